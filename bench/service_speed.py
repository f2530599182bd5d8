"""What Ray costs and buys: local vs 1 Ray worker, 1 vs 2 workers, submit-to-first-metric.

    python -m bench.service_speed [--steps 1500] [--skip-submit]

Protocol: the ring8 preset (PacGAN-size nets, batch 100 per worker), one torch thread per
process, ``train.steps`` steps with an evaluation every ``steps/3``; steps/s is the rate of the
LAST evaluation window (steady state: Ray's start-up is excluded, reported separately). All runs
happen in this one invocation, back to back, so their ratios are comparable.
  1. ``resources.backend=local`` (the plain loop + the service's outputs, no Ray)
  2. Ray Train, 1 worker        -> overhead ratio (bar: >= 0.90 x local)
  3. Ray Train, 2 workers (DDP) -> scaling: samples/s ratio 2 vs 1 worker (2 cores in all)
  4. ``ray job submit`` against ``deploy.local.stack`` -> seconds to the first progress line
Writes bench/out/service_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import machine, write_json

REPO = Path(__file__).resolve().parents[1]


def run_job(overrides: list[str], workdir: Path, tag: str) -> dict:
    summary = workdir / f"{tag}.json"
    cmd = [
        sys.executable,
        "-m",
        "services.train",
        "--config",
        "ring8",
        "--quiet",
        "--summary-json",
        str(summary),
        f"name={tag}",
        f"storage.uri={workdir / 'runs'}",
        "train.threads=1",
        *overrides,
    ]
    env = {**os.environ, "RAY_TMPDIR": str(workdir / "ray")}
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{proc.stderr[-3000:]}")
    data = json.loads(summary.read_text())
    return {
        "tag": tag,
        "steps_per_s": data["steps_per_s"],
        "wall_seconds": wall,
        "fit_seconds": data["wall_seconds"],
    }


def submit_latency(workdir: Path, steps: int) -> dict:
    """Seconds from `ray job submit` to the job's first progress line, on the local stack."""
    from deploy.local.stack import Ports, client_env, down, free_port, submit_line, up

    stack_dir = Path(tempfile.mkdtemp(prefix="rgst", dir="/tmp"))
    state = up(stack_dir, Ports(s3=free_port(), mlflow=free_port(), dashboard=free_port()))
    try:
        env = {**os.environ, **client_env(state)}
        words = shlex.split(submit_line(state))
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            *words[1:],
            f"train.steps={steps}",
            f"eval.every={max(steps // 4, 1)}",
            "name=submit-bench",
        ]
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO
        )
        first_metric = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if first_metric is None and "[raygan] step" in line:
                first_metric = time.perf_counter() - started
        proc.wait()
        return {
            "submit_to_first_metric_s": first_metric,
            "submit_to_exit_s": time.perf_counter() - started,
            "returncode": proc.returncode,
        }
    finally:
        down(stack_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--skip-submit", action="store_true")
    args = parser.parse_args(argv)
    every = max(args.steps // 3, 1)
    common = [
        f"train.steps={args.steps}",
        f"eval.every={every}",
        f"checkpoint.every={every}",
        "tracking.enabled=false",
    ]
    print("# service speed: local loop vs Ray Train (ring8 preset, batch 100 per worker)")
    print(f"protocol: {args.steps} steps, steps/s of the last eval window, 1 torch thread/process")
    with tempfile.TemporaryDirectory(prefix="rgbench") as tmp:
        workdir = Path(tmp)
        local = run_job([*common, "resources.backend=local"], workdir, "local")
        one = run_job([*common, "resources.num_workers=1"], workdir, "ray1")
        two = run_job([*common, "resources.num_workers=2"], workdir, "ray2")
        result = {
            "local": local,
            "ray_1_worker": one,
            "ray_2_workers": two,
            "ray_overhead_ratio": one["steps_per_s"] / local["steps_per_s"],
            "ddp_samples_per_s_ratio": 2 * two["steps_per_s"] / one["steps_per_s"],
            # With per-worker batch fixed, the extra time per step of 2 workers over 1 is the
            # gradient all-reduce plus contention for the 2 shared cores: an upper bound.
            "allreduce_upper_bound_ms": 1e3 * (1 / two["steps_per_s"] - 1 / one["steps_per_s"]),
        }
        if not args.skip_submit:
            result["submit"] = submit_latency(workdir, 200)
    print(
        f"local: {local['steps_per_s']:.1f} steps/s; Ray 1 worker: {one['steps_per_s']:.1f} "
        f"(ratio {result['ray_overhead_ratio']:.3f}, bar >= 0.90)"
    )
    print(
        f"Ray 2 workers: {two['steps_per_s']:.1f} steps/s per worker -> samples/s x"
        f"{result['ddp_samples_per_s_ratio']:.2f} vs 1 worker; per-step extra "
        f"{result['allreduce_upper_bound_ms']:.1f} ms (all-reduce + core contention)"
    )
    print(
        f"fit() wall incl. start-up: local {local['fit_seconds']:.0f} s, 1 worker "
        f"{one['fit_seconds']:.0f} s, 2 workers {two['fit_seconds']:.0f} s"
    )
    if "submit" in result:
        print(
            f"ray job submit -> first progress line: "
            f"{result['submit']['submit_to_first_metric_s']:.1f} s"
        )
    path = write_json("service_speed", {"protocol": vars(args), "machine": machine(), **result})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU throughput of the training step: fp32 vs bf16, the largest batch, TFLOP/s vs the card's peak.

    python -m bench.gpu                  # one CUDA GPU; estimated 3-4 min on an H100 (unmeasured)
    python -m bench.gpu --cpu-smoke      # tiny sizes on CPU: checks the code path, no real figures

Protocol (GPU): DCGAN-size nets on 3x32x32 images, built by gan_core from the stacked_digits
preset with the overrides printed below (G: z 100 -> 4x4x512 -> ConvTranspose + BN + ReLU up to
32x32x64 -> 3x3 conv + tanh; D: stride-2 convs 64-128-256 + LeakyReLU, linear head),
non-saturating loss, Adam, one D and one G update per step. Every step is
``gan_core.steps.train_step`` itself, so autocast, the GradScalers and channels_last are the
library's own code, including its per-step ``.item()`` of the metrics. Real batches are random
images made once on the device (data loading is not measured); noise is drawn as in training.
1. steps/s per variant (fp32, bf16, bf16 + channels_last, fp16; ``--compile`` adds bf16 +
   torch.compile) at each ``--batches`` size: ``--warmup`` steps, then ``--rounds`` rounds of
   ``--steps`` steps, each timed between two ``torch.cuda.synchronize()``; median over rounds.
2. FLOPs of one step with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convs,
   forward and backward; BN, activations and Adam are not counted); achieved TFLOP/s = FLOPs
   per step x steps/s, against the card's dense peak (NVIDIA datasheet figures, ``PEAKS``).
3. Largest batch per precision: double the batch from ``--batches[0]`` until CUDA runs out of
   memory (two steps at each size, so Adam's moments exist), up to ``--max-batch``.
4. A 1-GPU ``services.train`` smoke run (Ray Train, 1 worker, ``resources.use_gpu=true``) of the
   stacked_digits preset, ``--service-steps`` steps in bf16 + channels_last (``--no-service``
   skips it; with ``--cpu-smoke`` it runs only with ``--service``, as ``resources.backend=local``).
Partial results are printed as they come and bench/out/gpu.json (gpu_cpu_smoke.json) is
rewritten after every phase, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import machine, median, table, write_json

REPO = Path(__file__).resolve().parents[1]
PRESET = "stacked_digits"
IMAGE = (3, 32, 32)
# DCGAN (Radford et al.) sizes for 32x32: 64 base channels in G and D, z of 100.
DCGAN = ["generators.width=64", "discriminator.width=64", "generators.z_dim=100"]
CPU_SMOKE_IMAGE = (3, 8, 8)
CPU_SMOKE = ["generators.width=8", "discriminator.width=8", "generators.z_dim=16"]
VARIANTS: dict[str, list[str]] = {
    "fp32": ["train.precision=fp32"],
    "bf16": ["train.precision=bf16"],
    "bf16+channels_last": ["train.precision=bf16", "train.channels_last=true"],
    "fp16": ["train.precision=fp16"],
}
COMPILE_VARIANT = ("bf16+compile", ["train.precision=bf16", "train.compile=true"])

# Dense (no structured sparsity) peak TFLOP/s from NVIDIA's datasheets, as vendor spec figures:
# "bf16" tensor cores, "tf32" tensor cores (what fp32 convolutions use by default, since
# torch.backends.cudnn.allow_tf32 is True), "fp32" CUDA cores (fp32 matmuls by default).
# Matched as substrings of torch.cuda.get_device_name() in this order: specific names first.
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.5, "tf32": 494.5, "fp32": 66.9}),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H200 NVL", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.5, "tf32": 494.5, "fp32": 66.9}),  # SXM
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    # NVIDIA publishes no A10G datasheet (an AWS part): the A10's figures, an upper bound.
    ("A10G", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
]


def peak_for(name: str) -> tuple[str, dict[str, float]] | None:
    """The PEAKS row whose key is in the device name, or None for an unknown card."""
    for key, peaks in PEAKS:
        if key in name:
            return key, peaks
    return None


class Bench:
    """One device, one config family: builds models and times ``train_step`` on them."""

    def __init__(self, device: torch.device, shape: tuple[int, ...], base: list[str]) -> None:
        self.device, self.shape, self.base = device, shape, base
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def build(self, batch: int, overrides: list[str]) -> tuple[Any, Callable[[], dict]]:
        """A fresh model for ``batch`` and a function running one training step on it."""
        from gan_core.config import load_config
        from gan_core.steps import build_model, train_step

        cfg = load_config(PRESET, [*self.base, f"train.batch_size={batch}", *overrides])
        torch.manual_seed(0)
        model = build_model(cfg, self.shape, self.device)
        real = torch.rand(batch, *self.shape, device=self.device) * 2 - 1
        rng = torch.Generator().manual_seed(1)
        return model, lambda: train_step(model, lambda: real, rng, self.device)

    def steps_per_s(self, step: Callable[[], dict], n: int) -> float:
        self.sync()
        started = time.perf_counter()
        for _ in range(n):
            step()
        self.sync()
        return n / (time.perf_counter() - started)

    def flops(self, step: Callable[[], dict]) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        return int(counter.get_total_flops())

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    """CUDA's allocator OOM, or a cuDNN / cuBLAS workspace allocation that failed for memory."""
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)
    )


def time_variants(
    bench: Bench, args: argparse.Namespace, variants: dict[str, list[str]], peaks: dict | None
) -> list[dict[str, Any]]:
    rows = []
    for batch in args.batches:
        flops_eager: int | None = None
        for name, overrides in variants.items():
            row: dict[str, Any] = {"variant": name, "batch": batch}
            try:
                if bench.cuda:
                    torch.cuda.reset_peak_memory_stats(bench.device)
                build_started = time.perf_counter()
                model, step = bench.build(batch, overrides)
                bench.steps_per_s(step, args.warmup)  # includes any compilation
                row["warmup_s"] = time.perf_counter() - build_started
                rates = [bench.steps_per_s(step, args.steps) for _ in range(args.rounds)]
                row["steps_per_s"] = median(rates)
                row["rounds"] = rates
                # FlopCounterMode cannot see inside compiled graphs: the same arithmetic as
                # the eager variants, whose count is reused.
                if "compile" in name and flops_eager is not None:
                    row["flops_per_step"] = flops_eager
                else:
                    row["flops_per_step"] = bench.flops(step)
                    flops_eager = flops_eager or row["flops_per_step"]
                row["tflops"] = row["flops_per_step"] * row["steps_per_s"] / 1e12
                if peaks is not None:
                    # fp16's dense tensor-core peak equals bf16's on every card in PEAKS.
                    key = "fp32" if name.startswith("fp32") else "bf16"
                    row["pct_of_peak"] = 100 * row["tflops"] / peaks[key]
                    if key == "fp32":
                        row["pct_of_tf32_peak"] = 100 * row["tflops"] / peaks["tf32"]
                if bench.cuda:
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(bench.device) / 2**30
                del model, step
            except Exception as exc:  # one broken variant must not lose the others' figures
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            bench.free()
            rows.append(row)
            print(_row_line(row), flush=True)
    return rows


def _flops(value: float) -> str:
    """``value`` FLOP (or FLOP/s) with a unit that keeps three significant figures readable."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} "


def _row_line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"  {row['variant']:<20} batch {row['batch']:>6}: FAILED {row['error']}"
    pct = f", {row['pct_of_peak']:.2f} % of peak" if "pct_of_peak" in row else ""
    if "pct_of_tf32_peak" in row:
        pct += f" ({row['pct_of_tf32_peak']:.2f} % of TF32 peak)"
    mem = f", {row['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in row else ""
    return (
        f"  {row['variant']:<20} batch {row['batch']:>6}: {row['steps_per_s']:8.1f} steps/s, "
        f"{_flops(row['flops_per_step'])}FLOP/step, {_flops(row['tflops'] * 1e12)}FLOP/s{pct}{mem}"
    )


def largest_batch(bench: Bench, args: argparse.Namespace, precision: str) -> dict[str, Any]:
    """Doubling from the first timed batch until OOM or ``--max-batch``; two steps per size."""
    batch, fits, started = args.batches[0], 0, time.perf_counter()
    result: dict[str, Any] = {"precision": precision, "cap": args.max_batch}
    while batch <= args.max_batch:
        try:
            if bench.cuda:
                torch.cuda.reset_peak_memory_stats(bench.device)
            model, step = bench.build(batch, [f"train.precision={precision}"])
            t0 = time.perf_counter()
            step()
            step()
            bench.sync()
            result["step_s_at_largest"] = (time.perf_counter() - t0) / 2
            if bench.cuda:
                result["peak_mem_gib"] = torch.cuda.max_memory_allocated(bench.device) / 2**30
            fits = batch
            del model, step
        except Exception as exc:
            if _is_oom(exc):
                result["oom_at"] = batch
            else:  # keep what fitted so far and say why the search stopped
                result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            bench.free()
            break
        bench.free()
        print(f"  {precision}: batch {batch} fits", flush=True)
        # A time guard keeps a card that is slow for its memory inside the bench's budget.
        if time.perf_counter() - started > args.search_budget_s:
            result["stopped"] = f"time budget {args.search_budget_s} s"
            break
        batch *= 2
    result["largest_batch"] = fits
    return result


def service_smoke(args: argparse.Namespace, cpu: bool) -> dict[str, Any]:
    """``python -m services.train`` on one GPU worker (CPU smoke: the local backend, no Ray)."""
    steps = args.service_steps
    with tempfile.TemporaryDirectory(prefix="rggpu") as tmp:
        summary = Path(tmp) / "summary.json"
        device = (
            ["resources.backend=local", "train.threads=1"]
            if cpu
            else ["resources.use_gpu=true", "resources.num_workers=1"]
        )
        cmd = [
            sys.executable,
            "-m",
            "services.train",
            "--config",
            PRESET,
            "--quiet",
            "--summary-json",
            str(summary),
            f"name=gpu_smoke_{int(time.time())}",
            f"storage.uri={Path(tmp) / 'runs'}",
            *device,
            f"train.steps={steps}",
            f"eval.every={max(steps // 2, 1)}",
            f"checkpoint.every={steps}",
            "eval.samples=2600",
            "tracking.enabled=false",
            "train.precision=bf16",
            "train.channels_last=true",
        ]
        env = {**os.environ, "RAY_TMPDIR": str(Path(tmp) / "ray")}
        print("  $ " + " ".join(cmd[1:]), flush=True)
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=env,
                cwd=REPO,
                timeout=args.service_timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {args.service_timeout_s} s"}
        result: dict[str, Any] = {
            "ok": proc.returncode == 0,
            "returncode": proc.returncode,
            "wall_s": time.perf_counter() - started,
            "command": cmd[1:],
        }
        if summary.is_file():
            result["summary"] = json.loads(summary.read_text())
        if proc.returncode != 0:
            result["stderr_tail"] = proc.stderr[-3000:]
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--search-budget-s", type=float, default=60.0)
    parser.add_argument("--compile", action="store_true", help="add bf16 + torch.compile")
    parser.add_argument("--no-service", action="store_true")
    parser.add_argument("--service", action="store_true", help="with --cpu-smoke: run it too")
    parser.add_argument("--service-steps", type=int, default=None)
    parser.add_argument("--service-timeout-s", type=int, default=240)
    args = parser.parse_args(argv)

    cpu = args.cpu_smoke
    if not cpu and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --cpu-smoke here", file=sys.stderr)
        return 2
    if cpu:
        defaults = dict(batches=[16], warmup=2, steps=3, rounds=2, max_batch=64, service_steps=20)
    else:
        defaults = dict(
            batches=[256, 2048], warmup=15, steps=40, rounds=5, max_batch=2**17, service_steps=200
        )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if cpu:
        # One intra-op thread, as the other CPU benches: on a small shared machine, OpenMP
        # threads spinning against other processes make tiny ops 10-100x slower at random.
        torch.set_num_threads(1)
    device = torch.device("cpu" if cpu else "cuda")
    shape, base = (CPU_SMOKE_IMAGE, CPU_SMOKE) if cpu else (IMAGE, DCGAN)
    bench = Bench(device, shape, base)
    name = "cpu" if cpu else torch.cuda.get_device_name(device)
    found = None if cpu else peak_for(name)
    peaks = found[1] if found else None
    variants = dict(VARIANTS)
    if args.compile:
        variants[COMPILE_VARIANT[0]] = COMPILE_VARIANT[1]
    out_name = "gpu_cpu_smoke" if cpu else "gpu"

    print(f"# GPU path of the training step ({'CPU SMOKE: code path only' if cpu else name})")
    print(
        f"protocol: preset {PRESET} + {' '.join(base)}, images {'x'.join(map(str, shape))}, "
        f"batches {args.batches}, {args.warmup} warm-up steps, median of {args.rounds} rounds "
        f"x {args.steps} steps{', CUDA-synchronized' if bench.cuda else ', 1 CPU thread'}"
    )
    flags = {
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
    }
    print(f"torch {torch.__version__}; {flags}")
    if peaks is not None:
        print(f"peak (vendor datasheet, dense, '{found[0]}'): {peaks} TFLOP/s")
    elif not cpu:
        print(f"no peak figures for '{name}' in PEAKS: achieved TFLOP/s only")
    payload: dict[str, Any] = {
        "protocol": {**vars(args), "preset": PRESET, "overrides": base, "image": shape},
        "machine": {**machine(), "device": name, "torch_flags": flags},
        "peaks_tflops": peaks,
        "peaks_source": "NVIDIA datasheets, dense (no sparsity)" if peaks else None,
    }

    print("\n## 1-2. steps/s and achieved TFLOP/s per variant", flush=True)
    payload["variants"] = time_variants(bench, args, variants, peaks)
    write_json(out_name, payload)
    ok = [r for r in payload["variants"] if "error" not in r]
    if ok:
        print(
            table(
                ["variant", "batch", "steps/s", "achieved", "% of peak"],
                [
                    [
                        r["variant"],
                        r["batch"],
                        r["steps_per_s"],
                        _flops(r["tflops"] * 1e12) + "FLOP/s",
                        r.get("pct_of_peak", "-"),
                    ]
                    for r in ok
                ],
            )
        )
    for batch in args.batches:
        rate = {r["variant"]: r["steps_per_s"] for r in ok if r["batch"] == batch}
        if "fp32" in rate and "bf16" in rate:
            print(f"batch {batch}: bf16 / fp32 = {rate['bf16'] / rate['fp32']:.2f}x steps/s")

    print("\n## 3. largest batch that fits (doubling until out of memory)", flush=True)
    payload["largest_batch"] = []
    for precision in ("fp32", "bf16"):
        try:
            found_batch = largest_batch(bench, args, precision)
        except Exception as exc:
            found_batch = {"precision": precision, "error": f"{type(exc).__name__}: {exc}"[:300]}
        payload["largest_batch"].append(found_batch)
        print(f"  {precision}: {found_batch}", flush=True)
        write_json(out_name, payload)

    if (not cpu and not args.no_service) or (cpu and args.service):
        print("\n## 4. services.train smoke run", flush=True)
        payload["service_smoke"] = service_smoke(args, cpu)
        smoke = payload["service_smoke"]
        summary = smoke.get("summary", {})
        last = summary.get("metrics", {})
        shown = {k: last[k] for k in ("modes", "kl", "d_loss", "g_loss") if k in last}
        print(
            f"  ok={smoke['ok']} wall {smoke.get('wall_s', 0):.0f} s; status "
            f"{summary.get('status')}, {summary.get('steps')} steps, "
            f"{summary.get('steps_per_s')} steps/s (last window); last metrics {shown}"
        )
        if not smoke["ok"]:
            print(smoke.get("error") or smoke.get("stderr_tail", ""))
    path = write_json(out_name, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

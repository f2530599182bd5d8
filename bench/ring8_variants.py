"""Mode coverage of each remedy on ring-8 (or grid-25), same budget and seeds for all.

    python -m bench.ring8_variants [--data ring8|grid25] [--steps N] [--seeds 0 1 2] [--jobs 2]

Protocol (docs/PROTOCOLS.md section 1, PacGAN's definitions): 2,500 samples scored; a sample is
high quality within 3 std of its nearest mean; a mode is captured by >= 1 HQ sample; reverse
KL over nearest-mean assignments. Each variant is a preset (PacGAN-size nets unless the preset
says otherwise) plus the shared overrides printed below; median over seeds, one torch thread
per run, runs spread over ``--jobs`` processes. Writes bench/out/<data>_variants.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import OUT_DIR, machine, median, run_parallel, table, write_json

# Cheapest first, so an interrupted run has the most rows (unrolled k=5 costs ~7 plain steps).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "plain GAN": ("", []),
    "PacGAN2": ("_pacgan", []),
    "MAD-GAN N=4": ("_madgan", []),
    "minibatch disc. B=32": ("_minibatch", []),
    "WGAN-GP": ("_wgan_gp", []),
    "unrolled k=5": ("_unrolled", []),
}
# Overrides applied to every variant on top of its preset.
SHARED: list[str] = []  # the presets carry the budget: lr 2e-3 cosine-decayed, batch 100


def preset_for(data: str, suffix: str) -> str:
    from gan_core.config import preset_names

    name = f"{data}{suffix}"
    # grid-25 reuses the ring-8 remedy presets with its data and mode spacing swapped in.
    return name if name in preset_names() else f"ring8{suffix}"


def train_one(data: str, variant: str, seed: int, steps: int, extra: list[str]) -> dict:
    import torch

    torch.set_num_threads(1)
    from gan_core.config import load_config
    from gan_core.loop import GanRun

    suffix, overrides = VARIANTS[variant]
    cfg = load_config(
        preset_for(data, suffix),
        [
            f"data.name={data}",
            f"seed={seed}",
            f"train.steps={steps}",
            f"eval.every={steps}",
            "eval.samples=2500",
            *SHARED,
            *overrides,
            *extra,
        ],
    )
    wall, cpu = time.perf_counter(), time.process_time()
    history = GanRun(cfg).run()
    final = history[-1]
    return {
        "variant": variant,
        "seed": seed,
        "steps": steps,
        "modes": final["modes"],
        "hq_pct": final["hq_pct"],
        "reverse_kl": final["reverse_kl"],
        "cpu_seconds": time.process_time() - cpu,
        "wall_seconds": time.perf_counter() - wall,
    }


def _load_done(path: Path, steps: int, overrides: list[str]) -> dict[tuple[str, int], dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {
        (r["variant"], r["seed"]): r
        for r in rows
        if r["steps"] == steps and r.get("overrides") == overrides
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="ring8", choices=["ring8", "grid25"])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value for every run")
    args = parser.parse_args(argv)

    print(f"# {args.data}: mode coverage per remedy (PacGAN protocol, docs/PROTOCOLS.md section 1)")
    print(f"budget: {args.steps} G steps, batch 100, seeds {args.seeds}, median over seeds")
    print(f"shared overrides: {' '.join(SHARED + args.set)}")
    print(f"machine: {machine()}", flush=True)
    # Finished runs are appended to a JSONL file as they complete; a rerun with the same
    # budget and overrides reuses them instead of training again (an interrupted bench resumes).
    log_path = OUT_DIR / f"{args.data}_variants.runs.jsonl"
    done = _load_done(log_path, args.steps, SHARED + args.set)
    jobs = [
        (args.data, v, s, args.steps, args.set)
        for v in args.variants
        for s in args.seeds
        if (v, s) not in done
    ]
    print(f"runs: {len(jobs)} to train, {len(done)} reused from {log_path}", flush=True)
    started = time.perf_counter()

    def record(result: dict) -> None:
        result["overrides"] = SHARED + args.set
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as fh:
            fh.write(json.dumps(result) + "\n")
        print(
            f"  {result['variant']} seed {result['seed']}: modes {result['modes']:.0f} "
            f"HQ {result['hq_pct']:.1f} rKL {result['reverse_kl']:.3f} "
            f"({result['cpu_seconds']:.0f} CPU s)",
            flush=True,
        )

    results = run_parallel(train_one, jobs, args.jobs, on_result=record)
    results += [done[(v, s)] for v in args.variants for s in args.seeds if (v, s) in done]
    rows = []
    for variant in args.variants:
        runs = [r for r in results if r["variant"] == variant]
        rows.append(
            [
                variant,
                median(r["modes"] for r in runs),
                median(r["hq_pct"] for r in runs),
                median(r["reverse_kl"] for r in runs),
                " / ".join(f"{r['modes']:.0f}" for r in runs),
                median(r["cpu_seconds"] for r in runs),
            ]
        )
    headers = [
        "variant",
        "modes (median)",
        "HQ % (median)",
        "rKL (median)",
        "modes per seed",
        "CPU s per run",
    ]
    print(table(headers, rows))
    print(f"total wall: {time.perf_counter() - started:.0f} s")
    path = write_json(
        f"{args.data}_variants",
        {
            "protocol": {
                "data": args.data,
                "steps": args.steps,
                "seeds": args.seeds,
                "shared_overrides": SHARED + args.set,
                "samples": 2500,
            },
            "machine": machine(),
            "runs": results,
            "summary": [dict(zip(headers, row, strict=True)) for row in rows],
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

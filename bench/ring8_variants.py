"""Mode coverage of each remedy on ring-8 (or grid-25), same budget and seeds for all.

    python -m bench.ring8_variants [--data ring8|grid25] [--steps N] [--seeds 0 1 2] [--jobs 2]

Protocol (docs/PROTOCOLS.md section 1, PacGAN's definitions): 2,500 samples scored; a sample is
high quality within 3 std of its nearest mean; a mode is captured by >= 1 HQ sample; reverse
KL over nearest-mean assignments. Each variant is a preset (PacGAN-size nets unless the preset
says otherwise) plus the shared overrides printed below; median over seeds, one torch thread
per run, runs spread over ``--jobs`` processes. Writes bench/out/<data>_variants.json: the runs
of this invocation merged with the runs already recorded there (and in the uncommitted run log
bench/out/<data>_variants.runs.jsonl) under the same budget and overrides, so running a few
variants keeps the other variants' rows. A variant whose preset does not exist (yet) is left out
of the default list.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import OUT_DIR, machine, median, run_parallel, table, write_json

# Cheapest first, so an interrupted run has the most rows (unrolled k=5 costs ~7 plain steps).
# The value is the preset's suffix (see preset_for) and overrides on top of it; rows are named
# after their preset's settings.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "plain GAN": ("", []),
    "PacGAN2": ("_pacgan", []),
    "MAD-GAN N=4": ("_madgan", []),
    "MAD-GAN-Sim N=4": ("_madgan_sim", []),
    "MRGAN": ("_mrgan", []),
    "MRGAN + manifold-diffusion": ("_mrgan_diffusion", []),
    "minibatch disc. B=32": ("_minibatch", []),
    "WGAN (clip 0.01, n_critic 5, RMSProp)": ("_wgan", []),
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


def available(data: str, variant: str) -> bool:
    """Whether the variant's preset exists (a row can be listed before its preset is written)."""
    from gan_core.config import preset_names

    return preset_for(data, VARIANTS[variant][0]) in preset_names()


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


def _load_recorded(
    path: Path, data: str, steps: int, overrides: list[str]
) -> dict[tuple[str, int], dict]:
    """The runs of an earlier <data>_variants.json (committed, unlike the run log) under the
    same data, budget and overrides; each keeps the machine that trained it."""
    if not path.is_file():
        return {}
    payload = json.loads(path.read_text())
    protocol = payload.get("protocol", {})
    if protocol.get("data", data) != data:
        return {}
    done = {}
    for r in payload.get("runs", []):
        if (
            r["steps"] == steps
            and r.get("overrides", protocol.get("shared_overrides")) == overrides
        ):
            done[(r["variant"], r["seed"])] = {"machine": payload.get("machine"), **r}
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="ring8", choices=["ring8", "grid25"])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value for every run")
    args = parser.parse_args(argv)
    missing = [v for v in args.variants or [] if not available(args.data, v)]
    if missing:
        parser.error(
            f"no preset for {missing}: {[preset_for(args.data, VARIANTS[v][0]) for v in missing]}"
        )
    if args.variants is None:
        args.variants = [v for v in VARIANTS if available(args.data, v)]
        skipped = [v for v in VARIANTS if v not in args.variants]
        if skipped:
            print(f"left out (no preset yet): {', '.join(skipped)}")

    print(f"# {args.data}: mode coverage per remedy (PacGAN protocol, docs/PROTOCOLS.md section 1)")
    print(f"budget: {args.steps} G steps, batch 100, seeds {args.seeds}, median over seeds")
    print(f"shared overrides: {' '.join(SHARED + args.set)}")
    # Taken before any run: the code a run trains with is imported at its start, so a commit
    # made meanwhile is not the run's (machine() at the end of a run would name it).
    started_on = machine()
    print(f"machine: {started_on}", flush=True)
    # Finished runs are appended to a JSONL file as they complete; a rerun with the same
    # budget and overrides reuses them instead of training again (an interrupted bench resumes).
    log_path = OUT_DIR / f"{args.data}_variants.runs.jsonl"
    json_path = OUT_DIR / f"{args.data}_variants.json"
    # The committed JSON first, the run log over it: the log holds this machine's newer runs.
    done = {
        **_load_recorded(json_path, args.data, args.steps, SHARED + args.set),
        **_load_done(log_path, args.steps, SHARED + args.set),
    }
    jobs = [
        (args.data, v, s, args.steps, args.set)
        for v in args.variants
        for s in args.seeds
        if (v, s) not in done
    ]
    print(
        f"runs: {len(jobs)} to train, {len(done)} recorded ({log_path}, {json_path})",
        flush=True,
    )
    started = time.perf_counter()

    def record(result: dict) -> None:
        result["overrides"] = SHARED + args.set
        result["machine"] = started_on
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
    done.update({(r["variant"], r["seed"]): r for r in results})
    # Every recorded variant is written, not only this invocation's: known variants in VARIANTS'
    # order, then any recorded under a name no longer listed (kept, not dropped). The JSON keeps
    # every recorded run; a requested variant's row is the median over the requested seeds,
    # another variant's over the seeds it was recorded with.
    recorded = list(dict.fromkeys(v for v, _ in done))
    shown = [v for v in VARIANTS if v in recorded] + [v for v in recorded if v not in VARIANTS]
    results = [r for v in shown for k, r in sorted(done.items()) if k[0] == v]
    rows, row_seeds = [], []
    for variant in shown:
        runs = [
            r
            for r in results
            if r["variant"] == variant and (variant not in args.variants or r["seed"] in args.seeds)
        ]
        if not runs:
            continue
        row_seeds.append([r["seed"] for r in runs])
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
                # This invocation's; each summary row names the seeds of its median.
                "seeds": args.seeds,
                "shared_overrides": SHARED + args.set,
                "samples": 2500,
            },
            "machine": machine(),
            "runs": results,
            "summary": [
                {**dict(zip(headers, row, strict=True)), "seeds": seeds}
                for row, seeds in zip(rows, row_seeds, strict=True)
            ],
        },
        json_path.parent,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Is the loss a convergence signal? D/G losses and the WGAN critic's estimate against coverage.

    python -m bench.convergence [--steps 6000] [--every 250] [--seeds 0] [--jobs 1] [--plot-only]

The seed chapter's claim: a minimax GAN's D and G losses do not fall as training progresses and
say little about sample quality, while a WGAN critic's estimate of the Wasserstein distance,
E[D(x)] - E[D(G(z))], falls as the samples improve. Each objective below trains on ring-8 under
PacGAN's protocol (docs/PROTOCOLS.md section 1: 2,500 samples, HQ = within 3 std of the nearest
mean, a mode is captured by >= 1 HQ sample, reverse KL over nearest-mean assignments), evaluated
every ``--every`` steps. At each evaluation raygan logs d_loss / g_loss (and for WGAN the
estimate) as means over the steps since the previous one (gan_core/loop.py). The summary is the
Spearman rank correlation over the evaluations of each signal with reverse KL, HQ % and the step:
a signal that tracks convergence in the claim's sense rises and falls with reverse KL (rho > 0)
and against HQ % (rho < 0). One torch thread per run, runs spread over ``--jobs`` processes.
Writes bench/out/convergence.json and docs/results/convergence.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import OUT_DIR, machine, run_parallel, write_json

ROOT = Path(__file__).resolve().parent.parent
FIGURE = ROOT / "docs" / "results" / "convergence.png"
JSON_NAME = "convergence"
SAMPLES = 2500

# name -> (label, preset, overrides); the figure's columns in this order.
CONFIGS: dict[str, tuple[str, str, list[str]]] = {
    "minimax": ("GAN, minimax (the chapter's game)", "ring8", ["objective.name=minimax"]),
    "nonsaturating": ("GAN, non-saturating G loss", "ring8", []),
    "wgan": ("WGAN (clip 0.01, n_critic 5, RMSProp)", "ring8_wgan", []),
    "wgan_gp": ("WGAN-GP (weight 0.1, n_critic 5)", "ring8_wgan_gp", []),
}
SIGNALS = ("d_loss", "g_loss", "wasserstein")
# What a signal is compared with: sample quality (two views of it) and plain training time.
TARGETS = ("reverse_kl", "hq_pct", "step")


def train_one(name: str, seed: int, steps: int, every: int, extra: list[str]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from gan_core.config import load_config
    from gan_core.loop import GanRun

    _, preset, overrides = CONFIGS[name]
    cfg = load_config(
        preset,
        [
            f"seed={seed}",
            f"train.steps={steps}",
            f"eval.every={every}",
            f"eval.samples={SAMPLES}",
            *overrides,
            *extra,
        ],
    )
    wall, cpu = time.perf_counter(), time.process_time()
    history = GanRun(cfg).run()
    return {
        "config": name,
        "seed": seed,
        "cpu_seconds": time.process_time() - cpu,
        "wall_seconds": time.perf_counter() - wall,
        "history": [{k: float(v) for k, v in h.items()} for h in history],
    }


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation of the pairs where both values are finite; NaN with fewer
    than 3 such pairs or when either side is constant (no ranking to correlate)."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return float("nan")
    rx, ry = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sxy / math.sqrt(sxx * syy)


def correlations(history: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Spearman's rho over the evaluations of ``history`` between every logged signal and every
    target: {signal: {target: rho}}."""
    out = {}
    for signal in SIGNALS:
        if not history or signal not in history[0]:
            continue
        xs = [h.get(signal, float("nan")) for h in history]
        out[signal] = {t: spearman(xs, [h.get(t, float("nan")) for h in history]) for t in TARGETS}
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per signal and target, rho per seed and the median over seeds; each signal's value at
    the first and the last evaluation (median over seeds); the final coverage."""
    per_seed = [correlations(r["history"]) for r in runs]
    rho: dict[str, dict[str, dict[str, Any]]] = {}
    for signal in per_seed[0] if per_seed else {}:
        rho[signal] = {}
        for target in TARGETS:
            values = [c[signal][target] for c in per_seed]
            finite = [v for v in values if math.isfinite(v)]
            rho[signal][target] = {
                "median": statistics.median(finite) if finite else float("nan"),
                "per_seed": values,
            }

    def at(index: int, key: str) -> float:
        return statistics.median(r["history"][index].get(key, float("nan")) for r in runs)

    keys = [s for s in SIGNALS if s in rho] + ["modes", "hq_pct", "reverse_kl"]
    return {
        "rho": rho,
        "first": {k: at(0, k) for k in keys},
        "last": {k: at(-1, k) for k in keys},
        # Each quality metric's lowest and highest value over the evaluations (median over
        # seeds): a metric that hardly moves cannot rank the signals.
        "range": {
            k: [
                statistics.median(min(e[k] for e in r["history"]) for r in runs),
                statistics.median(max(e[k] for e in r["history"]) for r in runs),
            ]
            for k in ("hq_pct", "reverse_kl")
        },
        # Quality's own trajectory: the rank correlation of reverse KL with the step.
        "reverse_kl_vs_step": statistics.median(
            spearman([h["step"] for h in r["history"]], [h["reverse_kl"] for h in r["history"]])
            for r in runs
        ),
    }


def plot(configs: dict[str, dict[str, Any]], path: Path) -> Path:
    """One column per config (its ``runs``' histories, one line per seed), rows: D and G losses;
    the critic's Wasserstein estimate (WGAN objectives only); modes and HQ % with reverse KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(configs)
    # One reverse-KL range for every column, so the columns compare at a glance.
    rkls = [
        max(e["reverse_kl"], 1e-4)
        for c in configs.values()
        for r in c["runs"]
        for e in r["history"]
        if math.isfinite(e["reverse_kl"])
    ]
    fig, axes = plt.subplots(
        3, len(names), figsize=(4.2 * len(names), 9.0), sharex=True, squeeze=False
    )
    for col, name in enumerate(names):
        runs = configs[name]["runs"]
        loss_ax, w_ax, cov_ax = axes[0][col], axes[1][col], axes[2][col]
        loss_ax.set_title(configs[name].get("label", name), fontsize=10)
        rkl_ax = cov_ax.twinx()
        has_w = False
        for i, run in enumerate(runs):
            h = run["history"]
            steps = [e["step"] for e in h]
            alpha = 1.0 if i == 0 else 0.45
            seed = f" (seed {run.get('seed', i)})" if len(runs) > 1 else ""
            first = i == 0
            loss_ax.plot(
                steps,
                [e["d_loss"] for e in h],
                "C0",
                alpha=alpha,
                label="D loss" if first else None,
            )
            loss_ax.plot(
                steps,
                [e["g_loss"] for e in h],
                "C1",
                alpha=alpha,
                label="G loss" if first else None,
            )
            if "wasserstein" in h[0]:
                has_w = True
                w_ax.plot(
                    steps,
                    [e["wasserstein"] for e in h],
                    "C2",
                    alpha=alpha,
                    label="E[D(x)] - E[D(G(z))]" + seed,
                )
            cov_ax.plot(
                steps, [e["hq_pct"] for e in h], "C3", alpha=alpha, label="HQ %" if first else None
            )
            cov_ax.plot(
                steps,
                [100 * e["modes"] / 8 for e in h],
                "C4",
                alpha=alpha,
                label="modes (% of 8)" if first else None,
            )
            rkl_ax.plot(
                steps,
                [max(e["reverse_kl"], 1e-4) for e in h],
                "k--",
                alpha=alpha,
                label="reverse KL" if first else None,
            )
        loss_ax.legend(fontsize=8)
        loss_ax.set_ylabel("loss (mean since last eval)" if col == 0 else "")
        if has_w:
            w_ax.legend(fontsize=8)
            w_ax.set_ylabel("critic's Wasserstein estimate" if col == 0 else "")
        else:
            w_ax.text(
                0.5,
                0.5,
                "no critic estimate\n(not a WGAN objective)",
                ha="center",
                va="center",
                transform=w_ax.transAxes,
                color="0.4",
            )
            w_ax.set_yticks([])
        cov_ax.set_ylim(0, 105)
        cov_ax.set_xlabel("generator step")
        cov_ax.set_ylabel("%" if col == 0 else "")
        rkl_ax.set_yscale("log")
        if rkls:
            rkl_ax.set_ylim(min(rkls) / 1.5, max(rkls) * 1.5)
        rkl_ax.set_ylabel("reverse KL (log)" if col == len(names) - 1 else "")
        lines = cov_ax.get_legend_handles_labels()
        more = rkl_ax.get_legend_handles_labels()
        cov_ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    fig.suptitle("ring-8: training signals against mode coverage (PacGAN protocol)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _fmt_rho(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:+.2f}"


def summary_table(configs: dict[str, dict[str, Any]]) -> str:
    """Markdown: one line per (config, signal) with the median rho over seeds per target."""
    lines = [
        "| objective | signal | first eval | last eval | rho vs reverse KL | rho vs HQ % "
        "| rho vs step |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in configs.values():
        s = entry["summary"]
        for signal, by_target in s["rho"].items():
            cells = [_fmt_rho(by_target[t]["median"]) for t in TARGETS]
            lines.append(
                f"| {entry['label']} | {signal} | {s['first'][signal]:.4g} | "
                f"{s['last'][signal]:.4g} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def _protocol(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "data": "ring8",
        "steps": args.steps,
        "every": args.every,
        "seeds": args.seeds,
        "samples": SAMPLES,
        "extra_overrides": args.set,
        "configs": {n: {"preset": p, "overrides": o} for n, (_, p, o) in CONFIGS.items()},
    }


def _reusable(path: Path, protocol: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """Runs recorded in an earlier convergence.json under the same budget, evaluation interval,
    overrides and config (so an interrupted bench resumes, and ``--plot-only`` redraws)."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    p = old.get("protocol", {})
    same = ("steps", "every", "samples", "extra_overrides")
    if any(p.get(k) != protocol[k] for k in same):
        return {}
    done = {}
    for name, entry in old.get("configs", {}).items():
        if p.get("configs", {}).get(name) != protocol["configs"].get(name):
            continue
        for run in entry.get("runs", []):
            done[(name, run["seed"])] = run
    return done


def _payload(
    protocol: dict[str, Any], done: dict[tuple[str, int], dict[str, Any]], names: list[str]
) -> dict[str, Any]:
    configs = {}
    for name in names:
        runs = [done[(name, s)] for s in protocol["seeds"] if (name, s) in done]
        if runs:
            configs[name] = {
                "label": CONFIGS[name][0],
                "runs": runs,
                "summary": summarise(runs),
            }
    return {"protocol": protocol, "machine": machine(), "configs": configs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value for every run")
    parser.add_argument("--plot-only", action="store_true", help="redraw from the JSON, no runs")
    parser.add_argument("--out", default=str(OUT_DIR), help="folder of convergence.json")
    parser.add_argument("--figure", default=str(FIGURE))
    args = parser.parse_args(argv)

    print("# ring-8: the loss as a convergence signal (PacGAN protocol, docs/PROTOCOLS.md s. 1)")
    print(f"budget: {args.steps} G steps, batch 100, evaluation every {args.every} steps on")
    print(f"  {SAMPLES} samples (modes, HQ %, reverse KL); seeds {args.seeds}")
    for name in args.configs:
        label, preset, overrides = CONFIGS[name]
        print(f"  {name}: {label}: preset {preset} {' '.join(overrides + args.set)}")
    print("signals: d_loss, g_loss (means over the steps since the previous evaluation),")
    print("  wasserstein = E[D(x)] - E[D(G(z))] for WGAN; summary: Spearman rho over evaluations")
    # Taken before any run: the code a run trains with is imported at its start, so a commit
    # made meanwhile is not the run's (machine() at the end of a run would name it).
    started_on = machine()
    print(f"machine: {started_on}", flush=True)

    out_dir = Path(args.out)
    json_path = out_dir / f"{JSON_NAME}.json"
    protocol = _protocol(args)
    done = _reusable(json_path, protocol)
    jobs = [
        (n, s, args.steps, args.every, args.set)
        for n in args.configs
        for s in args.seeds
        if (n, s) not in done
    ]
    if args.plot_only:
        jobs = []
    print(f"runs: {len(jobs)} to train, {len(done)} reused from {json_path}", flush=True)
    started = time.perf_counter()

    def record(result: dict[str, Any]) -> None:
        # Per run: a reused run keeps the commit and CPU of the invocation that trained it.
        result["machine"] = started_on
        done[(result["config"], result["seed"])] = result
        last = result["history"][-1]
        print(
            f"  {result['config']} seed {result['seed']}: modes {last['modes']:.0f} "
            f"HQ {last['hq_pct']:.1f} rKL {last['reverse_kl']:.3f} "
            f"({result['cpu_seconds']:.0f} CPU s)",
            flush=True,
        )
        # Written after every run, so an interrupted bench resumes from the finished ones.
        write_json(JSON_NAME, _payload(protocol, done, args.configs), out_dir)

    run_parallel(train_one, jobs, args.jobs, on_result=record)
    payload = _payload(protocol, done, args.configs)
    if not payload["configs"]:
        print("nothing recorded for this protocol", file=sys.stderr)
        return 1
    print(summary_table(payload["configs"]))
    for entry in payload["configs"].values():
        s = entry["summary"]
        print(
            f"{entry['label']}: reverse KL {s['first']['reverse_kl']:.3f} -> "
            f"{s['last']['reverse_kl']:.3f}, HQ {s['first']['hq_pct']:.1f} -> "
            f"{s['last']['hq_pct']:.1f} %, modes {s['first']['modes']:.0f} -> "
            f"{s['last']['modes']:.0f}; rho(reverse KL, step) {s['reverse_kl_vs_step']:+.2f}; "
            f"reverse KL range {s['range']['reverse_kl'][0]:.3f}-{s['range']['reverse_kl'][1]:.3f}"
        )
    # Rewritten without training too (--plot-only): the summary is recomputed from the runs.
    payload["trained"], payload["wall_seconds"] = len(jobs), time.perf_counter() - started
    path = write_json(JSON_NAME, payload, out_dir)
    print(f"wrote {path}")
    figure = plot(payload["configs"], Path(args.figure))
    print(f"wrote {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

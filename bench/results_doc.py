"""Summaries and the markdown of docs/RESULTS.md for ``python -m bench`` (bench/reproduce.py).

The published figures are copied from docs/PROTOCOLS.md (which cites each paper's table) and never
edited; our rows sit beside them, each with its own protocol note where it differs.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

# (method, modes, HQ %, reverse KL) per mixture; PacGAN Table 1, mean over 10 runs.
PUBLISHED_MIXTURES: dict[str, list[tuple[str, str, str, str]]] = {
    "ring8": [
        ("GAN (PacGAN Table 1)", "6.3 +- 0.5", "98.2 +- 0.2", "0.45"),
        ("ALI (PacGAN Table 1)", "6.6", "97.6", "0.36"),
        ("PacGAN2 (PacGAN Table 1)", "7.9 +- 0.1", "95.6 +- 2.0", "0.07"),
        ("PacGAN4 (PacGAN Table 1)", "7.8 +- 0.1", "95.9 +- 1.4", "0.07"),
        ("Unrolled GAN, 5 steps (VEEGAN Table 1, other setup)", "7.6", "35.6", "-"),
        ("WGAN-GP (GDPP Table 1, other setup)", "6.8", "59.6", "-"),
    ],
    "grid25": [
        ("GAN (PacGAN Table 1)", "17.3 +- 0.8", "94.8 +- 0.7", "0.70"),
        ("ALI (PacGAN Table 1)", "24.1", "95.7", "0.14"),
        ("PacGAN2 (PacGAN Table 1)", "23.8 +- 0.7", "91.3 +- 0.8", "0.13"),
        ("PacGAN4 (PacGAN Table 1)", "24.8 +- 0.2", "93.6 +- 0.6", "0.04"),
        ("Unrolled GAN, 5 steps (VEEGAN Table 1, other setup)", "23.6", "16", "-"),
        ("WGAN-GP (GDPP Table 1, other setup)", "24.2", "28.7", "-"),
    ],
}
# (setting, method, modes, KL) on Stacked MNIST (28x28; ours is stacked 8x8 digits).
PUBLISHED_STACKED: list[tuple[str, str, str, str]] = [
    ("VEEGAN Table 2", "DCGAN", "99", "3.4"),
    ("VEEGAN Table 2", "Unrolled GAN", "48.7", "4.32"),
    ("VEEGAN Table 2", "VEEGAN", "150", "2.95"),
    ("PacGAN Table 2 (VEEGAN setting)", "PacDCGAN2", "1000", "0.06"),
    ("GDPP Table 3", "WGAN-GP", "995", "0.148"),
    ("GDPP Table 3", "GDPP", "1000", "0.135"),
]
# Unrolled GAN paper Table 2 (Stacked MNIST): modes / KL per unroll depth 0, 1, 5, 10.
PUBLISHED_UNROLL: dict[str, list[tuple[str, str]]] = {
    "1/4": [("30.6", "5.99"), ("65.4", "5.91"), ("236.4", "4.67"), ("327.2", "4.66")],
    "1/2": [("628.0", "2.58"), ("523.6", "2.44"), ("732.0", "1.66"), ("817.4", "1.43")],
}
DEPTHS = (0, 1, 5, 10)

# The bars of issue 7 / docs/PROTOCOLS.md, checked on the medians over seeds.
BARS: dict[str, dict[str, tuple[str, float]]] = {
    "ring8": {"modes": (">=", 8), "hq_pct": (">=", 95.0), "reverse_kl": ("<=", 0.05)},
    "grid25": {"modes": (">=", 25), "hq_pct": (">=", 95.0), "reverse_kl": ("<=", 0.05)},
    "stacked": {"modes": (">=", 1000), "kl": ("<=", 0.05)},
}
METRICS = {
    "ring8": ("modes", "hq_pct", "reverse_kl"),
    "grid25": ("modes", "hq_pct", "reverse_kl"),
    "stacked": ("modes", "kl"),
    "unroll": ("modes", "kl"),
    "fashion": ("modes", "kl", "fd"),
}
NAMES = {"modes": "modes", "hq_pct": "HQ %", "reverse_kl": "rKL", "kl": "KL", "fd": "FD"}


# The hand search behind the best configs (single-seed runs recorded when they were chosen),
# appended to the generated document as written.
SEARCH_NOTES = Path(__file__).with_name("search_notes.md")


def summarise(rows: list[Any], results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Median and range of each metric over a row's seeds, the bar verdict and the picture of
    the median run."""
    summary = []
    for row in rows:
        runs = results[row.key]
        stats: dict[str, dict[str, float]] = {}
        for name in METRICS[row.suite]:
            values = [r["metrics"][name] for r in runs]
            stats[name] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "values": values,
            }
        # The median run: the one ranked in the middle by (modes, HQ, or -FD where there is
        # one, else -KL).
        second = "hq_pct" if "hq_pct" in stats else "fd" if "fd" in stats else "kl"
        sign = 1.0 if second == "hq_pct" else -1.0
        ranked = sorted(runs, key=lambda r: (r["metrics"]["modes"], sign * r["metrics"][second]))
        middle = ranked[(len(ranked) - 1) // 2]
        summary.append(
            {
                "suite": row.suite,
                "key": row.key,
                "label": row.label,
                "preset": row.preset,
                "overrides": list(row.overrides),
                "steps": row.steps,
                "seeds": list(row.seeds),
                "note": row.note,
                "stats": stats,
                "bar": check_bar(row.suite, stats) if row.key.endswith("_best") else None,
                "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
                "picture": middle["picture"],
                "picture_seed": middle["seed"],
            }
        )
    return summary


def check_bar(suite: str, stats: dict[str, dict[str, float]]) -> dict[str, Any] | None:
    """Whether the medians meet the suite's bar, metric by metric; None when it has none."""
    bars = BARS.get(suite)
    if bars is None:
        return None
    checks = {}
    for name, (op, limit) in bars.items():
        value = stats[name]["median"]
        checks[name] = value >= limit if op == ">=" else value <= limit
    return {"met": all(checks.values()), "checks": checks}


def _fmt(name: str, value: float) -> str:
    if name == "modes":
        return f"{value:.0f}" if value == int(value) else f"{value:.1f}"
    if name in ("hq_pct", "fd"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def _cell(name: str, stat: dict[str, float]) -> str:
    if stat["min"] == stat["max"]:
        return _fmt(name, stat["median"])
    return f"{_fmt(name, stat['median'])} ({_fmt(name, stat['min'])}-{_fmt(name, stat['max'])})"


def protocol_text(quick: bool) -> str:
    seeds = (
        "1 seed (0)"
        if quick
        else "5 seeds (0-4) for the best configs, 3 (0-2) for the plain rows, median (min-max)"
    )
    return "\n".join(
        [
            "# raygan reproduction of the published mode-coverage tables"
            + (" (--quick: short budgets, not the bars' protocol)" if quick else ""),
            "ring-8 / grid-25: PacGAN's protocol (docs/PROTOCOLS.md, section 1): 2,500 samples, "
            "HQ = within 3 std of the nearest mean, mode captured by >= 1 HQ sample, reverse KL "
            f"over nearest-mean assignments; {seeds}",
            "stacked digits: three 8x8 digits as channels (1,000 modes), modes and KL(generated "
            f"|| uniform) over 26,000 samples, labelled by the shipped digit classifier; {seeds}",
            "unroll table: unroll depth 0/1/5/10, D with 1/4 and 1/2 of G's base channels, "
            "stacked digits, 1 seed (0)",
            "Fashion-MNIST: the 60,000 training images (28x28, padded to 32x32 with 2 px of "
            "black), DCGAN nets, plain beside the best config at the same steps; 5,000 generated "
            "samples against 5,000 real training images, scored by a classifier trained on the "
            "data set's own labels (gan_core/file_eval.py): classes covered (modes, of 10), "
            "KL(generated classes || real class frequencies) and the Frechet distance (FD) in "
            "its 128-d penultimate features; 1 seed (0)",
            "one process per run, one torch thread each; CPU s = process time of the training",
            "Ray Tune is used where it helps, to search the knobs (`tuning.sweep`, whose report "
            "chose the best configs below); these fixed runs are not a search, and as Tune "
            "trials each run would pay a Ray Train start-up on the same 2 cores "
            "(`bench.service_speed`: 44 s against 23 s of wall time for one 600-step job), so a "
            "process pool trains them",
        ]
    )


def console_tables(summary: list[dict[str, Any]]) -> str:
    lines = []
    for item in summary:
        cells = " | ".join(f"{NAMES[n]} {_cell(n, s)}" for n, s in item["stats"].items())
        bar = ""
        if item["bar"] is not None:
            bar = " | bar met" if item["bar"]["met"] else " | bar NOT met"
        lines.append(
            f"{item['suite']:8s} {item['label']:30s} | {cells} | {item['steps']} steps | "
            f"{item['cpu_seconds']:.0f} CPU s/run{bar}"
        )
    return "\n".join(lines)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _config_text(item: dict[str, Any]) -> str:
    overrides = " ".join(item["overrides"]) or "(preset as is)"
    return f"`{item['preset']}` {overrides}"


def render(payload: dict[str, Any]) -> str:
    """docs/RESULTS.md: protocol, machine, our rows beside the published ones, pictures."""
    summary = payload["rows"]
    m = payload["machine"]
    quick = payload["quick"]
    cpu = sum(r["cpu_seconds"] for r in payload["runs"])
    jobs = max(1, int(payload.get("jobs", 2)))
    out = [
        "# Results: mode coverage against the published numbers",
        "",
        "Generated by `python -m bench"
        + (" --quick`" if quick else "` (`make bench`)")
        + f" at commit `{m['commit']}` on {m['date']}; this invocation's machine: "
        f"{m['cores']} cores ({m['cpu']}), Python {m['python']}, torch {m['torch']}. The runs "
        "below took "
        f"{cpu:.0f} CPU s of training in all (a fresh run, {jobs} at once, needs about "
        f"{cpu / jobs / 60:.0f} min of wall time); the last invocation trained "
        f"{payload['trained']} of them in {payload['wall_seconds']:.0f} s of wall time (the "
        "others were recorded by an earlier invocation of the same config and reused, see "
        "bench/reproduce.py; a reused run keeps the numbers and CPU seconds of the machine "
        "that trained it: a seed trains to other numbers, at another speed, on another CPU, "
        "see 'Hosts' at the end). Do not edit by hand: rerun the command.",
        "",
        "Protocol:",
        "",
    ]
    out += [f"- {line}" for line in protocol_text(quick).splitlines()[1:]]
    if quick:
        out += [
            "",
            "**--quick uses short budgets and one seed: its rows are a smoke test of the "
            "pipeline, not a claim about the bars (see docs/RESULTS.md).**",
        ]
    for suite, title in (("ring8", "ring-8"), ("grid25", "grid-25")):
        items = [s for s in summary if s["suite"] == suite]
        if not items:
            continue
        out += ["", f"## {title}", ""]
        rows = []
        for item in items:
            st = item["stats"]
            bar = (
                ""
                if item["bar"] is None
                else (" (bar met)" if item["bar"]["met"] else " (bar not met)")
            )
            rows.append(
                [
                    f"**raygan: {item['label']}**{bar}",
                    _cell("modes", st["modes"]),
                    _cell("hq_pct", st["hq_pct"]),
                    _cell("reverse_kl", st["reverse_kl"]),
                    f"{item['steps']} steps, {item['cpu_seconds']:.0f} CPU s",
                ]
            )
        for method, modes, hq, rkl in PUBLISHED_MIXTURES[suite]:
            rows.append(
                [
                    method,
                    modes,
                    hq,
                    rkl,
                    "400 epochs (PacGAN)" if "PacGAN T" in method else "published",
                ]
            )
        out += _table(["method", "modes", "HQ %", "reverse KL", "budget"], rows)
        out += _details(items)
    items = [s for s in summary if s["suite"] == "stacked"]
    if items:
        out += ["", "## stacked digits (1,000 modes)", ""]
        rows = []
        for item in items:
            st = item["stats"]
            bar = (
                ""
                if item["bar"] is None
                else (" (bar met)" if item["bar"]["met"] else " (bar not met)")
            )
            rows.append(
                [
                    f"**raygan: {item['label']}**{bar}",
                    "stacked 8x8 digits",
                    _cell("modes", st["modes"]),
                    _cell("kl", st["kl"]),
                    f"{item['steps']} steps, {item['cpu_seconds']:.0f} CPU s",
                ]
            )
        for setting, method, modes, kl in PUBLISHED_STACKED:
            rows.append([method, f"Stacked MNIST, {setting}", modes, kl, "published"])
        out += _table(["method", "data / source", "modes", "KL", "budget"], rows)
        out += [
            "",
            f"Digit classifier (shipped recipe, trained on the digits' train split): test "
            f"accuracy {payload.get('classifier_test_accuracy', float('nan')):.4f}. Real "
            "stacked digits score 1,000 modes and KL 0.020 on 26,000 samples (the metric's "
            "floor at this sample size).",
        ]
        out += _details(items)
    items = [s for s in summary if s["suite"] == "unroll"]
    if items:
        out += [
            "",
            "## Unroll depth (the Unrolled GAN paper's Table 2, in shape)",
            "",
            "Ours: stacked 8x8 digits, modes / KL (median of the seeds). Published: Stacked "
            "MNIST, Unrolled GAN paper Table 2, modes / KL.",
            "",
        ]
        rows = []
        for frac in ("1/4", "1/2"):
            ours = [s for s in items if s["label"].startswith(f"D = {frac} G")]
            if not ours:
                continue
            by_k = {int(s["key"].rsplit("_k", 1)[1]): s for s in ours}
            rows.append(
                [f"**raygan, D = {frac} G**"]
                + [
                    f"{_fmt('modes', by_k[k]['stats']['modes']['median'])} / "
                    f"{_fmt('kl', by_k[k]['stats']['kl']['median'])}"
                    if k in by_k
                    else "-"
                    for k in DEPTHS
                ]
            )
            rows.append(
                [f"Unrolled GAN paper, D = {frac} G"]
                + [f"{a} / {b}" for a, b in PUBLISHED_UNROLL[frac]]
            )
        out += _table(["setting"] + [f"unroll {k}" for k in DEPTHS], rows)
        out += _details(items)
    items = [s for s in summary if s["suite"] == "fashion"]
    if items:
        out += _fashion(items, payload.get("fashion"))
    if not quick:
        out += convergence_section(CONVERGENCE_JSON)
        out += ["", SEARCH_NOTES.read_text().rstrip()]
    return "\n".join(out) + "\n"


# bench.convergence's record (`python -m bench.convergence`), shown when present; its figure is
# read from docs/results/ (a path relative to docs/RESULTS.md).
CONVERGENCE_JSON = Path(__file__).with_name("out") / "convergence.json"
CONVERGENCE_FIGURE = "results/convergence.png"
# |rho| at or above this counts as a signal following reverse KL; below it, as saying little.
RHO_TRACKS = 0.5


def _relation(rho_kl: float, rho_hq: float, use_kl: bool = True) -> str:
    """How a signal moves with sample quality, from its rank correlations with reverse KL
    (lower is better) and HQ % (higher is better); without ``use_kl`` (reverse KL stayed within
    its bar all run) from HQ % alone. See convergence_section's verdict text."""
    if not use_kl:
        if rho_hq != rho_hq or abs(rho_hq) < RHO_TRACKS:
            return "says little"
        return "falls as the samples improve" if rho_hq < 0 else "rises as the samples improve"
    strong = [v == v and abs(v) >= RHO_TRACKS for v in (rho_kl, rho_hq)]
    if all(strong) and rho_kl > 0 > rho_hq:
        return "falls as the samples improve"
    if all(strong) and rho_kl < 0 < rho_hq:
        return "rises as the samples improve"
    if not any(strong):
        return "says little"
    if all(strong):
        return "follows reverse KL and HQ % in contradicting senses"
    return "follows one quality metric only"


def _time_caveat(by_target: dict[str, dict[str, Any]], rho_hq: float) -> str:
    """A note where a signal is at least as monotone in the step as in HQ %: with quality rising
    over time (and the learning rate decaying), one run cannot tell the two apart."""
    step = by_target["step"]["median"]
    if step == step and rho_hq == rho_hq and abs(step) >= max(abs(rho_hq), RHO_TRACKS):
        return (
            f" Its rho with the step is {_rho(step)}, as strong as with HQ %: this run cannot "
            "tell following quality from drifting with training time."
        )
    return ""


def _rho(value: float) -> str:
    return "-" if value != value else f"{value:+.2f}"


def convergence_section(path: Path) -> list[str]:
    """'The loss as a convergence signal': protocol, command, figure, the rank correlations of
    bench.convergence's record at ``path`` and the verdicts they give; [] when not recorded."""
    if not path.is_file():
        return []
    import json

    record = json.loads(path.read_text())
    p, m, configs = record["protocol"], record["machine"], record["configs"]
    seeds = " ".join(str(s) for s in p["seeds"])
    kl_bar = BARS["ring8"]["reverse_kl"][1]
    # Each run records the machine that trained it; the file's own is the last invocation's
    # (maybe a --plot-only redraw).
    ran = [r.get("machine", m) for entry in configs.values() for r in entry["runs"]]
    commits = ", ".join(f"`{c}`" for c in sorted({r["commit"] for r in ran}))
    days = sorted({r["date"][:10] for r in ran})
    dates = days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"
    out = [
        "",
        "## The loss as a convergence signal",
        "",
        "The claim tested (Arjovsky et al. 2017, Wasserstein GAN): a minimax GAN's D and G losses "
        "do not fall as training progresses and say little about sample quality, while a WGAN "
        "critic's estimate of the Wasserstein distance, E[D(x)] - E[D(G(z))], falls as the "
        "samples improve.",
        "",
        f"Protocol: ring-8 (docs/PROTOCOLS.md section 1: {p['samples']:,} samples, HQ = within 3 "
        "std of the nearest mean, a mode is captured by >= 1 HQ sample, reverse KL over "
        f"nearest-mean assignments), {p['steps']:,} G steps, evaluated every {p['every']} steps; "
        "d_loss / g_loss (and the estimate) are the means over the steps since the previous "
        f"evaluation (gan_core/loop.py); seeds {seeds}; one torch thread per run. Configs: "
        + "; ".join(
            f"{entry['label']}: `{p['configs'][name]['preset']}` "
            + (" ".join(p["configs"][name]["overrides"]) or "(preset as is)")
            for name, entry in configs.items()
        )
        + (f"; every run also {' '.join(p['extra_overrides'])}" if p["extra_overrides"] else "")
        + ". The presets decay the learning rate to 0 (cosine), so anything that drifts with "
        "training time correlates with a quality that improves with it: the rank correlation "
        "with the step is shown beside the one with quality.",
        "",
        f"Command: `python -m bench.convergence --steps {p['steps']} --every {p['every']} "
        f"--seeds {seeds}"
        + (f" --set {' '.join(p['extra_overrides'])}" if p["extra_overrides"] else "")
        + "` (writes bench/out/convergence.json and docs/"
        + CONVERGENCE_FIGURE
        + "); "
        f"runs trained at commit {commits} on {dates} ({m['cores']} cores, {m['cpu']}).",
        "",
    ]
    if (Path(__file__).resolve().parent.parent / "docs" / CONVERGENCE_FIGURE).is_file():
        out += [f"![training signals against coverage on ring-8]({CONVERGENCE_FIGURE})", ""]
    out += [
        "Spearman's rank correlation (rho) over the evaluations of each signal with reverse KL, "
        "HQ % and the step (median over seeds); a signal that tracks convergence in the claim's "
        "sense has rho > 0 with reverse KL and < 0 with HQ %. First / last eval: the signal's "
        "value at the first and the last evaluation (the clipped critic's values are small: "
        "weights clipped to [-0.01, 0.01] keep its outputs, and their differences, small).",
        "",
    ]
    rows = []
    for entry in configs.values():
        s = entry["summary"]
        for signal, by_target in s["rho"].items():
            rows.append(
                [
                    entry["label"],
                    signal,
                    f"{s['first'][signal]:.4g}",
                    f"{s['last'][signal]:.4g}",
                    *(_rho(by_target[t]["median"]) for t in ("reverse_kl", "hq_pct", "step")),
                ]
            )
    out += _table(
        [
            "objective",
            "signal",
            "first eval",
            "last eval",
            "rho vs reverse KL",
            "rho vs HQ %",
            "rho vs step",
        ],
        rows,
    )
    out += ["", "Quality over the run (first -> last evaluation, median over seeds):", ""]
    for entry in configs.values():
        s = entry["summary"]
        out.append(
            f"- {entry['label']}: modes {s['first']['modes']:.0f} -> {s['last']['modes']:.0f}, "
            f"HQ {s['first']['hq_pct']:.1f} -> {s['last']['hq_pct']:.1f} %, reverse KL "
            f"{s['first']['reverse_kl']:.3f} -> {s['last']['reverse_kl']:.3f}; over the run HQ "
            f"{s['range']['hq_pct'][0]:.1f}-{s['range']['hq_pct'][1]:.1f} %, reverse KL "
            f"{s['range']['reverse_kl'][0]:.3f}-{s['range']['reverse_kl'][1]:.3f} (rho of "
            f"reverse KL with the step {_rho(s['reverse_kl_vs_step'])})"
        )
    out += [
        "",
        "Verdicts, computed from the medians above: a signal follows quality when |rho| >= "
        f"{RHO_TRACKS} with reverse KL and with HQ %, in the directions of one quality (rho > 0 "
        "with reverse KL and < 0 with HQ %, or the reverse); it says little when |rho| < "
        f"{RHO_TRACKS} with both, and it gives no consistent reading of quality when it follows "
        "one metric only or the two in contradicting senses; the GAN losses count as saying "
        "little unless one of them follows quality. A quality metric that hardly moves over the"
        f" run cannot rank the signals: where reverse KL stays at or below {kl_bar} (ring-8's "
        "bar, so good all run) at every evaluation, the verdict reads HQ % alone. The two "
        "metrics can disagree: reverse KL assigns every sample, HQ or not, to its nearest mean "
        "(gan_core/metrics.py), so samples spread around the whole ring score a low reverse KL "
        "at an HQ % near 0.",
        "",
    ]
    for entry in configs.values():
        rho = {
            sig: (by["reverse_kl"]["median"], by["hq_pct"]["median"])
            for sig, by in entry["summary"]["rho"].items()
        }
        use_kl = entry["summary"]["range"]["reverse_kl"][1] > kl_bar
        basis = "" if use_kl else " (reverse KL within its bar all run: HQ % alone)"
        if "wasserstein" in rho:
            kl, hq = rho["wasserstein"]
            how = _relation(kl, hq, use_kl)
            out.append(
                f"- {entry['label']}: the critic's estimate has rho {_rho(kl)} with reverse KL and "
                f"{_rho(hq)} with HQ %{basis}: it {how}; the claim (it falls as the samples "
                "improve) is "
                + (
                    "supported here."
                    if how == "falls as the samples improve"
                    else "not supported here."
                )
                + _time_caveat(entry["summary"]["rho"]["wasserstein"], hq)
            )
            continue
        parts = [
            f"{sig} (rho {_rho(kl)} / {_rho(hq)}) {_relation(kl, hq, use_kl)}"
            for sig, (kl, hq) in rho.items()
        ]
        # The losses say something only where one falls or rises with quality consistently.
        consistent = ("falls as the samples improve", "rises as the samples improve")
        little = all(_relation(kl, hq, use_kl) not in consistent for kl, hq in rho.values())
        out.append(
            f"- {entry['label']}, with reverse KL / HQ %{basis}: "
            + "; ".join(parts)
            + ": the claim (the losses say little) is "
            + ("supported here." if little else "not supported here.")
        )
    return out


def _fashion(items: list[dict[str, Any]], ref: dict[str, Any] | None) -> list[str]:
    out = ["", "## Fashion-MNIST (10 classes)", ""]
    rows = [
        [
            f"**raygan: {item['label']}**",
            _cell("modes", item["stats"]["modes"]),
            _cell("kl", item["stats"]["kl"]),
            _cell("fd", item["stats"]["fd"]),
            f"{item['steps']} steps, {item['cpu_seconds']:.0f} CPU s",
        ]
        for item in items
    ]
    floor = (ref or {}).get("real_floor", {})
    if floor and floor.get("fd") == floor.get("fd"):  # not NaN
        rows.append(
            [
                "real images (5,000 of the test split)",
                _fmt("modes", floor["modes"]),
                _fmt("kl", floor["kl"]),
                _fmt("fd", floor["fd"]),
                "the metrics' floor",
            ]
        )
    out += _table(["method", "modes", "KL", "FD", "budget"], rows)
    if ref:
        out += [
            "",
            f"Data: Fashion-MNIST's {ref['data_rows']:,} training images (Debian's "
            "`dataset-fashion-mnist`, converted by `python -m gan_core.datasets fashion-mnist`), "
            "streamed in a seeded order (gan_core/files.py). Classifier: gan_core's "
            f"LabelClassifier trained on {ref['classifier_train_rows']:,} of them (a fixed "
            f"sample) with their labels; held-out accuracy {ref['classifier_test_accuracy']:.4f} "
            f"on {ref['classifier_test_rows']:,} others. Each run is scored once, on the final "
            f"(EMA where on) generator: {ref['samples']:,} samples against the "
            f"{ref['reference_rows']:,} real images its seed picks. No published numbers are "
            "comparable (papers score Fashion-MNIST with other classifiers and sample counts); "
            "the real-image row is the floor of these metrics at this sample size.",
        ]
    out += _details(items)
    return out


def _details(items: list[dict[str, Any]]) -> list[str]:
    out = ["", "Per row: config, per-seed values, CPU seconds, the picture of the median run.", ""]
    for item in items:
        per_seed = "; ".join(
            f"{NAMES[n]} " + ", ".join(_fmt(n, v) for v in s["values"])
            for n, s in item["stats"].items()
        )
        out += [
            f"**{item['label']}**: {_config_text(item)}, train.steps={item['steps']}, seeds "
            f"{item['seeds']}. Per seed: {per_seed}. Median CPU s per run: "
            f"{item['cpu_seconds']:.0f}." + (f" {item['note']}" if item["note"] else ""),
            "",
            f"![{item['label']}, seed {item['picture_seed']}]({item['picture']})"
            if item["picture"]
            else f"(No picture: the median run's, seed {item['picture_seed']}, was not on the "
            "machine that wrote this; rerun the suite to draw it.)",
            "",
        ]
    return out

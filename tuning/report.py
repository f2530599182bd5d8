"""What a sweep found: ``python -m tuning.report SWEEP_DIR`` (also run at the end of a sweep).

Reads the sweep's folder alone (local or ``s3://``; no running Ray needed): ``sweep.json`` (the
plan) and Tune's experiment state, through ``ray.tune.ExperimentAnalysis``: each trial's status,
final knobs and last reported metrics. (Not the trials' ``result.json`` files on their own: when
a trial restarts from a checkpoint, e.g. a PBT exploit, Tune re-downloads that file from storage
over its newer local copy, so reports can go missing from it.) Writes beside them, and prints:

- ``report.md``: the table of trials (knobs, modes, HQ %, reverse KL or KL, score, steps, steps/s,
  wall seconds, stopped early or not), the marginal effect of each knob (mean coverage over the
  trials with each value) and the best trial;
- ``trials.csv``: the same table for a spreadsheet;
- ``coverage_vs_cost.png``: modes captured against training seconds per 1,000 steps;
- ``best.yaml``: the best trial's full config, renamed ``<sweep>-best`` so that
  ``python -m services.train --config best.yaml`` starts a fresh run instead of resuming the
  trial's. Everything else equals the config the trial trained (for PBT: its final knobs).

The best trial's generator, when its trial logged one (services.model_log: a trial that ran to
its end, with tracking on), is named in report.md as an MLflow model URI,
``runs:/<the trial's child run id>/generator``, read from ``runs/<trial>/model.json``.

A trial's status: ``ERROR``, ``COMPLETED`` (reached ``train.steps``), ``STOPPED`` (ended early by
the scheduler) or ``INCOMPLETE`` (an interrupted sweep, not resumed yet). Marginal effects and the
best trial use every trial that reported, stopped ones included: their last numbers are what the
scheduler judged them by.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from gan_core.config import ConfigError, GanConfig, StorageConfig, to_yaml
from services.storage import Storage, StorageError, open_storage
from tuning.objective import divergence_key
from tuning.plan import PLAN_FILE, RUNS_DIR, SweepPlan

REPORT_FILES = ("report.md", "trials.csv", "coverage_vs_cost.png", "best.yaml")


@dataclass
class TrialRow:
    """One trial as the report sees it: its knobs and its last reported metrics."""

    trial: str
    knobs: dict[str, Any]
    metrics: dict[str, Any]
    status: str  # COMPLETED, STOPPED, ERROR, INCOMPLETE
    steps_per_s: float | None = None  # mean over its reports (training only, no evaluation)
    wall_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""  # an ERROR trial's reason: the last line of Tune's error trace
    model: dict[str, Any] = field(default_factory=dict)  # its runs/<trial>/model.json, if any

    @property
    def model_uri(self) -> str | None:
        return self.model.get("model_uri")

    @property
    def stopped_early(self) -> bool:
        return self.status == "STOPPED"

    def value(self, key: str) -> float | None:
        value = self.metrics.get(key)
        return float(value) if isinstance(value, int | float) else None


def trial_row(
    trial: str,
    knobs: dict[str, Any],
    tune_status: str,
    last: dict[str, Any],
    history: list[dict[str, Any]],
    total_steps: int,
    error: str | None = None,
) -> TrialRow:
    """A row from Tune's view of a trial: its status (TERMINATED, ERROR, RUNNING, PENDING,
    PAUSED), its last result, the reports still on file (oldest first, possibly partial) and,
    for an errored trial, Tune's error trace."""
    if tune_status == "ERROR":
        status = "ERROR"
    elif int(last.get("step", 0)) >= total_steps:
        status = "COMPLETED"
    elif tune_status == "TERMINATED":
        status = "STOPPED"
    else:
        status = "INCOMPLETE"
    speeds = [
        float(r["steps_per_s"])
        for r in history or [last]
        if isinstance(r.get("steps_per_s"), int | float) and r["steps_per_s"] > 0
    ]
    return TrialRow(
        trial=trial,
        knobs=dict(knobs),
        metrics=dict(last),
        status=status,
        steps_per_s=fmean(speeds) if speeds else None,
        wall_s=float(last.get("time_total_s", 0.0)),
        history=list(history),
        error=error_reason(error) if status == "ERROR" else "",
    )


def error_reason(trace: str | None) -> str:
    """The exception line of a Tune error trace (``RuntimeError: nan-stop diverged: ...``): the
    last line shaped like ``SomethingError: message``, else the last non-empty line."""
    lines = [line.strip() for line in (trace or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b[^:]*: ", line):
            return line
    return lines[-1] if lines else "no error recorded"


def load_rows(storage: Storage, plan: SweepPlan) -> list[TrialRow]:
    """Every trial of the sweep whose folder is ``storage``'s root, by trial name."""
    from ray.tune import ExperimentAnalysis

    from services.model_log import read_logged

    analysis = ExperimentAnalysis(
        storage.root, storage_filesystem=storage.filesystem if storage.is_s3 else None
    )
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        history = frame.to_dict("records") if frame is not None else []
        total = plan.trial_config(trial.config).train.steps
        error = trial.get_error() if trial.status == "ERROR" else None
        rows.append(
            trial_row(
                str(trial),
                trial.config,
                trial.status,
                trial.last_result or {},
                history,
                total,
                error=str(error) if error else None,
            )
        )
        rows[-1].model = read_logged(storage, f"{RUNS_DIR}/{trial}") or {}
    return sorted(rows, key=lambda r: r.trial)


def best_row(rows: list[TrialRow], metric: str, mode: str) -> TrialRow | None:
    """The trial with the best last ``metric`` (``mode`` max or min); None if none reported it."""
    scored = [r for r in rows if r.value(metric) is not None and math.isfinite(r.value(metric))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r.value(metric))


def common_step(rows: list[TrialRow]) -> int | None:
    """The last evaluation step that every trial with reports reached (ASHA's first rung, in a
    sweep it stopped trials in); None when no trial has a report history."""
    reached = [
        max(int(r["step"]) for r in row.history if isinstance(r.get("step"), int | float))
        for row in rows
        if any(isinstance(r.get("step"), int | float) for r in row.history)
    ]
    return min(reached) if reached else None


def value_at(row: TrialRow, metric: str, step: int) -> float | None:
    """``metric`` as the trial reported it at ``step`` (None if that report is not on file)."""
    for report in row.history:
        if report.get("step") == step and isinstance(report.get(metric), int | float):
            return float(report[metric])
    return None


def marginal_effects(
    rows: list[TrialRow], knobs: list[str], metric: str = "modes", at_step: int | None = None
) -> dict[str, list[tuple[Any, float, int]]]:
    """For each knob, ``(value, mean of metric, trials)`` over the trials with that value.

    Averaging over all other knobs is what a grid makes fair: each value of one knob meets every
    combination of the others equally often. Trials without the metric are left out. By default
    each trial counts with its last report; ``at_step`` compares them all at that step instead,
    which a scheduler's early stops cannot bias (a stopped trial's last report is older).
    """
    effects: dict[str, list[tuple[Any, float, int]]] = {}
    for knob in knobs:
        groups: dict[Any, list[float]] = {}
        for row in rows:
            value = row.value(metric) if at_step is None else value_at(row, metric, at_step)
            if knob in row.knobs and value is not None and math.isfinite(value):
                groups.setdefault(row.knobs[knob], []).append(value)
        effects[knob] = [
            (v, fmean(xs), len(xs))
            for v, xs in sorted(groups.items(), key=lambda kv: _order(kv[0]))
        ]
    return effects


def _order(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int | float) else (1, str(value))


def best_config(plan: SweepPlan, row: TrialRow) -> GanConfig:
    """The best trial's config, under a new run name (see module docstring)."""
    return plan.trial_config({**row.knobs, "name": f"{plan.name}-best"})


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def table_columns(plan: SweepPlan, rows: list[TrialRow]) -> list[str]:
    sample = next((r.metrics for r in rows if divergence_key(r.metrics)), {})
    divergence = divergence_key(sample) or "reverse_kl"
    metrics = ["modes", "hq_pct", divergence, plan.metric]
    return [
        "trial",
        *plan.space.knobs,
        *dict.fromkeys(metrics),
        "step",
        "steps_per_s",
        "wall_s",
        "stopped_early",
        "status",
    ]


def table_cells(row: TrialRow, columns: list[str]) -> list[Any]:
    fixed = {
        "trial": row.trial,
        "steps_per_s": row.steps_per_s,
        "wall_s": row.wall_s,
        "stopped_early": row.stopped_early,
        "status": row.status,
    }
    cells = []
    for column in columns:
        if column in fixed:
            cells.append(fixed[column])
        elif column in row.knobs:
            cells.append(row.knobs[column])
        else:
            cells.append(row.metrics.get(column))
    return cells


def _markdown(header: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def _effects_table(plan: SweepPlan, rows: list[TrialRow], step: int | None) -> str:
    effect_rows = []
    coverage = marginal_effects(rows, plan.space.knobs, "modes", step)
    scores = marginal_effects(rows, plan.space.knobs, plan.metric, step)
    for knob in plan.space.knobs:
        # Unlabelled data reports no modes: a value still gets its row from the sweep's metric.
        modes = {v: (m, n) for v, m, n in coverage[knob]}
        score = {v: (m, n) for v, m, n in scores[knob]}
        for value in sorted({*modes, *score}, key=_order):
            n = max(modes.get(value, (None, 0))[1], score.get(value, (None, 0))[1])
            effect_rows.append(
                [knob, value, n, modes.get(value, (None,))[0], score.get(value, (None,))[0]]
            )
    return _markdown(["knob", "value", "trials", "mean modes", f"mean {plan.metric}"], effect_rows)


def render_markdown(plan: SweepPlan, rows: list[TrialRow]) -> str:
    columns = table_columns(plan, rows)
    sign = -1.0 if plan.mode == "max" else 1.0
    order = sorted(
        rows, key=lambda r: (r.value(plan.metric) is None, sign * (r.value(plan.metric) or 0.0))
    )
    counts = {
        s: sum(r.status == s for r in rows) for s in ("COMPLETED", "STOPPED", "ERROR", "INCOMPLETE")
    }
    parts = [
        f"# Sweep {plan.name}",
        "",
        f"Space `{plan.space.name}` ({plan.space.source}), scheduler {plan.scheduler}, "
        f"objective: {plan.mode} `{plan.metric}`"
        + (
            " = modes - d / (1 + d), d = reverse KL (2D) or KL (images)"
            if plan.metric == "score"
            else ""
        )
        + ".",
        f"Trials: {len(rows)} ({', '.join(f'{n} {s.lower()}' for s, n in counts.items() if n)}).",
        "",
        _markdown(columns, [table_cells(r, columns) for r in order]),
        "",
        "## Marginal effect of each knob",
        "",
        "Mean over the trials with each value (all other knobs averaged out).",
        "",
    ]
    parts.append(_effects_table(plan, rows, None))
    step = common_step(rows)
    last = max((int(r.metrics.get("step", 0)) for r in rows), default=0)
    if step is not None and step < last:
        parts += [
            "",
            f"The same at step {step}, which every trial reached: a scheduler's early stops "
            "cannot bias this comparison (a stopped trial's last report is older than the "
            "others').",
            "",
            _effects_table(plan, rows, step),
        ]
    failed = [r for r in rows if r.status == "ERROR"]
    if failed:
        parts += ["", "## Failed trials", ""]
        parts += [f"- {r.trial}: {r.error}" for r in failed]
    best = best_row(rows, plan.metric, plan.mode)
    parts += ["", "## Best trial", ""]
    if best is None:
        parts.append(f"No trial reported `{plan.metric}`.")
    else:
        knobs = ", ".join(f"{k}={v}" for k, v in best.knobs.items())
        parts.append(
            f"{best.trial}: {knobs}; {plan.metric} = {_fmt(best.value(plan.metric))}, "
            f"modes = {_fmt(best.value('modes'))}. Config: `best.yaml` "
            f"(`python -m services.train --config best.yaml`)."
        )
        if best.model_uri:
            parts.append(
                f"\nModel: `{best.model_uri}` (MLflow; "
                f'`mlflow.pytorch.load_model("{best.model_uri}")` maps noise to samples).'
            )
    return "\n".join(parts) + "\n"


def render_csv(plan: SweepPlan, rows: list[TrialRow]) -> str:
    columns = table_columns(plan, rows)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows(table_cells(r, columns) for r in rows)
    return out.getvalue()


def plot_coverage_vs_cost(plan: SweepPlan, rows: list[TrialRow], path: Path) -> Path:
    """Modes captured against seconds per 1,000 training steps (what each setting costs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    best = best_row(rows, plan.metric, plan.mode)
    # Unlabelled data has no modes: plot the sweep's own metric (e.g. coverage) instead.
    y = "modes" if any(r.value("modes") is not None for r in rows) else plan.metric
    for stopped, marker, label in ((False, "o", "ran to the end"), (True, "x", "stopped early")):
        pts = [
            (1000.0 / r.steps_per_s, r.value(y))
            for r in rows
            if r.stopped_early == stopped and r.steps_per_s and r.value(y) is not None
        ]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=label)
    if best is not None and best.steps_per_s and best.value(y) is not None:
        ax.annotate(
            "best",
            (1000.0 / best.steps_per_s, best.value(y)),
            textcoords="offset points",
            xytext=(5, 5),
        )
    ax.set_xlabel("training seconds per 1,000 steps")
    ax.set_ylabel("modes captured (last report)" if y == "modes" else f"{y} (last report)")
    ax.set_title(f"sweep {plan.name}: coverage vs cost")
    if ax.get_legend_handles_labels()[0]:  # no trial with the metric: nothing to label
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build_report(plan: SweepPlan, rows: list[TrialRow], folder: Path) -> dict[str, Path]:
    """Write the report files for ``rows`` into local ``folder``; returns them by name."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"report.md": folder / "report.md", "trials.csv": folder / "trials.csv"}
    files["report.md"].write_text(render_markdown(plan, rows))
    files["trials.csv"].write_text(render_csv(plan, rows))
    files["coverage_vs_cost.png"] = plot_coverage_vs_cost(
        plan, rows, folder / "coverage_vs_cost.png"
    )
    best = best_row(rows, plan.metric, plan.mode)
    if best is not None:
        files["best.yaml"] = folder / "best.yaml"
        files["best.yaml"].write_text(to_yaml(best_config(plan, best)))
    return files


def write_report(storage: Storage, plan: SweepPlan, folder: Path) -> dict[str, Path]:
    """Build the report into local ``folder`` and copy it into the sweep's folder in ``storage``
    (whose root is the sweep folder). Returns the local files by name."""
    files = build_report(plan, load_rows(storage, plan), folder)
    for name, path in files.items():
        storage.write_bytes(name, path.read_bytes())
    return files


def open_sweep(sweep_dir: str) -> tuple[Storage, SweepPlan]:
    """The sweep folder (local path or s3:// URI; endpoint from AWS_ENDPOINT_URL) and its plan."""
    storage = open_storage(StorageConfig(uri=sweep_dir))
    if not storage.exists(PLAN_FILE):
        raise ConfigError(
            "SWEEP_DIR", sweep_dir, f"a sweep folder holding {PLAN_FILE}", "<report arguments>"
        )
    return storage, SweepPlan.from_json(storage.read_bytes(PLAN_FILE).decode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tuning.report",
        description="Summarize a sweep: table, knob effects, coverage-vs-cost plot, best.yaml.",
    )
    parser.add_argument(
        "sweep_dir",
        metavar="SWEEP_DIR",
        help="the sweep's folder: <storage>/<sweep name> (local or s3://)",
    )
    args = parser.parse_args(argv)
    try:
        storage, plan = open_sweep(args.sweep_dir)
    except (ConfigError, StorageError) as exc:
        print(f"raygan: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        files = write_report(storage, plan, Path(tmp))
        print(files["report.md"].read_text(), end="")
    print(f"[raygan] report files in {storage.uri}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

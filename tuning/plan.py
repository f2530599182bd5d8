"""What a sweep is, decided and checked before Ray starts, and kept as ``<sweep>/sweep.json``.

``make_plan`` turns the CLI's choices into a ``SweepPlan``: the base config (preset or YAML, then
the space's ``fixed`` keys, then the user's ``key=value`` overrides, then the workers per trial),
the search space, the scheduler and the objective. It validates everything a trial could meet:
every grid point's config, every distribution's bounds, that PBT mutates only keys a checkpoint
can carry across, that the storage is usable. A problem is a ConfigError (or StorageError) naming
the key and where it came from, and nothing has started yet.

The plan is written beside Tune's files, so ``--resume`` and ``python -m tuning.report`` rebuild
the same sweep from the folder alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from gan_core.config import (
    MAX_NAME_LENGTH,
    ConfigError,
    GanConfig,
    flatten,
    from_dict,
    load_config,
    parse_overrides,
)
from services.launch import for_workers
from services.storage import Storage, open_storage
from services.tracking import default_tracking_uri
from tuning.objective import DEFAULT_METRIC, DEFAULT_MODE
from tuning.spaces import (
    SearchSpace,
    architecture_mutations,
    grid_points,
    load_space,
    space_from_data,
    trial_count,
    validate_space,
)

PLAN_FILE = "sweep.json"
SCHEDULERS = ("fifo", "asha", "pbt")
RUNS_DIR = "runs"  # inside the sweep's folder: the trials' Train runs and sample grids
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# best.yaml names its config "<sweep>-best", which must stay a valid config name.
MAX_SWEEP_NAME = MAX_NAME_LENGTH - len("-best")


@dataclass
class SweepPlan:
    name: str
    space: SearchSpace
    base: dict[str, Any]  # flattened, validated base config shared by every trial
    scheduler: str = "asha"
    metric: str = DEFAULT_METRIC
    mode: str = DEFAULT_MODE
    num_samples: int = 1
    max_concurrent: int = 0  # 0: as many trials as the cluster's CPUs hold at once
    grace_period: int = 1  # ASHA: reports before a trial may be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = 2  # PBT: reports between exploit/explore decisions
    pbt_synch: bool = False  # PBT: wait for the whole population at each decision
    # How a trial trains: "process" (in the trial's own process, one CPU worker), "train" (a Ray
    # Train job), "auto" (process where it can: tuning.trial.runs_in_process).
    trial_runner: str = "auto"
    tracking_uri: str = ""
    parent_run_id: str | None = None

    @property
    def base_config(self) -> GanConfig:
        return from_dict(self.base, source=f"sweep {self.name} base")

    def trial_config(self, knobs: dict[str, Any]) -> GanConfig:
        """What a trial with these knobs trains (before its run name and storage are set)."""
        return from_dict({**self.base, **knobs}, source=f"sweep {self.name}")

    @property
    def one_cpu_worker(self) -> bool:
        """Every trial has one CPU worker and no knob changes the resources (Tune's resource
        request is fixed per sweep): what training in the trial's own process needs."""
        return (
            int(self.base["resources.num_workers"]) == 1
            and not self.base["resources.use_gpu"]
            and not any(k.startswith("resources.") for k in self.space.knobs)
        )

    @property
    def trials(self) -> int:
        return trial_count(self.space, self.num_samples)

    @property
    def max_reports(self) -> int:
        """Reports of a trial that runs to the end: ASHA's ``max_t`` in training iterations."""
        return max(
            math.ceil(
                int(knobs.get("train.steps", self.base["train.steps"]))
                / int(knobs.get("eval.every", self.base["eval.every"]))
            )
            for knobs in grid_points(self.space)
        )

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["space"] = {
            "name": self.space.name,
            "source": self.space.source,
            **self.space.to_data(),
        }
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> SweepPlan:
        data = json.loads(text)
        space = data.pop("space")
        name, source = space.pop("name"), space.pop("source")
        return cls(space=space_from_data(name, space, source), **data)


def _flat_overrides(overrides: list[str]) -> dict[str, Any]:
    nested = OmegaConf.to_container(parse_overrides(overrides), resolve=False)
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            out[prefix[:-1]] = node

    walk("", nested)
    return out


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed, "<sweep arguments>")


def make_plan(
    name: str,
    space: str,
    config: str = "ring8",
    overrides: list[str] | None = None,
    *,
    workers_per_trial: int = 1,
    **settings: Any,
) -> tuple[SweepPlan, Storage]:
    """Validate the sweep's arguments and every trial config; no Ray, nothing trained.

    ``settings`` are SweepPlan fields (scheduler, metric, mode, num_samples, ...). Returns the
    plan and the opened base storage (the sweep lives in ``<storage>/<name>``).
    """
    overrides = list(overrides or [])
    _check(
        bool(_NAME.fullmatch(name)) and len(name) <= MAX_SWEEP_NAME,
        "--name",
        name[:80] + ("..." if len(name) > 80 else ""),
        f"letters, digits, '_', '.', '-', at most {MAX_SWEEP_NAME} (it names a folder, a Tune "
        "experiment and the '<name>-best' config of best.yaml)",
    )
    _check(workers_per_trial >= 1, "--workers-per-trial", workers_per_trial, ">= 1")
    search = load_space(space)
    load_config(config, overrides)  # the user's own overrides fail first, under their own name
    flat = flatten(load_config(config))
    flat.update(search.fixed)
    flat.update(_flat_overrides(overrides))
    flat["resources.num_workers"] = workers_per_trial
    plan = SweepPlan(name=name, space=search, base={}, **settings)
    if plan.scheduler == "pbt":
        # PBT clones a trial at its latest report: every report must carry a checkpoint.
        flat["checkpoint.every"] = flat["eval.every"]
    base = from_dict(flat, source=f"--config {config} + space {search.name} fixed + overrides")
    # Paths as the trials' processes must see them (they run in folders of Ray's own).
    base = for_workers(base)
    plan.base = flatten(base)
    plan.space = validate_space(search, plan.base)
    _check_settings(plan)
    storage = open_storage(base.storage)
    plan.tracking_uri = base.tracking.uri or default_tracking_uri(storage.uri)
    return plan, storage


TRIAL_RUNNERS = ("auto", "process", "train")


def _check_settings(plan: SweepPlan) -> None:
    _check(
        plan.scheduler in SCHEDULERS,
        "--scheduler",
        plan.scheduler,
        "one of " + ", ".join(SCHEDULERS),
    )
    _check(plan.mode in ("max", "min"), "--mode", plan.mode, "max or min")
    _check(plan.num_samples >= 1, "--num-samples", plan.num_samples, ">= 1")
    _check(
        plan.max_concurrent >= 0,
        "--max-concurrent",
        plan.max_concurrent,
        ">= 0 (0 = as many as the CPUs hold)",
    )
    _check(plan.grace_period >= 1, "--grace-period", plan.grace_period, ">= 1 report")
    _check(plan.reduction_factor >= 2, "--reduction-factor", plan.reduction_factor, ">= 2")
    _check(
        plan.perturbation_interval >= 1,
        "--perturbation-interval",
        plan.perturbation_interval,
        ">= 1 report",
    )
    _check(
        plan.trial_runner in TRIAL_RUNNERS,
        "--trial-runner",
        plan.trial_runner,
        "one of " + ", ".join(TRIAL_RUNNERS),
    )
    space = plan.space
    if plan.trial_runner == "process":
        _check(
            plan.one_cpu_worker,
            "--trial-runner",
            plan.trial_runner,
            "'auto' or 'train' for trials with more than one worker, a GPU or a resources knob "
            "(a trial trained in its own process has one CPU worker)",
        )
    data_names = {plan.base["data.name"], *space.grid.get("data.name", [])}
    _check(
        plan.metric != DEFAULT_METRIC or "parquet" not in data_names,
        "--metric",
        plan.metric,
        "a metric the trials report: Parquet data has no mode count to score",
    )
    if plan.scheduler == "pbt":
        _check(
            bool(space.mutations),
            "--scheduler",
            "pbt",
            f"a space with a 'mutations' section ({space.source} has none)",
        )
        frozen = architecture_mutations(space, plan.base)
        if frozen:
            raise ConfigError(
                frozen[0],
                space.mutations[frozen[0]].to_data(),
                "a key PBT can change in a running trial (learning rates, unroll.steps, "
                "objective weights ...), not one that changes the checkpoint's architecture",
                f"{space.source} (mutations)",
            )


def plan_path(name: str) -> str:
    return f"{name}/{PLAN_FILE}"


def save_plan(storage: Storage, plan: SweepPlan) -> str:
    return storage.write_bytes(plan_path(plan.name), plan.to_json().encode())


def load_plan(storage: Storage, name: str) -> SweepPlan:
    """The plan of an existing sweep; a ConfigError when ``<storage>/<name>`` holds none."""
    if not storage.exists(plan_path(name)):
        raise ConfigError(
            "--name",
            name,
            f"an existing sweep (no {PLAN_FILE} under {storage.uri}/{name})",
            "<sweep arguments>",
        )
    return SweepPlan.from_json(storage.read_bytes(plan_path(name)).decode())

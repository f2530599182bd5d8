"""Search spaces for sweeps: YAML data files, checked against the config before Ray starts.

A space file (``tuning/spaces/NAME.yaml``, or any path) has these sections, all optional but one
of ``grid``/``sample``/``mutations``::

    description: what the sweep asks
    fixed:      {train.batch_size: 96}            # set for every trial (CLI key=value wins)
    grid:       {unroll.steps: [0, 1, 5, 10]}     # every combination is a trial (x num_samples)
    sample:     {g_optim.lr: {loguniform: [1.0e-4, 1.0e-2]}}   # drawn num_samples times
    mutations:  {g_optim.lr: {loguniform: [1.0e-4, 1.0e-2]}, unroll.steps: {choice: [0, 1, 5]}}

Keys are dotted config keys (``gan_core.config.flatten`` names). Distributions are ``uniform``,
``loguniform``, ``randint`` (``[low, high)``) and ``choice``. ``mutations`` are what PBT may
change in a running trial: only keys that leave the checkpoint's architecture unchanged.

``validate_space`` builds the config of every grid point (and of every distribution's bounds and
choices) with ``from_dict`` before anything starts, so a typo, an empty list, a wrong type or an
impossible combination is a ``ConfigError`` naming the key, the value and the file.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gan_core.config import ConfigError, GanConfig, flatten, from_dict

SPACE_DIR = Path(__file__).parent
SECTIONS = ("description", "fixed", "grid", "sample", "mutations")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")


@dataclass(frozen=True)
class Distribution:
    """One sampled (or PBT-mutated) knob: ``kind`` in DISTRIBUTIONS, ``args`` its bounds/values."""

    kind: str
    args: tuple[Any, ...]

    def probe_values(self) -> list[Any]:
        """The values whose configs are validated: both bounds, or every choice."""
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def to_tune(self) -> Any:
        """The Ray Tune domain (a list for ``choice``, which PBT then walks value to value)."""
        from ray import tune

        if self.kind == "choice":
            return list(self.args)
        low, high = self.args
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[
            self.kind
        ](low, high)

    def to_data(self) -> dict[str, list[Any]]:
        return {self.kind: list(self.args)}


@dataclass(frozen=True)
class SearchSpace:
    name: str
    source: str  # the file it came from, for error messages
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    sample: dict[str, Distribution] = field(default_factory=dict)
    mutations: dict[str, Distribution] = field(default_factory=dict)

    @property
    def knobs(self) -> list[str]:
        """Every key a trial's config may vary in, in file order."""
        return list(dict.fromkeys([*self.grid, *self.sample, *self.mutations]))

    def to_data(self) -> dict[str, Any]:
        """The space as plain data (what a space file holds), e.g. to store beside a sweep."""
        return {
            "description": self.description,
            "fixed": dict(self.fixed),
            "grid": {k: list(v) for k, v in self.grid.items()},
            "sample": {k: d.to_data() for k, d in self.sample.items()},
            "mutations": {k: d.to_data() for k, d in self.mutations.items()},
        }


def space_names() -> list[str]:
    return sorted(p.stem for p in SPACE_DIR.glob("*.yaml"))


def load_space(name_or_path: str) -> SearchSpace:
    """Read a named space or a YAML file; its structure is checked here, its values by
    ``validate_space``. Problems are ConfigErrors naming the key and the file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = SPACE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(
                "--space",
                name_or_path,
                f"a YAML path or a named space: {', '.join(space_names())}",
                "<space argument>",
            )
    if not path.is_file():
        raise ConfigError("--space", name_or_path, "an existing YAML file", "<space argument>")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", str(path), f"valid YAML ({exc})", str(path)) from None
    return space_from_data(path.stem, data, str(path))


def space_from_data(name: str, data: Any, source: str) -> SearchSpace:
    """A SearchSpace from the plain data of a space file (``SearchSpace.to_data`` round-trips)."""
    if not isinstance(data, dict):
        raise ConfigError(
            "<file>", source, "a YAML mapping with sections " + ", ".join(SECTIONS), source
        )
    unknown = [key for key in data if key not in SECTIONS]
    if unknown:
        raise ConfigError(
            str(unknown[0]), data[unknown[0]], "a section: " + ", ".join(SECTIONS), source
        )
    sections = {key: _mapping(data, key, source) for key in SECTIONS[1:]}
    for section in SECTIONS[1:]:
        for key, value in sections[section].items():
            _check_key(key, value, source)
    grid = {key: _values(key, values, source) for key, values in sections["grid"].items()}
    sample = {key: _distribution(key, spec, source) for key, spec in sections["sample"].items()}
    mutations = {
        key: _distribution(key, spec, source) for key, spec in sections["mutations"].items()
    }
    twice = sorted(set(grid) & set(sample))
    if twice:
        raise ConfigError(
            twice[0],
            sections["sample"][twice[0]],
            "a key in either grid or sample, not both",
            source,
        )
    if not (grid or sample or mutations):
        raise ConfigError("grid", {}, "at least one knob in grid, sample or mutations", source)
    return SearchSpace(
        name=name,
        source=source,
        description=str(data.get("description") or "").strip(),
        fixed=dict(sections["fixed"]),
        grid=grid,
        sample=sample,
        mutations=mutations,
    )


def _mapping(data: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    value = data.get(section) or {}
    if not isinstance(value, dict):
        raise ConfigError(section, value, "a mapping of dotted config keys", source)
    return {str(k): v for k, v in value.items()}


_KNOWN_KEYS = frozenset(flatten(GanConfig()))


def _check_key(key: str, value: Any, source: str) -> None:
    if key in _KNOWN_KEYS:
        return
    parts = key.split(".")
    # Name what exists at the deepest section of ``key`` that does exist.
    for cut in range(len(parts) - 1, -1, -1):
        prefix = ".".join(parts[:cut])
        below = sorted(
            {
                k.removeprefix(f"{prefix}.").split(".")[0]
                for k in _KNOWN_KEYS
                if not prefix or k.startswith(f"{prefix}.")
            }
        )
        if below:
            break
    where = f"under {prefix!r}" if prefix else "at the top level"
    raise ConfigError(key, value, f"a config key; known {where}: {', '.join(below)}", source)


def _values(key: str, values: Any, source: str) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise ConfigError(key, values, "a non-empty list of values", source)
    return values


def _distribution(key: str, spec: Any, source: str) -> Distribution:
    allowed = "one of {" + ", ".join(f"{d}: [...]" for d in DISTRIBUTIONS) + "}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(key, spec, allowed, source)
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS or not isinstance(args, list) or not args:
        raise ConfigError(key, spec, allowed, source)
    if kind == "choice":
        return Distribution(kind, tuple(args))
    if len(args) != 2:
        raise ConfigError(key, spec, f"{kind}: [low, high]", source)
    try:
        low, high = (int(a) if kind == "randint" else float(a) for a in args)
    except (TypeError, ValueError):
        raise ConfigError(key, spec, f"{kind}: [low, high] with numbers", source) from None
    if not low < high or (kind == "loguniform" and low <= 0) or not math.isfinite(high):
        raise ConfigError(
            key,
            spec,
            f"{kind}: [low, high] with low < high"
            + (" and low > 0" if kind == "loguniform" else ""),
            source,
        )
    return Distribution(kind, (low, high))


def grid_points(space: SearchSpace) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the order Tune runs them: Tune sorts the keys
    and varies the first sorted key fastest. One dict of knobs per point, ``[{}]`` without grid.
    """
    keys = sorted(space.grid)
    combos = itertools.product(*(space.grid[k] for k in reversed(keys)))
    points = [dict(zip(reversed(keys), combo, strict=True)) for combo in combos]
    return [{k: point[k] for k in space.grid} for point in points]


def trial_count(space: SearchSpace, num_samples: int) -> int:
    """How many trials Tune runs: the grid repeated ``num_samples`` times (Tune's semantics)."""
    return len(grid_points(space)) * num_samples


def describe_knobs(knobs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in knobs.items()) or "(no knobs)"


def validate_space(space: SearchSpace, base: dict[str, Any]) -> SearchSpace:
    """Check that every trial the space can produce on ``base`` (a flattened config) is a valid
    config; the first bad one is a ConfigError naming the combination.

    Returns the space with every value converted to its config type: YAML 1.1 reads ``1.0e30``
    (no exponent sign) as a string, and Tune hands trials the values exactly as given.

    Sampled and mutated keys are checked at each bound (or choice) on the first grid point, each
    on its own: checking every bound on every grid point would multiply the work, and the
    combination rules in ``validate`` tie grid keys to each other (e.g. ``generators.count`` to
    ``train.batch_size``), not to learning rates.
    """
    points = grid_points(space)
    for knobs in points:
        _check_config(space, {**base, **knobs}, knobs)
    first = points[0]

    def typed(key: str, value: Any) -> Any:
        knobs = {**first, key: value}
        return flatten(_check_config(space, {**base, **knobs}, knobs))[key]

    grid = {key: [typed(key, v) for v in values] for key, values in space.grid.items()}
    dists = {}
    for section in ("sample", "mutations"):
        dists[section] = {}
        for key, dist in getattr(space, section).items():
            values = [typed(key, v) for v in dist.probe_values()]
            args = tuple(values) if dist.kind == "choice" else dist.args
            dists[section][key] = Distribution(dist.kind, args)
    return dataclasses.replace(space, grid=grid, **dists)


def _check_config(space: SearchSpace, flat: dict[str, Any], knobs: dict[str, Any]) -> GanConfig:
    try:
        return from_dict(flat, source=space.source)
    except ConfigError as exc:
        where = f"{space.source}: trial {describe_knobs(knobs)}"
        raise ConfigError(exc.key, exc.value, exc.allowed, where) from None


def architecture_mutations(space: SearchSpace, base: dict[str, Any]) -> list[str]:
    """Mutated keys whose values change what a checkpoint holds, so PBT cannot change them."""
    from services.checkpoints import config_differences

    bad = []
    for key, dist in space.mutations.items():
        configs = [from_dict({**base, key: v}, source=space.source) for v in dist.probe_values()]
        if any(config_differences(configs[0], other) for other in configs[1:]):
            bad.append(key)
    return bad


def tune_param_space(space: SearchSpace) -> dict[str, Any]:
    """Tune's ``param_space``: flat dotted keys, so a trial's config is exactly its knobs."""
    from ray import tune

    out: dict[str, Any] = {key: tune.grid_search(values) for key, values in space.grid.items()}
    out.update({key: dist.to_tune() for key, dist in space.sample.items()})
    # A key only PBT mutates starts from a draw of its mutation distribution.
    out.update({key: dist.to_tune() for key, dist in space.mutations.items() if key not in out})
    return out


def pbt_mutations(space: SearchSpace) -> dict[str, Any]:
    """``hyperparam_mutations`` for Tune's PopulationBasedTraining."""
    return {key: dist.to_tune() for key, dist in space.mutations.items()}

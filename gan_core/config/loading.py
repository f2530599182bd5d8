"""Loading a run config: presets, ``base:`` chains, YAML files, ``key=value`` overrides.

A config is loaded from a preset name (a YAML file in ``gan_core/presets``) or a YAML path, then
``key=value`` overrides are applied, then ``validate`` (gan_core.config.rules) checks it. What
OmegaConf or YAML refuse is reported as a ConfigError naming the key, value, what is allowed and
the source.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from gan_core.config.rules import validate
from gan_core.config.schema import ConfigError, GanConfig, _short

# The presets sit beside this package, in gan_core/presets.
PRESET_DIR = Path(__file__).parent.parent / "presets"
# A config file is a few hundred bytes; anything far larger is not one (and is not read whole).
MAX_CONFIG_BYTES = 2**20
_DOTTED_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class _Hidden:
    """Stands in an error for a value that is not shown: a file's unknown key may hold anything
    (a credentials file's secret), so only the key is named."""

    def __repr__(self) -> str:
        return "<not shown>"


_NOT_SHOWN = _Hidden()


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve_source(
    preset_or_path: str, key: str = "--config", source: str = "<config argument>"
) -> Path:
    """Find the YAML file for a preset name or path; ``key``/``source`` say who asked for it."""
    presets = f"a preset: {', '.join(preset_names())}"
    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(key, preset_or_path, f"an existing YAML file or {presets}", source)
        return path
    candidate = PRESET_DIR / f"{preset_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(key, preset_or_path, f"a YAML path or {presets}", source)
    return candidate


_ABSENT = object()


def _merge(base: DictConfig, other: Any, source: str, show_unknown: bool = True) -> DictConfig:
    """``other`` merged onto ``base``; ``show_unknown=False`` (files) names an unknown key
    without its value."""
    try:
        return OmegaConf.merge(base, other)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        # OmegaConf's message shows the value only as text, and for an unknown key its ``key``
        # attribute is the key itself, so the bad value is read back from what was merged.
        plain = other
        if OmegaConf.is_config(other):
            plain = OmegaConf.to_container(other, resolve=False)
        key = str(getattr(exc, "full_key", None) or "")
        if not key:
            # A scalar given for a whole section ("generators=3") fails without a key.
            mismatch = _section_mismatch(plain, GanConfig, "")
            if mismatch is not None:
                key, section = mismatch
                value = _lookup(plain, key)
                allowed = "a mapping of " + ", ".join(f.name for f in dataclasses.fields(section))
                raise ConfigError(key, value, allowed, source) from None
            key = "?"
        value = _lookup(plain, key)
        if value is _ABSENT:
            value = _bad_value(exc)
        if isinstance(exc, ConfigKeyError) and not show_unknown:
            value = _NOT_SHOWN
        raise ConfigError(key, value, _allowed_for(key, exc), source) from None


def _lookup(node: Any, key: str) -> Any:
    """The value at dotted ``key`` in nested dicts (whose own keys may contain dots), or _ABSENT."""
    if not isinstance(node, dict):
        return _ABSENT
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in node:
            return node[head] if cut == len(parts) else _lookup(node[head], ".".join(parts[cut:]))
    return _ABSENT


def _section_mismatch(node: Any, schema: type, prefix: str) -> tuple[str, type] | None:
    """The first key in ``node`` holding a non-mapping where ``schema`` has a nested section."""
    if not isinstance(node, dict):
        return None
    defaults = schema()
    for name, value in node.items():
        section = type(getattr(defaults, str(name), None))
        if not dataclasses.is_dataclass(section):
            continue
        if not isinstance(value, dict):
            return f"{prefix}{name}", section
        found = _section_mismatch(value, section, f"{prefix}{name}.")
        if found is not None:
            return found
    return None


def _bad_value(exc: OmegaConfBaseException) -> Any:
    """Fallback when the value cannot be read back: the one OmegaConf quotes, else its message."""
    msg = str(exc).splitlines()[0]
    # OmegaConf messages look like "Value 'abc' of type 'str' could not be converted to Integer".
    if msg.startswith("Value '"):
        return msg.split("'")[1]
    return msg


def _allowed_for(key: str, exc: OmegaConfBaseException) -> str:
    if isinstance(exc, ConfigKeyError):
        section = getattr(exc, "object_type", None)
        if dataclasses.is_dataclass(section):
            return "known keys: " + ", ".join(f.name for f in dataclasses.fields(section))
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        return "known keys: " + ", ".join(_known_keys(parent))
    typ = _field_type(key)
    return f"a value of type {typ}" if typ else _reason(exc)


def _known_keys(parent: str) -> list[str]:
    node: Any = GanConfig()
    for part in filter(None, parent.split(".")):
        node = getattr(node, part, None)
        if not dataclasses.is_dataclass(node):
            return []
    return [f.name for f in dataclasses.fields(node)]


def _field_type(key: str) -> str:
    node: Any = GanConfig()
    parts = key.split(".")
    for part in parts[:-1]:
        node = getattr(node, part, None)
        if node is None:
            return ""
    value = getattr(node, parts[-1], None)
    return type(value).__name__ if value is not None else ""


def _reason(exc: Exception) -> str:
    """An OmegaConf/YAML exception's first line (its message runs on with context lines, and may
    quote a value: shortened)."""
    return _short(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__


def parse_overrides(overrides: list[str]) -> DictConfig:
    """Turn ``["a.b=1", "c=x"]`` into a config; a malformed item is a ConfigError naming it."""
    merged = OmegaConf.create()
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(item, item, "overrides of the form key=value")
        key, text = item.split("=", 1)
        # Every config key is a dotted name; anything else ("", "a..b", "a[0]", " a") would
        # reach OmegaConf's key grammar and fail there without saying which item was wrong.
        if not _DOTTED_KEY.fullmatch(key):
            raise ConfigError(
                key, text, "a dotted key of letters, digits and '_' (e.g. generators.count=2)"
            )
        try:
            # One item at a time: YAML reports a bad value with its own exception types and
            # without the key, so the item is parsed alone to name it.
            OmegaConf.from_dotlist([item])
        except Exception as exc:
            raise ConfigError(
                key,
                text,
                f"a YAML value; quote text with special characters: {key}='...' ({_reason(exc)})",
            ) from None
        if "${" in text:
            raise ConfigError(key, text, NO_INTERPOLATION)
        try:
            merged.merge_with_dotlist([item])
        except Exception as exc:
            # Two items that disagree on a section's shape ("generators=[1]" and then
            # "generators.count=2", or the reverse) fail in OmegaConf without naming either.
            raise ConfigError(
                key,
                text,
                f"overrides that do not give a section both a value and keys ({_reason(exc)})",
            ) from None
    return merged


NO_INTERPOLATION = (
    "a plain value, not an interpolation: configs do not resolve ${...} (it would read "
    "environment variables into values that are printed and logged); copy the value in"
)


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_has_interpolation(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_interpolation(v) for v in value)
    return False


def _refuse_interpolation(data: dict[Any, Any], source: str, prefix: str = "") -> None:
    """A ConfigError for the first value holding ``${``, read before OmegaConf could resolve it
    (``${oc.env:AWS_SECRET_ACCESS_KEY}`` would put a secret in a printed config)."""
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            _refuse_interpolation(value, source, f"{key}.")
        elif _has_interpolation(value):
            raise ConfigError(key, value, NO_INTERPOLATION, source)


def _odd_key(data: dict[Any, Any], parent: str = "") -> str | None:
    """Where the first key that is not a config key name is, never the key itself: in a file
    that is not a config, a "key" may be a whole line (each of /etc/shadow's is one)."""
    for index, (name, value) in enumerate(data.items(), 1):
        if not (isinstance(name, str) and _DOTTED_KEY.fullmatch(name)):
            return f"key {index} " + (f"under {parent}" if parent else "at the top level")
        if isinstance(value, dict):
            found = _odd_key(value, f"{parent}.{name}" if parent else name)
            if found is not None:
                return found
    return None


def _yaml_problem(exc: Exception) -> str:
    """What a YAML error says and where, without the lines of the file it quotes."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return _short(exc.problem or exc.context or type(exc).__name__) + at
    return _reason(exc)


def _read_file(source: Path) -> DictConfig:
    """A YAML config file as OmegaConf reads it. A file that is not a mapping of plain values is
    refused by its path and the problem, never by its content (``--config /etc/passwd``)."""
    where = str(source)

    def refused(allowed: str) -> ConfigError:
        return ConfigError("<file>", where, allowed, where)

    try:
        with source.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise refused(f"a YAML config under {MAX_CONFIG_BYTES} bytes")
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise refused("a YAML mapping of config keys in UTF-8 text") from None
    except OSError as exc:
        raise refused(f"a readable YAML file ({exc.strerror})") from None
    try:
        # A plain safe load first: OmegaConf.create would turn a file of one text value (any
        # text file) into a key named by the whole text, and it must not see ${...} at all.
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise refused(f"valid YAML ({_yaml_problem(exc)})") from None
    if data is None:
        return OmegaConf.create()
    if not isinstance(data, dict):
        held = {str: "one text value", list: "a list"}.get(type(data), type(data).__name__)
        raise refused(f"a YAML mapping of config keys (key: value lines); this file holds {held}")
    odd = _odd_key(data)
    if odd is not None:
        raise refused(
            "a YAML mapping whose keys are config key names (letters, digits, '_'); this file's "
            f"{odd} is not one"
        )
    _refuse_interpolation(data, where)
    try:
        # OmegaConf's own loader: it reads 1e-4 as a float and refuses duplicate keys.
        return OmegaConf.create(text)  # type: ignore[return-value]
    except Exception as exc:
        raise refused(f"valid YAML ({_yaml_problem(exc)})") from None


def _load_file(source: Path, schema: DictConfig, seen: tuple[Path, ...]) -> DictConfig:
    """Merge a YAML file onto ``schema``; a top-level ``base: PRESET_OR_PATH`` is merged first."""
    if source.resolve() in seen:
        raise ConfigError("base", str(source), "a chain of base files without a cycle", str(source))
    from_file = _read_file(source)
    base = from_file.pop("base", None)
    if base is not None:
        relative = source.parent / str(base)
        if relative.is_file():
            base_path = relative
        else:
            base_path = _resolve_source(str(base), "base", str(source))
        schema = _load_file(base_path, schema, seen + (source.resolve(),))
    return _merge(schema, from_file, str(source), show_unknown=False)


def load_config(preset_or_path: str = "ring8", overrides: list[str] | None = None) -> GanConfig:
    """Build a validated GanConfig from a preset name or YAML path plus ``key=value`` overrides."""
    source = _resolve_source(preset_or_path)
    merged = _load_file(source, OmegaConf.structured(GanConfig), seen=())
    where = str(source)
    if overrides:
        merged = _merge(merged, parse_overrides(overrides), "overrides")
        where = f"{source} + overrides"
    cfg = _to_object(merged, where)
    validate(cfg, where)
    return cfg


def from_dict(data: dict[str, Any], source: str = "<dict>") -> GanConfig:
    """Build and validate a GanConfig from a plain (possibly nested or dotted) dict."""
    _refuse_interpolation(data, source)
    nested = OmegaConf.create()
    for key, value in data.items():
        # update() splits "a.b" into nested keys, so flatten() output and Tune samples load too.
        OmegaConf.update(nested, str(key), value, merge=True)
    merged = _merge(OmegaConf.structured(GanConfig), nested, source)
    cfg = _to_object(merged, source)
    validate(cfg, source)
    return cfg


def _to_object(merged: DictConfig, source: str) -> GanConfig:
    """Instantiate the dataclasses. Interpolations are refused before any merge, so nothing is
    resolved here; an OmegaConf failure left (a missing value) still names its key."""
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", None) or "") or "?"
        value = _lookup(OmegaConf.to_container(merged, resolve=False), key)
        if value is _ABSENT:
            value = _bad_value(exc)
        raise ConfigError(key, value, f"a complete value ({_reason(exc)})", source) from None


def to_yaml(cfg: GanConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))

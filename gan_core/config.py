"""Structured run configs: one OmegaConf dataclass tree describes a whole GAN run.

A config is loaded from a preset name (a YAML file in ``gan_core/presets``) or a YAML path, then
``key=value`` overrides are applied, then ``validate`` checks ranges and combinations. Every
problem is a ``ConfigError`` naming the key, the bad value, what is allowed and where it came from,
so a bad config is refused before any training (or any Ray worker) starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

PRESET_DIR = Path(__file__).parent / "presets"

DATASETS = ("ring8", "grid25", "digits", "stacked_digits", "parquet", "image_folder")
# Data sets read from files (gan_core.files): streamed, not generated.
FILE_DATA = ("parquet", "image_folder")
OBJECTIVES = (
    "minimax",
    "nonsaturating",
    "wgan",
    "wgan-gp",
    "dragan",
    "ebgan",
    "madgan",
    "mrgan",
)
# Objectives whose D is a critic scored by the Wasserstein estimate E[D(x)] - E[D(G(z))].
WASSERSTEIN_OBJECTIVES = ("wgan", "wgan-gp")
ARCHS = ("mlp", "dcgan")
# Every data set, labelled or not, reports the Frechet distance and the k-NN measures of
# gan_core.manifold: in raw coordinates for points, in the feature space eval.features picks for
# images. Labelled data (mode centres, digit classes, a file's label column) also reports the
# modes a classifier sees and a KL over them (file data: services/preflight.py checks which).
POINT_METRICS = ("fd", "precision", "recall", "density", "coverage")
LABEL_METRICS = ("modes", "kl", "fd")
# The evaluation metrics each dataset reports (gan_core.metrics): checkpoint.metric may name one
# of its own data's, or a training metric (d_loss, g_loss, step, ...), which every run reports.
EVAL_METRICS: dict[str, tuple[str, ...]] = {
    "ring8": ("modes", "hq_pct", "reverse_kl", *POINT_METRICS),
    "grid25": ("modes", "hq_pct", "reverse_kl", *POINT_METRICS),
    "digits": tuple(dict.fromkeys(LABEL_METRICS + POINT_METRICS)),
    "stacked_digits": tuple(dict.fromkeys(LABEL_METRICS + POINT_METRICS)),
    # File data: what it reports depends on what the files hold (services/preflight.py checks).
    "parquet": tuple(dict.fromkeys(LABEL_METRICS + POINT_METRICS)),
    "image_folder": tuple(dict.fromkeys(LABEL_METRICS + POINT_METRICS)),
}
# eval.features: the space image metrics are computed in (gan_core.features), or a TorchScript
# file (a path ending in TORCHSCRIPT_SUFFIX, local or s3://). Points always use raw coordinates.
EVAL_FEATURES = ("auto", "labels", "digits", "random")
TORCHSCRIPT_SUFFIX = ".pt"
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "elu")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
LR_SCHEDULES = ("constant", "cosine", "linear")
NONFINITE_POLICIES = ("rollback", "stop", "continue")
PRECISIONS = ("fp32", "bf16", "fp16")
# Image sides the DCGAN nets support (gan_core.nets builds them from this).
DCGAN_SIDES = (8, 16, 32, 64)
# torch.set_num_threads accepts more, but each thread is a real OS thread; this is already far
# beyond any machine, and a typo such as threads=100000 crashes the process.
MAX_THREADS = 1024
# MAD-GAN's evaluation draws at most 5000 samples per call, at least one per generator.
MAX_GENERATORS = 5000
# Fourier features per point: far beyond useful (64 suffice for grid-25), small enough to build.
MAX_FOURIER = 4096
POINT_DATA = ("ring8", "grid25")
# Unrolled GAN look-ahead steps: each G step runs k D updates (the paper uses k <= 10, the bench
# 10); beyond this a G step costs over a thousand D steps, and second order keeps all k alive.
MAX_UNROLL_STEPS = 1000
# Run names become a folder and a prefix of Ray's and MLflow's own names (255-byte file names,
# with suffixes Ray appends); Ray's metrics fail on non-ASCII text inside a worker.
MAX_NAME_LENGTH = 100
# A config file is a few hundred bytes; anything far larger is not one (and is not read whole).
MAX_CONFIG_BYTES = 2**20
# The most characters of a key or value an error shows: enough to recognise a typo, never a
# whole file that was not a config (a key that is the file's first line, a credential).
MAX_SHOWN = 80
_DOTTED_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _short(text: str, limit: int = MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConfigError(ValueError):
    """A config value that is unknown, mistyped, out of range or incompatible with another.

    The message shows at most MAX_SHOWN characters of the key and of the value's repr; the
    attributes keep them whole."""

    def __init__(self, key: str, value: Any, allowed: str, source: str = "<overrides>") -> None:
        self.key, self.value, self.allowed, self.source = key, value, allowed, source
        shown = f"{_short(str(key))}={_short(repr(value))}"
        super().__init__(f"{source}: {shown} is invalid; allowed: {allowed}")


class _Hidden:
    """Stands in an error for a value that is not shown: a file's unknown key may hold anything
    (a credentials file's secret), so only the key is named."""

    def __repr__(self) -> str:
        return "<not shown>"


_NOT_SHOWN = _Hidden()


@dataclass
class DataConfig:
    name: str = "ring8"
    # File data only: a Parquet file or folder, or a folder of images; a local path or an s3://
    # URI. See gan_core.files for the layouts read.
    path: str = ""
    # File data only: the side images are trained at (encoded images are resized to it; lists of
    # pixels must already have it). 0 = the Parquet file holds points.
    image_size: int = 0
    channels: int = 1
    # Encoded images only: pixels of background (black) added on every side before resizing,
    # e.g. 2 turns 28x28 Fashion-MNIST into 32x32 without scaling it.
    pad: int = 0
    # File data: a data set whose decoded size is at most this many MiB is decoded once and kept
    # in memory (the local reader's process; under Ray, Ray's object store, shared by workers);
    # a larger one is streamed and decoded again every pass. 0 always streams.
    cache_mb: int = 1024


@dataclass
class GeneratorConfig:
    arch: str = "mlp"
    count: int = 1  # > 1 is a MAD-GAN generator bank
    shared: bool = False  # MAD-GAN: share all but the last layer between generators
    z_dim: int = 2
    width: int = 400  # MLP hidden units, or DCGAN base channels
    depth: int = 4  # MLP hidden layers
    activation: str = "relu"
    batch_norm: bool = True


@dataclass
class MinibatchConfig:
    kernels: int = 0  # B in Salimans et al.; 0 turns minibatch discrimination off
    kernel_dims: int = 5  # C


@dataclass
class DiscriminatorConfig:
    arch: str = "mlp"
    width: int = 200
    depth: int = 3
    activation: str = "leaky_relu"
    maxout_pieces: int = 1  # > 1 replaces each hidden activation by a maxout of that many pieces
    batch_norm: bool = False  # off by default: BN on real-only/fake-only batches leaks statistics
    pack: int = 1  # PacGAN: samples per discriminator input
    minibatch: MinibatchConfig = field(default_factory=MinibatchConfig)
    # Random Fourier features of each input point (MLP on points only; 0 = off): D sees
    # sin/cos(2 pi x B) for a fixed Gaussian B of this many columns with entries of std
    # fourier_scale (cycles per data unit). An MLP on raw 2D coordinates learns sharp, many-bump
    # functions slowly (spectral bias): on grid-25 PacGAN's D stays at chance for thousands of
    # steps; with these features it separates them from noise at once (test_fourier.py). In a
    # GAN the sharper D can overpower G: see bench/search_notes.md before turning it on.
    fourier_features: int = 0
    fourier_scale: float = 1.0


@dataclass
class EncoderConfig:
    """MRGAN's encoder E: x -> z (an MLP or DCGAN-style conv net like D's body)."""

    width: int = 200
    depth: int = 3


@dataclass
class ObjectiveConfig:
    name: str = "nonsaturating"
    gp_weight: float = 10.0  # WGAN-GP and DRAGAN penalty weight (lambda)
    n_critic: int = 1  # D updates per G update
    # WGAN (Arjovsky et al. 2017): every critic weight is clipped to [-clip, clip] after each
    # critic update. Read by objective wgan only.
    clip: float = 0.01
    dragan_noise: float = 0.5  # DRAGAN perturbation scale c: x + c * std(x) * U[0, 1)
    ebgan_margin: float = 1.0
    ebgan_pt_weight: float = 0.1  # pulling-away term weight
    madgan_diversity: float = 0.0  # cosine-similarity penalty between generators' samples
    # MAD-GAN-Sim (objectives.madgan_similarity): weight of the hinge that, for the SAME z,
    # pushes the generators' samples apart in D's penultimate features; 0 = off.
    madgan_similarity: float = 0.0
    mrgan_geometric: float = 0.2  # lambda_1: ||x - G(E(x))||^2
    mrgan_mode: float = 0.4  # lambda_2: -log D(G(E(x)))
    # MRGAN's manifold-diffusion schedule (MDGAN, Che et al. 2017; gan_core.steps.
    # manifold_diffusion_updates): each step trains D on x against G(E(x)), then G and E on the
    # two terms above; then a second discriminator D_D (D's architecture, d_optim's settings)
    # on G(E(x)) against G(z), then G alone on -log D_D(G(z)). false: MRGAN's single G phase,
    # G's own loss plus the two terms. true only with objective mrgan, one generator, no unroll.
    mrgan_diffusion: bool = False


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    # rmsprop: decay of the running mean of squared gradients (torch's default, and the WGAN
    # authors' code). Adam and SGD ignore it, as rmsprop and sgd ignore the betas.
    alpha: float = 0.99


@dataclass
class UnrollConfig:
    steps: int = 0  # k look-ahead steps of D for G's loss; 0 = off
    second_order: bool = True  # differentiate G's loss through the k steps (as in the paper)


@dataclass
class TrainConfig:
    steps: int = 5000  # G updates
    batch_size: int = 100  # per worker
    ema: float = 0.0  # decay of an exponential moving average of G's weights; 0 = off
    lr_schedule: str = "constant"
    threads: int = 0  # torch intra-op threads per process; 0 = leave torch's default
    # What a non-finite loss or weight does: roll back to the last good checkpoint with the
    # learning rates times nan_lr_factor (at most nan_retries times), or stop at once.
    # continue: no check (NaN metrics score lowest; a Tune scheduler may stop the trial).
    on_nonfinite: str = "rollback"  # rollback | stop | continue
    nan_retries: int = 3
    nan_lr_factor: float = 0.5
    # GPU path (each a no-op or exact on CPU unless asked for): autocast precision, NHWC
    # memory layout for conv nets, torch.compile of G and D.
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: one GradScaler for G, one for D)
    channels_last: bool = False
    compile: bool = False


@dataclass
class EvalConfig:
    every: int = 1000  # steps between evaluations
    samples: int = 2500  # generated samples scored per evaluation
    grid: int = 64  # samples in the fixed-noise grid / scatter
    # Feature space of the image metrics (docs/METRICS.md): auto | labels | digits | random | a
    # TorchScript file (*.pt, local or s3://). auto = labels with a label column, else random.
    features: str = "auto"


@dataclass
class ResourcesConfig:
    """How the Ray service runs this config (gan_core itself ignores it)."""

    backend: str = "ray"  # ray | local
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    # Seconds a job waits for its workers to be placed (a node lost, a busy cluster) before it
    # stops with exit status 4; a rerun resumes from the last checkpoint (services/waiting.py).
    wait_timeout: float = 1800.0


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps; a checkpoint is also written at the end
    keep: int = 2  # best K kept by `metric`
    metric: str = ""  # empty: "modes" where the data has labels, else "step" (the latest)
    mode: str = "max"


@dataclass
class StorageConfig:
    uri: str = "./runs"  # local folder or s3://bucket/prefix
    endpoint: str = ""  # S3-compatible endpoint URL; empty = AWS_ENDPOINT_URL or AWS default
    region: str = ""
    # A run's lease (services/lease.py) is renewed every quarter of this; a holder silent for
    # longer on another machine is presumed dead (one on this machine is checked by its PID).
    lease_seconds: float = 60.0


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty = MLFLOW_TRACKING_URI or sqlite:///<storage>/mlflow.db
    experiment: str = "raygan"
    # Registered model name for the run's generator (services/model_log.py); empty = not registered.
    register_as: str = ""


# What MLflow's registry and ``models:/NAME/latest`` URIs accept, minus characters that a shell,
# a URI or a file name would trip over.
REGISTERED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass
class GanConfig:
    name: str = "ring8"  # run name; stable so that rerunning the same name resumes
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    generators: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    g_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    d_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    unroll: UnrollConfig = field(default_factory=UnrollConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


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


def to_dict(cfg: GanConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: GanConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: GanConfig) -> dict[str, Any]:
    """``{"generators.count": 1, ...}``: the form MLflow params and Tune spaces use."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(name + ".", value)
            else:
                out[name] = value

    walk("", to_dict(cfg))
    return out


def _check(ok: bool, key: str, value: Any, allowed: str, source: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed, source)


def _one_of(key: str, value: Any, options: tuple[str, ...], source: str) -> None:
    _check(value in options, key, value, "one of " + ", ".join(options), source)


def checkpoint_metric(cfg: GanConfig) -> tuple[str, str]:
    """The (metric, mode) that ranks kept checkpoints: ``checkpoint.metric``, or by default modes
    (max) where the data has mode labels and the step (max: the latest) where it has none."""
    c = cfg.checkpoint
    if c.metric:
        return c.metric, c.mode
    # File data reports modes only with a label column, unknown until the data is read.
    labelled = cfg.data.name not in FILE_DATA and EVAL_METRICS.get(cfg.data.name)
    return ("modes", "max") if labelled else ("step", "max")


def _check_features(cfg: GanConfig, file_images: bool, source: str) -> None:
    """eval.features: a known name or a TorchScript path, and one the data's kind can use."""
    value = cfg.eval.features
    _check(
        value in EVAL_FEATURES
        or (value.endswith(TORCHSCRIPT_SUFFIX) and len(value) > len(TORCHSCRIPT_SUFFIX)),
        "eval.features",
        value,
        f"one of {', '.join(EVAL_FEATURES)}, or a TorchScript file path ending in "
        f"{TORCHSCRIPT_SUFFIX} (local or s3://)",
        source,
    )
    points = cfg.data.name in POINT_DATA or (cfg.data.name == "parquet" and not file_images)
    # Points are scored in their own coordinates: a feature space asked of them would be ignored.
    _check(
        value == "auto" or not points,
        "eval.features",
        value,
        f"auto for point data (data.name={cfg.data.name}: metrics in raw coordinates)",
        source,
    )
    _check(
        value in ("auto", "digits") or cfg.data.name not in ("digits", "stacked_digits"),
        "eval.features",
        value,
        f"auto or digits for data.name={cfg.data.name} (the digit classifier's features)",
        source,
    )


def validate(cfg: GanConfig, source: str = "<config>") -> None:
    """Range and combination checks that types alone cannot express."""
    g, d, o, t = cfg.generators, cfg.discriminator, cfg.objective, cfg.train
    _one_of("data.name", cfg.data.name, DATASETS, source)
    # data.image_size only means something for file data: ring8 with image_size=16 is points.
    file_images = cfg.data.name in FILE_DATA and cfg.data.image_size > 0
    image_data = cfg.data.name in ("digits", "stacked_digits") or file_images
    _check(
        cfg.data.name != "parquet" or bool(cfg.data.path),
        "data.path",
        cfg.data.path,
        "a Parquet file or folder when data.name=parquet",
        source,
    )
    _check(
        cfg.data.name != "image_folder" or bool(cfg.data.path),
        "data.path",
        cfg.data.path,
        "a folder of .png/.jpg files (local or s3://) when data.name=image_folder",
        source,
    )
    _check(cfg.data.image_size >= 0, "data.image_size", cfg.data.image_size, ">= 0", source)
    _check(
        cfg.data.name != "image_folder" or cfg.data.image_size > 0,
        "data.image_size",
        cfg.data.image_size,
        "> 0 with data.name=image_folder (the side images are resized to)",
        source,
    )
    _check(cfg.data.channels >= 1, "data.channels", cfg.data.channels, ">= 1", source)
    _check(
        cfg.data.name != "image_folder" or cfg.data.channels in (1, 3),
        "data.channels",
        cfg.data.channels,
        "1 (grayscale) or 3 (RGB) with data.name=image_folder (what images decode to)",
        source,
    )
    _check(cfg.data.pad >= 0, "data.pad", cfg.data.pad, ">= 0", source)
    _check(cfg.data.cache_mb >= 0, "data.cache_mb", cfg.data.cache_mb, ">= 0 (0 = stream)", source)
    _one_of("objective.name", o.name, OBJECTIVES, source)
    for prefix, arch in (("generators", g.arch), ("discriminator", d.arch)):
        _one_of(f"{prefix}.arch", arch, ARCHS, source)
    _one_of("generators.activation", g.activation, ACTIVATIONS, source)
    _one_of("discriminator.activation", d.activation, ACTIVATIONS, source)
    _check(g.count >= 1, "generators.count", g.count, ">= 1 (1 = single G, > 1 = MAD-GAN)", source)
    _check(g.z_dim >= 1, "generators.z_dim", g.z_dim, ">= 1", source)
    for prefix, net in (("generators", g), ("discriminator", d), ("encoder", cfg.encoder)):
        _check(net.width >= 1, f"{prefix}.width", net.width, ">= 1", source)
        _check(net.depth >= 1, f"{prefix}.depth", net.depth, ">= 1", source)
    _check(d.maxout_pieces >= 1, "discriminator.maxout_pieces", d.maxout_pieces, ">= 1", source)
    _check(d.pack >= 1, "discriminator.pack", d.pack, ">= 1", source)
    _check(
        0 <= d.fourier_features <= MAX_FOURIER,
        "discriminator.fourier_features",
        d.fourier_features,
        f"an integer in [0, {MAX_FOURIER}] (0 = off)",
        source,
    )
    _check(d.fourier_scale > 0, "discriminator.fourier_scale", d.fourier_scale, "> 0", source)
    if d.fourier_features > 0:
        _check(
            d.arch == "mlp" and cfg.data.name in POINT_DATA + ("parquet",) and not image_data,
            "discriminator.fourier_features",
            d.fourier_features,
            "0 unless discriminator.arch=mlp on point data (features of 2D coordinates)",
            source,
        )
        _check(
            cfg.objective.name != "ebgan",
            "discriminator.fourier_features",
            d.fourier_features,
            "0 with objective ebgan (its D is an autoencoder of the raw input)",
            source,
        )
    mb = d.minibatch
    _check(mb.kernels >= 0, "discriminator.minibatch.kernels", mb.kernels, ">= 0 (0 = off)", source)
    _check(
        mb.kernel_dims >= 1, "discriminator.minibatch.kernel_dims", mb.kernel_dims, ">= 1", source
    )
    for prefix, opt in (("g_optim", cfg.g_optim), ("d_optim", cfg.d_optim)):
        _one_of(f"{prefix}.name", opt.name, OPTIMIZERS, source)
        _check(opt.lr > 0, f"{prefix}.lr", opt.lr, "> 0", source)
        _check(0 <= opt.beta1 < 1, f"{prefix}.beta1", opt.beta1, "in [0, 1)", source)
        _check(0 <= opt.beta2 < 1, f"{prefix}.beta2", opt.beta2, "in [0, 1)", source)
        _check(0 <= opt.alpha < 1, f"{prefix}.alpha", opt.alpha, "in [0, 1)", source)
    _check(cfg.unroll.steps >= 0, "unroll.steps", cfg.unroll.steps, ">= 0 (0 = off)", source)
    _check(o.n_critic >= 1, "objective.n_critic", o.n_critic, ">= 1", source)
    for key in (
        "gp_weight",
        "clip",
        "dragan_noise",
        "ebgan_margin",
        "ebgan_pt_weight",
        "madgan_diversity",
        "madgan_similarity",
        "mrgan_geometric",
        "mrgan_mode",
    ):
        value = getattr(o, key)
        _check(value >= 0, f"objective.{key}", value, ">= 0", source)
    _check(t.steps >= 1, "train.steps", t.steps, ">= 1", source)
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1", source)
    _check(0 <= t.ema < 1, "train.ema", t.ema, "in [0, 1) (0 = off)", source)
    _one_of("train.lr_schedule", t.lr_schedule, LR_SCHEDULES, source)
    _check(t.threads >= 0, "train.threads", t.threads, ">= 0 (0 = torch default)", source)
    _one_of("train.on_nonfinite", t.on_nonfinite, NONFINITE_POLICIES, source)
    _check(t.nan_retries >= 0, "train.nan_retries", t.nan_retries, ">= 0", source)
    _check(0 < t.nan_lr_factor <= 1, "train.nan_lr_factor", t.nan_lr_factor, "in (0, 1]", source)
    _one_of("train.precision", t.precision, PRECISIONS, source)
    _check(cfg.eval.every >= 1, "eval.every", cfg.eval.every, ">= 1", source)
    _check(cfg.eval.samples >= 1, "eval.samples", cfg.eval.samples, ">= 1", source)
    _check(cfg.eval.grid >= 1, "eval.grid", cfg.eval.grid, ">= 1", source)
    _check_features(cfg, file_images, source)
    r = cfg.resources
    _one_of("resources.backend", r.backend, ("ray", "local"), source)
    _check(r.num_workers >= 1, "resources.num_workers", r.num_workers, ">= 1", source)
    _check(r.cpus_per_worker > 0, "resources.cpus_per_worker", r.cpus_per_worker, "> 0", source)
    _check(r.max_failures >= -1, "resources.max_failures", r.max_failures, ">= -1", source)
    _check(
        r.wait_timeout >= 10,
        "resources.wait_timeout",
        r.wait_timeout,
        ">= 10 (seconds a job waits for its workers to be placed)",
        source,
    )
    _check(
        5 <= cfg.storage.lease_seconds <= 86400,
        "storage.lease_seconds",
        cfg.storage.lease_seconds,
        "5-86400 (seconds without renewal before a run's lease on another machine is stale)",
        source,
    )
    c = cfg.checkpoint
    _check(c.every >= 1, "checkpoint.every", c.every, ">= 1", source)
    _check(c.keep >= 1, "checkpoint.keep", c.keep, ">= 1", source)
    _one_of("checkpoint.mode", c.mode, ("max", "min"), source)
    own = EVAL_METRICS.get(cfg.data.name, ())
    other = {m for names in EVAL_METRICS.values() for m in names} - set(own)
    # Ray only logs an error per checkpoint for a missing score and then keeps arbitrary ones.
    _check(
        c.metric not in other,
        "checkpoint.metric",
        c.metric,
        f"a metric data.name={cfg.data.name} reports: "
        + (", ".join(own) + " or " if own else "")
        + "a training metric (d_loss, g_loss, step), or empty for the data's default",
        source,
    )
    _check(
        bool(cfg.name)
        and cfg.name not in (".", "..")
        and not any(ch in cfg.name for ch in "/\\")
        and cfg.name.isprintable()
        and cfg.name.isascii()
        and len(cfg.name) <= MAX_NAME_LENGTH,
        "name",
        cfg.name,
        f"a non-empty name of at most {MAX_NAME_LENGTH} printable ASCII characters, without "
        "'/', '\\' or control characters, other than '.' and '..' (it names the run's folder "
        "under storage.uri, Ray's run and MLflow's)",
        source,
    )
    # torch takes a negative seed (as 2**64 + seed), but numpy's generators, which order file
    # data and draw the digit sets, refuse one inside the worker: a seed is a count, >= 0.
    _check(cfg.seed >= 0, "seed", cfg.seed, "an integer >= 0", source)
    register_as = cfg.tracking.register_as
    _check(
        not register_as or REGISTERED_NAME.fullmatch(register_as) is not None,
        "tracking.register_as",
        register_as,
        "empty (no registry) or a model name of 1-128 letters, digits, '_', '.', '-', starting "
        "with a letter or digit",
        source,
    )
    _check(
        not register_as or cfg.tracking.enabled,
        "tracking.register_as",
        register_as,
        "empty when tracking.enabled=false (registering needs the run's MLflow run)",
        source,
    )
    _check(
        t.threads <= MAX_THREADS,
        "train.threads",
        t.threads,
        f"<= {MAX_THREADS} (0 = torch default)",
        source,
    )
    _check(
        g.count <= MAX_GENERATORS,
        "generators.count",
        g.count,
        f"<= {MAX_GENERATORS} (evaluation draws at most {MAX_GENERATORS} samples per call)",
        source,
    )
    _check_numbers(cfg, source)

    # Combinations.
    _check(
        t.batch_size >= g.count,
        "train.batch_size",
        t.batch_size,
        f">= generators.count ({g.count}): every generator needs samples in a batch",
        source,
    )
    _check(
        t.batch_size % g.count == 0,
        "train.batch_size",
        t.batch_size,
        f"a multiple of generators.count ({g.count})",
        source,
    )
    _check(
        t.batch_size % d.pack == 0,
        "train.batch_size",
        t.batch_size,
        f"a multiple of discriminator.pack ({d.pack})",
        source,
    )
    # MAD-GAN-Sim compares generators pairwise on the same z, by the real-class score of
    # MAD-GAN's N+1-way discriminator: there is nothing to compare with one generator, and no
    # such score with another objective's D.
    _check(
        o.madgan_similarity == 0 or g.count >= 2,
        "objective.madgan_similarity",
        o.madgan_similarity,
        f"0 with generators.count={g.count} (the term compares pairs of generators)",
        source,
    )
    _check(
        o.madgan_similarity == 0 or o.name == "madgan",
        "objective.madgan_similarity",
        o.madgan_similarity,
        f"0 with objective {o.name} (the term's margin is read from objective madgan's "
        "N+1-way discriminator, its real-class probability)",
        source,
    )
    _check(
        o.name != "madgan" or g.count >= 2,
        "objective.name",
        o.name,
        f"madgan needs generators.count >= 2 (got {g.count}); use nonsaturating for one G",
        source,
    )
    _check(
        o.name != "madgan" or d.pack == 1,
        "discriminator.pack",
        d.pack,
        "1 with objective madgan (D classifies single samples by generator)",
        source,
    )
    # The manifold-diffusion schedule is MRGAN's (it trains the encoder). The look-ahead unrolls
    # one D in front of G's one loss; the schedule has two Ds, each with its own G loss. With a
    # bank the encoder would send real row i to the head that the row's place in the batch picks
    # (sample_noise's layout), not to one it learned: one generator, as in the paper.
    _check(
        not o.mrgan_diffusion or o.name == "mrgan",
        "objective.mrgan_diffusion",
        o.mrgan_diffusion,
        f"false with objective {o.name} (the manifold-diffusion schedule trains MRGAN's "
        "encoder; set objective.name=mrgan)",
        source,
    )
    _check(
        not o.mrgan_diffusion or cfg.unroll.steps == 0,
        "unroll.steps",
        cfg.unroll.steps,
        "0 with objective.mrgan_diffusion=true (the look-ahead unrolls one discriminator in "
        "front of one G loss; the schedule trains two, in separate phases)",
        source,
    )
    _check(
        not o.mrgan_diffusion or g.count == 1,
        "generators.count",
        g.count,
        "1 with objective.mrgan_diffusion=true (the encoder would assign each real sample to "
        "a generator by its row in the batch, not by anything learned)",
        source,
    )
    _check(
        o.name != "wgan" or o.clip > 0,
        "objective.clip",
        o.clip,
        "> 0 with objective wgan (clipping is its only constraint on the critic; for a "
        "gradient penalty instead use objective.name=wgan-gp)",
        source,
    )
    # The unroll look-ahead replays D's own update rule (gan_core.unroll): it has no weight
    # clipping and no RMSProp, so it would look ahead along a path D never takes.
    _check(
        o.name != "wgan" or cfg.unroll.steps == 0,
        "unroll.steps",
        cfg.unroll.steps,
        "0 with objective wgan (the look-ahead does not clip the critic's weights)",
        source,
    )
    _check(
        cfg.d_optim.name != "rmsprop" or cfg.unroll.steps == 0,
        "d_optim.name",
        cfg.d_optim.name,
        f"adam or sgd with unroll.steps={cfg.unroll.steps} (the look-ahead replays D's update "
        "rule for those two only), or unroll.steps=0",
        source,
    )
    _check(
        o.name != "ebgan" or mb.kernels == 0,
        "discriminator.minibatch.kernels",
        mb.kernels,
        "0 with objective ebgan (its discriminator is an autoencoder)",
        source,
    )
    _check(
        o.name != "ebgan" or d.pack == 1,
        "discriminator.pack",
        d.pack,
        "1 with objective ebgan (its discriminator is an autoencoder)",
        source,
    )
    _check(
        not (mb.kernels > 0 and t.batch_size // d.pack < 2),
        "discriminator.minibatch.kernels",
        mb.kernels,
        "0 when a batch holds fewer than 2 discriminator inputs",
        source,
    )
    for prefix, arch in (("generators.arch", g.arch), ("discriminator.arch", d.arch)):
        _check(
            arch == "mlp" or image_data,
            prefix,
            arch,
            "mlp for point data (dcgan needs image data)",
            source,
        )
    if file_images and "dcgan" in (g.arch, d.arch):
        _check(
            cfg.data.image_size in DCGAN_SIDES,
            "data.image_size",
            cfg.data.image_size,
            f"one of {', '.join(map(str, DCGAN_SIDES))} with dcgan nets (or mlp nets)",
            source,
        )
    # Training-mode BatchNorm1d needs at least 2 samples per batch it normalises (the conv nets'
    # BatchNorm2d always has a 4x4 map or more per sample). Each generator of a bank normalises
    # its own share of the batch, a shared body the whole batch; D sees batch/pack packed fakes
    # alone in G's phase.
    if g.batch_norm and g.arch == "mlp":
        per_net = t.batch_size if (g.shared and g.count > 1) else t.batch_size // g.count
        _check(
            per_net >= 2,
            "train.batch_size",
            t.batch_size,
            f">= 2 * generators.count ({2 * g.count}) with generators.batch_norm (BatchNorm "
            "needs 2 samples per generator), or generators.batch_norm=false",
            source,
        )
    if d.batch_norm and d.arch == "mlp":
        _check(
            t.batch_size // d.pack >= 2,
            "train.batch_size",
            t.batch_size,
            f">= 2 * discriminator.pack ({2 * d.pack}) with discriminator.batch_norm (BatchNorm "
            "needs 2 inputs per batch), or discriminator.batch_norm=false",
            source,
        )
    # Last: valid sizes can still add up to more memory than any worker has (a width of 10**6);
    # the estimate builds the nets on the meta device, which needs every check above to pass.
    from gan_core.footprint import check_footprint  # imported here: it imports torch and nets

    check_footprint(cfg, source=source)
    # After the estimate, so a look-ahead too big to hold is reported with its size; one that
    # fits can still make every G step cost more D steps than a run can wait for.
    _check(
        cfg.unroll.steps <= MAX_UNROLL_STEPS,
        "unroll.steps",
        cfg.unroll.steps,
        f"an integer in [0, {MAX_UNROLL_STEPS}] (each G step runs unroll.steps D updates; the "
        "paper uses up to 10)",
        source,
    )


def _check_numbers(cfg: GanConfig, source: str) -> None:
    """Every number is finite and fits the 64-bit integers torch, numpy and Ray convert to.

    The range checks above compare, so they let inf (lr=inf passes "> 0") and 10**30 through;
    those only fail later, inside a worker (NaN weights, "Overflow when unpacking long")."""
    for key, value in flatten(cfg).items():
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            _check(math.isfinite(value), key, value, "a finite number", source)
        elif isinstance(value, int):
            _check(-(2**63) <= value < 2**63, key, value, "a 64-bit integer", source)

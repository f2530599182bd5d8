"""The schema of a run config: its dataclasses, the values its keys allow, and ConfigError.

Imports nothing of raygan, so that gan_core.nets and gan_core.footprint can read it without
reaching the rules (gan_core.config.rules), whose last check builds the nets.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

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
# The most characters of a key or value an error shows: enough to recognise a typo, never a
# whole file that was not a config (a key that is the file's first line, a credential).
MAX_SHOWN = 80


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


def checkpoint_metric(cfg: GanConfig) -> tuple[str, str]:
    """The (metric, mode) that ranks kept checkpoints: ``checkpoint.metric``, or by default modes
    (max) where the data has mode labels and the step (max: the latest) where it has none."""
    c = cfg.checkpoint
    if c.metric:
        return c.metric, c.mode
    # File data reports modes only with a label column, unknown until the data is read.
    labelled = cfg.data.name not in FILE_DATA and EVAL_METRICS.get(cfg.data.name)
    return ("modes", "max") if labelled else ("step", "max")


def to_dict(cfg: GanConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


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

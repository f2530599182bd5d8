"""validate(): the range and combination checks of a GanConfig that its types cannot express.

Every refusal is a ConfigError naming the key, the value, what is allowed and the config's source.
"""

from __future__ import annotations

import math
from typing import Any

from gan_core.config.schema import (
    ACTIVATIONS,
    ARCHS,
    DATASETS,
    DCGAN_SIDES,
    EVAL_FEATURES,
    EVAL_METRICS,
    FILE_DATA,
    LR_SCHEDULES,
    MAX_FOURIER,
    MAX_GENERATORS,
    MAX_NAME_LENGTH,
    MAX_THREADS,
    MAX_UNROLL_STEPS,
    NONFINITE_POLICIES,
    OBJECTIVES,
    OPTIMIZERS,
    POINT_DATA,
    PRECISIONS,
    REGISTERED_NAME,
    TORCHSCRIPT_SUFFIX,
    ConfigError,
    GanConfig,
    flatten,
)


def _check(ok: bool, key: str, value: Any, allowed: str, source: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed, source)


def _one_of(key: str, value: Any, options: tuple[str, ...], source: str) -> None:
    _check(value in options, key, value, "one of " + ", ".join(options), source)


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

"""GAN objectives: pure loss functions of discriminator outputs, one per term in the literature.

Every function takes tensors the training step already has (logits, critic scores, energies,
codes, samples) and returns a scalar tensor, the mean over the batch, so each loss can be checked
by hand and composed freely (an unrolled MAD-GAN is just these terms evaluated at other params).
Logit-based losses use softplus / cross-entropy rather than sigmoid-then-log, which would turn a
confident discriminator's logits into ``log(0) = -inf``.

Sign conventions follow the papers: every ``*_d_loss`` is minimised by the discriminator, every
``*_g_loss`` by the generator; penalties and regularizers are returned unweighted unless their
weight is an argument.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def gan_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Goodfellow et al.'s discriminator loss ``-E[log D(x)] - E[log(1 - D(G(z)))]``."""
    # -log(sigmoid(r)) = softplus(-r) and -log(1 - sigmoid(f)) = softplus(f)
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def minimax_g_loss(fake_logits: Tensor) -> Tensor:
    """The original (saturating) generator loss ``E[log(1 - D(G(z)))]``.

    Its gradient vanishes exactly when D confidently rejects the samples, which is why
    ``nonsaturating_g_loss`` is the usual choice; it is kept to reproduce that failure.
    """
    return -F.softplus(fake_logits).mean()


def nonsaturating_g_loss(fake_logits: Tensor) -> Tensor:
    """The non-saturating generator loss ``-E[log D(G(z))]``: same optimum, strong early push."""
    return F.softplus(-fake_logits).mean()


def wgan_d_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """The WGAN critic loss ``E[f(G(z))] - E[f(x)]`` (the negated Wasserstein-1 estimate)."""
    return fake_scores.mean() - real_scores.mean()


def wgan_g_loss(fake_scores: Tensor) -> Tensor:
    """The WGAN generator loss ``-E[f(G(z))]``."""
    return -fake_scores.mean()


def wasserstein_estimate(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """The critic's estimate of the Wasserstein-1 distance, ``E[f(x)] - E[f(G(z))]``.

    Up to the critic's Lipschitz constant (weight clipping bounds it, a gradient penalty pulls it
    towards 1) this is the quantity Arjovsky et al. show falls as samples improve, unlike a
    minimax loss; it is ``-wgan_d_loss`` and carries no penalty.
    """
    return real_scores.mean() - fake_scores.mean()


def _per_sample_uniform(
    like: Tensor, shape: tuple[int, ...], generator: torch.Generator | None
) -> Tensor:
    # Draw on the generator's own device so a CPU generator also serves a CUDA batch.
    device = generator.device if generator is not None else like.device
    draw = torch.rand(shape, generator=generator, device=device, dtype=like.dtype)
    return draw.to(like.device)


def _unit_gradient_norm_penalty(critic: Callable[[Tensor], Tensor], x_hat: Tensor) -> Tensor:
    x_hat = x_hat.detach().requires_grad_(True)
    # create_graph=True keeps the gradient differentiable, so the penalty's backward reaches the
    # critic's parameters (a double backward).
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


def gradient_penalty(
    critic: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """WGAN-GP's penalty ``E[(||grad_x critic(x_hat)||_2 - 1)^2]`` (Gulrajani et al. 2017).

    ``x_hat = a * real + (1 - a) * fake`` with one ``a ~ U[0, 1)`` per sample, shared by all of
    that sample's features. The points are detached from whatever produced them: the penalty is a
    term of the critic's loss only. Not multiplied by lambda.
    """
    a = _per_sample_uniform(real, (real.shape[0],) + (1,) * (real.dim() - 1), generator)
    x_hat = a * real.detach() + (1.0 - a) * fake.detach()
    return _unit_gradient_norm_penalty(critic, x_hat)


def dragan_penalty(
    critic: Callable[[Tensor], Tensor],
    real: Tensor,
    noise_scale: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DRAGAN's penalty ``E[(||grad critic(x_hat)|| - 1)^2]`` around the data (Kodali et al. 2017).

    ``x_p = real + noise_scale * std(real) * u`` with ``u ~ U[0, 1)`` per feature (``std`` over the
    whole batch), then ``x_hat = a * real + (1 - a) * x_p`` with one ``a ~ U[0, 1)`` per sample.
    ``u`` is drawn before ``a``. Not multiplied by lambda.
    """
    real = real.detach()
    noise = _per_sample_uniform(real, tuple(real.shape), generator)
    x_p = real + noise_scale * real.std() * noise
    a = _per_sample_uniform(real, (real.shape[0],) + (1,) * (real.dim() - 1), generator)
    return _unit_gradient_norm_penalty(critic, a * real + (1.0 - a) * x_p)


def ebgan_d_loss(real_energy: Tensor, fake_energy: Tensor, margin: float) -> Tensor:
    """EBGAN's discriminator loss ``E[D(x)] + E[max(0, margin - D(G(z)))]`` (Zhao et al. 2017).

    Energies are per sample, shape ``(n,)``; fakes already above the margin cost nothing.
    """
    return real_energy.mean() + F.relu(margin - fake_energy).mean()


def pulling_away_term(code: Tensor) -> Tensor:
    """EBGAN's pulling-away term: mean squared cosine similarity over ordered pairs ``i != j``.

    ``PT = 1/(N(N-1)) sum_{i != j} (s_i . s_j / (|s_i| |s_j|))^2`` for codes ``s`` of shape
    ``(N, ...)`` (flattened per sample). 0 for mutually orthogonal codes, 1 for parallel ones;
    0 for a batch of one, which has no pairs.
    """
    n = code.shape[0]
    if n < 2:
        return code.new_zeros(())
    unit = F.normalize(code.flatten(1), dim=1)
    cos_sq = (unit @ unit.T) ** 2
    # The diagonal is |s_i|^2 / |s_i|^2 = 1 for every nonzero code: remove it by subtraction.
    off_diagonal = cos_sq.sum() - cos_sq.diagonal().sum()
    return off_diagonal / (n * (n - 1))


def ebgan_g_loss(fake_energy: Tensor, fake_code: Tensor, pt_weight: float) -> Tensor:
    """EBGAN's generator loss ``E[D(G(z))] + pt_weight * PT(codes of G(z))``."""
    return fake_energy.mean() + pt_weight * pulling_away_term(fake_code)


def madgan_d_loss(real_logits: Tensor, fake_logits: Tensor, fake_generator: Tensor) -> Tensor:
    """MAD-GAN's (N+1)-class discriminator loss (Ghosh et al. 2018).

    Logits have ``N + 1`` columns: class ``i < N`` is "made by generator i", class ``N`` (the
    last) is "real". ``fake_generator[j]`` is the index of the generator that made fake ``j``.
    Cross-entropy of reals against class N plus cross-entropy of fakes against their generator.
    """
    real_class = real_logits.shape[1] - 1
    if fake_logits.shape[1] != real_logits.shape[1]:
        raise ValueError(
            f"real_logits have {real_logits.shape[1]} classes but fake_logits have "
            f"{fake_logits.shape[1]}; both must have num_generators + 1"
        )
    real_target = torch.full(
        (real_logits.shape[0],), real_class, dtype=torch.long, device=real_logits.device
    )
    return F.cross_entropy(real_logits, real_target) + F.cross_entropy(
        fake_logits, fake_generator.long()
    )


def madgan_g_loss(fake_logits: Tensor) -> Tensor:
    """MAD-GAN's non-saturating generator loss: cross-entropy of fakes against the real class N."""
    real_class = fake_logits.shape[1] - 1
    target = torch.full(
        (fake_logits.shape[0],), real_class, dtype=torch.long, device=fake_logits.device
    )
    return F.cross_entropy(fake_logits, target)


def madgan_diversity(samples: Tensor) -> Tensor:
    """Mean cosine similarity between generators' samples at the same batch index.

    ``samples`` has shape ``(N, m, ...)``: N generators, m samples each, generator i's k-th sample
    paired with generator j's k-th. The mean runs over pairs ``i < j`` and over k, so identical
    generators score 1 and opposite ones -1; one generator has no pairs and scores 0. This is the
    MAD-GAN paper's similarity-based diversity penalty: adding it to the generators' loss pushes
    them towards different modes.
    """
    n = samples.shape[0]
    if n < 2:
        return samples.new_zeros(())
    unit = F.normalize(samples.flatten(2), dim=2)
    # similarity[i, j, k] = cos(samples[i, k], samples[j, k])
    similarity = torch.einsum("ikd,jkd->ijk", unit, unit)
    i, j = torch.triu_indices(n, n, offset=1, device=samples.device)
    return similarity[i, j].mean()


def madgan_similarity(features: Tensor, real_prob: Tensor) -> Tensor:
    """MAD-GAN-Sim's competing objective (Ghosh et al., arXiv 1704.02906), as a hinge.

    ``features[i, k]`` is ``phi(G_i(z_k))``, D's penultimate-layer features of generator i's
    sample for the k-th noise vector, THE SAME ``z_k`` for every generator: shape (N, m, f).
    ``real_prob[i, k]`` is ``D_{N+1}(G_i(z_k))``, the probability D gives the real class: (N, m).
    The paper asks, for the same z, that D score G_i(z) above G_j(z) by a margin given by the
    similarity of the two samples in D's feature space,
    ``D(G_i(z)) >= D(G_j(z)) + psi(phi(G_i(z)), phi(G_j(z)))`` for every ``j != i``, with psi
    the cosine similarity here (margin scale 1). Both orders of a pair cannot hold at once
    unless the margin is <= 0, so the constraints are met only by generators whose samples D
    sees as dissimilar. Returned: the mean over ordered pairs ``i != j`` and over k of the
    violation ``max(0, psi_ijk - D(G_i(z_k)) + D(G_j(z_k)))``; 1 for identical generators
    (equal features and scores), 0 when equally scored samples have orthogonal or opposite
    features; 0 for one generator, which has no pairs.

    Each generator minimises only its own constraints (G_i is the ``i`` of pair (i, j)): the
    other generator's features and score enter pair (i, j) as constants, so the gradient of the
    sum reaching G_i is that of G_i's own objective and no generator is pushed to look worse.

    Source check: the authors' synthetic-data code (github.com/vivkul/MAD-GAN_synthetic,
    madgan.py, "Same noise as input to all the generators") confirms the shared z; the paper's
    equation itself could not be read while this was written (only its abstract, which places
    the similarity-based objective in the appendix), so the hinge form, psi = cosine and the
    margin scale of 1 above are this implementation's reading, to be checked against the paper.
    """
    n = features.shape[0]
    if n < 2:
        return features.new_zeros(())
    unit = F.normalize(features.flatten(2), dim=2)
    # cosine[i, j, k] = cos(phi(G_i(z_k)), phi(G_j(z_k))), with generator j held constant
    cosine = torch.einsum("ikd,jkd->ijk", unit, unit.detach())
    margin_violation = cosine - real_prob.unsqueeze(1) + real_prob.detach().unsqueeze(0)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=features.device)
    return F.relu(margin_violation[off_diagonal]).mean()


def mrgan_regularizer(
    real: Tensor,
    reconstruction: Tensor,
    reconstruction_logits: Tensor,
    geometric: float,
    mode: float,
) -> Tensor:
    """MRGAN's regularizer for G and the encoder E (Che et al. 2017).

    ``geometric * E||x - G(E(x))||^2 + mode * E[-log D(G(E(x)))]``, the squared distance summed
    over features and averaged over the batch. The paper writes the mode regularizer as
    ``E[log(1 - D(G(E(x))))]`` (saturating); this uses its non-saturating form
    ``-log D(G(E(x))) = softplus(-logit)``, as for the generator's own loss.
    """
    squared_distance = (real - reconstruction).flatten(1).pow(2).sum(dim=1).mean()
    return geometric * squared_distance + mode * F.softplus(-reconstruction_logits).mean()

"""The Unrolled GAN look-ahead (Metz et al. 2017): D's parameters k update steps into the future.

The generator's loss is evaluated against a discriminator that has already answered it: the
look-ahead runs D's own update rule (SGD or Adam, continuing D's real Adam moments) for ``k``
steps, functionally, on a params dict for ``torch.func.functional_call``. D's real parameters,
their ``.grad`` and its optimizer state are never touched, so the look-ahead is a pure function of
the current state and stays local to each worker (only G's final gradient is all-reduced).

With ``second_order=True`` the k updates stay in the autograd graph, so G's loss at the final
params is differentiated through them, as in the paper: G is also told how D would react.
With ``second_order=False`` each step is detached and G only sees the look-ahead D's gradient.

Only parameters are looked ahead; buffers (BatchNorm running statistics) are the module's own and
are not advanced, and a BN layer would also mix real and fake statistics across the k steps, so a
discriminator that is unrolled should have no BatchNorm. Pass the unwrapped module (not the DDP
wrapper), since the look-ahead must not all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

UNROLL_OPTIMIZERS = ("adam", "sgd")


def functional_discriminator(d: nn.Module, params: dict[str, Tensor]) -> Callable[..., Tensor]:
    """``d`` evaluated at ``params`` instead of its own parameters (buffers stay ``d``'s own).

    Also works on a module whose forward ``nn.Module.compile`` compiled in place (the params are
    graph inputs), as long as nothing differentiates through its gradient: a second-order
    look-ahead needs an eager D (``gan_core.steps.compile_networks`` keeps it so).
    """

    def call(*args: Any, **kwargs: Any) -> Tensor:
        return torch.func.functional_call(d, params, args, kwargs)

    return call


def _safe_sqrt(x: Tensor) -> Tensor:
    # sqrt's derivative is infinite at 0, and a parameter whose gradient is exactly 0 (a dead
    # ReLU) has Adam's second moment exactly 0, so a second-order look-ahead would give G a NaN
    # gradient. At v = 0 the first moment is 0 too, so the Adam step's true derivative there has
    # no sqrt term: a zero derivative is exact, and the double `where` keeps NaN out of backward.
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def lookahead_params(
    d: nn.Module,
    d_loss_fn: Callable[[Callable[[Tensor], Tensor]], Tensor],
    steps: int,
    optimizer: str,
    lr: float,
    betas: tuple[float, float] = (0.5, 0.999),
    optimizer_state: dict | None = None,
    second_order: bool = True,
    eps: float = 1e-8,
    loss_scale: Tensor | None = None,
) -> dict[str, Tensor]:
    """D's parameters after ``steps`` functional updates of its own rule, for ``functional_call``.

    ``d_loss_fn(call)`` returns D's loss, with ``call(x)`` evaluating D at the current look-ahead
    params (the caller closes over the real and fake batches; for the second-order look-ahead the
    fake batch must not be detached, so G's influence on D's updates is in the graph).
    ``optimizer`` is ``"adam"`` (bias-corrected, no weight decay or amsgrad, as
    ``torch.optim.Adam``'s defaults) or ``"sgd"`` (plain ``p - lr * g``). ``optimizer_state`` is
    ``torch.optim.Adam.state`` of D's real optimizer, keyed by parameter object; its step counts
    and moments are read, never written, and a parameter without an entry starts from zero.
    A parameter the loss does not use gets no gradient and, as in ``torch.optim``, no update.

    The look-ahead starts from detached copies of D's parameters with ``requires_grad=True``, even
    while D is frozen for the generator's phase. ``steps=0`` returns those copies unchanged.

    ``loss_scale`` (fp16 mixed precision: D's GradScaler scale, see ``gan_core.precision``) scales
    each look-ahead loss before its gradient is taken, so D's float16 backward does not
    underflow, and divides the gradients by it again before the update (in the graph, so a
    second-order look-ahead is differentiated through the same arithmetic). An overflow makes
    the look-ahead parameters non-finite, hence G's gradient, and G's own scaler skips that step.
    """
    if optimizer not in UNROLL_OPTIMIZERS:
        raise ValueError(
            f"unroll optimizer {optimizer!r} is not one of {UNROLL_OPTIMIZERS} "
            "(it must be D's own update rule, d_optim.name)"
        )
    if steps < 0:
        raise ValueError(f"unroll steps must be >= 0, got {steps}")
    beta1, beta2 = betas
    originals = dict(d.named_parameters())
    params = {name: p.detach().clone().requires_grad_(True) for name, p in originals.items()}

    step_count: dict[str, float] = {}
    exp_avg: dict[str, Tensor] = {}
    exp_avg_sq: dict[str, Tensor] = {}
    if optimizer == "adam":
        for name, p in originals.items():
            # .get: Optimizer.state is a defaultdict, and indexing it would insert an entry.
            state = (optimizer_state or {}).get(p) or {}
            step_count[name] = float(state["step"]) if "step" in state else 0.0
            exp_avg[name] = state["exp_avg"].detach() if "exp_avg" in state else torch.zeros_like(p)
            exp_avg_sq[name] = (
                state["exp_avg_sq"].detach() if "exp_avg_sq" in state else torch.zeros_like(p)
            )

    for _ in range(steps):
        loss = d_loss_fn(functional_discriminator(d, params))
        if loss_scale is not None:
            loss = loss * loss_scale
        names = list(params)
        grads = torch.autograd.grad(
            loss,
            [params[n] for n in names],
            create_graph=second_order,
            allow_unused=True,
        )
        if loss_scale is not None:
            grads = tuple(None if g is None else g / loss_scale for g in grads)
        updated: dict[str, Tensor] = {}
        for name, g in zip(names, grads, strict=True):
            p = params[name]
            if g is None:
                updated[name] = p
                continue
            if optimizer == "sgd":
                new_p = p - lr * g
            else:
                step_count[name] += 1.0
                t = step_count[name]
                # Same operation order as torch.optim.Adam's foreach path, so a one-step
                # look-ahead matches a real step to float rounding.
                exp_avg[name] = torch.lerp(exp_avg[name], g, 1.0 - beta1)
                exp_avg_sq[name] = exp_avg_sq[name] * beta2 + (1.0 - beta2) * g * g
                bias_correction1 = 1.0 - beta1**t
                bias_correction2_sqrt = (1.0 - beta2**t) ** 0.5
                denom = _safe_sqrt(exp_avg_sq[name]) / bias_correction2_sqrt + eps
                new_p = p - (lr / bias_correction1) * (exp_avg[name] / denom)
            if not second_order:
                # First order: cut each step off the graph, G's gradient stops at the final D.
                new_p = new_p.detach().requires_grad_(True)
            updated[name] = new_p
        params = updated
    return params

"""Mixed precision for the training step: autocast around network forwards, GradScalers for fp16.

``train.precision`` picks one of three modes:

- ``fp32``: nothing here touches the step; every helper returns its argument unchanged, so the
  arithmetic is exactly the full-precision step's.
- ``bf16``: each G, D (and MRGAN encoder) forward runs under ``torch.autocast(device_type,
  torch.bfloat16)`` and its outputs are cast back to float32, so losses, penalties, the unroll
  look-ahead's optimizer arithmetic and every reduction outside the networks stay in float32.
  bf16 has float32's exponent range, so no loss scaling is needed. Runs on CPU too.
- ``fp16``: the same autocast with float16, plus one ``torch.amp.GradScaler`` per network (one for
  G's optimizer, one for D's): G's and D's losses have unrelated magnitudes and are stepped in
  separate phases, so each gets a scale calibrated to its own gradients. torch 2.13 supports
  float16 autocast and ``GradScaler("cpu")`` on CPU, so fp16 runs there as well (slowly: it is
  for testing the code path, not for speed).

Gradient penalties under fp16 follow PyTorch's AMP recipe ("gradient penalty" in the AMP
examples): the inner ``autograd.grad`` that the penalty is built from is taken of a *scaled*
critic output (so its float16 backward does not underflow) and the resulting gradient is
*unscaled* before the penalty's norm is computed, all inside the graph so the double backward
sees the same scaling. ``scaled_penalty_critic`` does both with an identity op whose backward
multiplies by a factor.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

PRECISION_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for fp32); an unknown name is a ValueError."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(
            f"precision {precision!r} is unknown; allowed: {', '.join(PRECISION_DTYPES)}"
        )
    return PRECISION_DTYPES[precision]


def autocast(precision: str, device_type: str) -> AbstractContextManager[Any]:
    """``torch.autocast`` for ``precision`` on ``device_type``; a no-op context for fp32."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def _to_float32(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(_to_float32(o) for o in out)
    return out


def autocast_call(fn: Callable[..., Any], precision: str, device_type: str) -> Callable[..., Any]:
    """``fn`` run under autocast with its outputs cast to float32; ``fn`` itself for fp32.

    Returning ``fn`` unchanged for fp32 (rather than a wrapper under a disabled autocast) is what
    keeps the fp32 step bit-identical to the step without any precision code. The float32 cast
    of the outputs keeps every loss and reduction computed from them in float32.
    """
    if autocast_dtype(precision) is None:
        return fn

    def call(*args: Any, **kwargs: Any) -> Any:
        with autocast(precision, device_type):
            out = fn(*args, **kwargs)
        return _to_float32(out)

    return call


def make_scaler(precision: str, device_type: str) -> torch.amp.GradScaler | None:
    """A fresh GradScaler for fp16 (PyTorch's defaults: scale 2**16, backoff 0.5), else None."""
    if autocast_dtype(precision) != torch.float16:
        return None
    return torch.amp.GradScaler(device_type)


def loss_scale(scaler: torch.amp.GradScaler | None, device: torch.device | str) -> Tensor | None:
    """The scaler's current scale as a 0-d tensor on ``device`` (no host sync), or None."""
    if scaler is None:
        return None
    # GradScaler.scale() multiplies by the scale tensor without reading it back to the host.
    return scaler.scale(torch.ones((), device=device))


def scaled_step(
    loss: Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> bool:
    """Backward and optimizer step, through ``scaler`` when there is one.

    Returns False when the scaler found inf/NaN gradients and skipped the step (the parameters
    and the optimizer's moments are then untouched and the scale was halved), True otherwise.
    """
    if scaler is None:
        loss.backward()
        optimizer.step()
        return True
    scaler.scale(loss).backward()
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    # update() lowers the scale only when this step found inf/NaN gradients (and skipped it).
    return scaler.get_scale() >= before


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward; multiplies the incoming gradient by ``factor`` in the backward.

    The backward is written with differentiable ops, so it is itself differentiated by the
    double backward of a gradient penalty (no ``once_differentiable``). It is not the identity
    for autograd at every order (each gradient passing through is scaled), which is why it only
    sits where a penalty's outer backward does not pass: at the critic's output, whose inner
    seed is a constant, and at the penalty points, which are detached leaves.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, factor: Tensor) -> Tensor:
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (factor,) = ctx.saved_tensors
        return grad * factor.to(grad.dtype), None


def scale_grad(x: Tensor, factor: Tensor) -> Tensor:
    """``x`` unchanged, with the gradient flowing back through it multiplied by ``factor``."""
    return _ScaleGrad.apply(x, factor)


def scaled_penalty_critic(
    critic: Callable[[Tensor], Tensor], scale: Tensor | None
) -> Callable[[Tensor], Tensor]:
    """``critic`` for a gradient penalty's ``autograd.grad(critic(x).sum(), x)`` under fp16.

    The critic's output gradient is multiplied by ``s = scale / n`` on its way into the float16
    backward and the input gradient divided by ``s`` on its way out, so the penalty is computed
    from the true (unscaled) input gradient. ``n`` (the number of penalty points) turns the
    ``.sum()`` seed of 1 per point into the per-point seed ``scale / n`` that the scaler is
    calibrated for on D's batch-mean loss (a seed of 2**16 per point would overflow float16 at
    the first step). Returns ``critic`` itself when ``scale`` is None (fp32 and bf16).
    """
    if scale is None:
        return critic

    def call(x: Tensor) -> Tensor:
        s = scale / x.shape[0]
        return scale_grad(critic(scale_grad(x, 1.0 / s)), s)

    return call

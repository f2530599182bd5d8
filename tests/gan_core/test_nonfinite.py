"""NaN/Inf detection and rollback in the plain loop (no Ray): hand-poisoned weights and losses."""

from __future__ import annotations

import math

import pytest
import torch

from gan_core.config import load_config
from gan_core.loop import GanRun, LoopHooks, NonFiniteError

TINY = [
    "generators.width=16",
    "generators.depth=2",
    "discriminator.width=16",
    "discriminator.depth=2",
    "train.batch_size=20",
    "train.lr_schedule=constant",
    "eval.samples=200",
    "eval.every=5",
    "checkpoint.every=5",
    "train.steps=12",
]


def _run(*overrides: str) -> GanRun:
    return GanRun(load_config("ring8", TINY + list(overrides)))


def _poison_at(step: int, times: int = 1):
    """on_step hook: NaN into D's first weight when the step counter reads ``step``."""
    fired = []

    def hook(run: GanRun, metrics: dict[str, float]) -> None:
        if run.model.step == step and len(fired) < times:
            fired.append(step)
            with torch.no_grad():
                next(run.model.discriminator.parameters()).view(-1)[0] = float("nan")

    return hook


def _weights(run: GanRun) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in run.model.state_dict()["discriminator"].items()}


def test_rollback_restores_the_last_checkpoint_state_and_halves_the_rate() -> None:
    run = _run()
    at_5: dict[str, torch.Tensor] = {}
    events: list[dict] = []

    def on_eval(r: GanRun, m: dict[str, float]) -> None:
        if r.model.step == 5 and not at_5:
            at_5.update(_weights(r))

    def on_rollback(r: GanRun, info: dict) -> None:
        events.append(dict(info))
        # Right after the rollback the weights are exactly the step-5 checkpoint's.
        for key, value in _weights(r).items():
            assert torch.equal(value, at_5[key]), key

    run.run(LoopHooks(on_step=_poison_at(7), on_eval=on_eval, on_rollback=on_rollback))
    assert events == [
        {
            "detected_at": 7,
            "what": events[0]["what"],
            "resumed_at": 5,
            "lr_scale": 0.5,
            "rollbacks": 1,
        }
    ]
    assert events[0]["what"].startswith("weight discriminator.")
    assert run.model.step == 12 and run.rollbacks == 1
    assert all(bool(torch.isfinite(p).all()) for p in run.model.discriminator.parameters())
    # The optimizer really runs at half the configured (constant) rate after the rollback.
    assert run.model.d_opt.param_groups[0]["lr"] == pytest.approx(run.cfg.d_optim.lr * 0.5)
    assert run.model.g_opt.param_groups[0]["lr"] == pytest.approx(run.cfg.g_optim.lr * 0.5)
    # History: evals at 5, 10, 12 once each (the rolled-back steps are not doubled).
    assert [h["step"] for h in run.history] == [5, 10, 12]


def test_rollback_before_the_first_checkpoint_goes_back_to_the_start() -> None:
    run = _run()
    start = _weights(run)
    seen: list[int] = []

    def on_rollback(r: GanRun, info: dict) -> None:
        seen.append(int(info["resumed_at"]))
        assert all(torch.equal(v, start[k]) for k, v in _weights(r).items())

    run.run(LoopHooks(on_step=_poison_at(3), on_rollback=on_rollback))
    assert seen == [0] and run.model.step == 12


def test_stop_policy_raises_at_the_step_with_the_bad_value() -> None:
    run = _run("train.on_nonfinite=stop")
    with pytest.raises(
        NonFiniteError, match=r"non-finite weight discriminator\.\S+ at step 7"
    ) as e:
        run.run(LoopHooks(on_step=_poison_at(7)))
    assert e.value.step == 7 and e.value.rollbacks == 0
    assert "train.on_nonfinite=stop" in str(e.value)


def test_retries_are_bounded_and_each_halves_the_rate_again() -> None:
    run = _run("train.nan_retries=2", "train.nan_lr_factor=0.25")
    scales: list[float] = []
    hooks = LoopHooks(
        on_step=_poison_at(7, times=10), on_rollback=lambda r, i: scales.append(i["lr_scale"])
    )
    with pytest.raises(NonFiniteError, match="2 rollback") as e:
        run.run(hooks)
    assert scales == [0.25, 0.0625]
    assert e.value.step == 7 and e.value.rollbacks == 2


def test_nan_loss_is_detected_even_with_finite_weights() -> None:
    run = _run("train.on_nonfinite=stop")

    def nan_loss(r: GanRun, metrics: dict[str, float]) -> None:
        if r.model.step == 4:
            metrics["g_loss"] = math.inf

    with pytest.raises(NonFiniteError, match="loss g_loss=inf at step 4"):
        run.run(LoopHooks(on_step=nan_loss))


def test_finite_runs_report_none_and_inf_in_a_bias_is_named() -> None:
    run = _run()
    assert run.first_nonfinite({"d_loss": 0.5}) is None
    with torch.no_grad():
        bias = [n for n, _ in run.model.generator.named_parameters() if n.endswith("bias")][0]
        dict(run.model.generator.named_parameters())[bias].view(-1)[-1] = -math.inf
    assert run.first_nonfinite({"d_loss": 0.5}) == f"weight generator.{bias}"


def test_huge_finite_weights_are_not_called_non_finite() -> None:
    """Weights of 1e30 square to inf in a 2-norm; each one is still finite (a learning rate of
    1e30 makes such weights in one step). Found by a sweep, where it crashed the check."""
    run = _run()
    with torch.no_grad():
        for p in run.model.discriminator.parameters():
            p.fill_(1e30)
    assert run.first_nonfinite({"d_loss": 0.5}) is None
    with torch.no_grad():
        next(run.model.discriminator.parameters()).view(-1)[3] = math.nan
    assert run.first_nonfinite({"d_loss": 0.5}).startswith("weight discriminator.")


def test_rate_scale_and_rollbacks_survive_a_checkpoint_round_trip() -> None:
    run = _run()
    run.run(LoopHooks(on_step=_poison_at(7)))
    state = run.state_dict()
    assert state["lr_scale"] == 0.5 and state["rollbacks"] == 1
    fresh = _run()
    fresh.load_state_dict(state)
    assert fresh.model.lr_scale == 0.5 and fresh.rollbacks == 1
    # A state saved before these keys existed loads at full rate.
    legacy = {k: v for k, v in state.items() if k not in ("lr_scale", "rollbacks")}
    fresh.load_state_dict(legacy)
    assert fresh.model.lr_scale == 1.0 and fresh.rollbacks == 0

"""gan_core.export: the TorchScript sampler of a run's generator."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gan_core.config import GanConfig, load_config
from gan_core.export import (
    ExportError,
    eval_noise,
    export_sampler,
    sampler_from_checkpoint,
)
from gan_core.loop import GanRun
from gan_core.steps import build_model

TINY = ["generators.width=16", "discriminator.width=16", "train.batch_size=24"]


def _ring8(*overrides: str) -> GanConfig:
    return load_config("ring8", [*TINY, "eval.samples=300", *overrides])


@pytest.fixture(scope="module")
def trained() -> GanRun:
    """A ring8 run with EMA and BatchNorm trained a few steps: EMA and raw weights differ."""
    run = GanRun(_ring8("train.ema=0.9", "train.steps=6", "eval.every=6"))
    for _ in range(6):
        run.train_step()
    return run


def test_sampler_reproduces_the_runs_evaluation_exactly(trained: GanRun) -> None:
    cfg = trained.cfg
    sampler = export_sampler(cfg, trained.state_dict())
    assert isinstance(sampler, torch.jit.ScriptModule)
    assert (sampler.z_dim, list(sampler.data_shape), sampler.count, sampler.ema) == (
        2,
        [2],
        1,
        True,
    )
    with torch.no_grad():
        got = sampler(eval_noise(cfg, 300))
    # GanRun.generate: EMA generator, BN statistics recalibrated from the step's fixed noise.
    torch.testing.assert_close(got, trained.generate(300), rtol=0, atol=1e-6)


def test_raw_sampler_is_the_trained_generator_not_the_ema(trained: GanRun) -> None:
    cfg, state = trained.cfg, trained.state_dict()
    raw = export_sampler(cfg, state, raw=True)
    assert raw.ema is False
    noise = eval_noise(cfg, 300)
    with torch.no_grad():
        got, ema = raw(noise), export_sampler(cfg, state)(noise)
    torch.testing.assert_close(got, trained.generate(300, use_ema=False), rtol=0, atol=1e-6)
    assert (got - ema).abs().max() > 1e-2


@pytest.mark.parametrize("shared", [False, True])
def test_a_bank_mixes_every_head_row_by_row(shared: bool) -> None:
    cfg = _ring8(
        "objective.name=madgan",
        "generators.count=3",
        f"generators.shared={shared}",
        "train.ema=0.5",
    )
    torch.manual_seed(0)
    model = build_model(cfg, (2,))
    model.step = 4
    sampler = export_sampler(cfg, {"model": model.state_dict()})
    assert sampler.count == 3
    noise = torch.randn(7, 2, generator=torch.Generator().manual_seed(1))  # 7: not a multiple of 3
    with torch.no_grad():
        got = sampler(noise)
        # Every head on every row: z[j, i] = noise[i] for all three generators j.
        each = model.sample(noise.expand(3, 7, 2).contiguous()).reshape(3, 7, 2)
    assert got.shape == (7, 2)
    for i in range(7):
        torch.testing.assert_close(got[i], each[i % 3, i], rtol=0, atol=1e-5)
    # The heads really differ, so a sampler using one head for all rows would fail above.
    assert (each[0] - each[1]).abs().min() > 1e-4 and (each[1] - each[2]).abs().min() > 1e-4


def test_image_sampler_gives_images_in_range() -> None:
    cfg = load_config("digits", ["generators.width=8", "discriminator.width=8", "train.ema=0"])
    torch.manual_seed(0)
    model = build_model(cfg, (1, 8, 8))
    sampler = export_sampler(cfg, {"model": model.state_dict()})
    assert list(sampler.data_shape) == [1, 8, 8] and sampler.ema is False
    noise = torch.randn(5, 32)
    with torch.no_grad():
        got = sampler(noise)
        want = model.sample(noise[None], use_ema=False)
    assert got.shape == (5, 1, 8, 8) and got.abs().max() <= 1.0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.save` is deprecated:DeprecationWarning")
def test_sampler_loads_in_a_process_that_cannot_import_raygan(
    trained: GanRun, tmp_path: Path
) -> None:
    path = tmp_path / "sampler.pt"
    sampler = export_sampler(trained.cfg, trained.state_dict())
    torch.jit.save(sampler, str(path))
    noise = torch.randn(9, 2, generator=torch.Generator().manual_seed(3))
    torch.save(noise, tmp_path / "noise.pt")
    with torch.no_grad():
        torch.save(sampler(noise), tmp_path / "want.pt")
    repo = str(Path(__file__).resolve().parents[2])
    child = textwrap.dedent(
        f"""
        import importlib.abc, sys
        # raygan is installed editable: drop the checkout from sys.path and refuse its packages.
        sys.path = [p for p in sys.path if p not in ("", ".", {repo!r})]
        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("gan_core", "services", "tuning", "bench"):
                    raise ImportError("raygan is not importable here: " + name)
        sys.meta_path.insert(0, Refuse())
        try:
            import gan_core
        except ImportError:
            pass
        else:
            raise SystemExit("gan_core is importable")
        import torch
        m = torch.jit.load("sampler.pt")
        got = m(torch.load("noise.pt", weights_only=True))
        want = torch.load("want.pt", weights_only=True)
        assert torch.equal(got, want), (got - want).abs().max()
        print("ok", m.z_dim, list(m.data_shape), m.count, m.ema, tuple(m(torch.randn(1, 2)).shape))
        """
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", child],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "2", "[2]", "1", "True", "(1,", "2)"]


def test_sampler_from_checkpoint_reads_the_folder(trained: GanRun, tmp_path: Path) -> None:
    from services.checkpoints import save_checkpoint

    folder = save_checkpoint(tmp_path / "checkpoint_000006", trained.state_dict(), trained.cfg, {})
    sampler, cfg, meta = sampler_from_checkpoint(folder)
    assert meta["step"] == 6 and cfg.generators.width == 16
    with torch.no_grad():
        got = sampler(eval_noise(cfg, 300))
    torch.testing.assert_close(got, trained.generate(300), rtol=0, atol=1e-6)


def test_a_corrupt_state_file_is_named(trained: GanRun, tmp_path: Path) -> None:
    from services.checkpoints import save_checkpoint

    folder = save_checkpoint(tmp_path / "ckpt", trained.state_dict(), trained.cfg, {})
    (folder / "state.pt").write_bytes((folder / "state.pt").read_bytes()[:200])
    with pytest.raises(ExportError, match=r"ckpt: state\.pt is (truncated or )?corrupt"):
        sampler_from_checkpoint(folder)
    (folder / "config.yaml").unlink()
    with pytest.raises(ExportError, match=r"config\.yaml is missing"):
        sampler_from_checkpoint(folder)


def test_a_state_of_another_architecture_is_refused(trained: GanRun) -> None:
    wider = _ring8("train.ema=0.9", "generators.width=24")
    with pytest.raises(ExportError, match=r"'ema'.*does not fit"):
        export_sampler(wider, trained.state_dict())

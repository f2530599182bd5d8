"""services.model_log: a finished run's generator as an MLflow model, loaded without raygan."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from gan_core.config import ConfigError, load_config
from gan_core.export import sampler_from_checkpoint
from services import model_log, train
from services.model_log import (
    GENERATOR,
    MODEL_FILE,
    best_checkpoint,
    log_run_generator,
    read_logged,
)
from services.storage import open_storage
from tests.conftest import copy_mlflow_store

# A ring-8 run of 4 steps: the smallest run with a checkpoint (at steps 2 and 4).
TINY = [
    "generators.width=16",
    "generators.depth=1",
    "discriminator.width=16",
    "discriminator.maxout_pieces=1",
    "train.batch_size=16",
    "train.steps=4",
    "eval.samples=100",
    "eval.every=2",
    "checkpoint.every=2",
    "resources.backend=local",
]

# Runs in a process that cannot import raygan (see run_without_raygan).
LOADER = """
import json, sys
import numpy as np, mlflow, torch
for module in ("gan_core", "services", "tuning"):
    try:
        __import__(module)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"{module} is importable: the test would prove nothing")
mlflow.set_tracking_uri(sys.argv[1])
noise = torch.from_numpy(np.load("noise.npy"))
for i, uri in enumerate(sys.argv[2:]):
    model = mlflow.pytorch.load_model(uri)
    with torch.no_grad():
        np.save(f"out{i}.npy", model(noise).numpy())
print(json.dumps({"type": type(model).__name__, "z_dim": int(model.z_dim)}))
"""


def without_raygan(args: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment of ``python -c LOADER ARGS`` with this environment's packages
    but without raygan: raygan is installed editable (a .pth import hook that finds the
    checkout), so site processing is off (-S) and site-packages comes in as a plain path; -P
    leaves out the working folder."""
    env = {k: v for k, v in env.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=sysconfig.get_paths()["purelib"], MLFLOW_DISABLE_TELEMETRY="true")
    return [sys.executable, "-S", "-P", "-c", LOADER, *args], env


def run_without_raygan(
    args: list[str], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    command, env = without_raygan(args, env)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, _mlflow_template: Path) -> dict:
    """A 4-step local-backend run through ``services.train`` with register_as=ring-gen (once
    for the module: the tests only read it)."""
    root = tmp_path_factory.mktemp("model_log")
    db = copy_mlflow_store(_mlflow_template, root / "mlflow.db")
    args = [
        *TINY,
        f"storage.uri={root / 'runs'}",
        f"tracking.uri={db}",
        "name=tiny",
        "tracking.register_as=ring-gen",
    ]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = train.main(["--config", "ring8", *args, "--summary-json", str(root / "s.json")])
    assert rc == 0
    summary = json.loads((root / "s.json").read_text())
    return {"args": args, "summary": summary, "root": root, "db": db, "out": out.getvalue()}


def test_finished_run_logs_a_generator_that_loads_without_raygan(
    finished_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary, mlflow_db = finished_run["summary"], finished_run["db"]
    run_id = summary["mlflow_run_id"]
    assert summary["model_uri"] == f"runs:/{run_id}/{GENERATOR}"
    assert summary["registered_model"] == "models:/ring-gen/1"
    assert (
        f"model: runs:/{run_id}/generator (registered: models:/ring-gen/1)" in (finished_run["out"])
    )

    # The model is the run's best checkpoint: ring8 ranks by modes, the later step on a tie.
    storage = open_storage(load_config("ring8", finished_run["args"]).storage)
    metas = {
        step: json.loads(storage.read_bytes(f"tiny/local_checkpoints/step_{step:07d}/meta.json"))
        for step in (2, 4)
    }
    best_step = 4 if metas[4]["metrics"]["modes"] >= metas[2]["metrics"]["modes"] else 2
    folder = finished_run["root"] / "runs/tiny/local_checkpoints" / f"step_{best_step:07d}"
    sampler, cfg, _ = sampler_from_checkpoint(folder)
    noted = json.loads(storage.read_bytes(f"tiny/{MODEL_FILE}"))
    assert noted["step"] == best_step and noted["checkpoint"].endswith(folder.name)

    client = mlflow.MlflowClient(mlflow_db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)  # models:/ URIs resolve through it
    info = mlflow.models.get_model_info(f"models:/{noted['model_id']}")
    shapes = [
        [(spec.type, spec.shape) for spec in schema.inputs]
        for schema in (info.signature.inputs, info.signature.outputs)
    ]
    f32 = np.dtype(np.float32)
    assert shapes == [[(f32, (-1, cfg.generators.z_dim))], [(f32, (-1, 2))]]
    assert info.flavors["pytorch"]["model_data"] == "data"
    version = client.get_model_version("ring-gen", "1")
    assert version.run_id == run_id
    final = client.get_run(run_id).data.metrics
    assert {k: float(version.tags[k]) for k in final} == final  # every final metric, exactly
    assert version.tags["raygan.run_name"] == "tiny"
    assert version.tags["raygan.checkpoint_step"] == str(best_step)
    assert client.get_run(run_id).data.tags["raygan.model_uri"] == summary["model_uri"]

    noise = torch.randn(37, cfg.generators.z_dim, generator=torch.Generator().manual_seed(3))
    np.save(tmp_path / "noise.npy", noise.numpy())
    with torch.no_grad():
        want = sampler(noise).numpy()
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "noise.npy").write_bytes((tmp_path / "noise.npy").read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = run_without_raygan(
        [mlflow_db, summary["model_uri"], "models:/ring-gen/latest"], work, env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "type": "RecursiveScriptModule",
        "z_dim": cfg.generators.z_dim,
    }
    for i in (0, 1):
        got = np.load(work / f"out{i}.npy")
        assert got.shape == (37, 2) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_a_dead_tracking_server_warns_and_the_run_stands(
    finished_run: dict,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///not-used.db")
    dead = f"http://127.0.0.1:{_free_port()}"
    cfg = load_config("ring8", finished_run["args"])
    with caplog.at_level(logging.WARNING, logger="raygan.model_log"):
        assert log_run_generator(cfg, finished_run["summary"]["mlflow_run_id"], dead) is None
    assert "could not log the generator of run tiny as an MLflow model at " + dead in caplog.text
    # MLflow's fluent tracking URI (set only around log_model) and its variable are put back.
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///not-used.db"
    # Once MLflow is back, the command the warning names logs it into the run its checkpoint
    # names: a second version of the registered model.
    assert model_log.main(["--config", "ring8", *finished_run["args"]]) == 0
    run_id = finished_run["summary"]["mlflow_run_id"]
    assert capsys.readouterr().out == (
        f"[raygan] model: runs:/{run_id}/generator (registered: models:/ring-gen/2)\n"
    )


def _checkpoint(root: Path, folder: str, step: int, metrics: dict, files: int = 3) -> None:
    path = root / "run" / folder
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"step": step, "metrics": metrics, "format": 1}))
    for name in ("config.yaml", "state.pt")[: files - 1]:
        (path / name).write_text("x")


def test_best_checkpoint_ranks_complete_folders_by_the_metric(tmp_path: Path) -> None:
    _checkpoint(tmp_path, "checkpoint_000000", 10, {"modes": 5.0, "kl": 0.2})
    _checkpoint(tmp_path, "checkpoint_000001", 20, {"modes": 7.0, "kl": 0.4})
    _checkpoint(tmp_path, "checkpoint_000002", 30, {"modes": 7.0, "kl": 0.3})
    _checkpoint(tmp_path, "checkpoint_000003", 40, {"modes": 8.0, "kl": 0.1}, files=2)  # partial
    _checkpoint(tmp_path, "local_checkpoints/step_0000050", 50, {"modes": None, "kl": 0.25})
    _checkpoint(tmp_path, "samples/checkpoint_x", 60, {"modes": 9.0, "kl": 0.0})  # not a run's
    storage = open_storage(load_config("ring8", [f"storage.uri={tmp_path}"]).storage)
    # A tie on modes goes to the later step; the partial folder and null values never count.
    assert best_checkpoint(storage, "run", "modes", "max") == "run/checkpoint_000002"
    assert best_checkpoint(storage, "run", "kl", "min") == "run/checkpoint_000000"
    assert best_checkpoint(storage, "run", "step", "max") == "run/local_checkpoints/step_0000050"
    assert best_checkpoint(storage, "run", "fd", "max") is None
    assert best_checkpoint(storage, "other", "modes", "max") is None


@pytest.mark.parametrize(
    ("overrides", "allowed"),
    [
        (["tracking.register_as=ring/gen"], "letters, digits"),
        (["tracking.register_as=-gen"], "starting with a letter or digit"),
        (["tracking.register_as=gen", "tracking.enabled=false"], "tracking.enabled=false"),
    ],
)
def test_register_as_is_checked_before_anything_runs(
    overrides: list[str], allowed: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(ConfigError, match="tracking.register_as") as caught:
        load_config("ring8", overrides)
    assert allowed in caught.value.allowed
    assert load_config("ring8", ["tracking.register_as=ring8-gen_v1.2"]).tracking.register_as
    storage = tmp_path / "runs"
    assert train.main(["--config", "ring8", *overrides, f"storage.uri={storage}"]) == 2
    assert "tracking.register_as=" in capsys.readouterr().err
    assert not storage.exists()


def test_the_sweep_report_names_the_best_trials_model(tmp_path: Path) -> None:
    from tests.tuning.test_report import hand_made
    from tuning.report import render_markdown

    plan, rows = hand_made(tmp_path)  # trial_2 is the best (score 6.91)
    storage = open_storage(load_config("ring8", [f"storage.uri={tmp_path / 'sweep'}"]).storage)
    for row in rows:
        uri = f"runs:/run-of-{row.trial}/generator"
        storage.write_bytes(
            f"runs/{row.trial}/{MODEL_FILE}", json.dumps({"model_uri": uri}).encode()
        )
        row.model = read_logged(storage, f"runs/{row.trial}") or {}
    storage.write_bytes(f"runs/trial_0/{MODEL_FILE}", b"{not json")
    assert read_logged(storage, "runs/trial_0") is None
    assert read_logged(storage, "runs/trial_9") is None
    text = render_markdown(plan, rows)
    best = text[text.index("## Best trial") :]
    assert "Model: `runs:/run-of-trial_2/generator`" in best
    assert text.count("runs:/") == 2  # the best one's only: in the line and in its load call

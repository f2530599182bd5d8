"""The training job end to end on real parts: a local Ray cluster on 127.0.0.1, a moto S3 server,
an MLflow SQLite store. ``fit()`` costs 10-15 s of start-up, so each test covers much."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import mlflow
import pytest

from services import train

pytestmark = pytest.mark.integration

TINY = [
    "generators.width=32",
    "generators.depth=2",
    "discriminator.width=32",
    "discriminator.maxout_pieces=1",
    "train.batch_size=32",
    "eval.samples=400",
    "eval.every=10",
    "checkpoint.every=10",
    "resources.num_workers=2",
]


def _mlflow_history(uri: str, run_id: str, key: str) -> list[int]:
    client = mlflow.MlflowClient(uri)
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_two_worker_job_on_s3_survives_a_crash_and_resumes(
    ray_cluster: Path,
    s3_server: str,
    tmp_path: Path,
    mlflow_db: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bucket = "raygan-it"
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    s3.create_bucket(Bucket=bucket)
    tracking = mlflow_db
    common = [
        *TINY,
        f"storage.uri=s3://{bucket}/runs",
        f"storage.endpoint={s3_server}",
        f"tracking.uri={tracking}",
        "name=it-s3",
        "resources.max_failures=2",
    ]
    # Rank 1 raises once at step 15: the group restarts from the step-10 checkpoint.
    monkeypatch.setenv("RAYGAN_FAIL_AT_STEP", "15")
    monkeypatch.setenv("RAYGAN_FAULT_RANK", "1")
    monkeypatch.setenv("RAYGAN_FAULT_DIR", str(tmp_path))
    summary_path = tmp_path / "summary.json"
    rc = train.main(
        ["--config", "ring8", *common, "train.steps=30", "--summary-json", str(summary_path)]
    )
    assert rc == 0
    assert (tmp_path / "fault_15").exists(), "the fault never fired: the test proves nothing"
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == 30
    assert summary["storage_uri"] == f"s3://{bucket}/runs/it-s3"
    assert {"modes", "hq_pct", "reverse_kl", "d_loss"} <= set(summary["metrics"])
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "checkpoints:" in last_line and "samples:" in last_line and "mlflow:" in last_line

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/it-s3/")["Contents"]]
    for step in (10, 20, 30):
        assert f"runs/it-s3/samples/step_{step:07d}.png" in keys
    assert any(k.endswith("/state.pt") for k in keys), keys

    run_id = summary["mlflow_run_id"]
    client = mlflow.MlflowClient(tracking)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["generators.width"] == "32"
    assert run.data.tags["raygan.storage_uri"] == f"s3://{bucket}/runs/it-s3"
    # The crash cost a restart, not history: every eval step is there exactly once.
    assert _mlflow_history(tracking, run_id, "modes") == [10, 20, 30]
    artifacts = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert any(p.endswith(".png") for p in artifacts)

    # Rerunning the same name resumes it (longer budget), hard-killing a worker on the way.
    monkeypatch.setenv("RAYGAN_FAIL_AT_STEP", "35")
    monkeypatch.setenv("RAYGAN_FAULT_KIND", "exit")
    rc = train.main(
        ["--config", "ring8", *common, "train.steps=50", "--summary-json", str(summary_path)]
    )
    assert rc == 0
    assert (tmp_path / "fault_35").exists()
    out = capsys.readouterr().out
    assert "resumed it-s3 at step 30" in out
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == 50
    assert summary["mlflow_run_id"] == run_id, "a resumed run continues its MLflow run"
    assert _mlflow_history(tracking, run_id, "modes") == [10, 20, 30, 40, 50]


def test_local_backend_matches_the_loop_and_resumes(tmp_path: Path, mlflow_db: str) -> None:
    tracking = mlflow_db
    common = [
        *TINY,
        "resources.backend=local",
        f"storage.uri={tmp_path / 'runs'}",
        f"tracking.uri={tracking}",
        "name=local-run",
    ]
    assert (
        train.main(
            [
                "--config",
                "ring8",
                *common,
                "train.steps=20",
                "--quiet",
                "--summary-json",
                str(tmp_path / "a.json"),
            ]
        )
        == 0
    )
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["steps"] == 20 and first["num_workers"] == 1
    assert (tmp_path / "runs" / "local-run" / "samples" / "step_0000020.png").is_file()
    assert (
        train.main(
            [
                "--config",
                "ring8",
                *common,
                "train.steps=30",
                "--quiet",
                "--summary-json",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    second = json.loads((tmp_path / "b.json").read_text())
    assert second["steps"] == 30
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert _mlflow_history(tracking, first["mlflow_run_id"], "modes") == [10, 20, 30]


def test_bad_config_is_refused_before_ray_starts(tmp_path: Path) -> None:
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray"), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "services.train", "--config", "ring8", "unroll.steps=-3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "unroll.steps=-3" in proc.stderr and ">= 0" in proc.stderr
    assert not (tmp_path / "ray").exists(), "Ray was started for a config that cannot run"


def test_missing_bucket_is_refused_with_its_uri(s3_env: str, tmp_path: Path) -> None:
    rc = train.main(
        [
            "--config",
            "ring8",
            "storage.uri=s3://no-such-bucket/x",
            f"storage.endpoint={s3_env}",
            "resources.backend=local",
        ]
    )
    assert rc == 2


def test_local_backend_and_one_ray_worker_train_bit_identically(
    ray_cluster: Path, tmp_path: Path
) -> None:
    """What is reproducible: the same config on the same number of workers and threads gives
    the same weights, whatever runs it. The local backend runs torch on the threads a Ray
    worker of the config gets (1 here), even in a process that has more."""
    import torch

    common = [
        *TINY,
        "resources.num_workers=1",
        "tracking.enabled=false",
        "train.steps=20",
        "checkpoint.every=20",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what torch picks by itself on a 2-core machine
    try:
        local = [
            "name=same-local",
            f"storage.uri={tmp_path / 'local'}",
            "resources.backend=local",
        ]
        assert train.main(["--config", "ring8", "--quiet", *common, *local]) == 0
        assert torch.get_num_threads() == 2, "the local backend must restore the caller's threads"
    finally:
        torch.set_num_threads(threads)
    summary = tmp_path / "ray.json"
    ray_run = ["name=same-ray", f"storage.uri={tmp_path / 'ray'}"]
    args = ["--config", "ring8", "--quiet", "--summary-json", str(summary)]
    assert train.main([*args, *common, *ray_run]) == 0
    ray_state = Path(json.loads(summary.read_text())["checkpoint_uri"]) / "state.pt"
    local_state = tmp_path / "local" / "same-local" / "local_checkpoints" / "step_0000020"
    a = torch.load(local_state / "state.pt", weights_only=True)["model"]
    b = torch.load(ray_state, weights_only=True)["model"]

    def tensors(node: object, key: str = "") -> dict[str, torch.Tensor]:
        if isinstance(node, torch.Tensor):
            return {key: node}
        items = node.items() if isinstance(node, dict) else []
        if isinstance(node, list | tuple):
            items = enumerate(node)
        out: dict[str, torch.Tensor] = {}
        for name, sub in items:
            out.update(tensors(sub, f"{key}.{name}"))
        return out

    left, right = tensors(a), tensors(b)
    assert left.keys() == right.keys() and len(left) > 20
    differ = [k for k in left if not torch.equal(left[k], right[k])]
    assert not differ, f"{len(differ)} of {len(left)} tensors differ, e.g. {differ[:3]}"

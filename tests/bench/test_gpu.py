"""bench/gpu.py on CPU: its code path end to end at tiny sizes, and the peak-table lookup.

No GPU is needed (none is in CI); the GPU figures themselves come from a lent device machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bench.common
from bench import gpu


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),  # SXM5
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A10G", "A10G"),  # not A10's row first: specific names are matched first
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", None),
    ],
)
def test_peak_for_matches_the_specific_card(name: str, key: str | None) -> None:
    found = gpu.peak_for(name)
    assert (found[0] if found else None) == key
    if found:
        peaks = found[1]
        # Tensor-core bf16 > TF32 > plain fp32 on every listed card.
        assert peaks["bf16"] > peaks["tf32"] > 0 and peaks["fp32"] > 0


def test_without_cuda_it_refuses_and_points_at_the_cpu_smoke(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu.main([]) == 2
    assert "--cpu-smoke" in capsys.readouterr().err


def test_cpu_smoke_measures_every_variant_and_the_largest_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.common, "OUT_DIR", tmp_path)
    args = ["--cpu-smoke", "--batches", "8", "--warmup", "1", "--steps", "2", "--rounds", "2"]
    assert gpu.main([*args, "--max-batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "CPU SMOKE: code path only" in out
    payload = json.loads((tmp_path / "gpu_cpu_smoke.json").read_text())
    rows = {r["variant"]: r for r in payload["variants"]}
    assert set(rows) == set(gpu.VARIANTS)
    flops = {r["flops_per_step"] for r in rows.values()}
    for name, row in rows.items():
        assert "error" not in row, (name, row.get("error"))
        assert row["batch"] == 8 and row["steps_per_s"] > 0 and len(row["rounds"]) == 2
        # Achieved FLOP/s is FLOPs per step times steps per second, by definition.
        assert row["tflops"] == pytest.approx(row["flops_per_step"] * row["steps_per_s"] / 1e12)
        assert "pct_of_peak" not in row  # no peak figures for a CPU
    # Precision and memory layout change how the arithmetic runs, not how much of it there is.
    assert len(flops) == 1 and flops.pop() > 0
    batches = {r["precision"]: r for r in payload["largest_batch"]}
    assert set(batches) == {"fp32", "bf16"}
    for found in batches.values():
        # Doubling from 8 up to the cap of 16 on a CPU: both fit, nothing runs out of memory.
        assert found["largest_batch"] == 16 and "oom_at" not in found and "error" not in found
    assert "service_smoke" not in payload  # only with --service on CPU

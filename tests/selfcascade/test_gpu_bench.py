"""bench/gpu.py, the one prepared script a lent GPU runs, on its tiny CPU cases: a script that
breaks here would waste a session's 15 minutes of device time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_benchmark_runs_every_variant_on_tiny_models(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--tiny", "--only", "tiny-sd", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["size"], r["variant"]): r for r in report["summary"]}
    assert (256, "tuned_per_stage_cuda_graphs") in rows  # the last rep's extras ran
    assert all(r["finite"] for r in rows.values())
    # Graphed variants are compared with their eager twin (on a CPU both run eager: equal).
    assert rows[(128, "tuning_free_cuda_graphs")]["max_pixel_diff_vs_eager"] == 0
    assert rows[(256, "tuned_cuda_graphs")]["max_pixel_diff_vs_eager"] == 0
    assert rows[(256, "tuned")]["vs_tuning_free"] is not None
    assert "tuned_cuda_graphs" in done.stdout  # the table is printed last


def test_the_attention_experiment_compares_like_with_like(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--tiny", "--experiment", "attention-graphs",
         "--attention-backend", "efficient", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["summary"]}
    tuned = rows["tuned_cuda_graphs_efficient_attention"]
    # The tuned overhead is taken against the tuning-free run with the same backend preferred.
    free = rows["tuning_free_cuda_graphs_efficient_attention"]
    assert tuned["vs_tuning_free"] == tuned["median_s"] / free["median_s"]
    assert "tuned_cuda_graphs" in rows  # the eager-backend twin, in the last rep
    assert all(r["finite"] for r in rows.values())


def test_the_kernel_benchmark_runs_on_tiny_shapes(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu_kernels.py", "--tiny", "--no-compile", "--reps", "2",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    backends = {r["backend"] for r in report["attention"]}
    assert backends == {"flash", "efficient", "cudnn"}
    # Every backend either ran, agreeing with SDPA's own choice, or says why it could not.
    for row in report["attention"]:
        assert "unsupported" in row or row["max_abs_diff_vs_default"] < 1e-4
    variants = {r["variant"] for r in report["unet"]}
    assert {"eager", "eager, cudnn preferred"} <= variants
    assert report["skipped"] == ["tiny-sd 128 compiled: --no-compile"]

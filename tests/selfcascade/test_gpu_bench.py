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

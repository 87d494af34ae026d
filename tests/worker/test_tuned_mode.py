"""A model with an upsampler checkpoint runs tuned when asked (or on "auto"), and not when told
not to: the worker turns the checkpoint into the engine's stage hook."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from contract.jobs import JobStatus
from tests.worker.conftest import submit, work_burst
from worker.resident import WorkerRuntime

pytestmark = pytest.mark.integration


@pytest.fixture
def models_with_upsamplers(tmp_path: Path, tiny_model_dir: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    from selfcascade.checkpoint import save_upsamplers
    from selfcascade.upsamplers import FeatureUpsamplerSet

    unet = StableDiffusionPipeline.from_pretrained(tiny_model_dir).unet
    checkpoint = save_upsamplers(
        tmp_path / "ups.safetensors", FeatureUpsamplerSet.for_unet(unet.config), unet, 2, 700
    )
    models = tmp_path / "models-tuned.json"
    models.write_text(json.dumps([{
        "name": "tiny", "path": str(tiny_model_dir), "native_width": 64, "native_height": 64,
        "upsamplers": str(checkpoint),
    }]))
    return models


def test_tuned_flag_selects_the_upsampler_hook(
    runtime_for: Any, models_with_upsamplers: Path
) -> None:
    rt: WorkerRuntime = runtime_for(models_file=models_with_upsamplers)
    assert rt.models["tiny"].tuned_hook is not None
    jobs = {
        tuned: submit(rt, width=128, height=128, steps=4, tuned=tuned)
        for tuned in (True, "auto", False)
    }
    work_burst(rt)
    for tuned, job_id in jobs.items():
        record = rt.store.get(job_id)
        assert record is not None and record.status is JobStatus.SUCCEEDED, record
        assert record.metrics.tuned is (tuned is not False)


def test_a_tuned_job_can_cache_the_pivot_features_per_stage(
    runtime_for: Any, models_with_upsamplers: Path
) -> None:
    rt: WorkerRuntime = runtime_for(models_file=models_with_upsamplers)
    job_id = submit(rt, width=128, height=128, steps=4, tuned=True, lr_features="per_stage")
    work_burst(rt)
    record = rt.store.get(job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED, record
    assert record.params.lr_features == "per_stage" and record.metrics.tuned


def test_a_compiling_worker_compiles_its_tuned_stages_at_load(
    runtime_for: Any, models_with_upsamplers: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from worker import resident

    monkeypatch.setattr(resident, "COMPILE_BACKEND", "eager")  # inductor: minutes on a CPU
    torch._dynamo.reset()
    rt: WorkerRuntime = runtime_for(
        models_file=models_with_upsamplers, warm_up_on_load=True, torch_compile_scale=2
    )
    compiled = rt.models["tiny"].engine.unet_graphs.compiled
    # 64 px, 128 px tuning-free, and 128 px tuned (the first stage is never tuned).
    assert compiled.compiled_signatures == 3
    before = compiled.calls
    job_id = submit(rt, width=128, height=128, steps=4, tuned=True)
    work_burst(rt)
    record = rt.store.get(job_id)
    assert record is not None and record.status is JobStatus.SUCCEEDED, record
    assert record.metrics.tuned is True
    assert compiled.calls - before == 4 + 2  # every UNet call of the job ran compiled

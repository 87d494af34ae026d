"""torch.compile of the UNet (selfcascade/compiled_unet.py) through the engine.

Dynamo's "eager" backend traces exactly what inductor would compile and runs the traced graph
with the original kernels: the routing (which calls run compiled) is tested here on any machine
in seconds, with images that must equal the uncompiled engine's bit for bit. The speed of
inductor's kernels is measured by bench/gpu_kernels.py and bench/gpu.py on a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from selfcascade.compiled_unet import CompiledUNet
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.request import GenerationRequest
from selfcascade.tiny_models import build_tiny_sd_pipeline
from selfcascade.tuned import TunedStageHook
from selfcascade.upsamplers import FeatureUpsamplerSet
from selfcascade.warmup import warm_up


@pytest.fixture(scope="module")
def engines() -> tuple[SelfCascadePipeline, SelfCascadePipeline]:
    """(plain, compiled) engines over one tiny SD pipeline; the compiled one warmed up."""
    torch._dynamo.reset()
    pipe = build_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    compiled = SelfCascadePipeline(pipe, compile_backend="eager")
    warm_up(compiled)  # 64 -> 128 px: the two stage sizes it compiles
    return SelfCascadePipeline(pipe), compiled


def compiled_of(engine: SelfCascadePipeline) -> CompiledUNet:
    compiled = engine.unet_graphs.compiled
    assert compiled is not None
    return compiled


def image(engine: SelfCascadePipeline, width: int, **kwargs: Any) -> np.ndarray:
    request = GenerationRequest("a red square", width, width, steps=4, seed=3)
    return np.asarray(engine.generate(request, **kwargs).images[0])


def test_the_warm_up_compiles_its_stages_and_jobs_of_those_sizes_run_compiled(
    engines: tuple[SelfCascadePipeline, SelfCascadePipeline],
) -> None:
    plain, engine = engines
    compiled = compiled_of(engine)
    assert compiled.compiled_signatures == 2  # the 64 px and the 128 px stage
    before = compiled.calls
    np.testing.assert_array_equal(image(engine, 128), image(plain, 128))
    assert compiled.calls - before == 4 + 2  # every UNet call of both stages
    assert "forward" not in vars(engine.pipe.unet)  # the UNet is left as it was


def test_a_size_the_warm_up_did_not_compile_runs_eager_instead_of_compiling_in_a_job(
    engines: tuple[SelfCascadePipeline, SelfCascadePipeline],
) -> None:
    plain, engine = engines
    compiled = compiled_of(engine)
    before = compiled.calls
    np.testing.assert_array_equal(image(engine, 192), image(plain, 192))
    # 64 -> 112 -> 192: the first stage runs compiled, the two new sizes eager.
    assert compiled.calls - before == 4
    assert compiled.compiled_signatures == 2


def test_a_tuned_stage_runs_compiled_only_after_a_tuned_warm_up() -> None:
    # Hooks are traced into the compiled code, guarded: the tuned stage of a size compiled
    # without hooks must not reuse that code (its upsamplers would be skipped), nor compile in
    # the middle of a job. A tuned warm-up compiles it.
    pipe = build_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    plain, engine = SelfCascadePipeline(pipe), SelfCascadePipeline(pipe, compile_backend="eager")
    compiled = compiled_of(engine)
    hook = TunedStageHook(FeatureUpsamplerSet.random_for_unet(pipe.unet.config, std=0.5))
    warm_up(engine)
    expected = image(plain, 128, stage_hooks=[hook])
    assert not np.array_equal(expected, image(plain, 128))  # the upsamplers do act

    before = compiled.calls
    np.testing.assert_array_equal(image(engine, 128, stage_hooks=[hook]), expected)
    assert compiled.calls - before == 4  # the untuned first stage only
    assert compiled.compiled_signatures == 2

    warm_up(engine, stage_hooks=[hook])
    assert compiled.compiled_signatures == 3  # + the tuned 128 px stage
    before = compiled.calls
    np.testing.assert_array_equal(image(engine, 128, stage_hooks=[hook]), expected)
    assert compiled.calls - before == 4 + 2  # the tuned stage too
    # The tuning-free stage of that size still runs its own code, hooks gone.
    np.testing.assert_array_equal(image(engine, 128), image(plain, 128))

    # Per-stage LR features decide per call: their hooks have no key and stay uncompiled.
    per_stage = TunedStageHook(hook.sets[0].upsamplers, "per_stage")
    warm_up(engine, stage_hooks=[per_stage])
    assert compiled.compiled_signatures == 3
    np.testing.assert_array_equal(
        image(engine, 128, stage_hooks=[per_stage]),
        image(plain, 128, stage_hooks=[per_stage]),
    )


def test_a_signature_that_fails_to_compile_stays_eager(
    engines: tuple[SelfCascadePipeline, SelfCascadePipeline],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compiled = compiled_of(engines[1])

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("inductor: no kernel for this shape")

    eager_calls: list[int] = []

    def eager(*args: Any, **kwargs: Any) -> str:
        eager_calls.append(1)
        return "eager output"

    monkeypatch.setattr(compiled, "_compiled", broken)
    monkeypatch.setattr(compiled, "_forward", eager)  # the uncompiled forward it falls back to
    with compiled.compiling():
        assert compiled.serves("new signature")
        assert compiled("new signature") == "eager output"
    assert not compiled.serves("new signature")
    assert eager_calls == [1]
    assert "stays eager" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inductor_kernels_replay_in_graphs_and_give_the_graphed_image() -> None:
    pipe = build_tiny_sd_pipeline().to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    plain, engine = SelfCascadePipeline(pipe), SelfCascadePipeline(pipe, compile_backend="inductor")
    warm_up(engine)
    graphs = engine.unet_graphs
    assert graphs.compiled is not None and graphs.compiled.compiled_signatures == 2
    replays = graphs.replays
    compiled_image, plain_image = image(engine, 128), image(plain, 128)
    assert graphs.replays - replays == 4 + 2  # both stages replayed graphs of compiled code
    # Fused kernels round differently in fp16: close, not equal.
    assert np.abs(compiled_image.astype(int) - plain_image.astype(int)).max() <= 8

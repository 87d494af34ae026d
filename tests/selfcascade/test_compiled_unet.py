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
from selfcascade.tuned import LRInputs, TunedStageHook, inject_upsamplers
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

    assert compiled.fallbacks == 0  # every compiled call ran the compiled code

    # Per-stage LR features decide per call: their hooks have no key and stay uncompiled.
    per_stage = TunedStageHook(hook.sets[0].upsamplers, "per_stage")
    warm_up(engine, stage_hooks=[per_stage])
    assert compiled.compiled_signatures == 3
    np.testing.assert_array_equal(
        image(engine, 128, stage_hooks=[per_stage]),
        image(plain, 128, stage_hooks=[per_stage]),
    )


def unet_call(unet: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """One guided UNet call's arguments at 32x32 latents."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randn((2, 77, unet.config.cross_attention_dim), generator=generator)
    sample = torch.randn((2, 4, 32, 32), generator=generator)
    return (sample, torch.tensor(500)), {"encoder_hidden_states": text, "return_dict": False}


def test_a_tuned_forward_repeated_without_the_unets_pre_hook_still_runs_compiled() -> None:
    # A graph capture calls the forward three times (two warm-up calls, the capture) while the
    # UNet's pre-hook ran once. State the tuned hooks kept across calls failed dynamo's guards
    # there, so the tuned 1024^2 graph of an H100 run captured uncompiled kernels (1.59 s
    # against 0.90 s for the tuning-free stage, bench/GPU_NOTES.md).
    pipe = build_tiny_sd_pipeline()
    unet = pipe.unet
    compiled = CompiledUNet(unet, backend="eager")
    upsamplers = FeatureUpsamplerSet.random_for_unet(unet.config, std=0.5)
    args, kwargs = unet_call(unet)
    pivot = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), inject_upsamplers(unet, upsamplers, pivot, "per_step", LRInputs()):
        expected = unet(*args, **kwargs)[0]
        unet.forward = lambda *a, **k: compiled("tuned", *a, **k)
        try:
            with compiled.compiling():
                first = unet(*args, **kwargs)[0]  # through the pre-hook, compiling
        finally:
            del unet.forward
        repeats = [compiled("tuned", *args, **kwargs)[0] for _ in range(2)]  # without it
    assert compiled.fallbacks == 0 and compiled.calls == 3
    for output in (first, *repeats):
        torch.testing.assert_close(output, expected, rtol=0, atol=0)


def test_a_compiled_signature_whose_guards_fail_runs_eager_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A hook the signature's key does not name (here: added behind its back) fails the guards
    # dynamo keeps on module hooks: that call runs uncompiled, with the hook, and says so.
    pipe = build_tiny_sd_pipeline()
    unet = pipe.unet
    compiled = CompiledUNet(unet, backend="eager")
    args, kwargs = unet_call(unet)
    with torch.no_grad():
        with compiled.compiling():
            compiled("plain", *args, **kwargs)
        handle = unet.mid_block.register_forward_hook(lambda _m, _a, out: out * 2)
        try:
            output = compiled("plain", *args, **kwargs)[0]
            expected = unet(*args, **kwargs)[0]
        finally:
            handle.remove()
        assert compiled.fallbacks == 1 and compiled.calls == 1
        torch.testing.assert_close(output, expected, rtol=0, atol=0)
        compiled("plain", *args, **kwargs)  # the hook gone, the compiled code serves again
    assert compiled.fallbacks == 1 and compiled.calls == 2
    assert "failed dynamo's guards and runs uncompiled" in caplog.text


def test_an_error_inside_a_compiled_call_propagates_instead_of_running_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only dynamo's own recompile refusal means "run eager"; any other RuntimeError of a
    # compiled call (a bad input, a kernel failure) is the job's error.
    pipe = build_tiny_sd_pipeline()
    compiled = CompiledUNet(pipe.unet, backend="eager")
    args, kwargs = unet_call(pipe.unet)
    with torch.no_grad(), compiled.compiling():
        compiled("plain", *args, **kwargs)

    def failing(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(compiled, "_compiled", failing)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        compiled("plain", *args, **kwargs)
    assert compiled.fallbacks == 0 and compiled.calls == 1


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

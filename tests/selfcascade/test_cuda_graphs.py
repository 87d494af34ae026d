"""CUDA graphs of the UNet (selfcascade/cuda_graphs.py).

The decisions (which calls share a graph, which stages must stay eager) are tested here on any
machine; capture and replay need a GPU and are tested by the `cuda` tests below, which run on a
lent GPU (bench/gpu_session.sh) and on any developer's CUDA machine, and are skipped elsewhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from selfcascade.cuda_graphs import UNetGraphs, graph_signature, inner_hook_keys
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.plan import StageSize
from selfcascade.request import GenerationRequest
from selfcascade.stage_hooks import StageRun
from selfcascade.tiny_models import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline
from selfcascade.tuned import LRInputs, TunedStageHook
from selfcascade.upsamplers import FeatureUpsamplerSet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def unet_args(size: int = 8, batch: int = 2) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments diffusers' SD pipelines pass the UNet at one denoising step."""
    args = (torch.zeros(batch, 4, size, size), torch.tensor(981))
    kwargs = {
        "encoder_hidden_states": torch.zeros(batch, 77, 32),
        "timestep_cond": None,
        "cross_attention_kwargs": None,
        "added_cond_kwargs": None,
        "return_dict": False,
    }
    return args, kwargs


def test_steps_of_one_stage_share_a_graph_and_other_shapes_do_not() -> None:
    args, kwargs = unet_args()
    same = graph_signature((torch.ones(2, 4, 8, 8), torch.tensor(21)), kwargs)
    assert graph_signature(args, kwargs) == same
    assert graph_signature(*unet_args(size=16)) != same  # the next stage
    assert graph_signature(*unet_args(batch=4)) != same  # two images per prompt
    half = {**kwargs, "encoder_hidden_states": torch.zeros(2, 77, 32, dtype=torch.float16)}
    assert graph_signature(args, half) != same
    sdxl = {**kwargs, "added_cond_kwargs": {"text_embeds": torch.zeros(2, 32),
                                            "time_ids": torch.zeros(2, 6)}}
    assert graph_signature(args, sdxl) != same


def test_calls_a_graph_cannot_serve_are_refused() -> None:
    args, kwargs = unet_args()
    # A Python-number timestep would be frozen into the graph: one graph per step value.
    assert graph_signature((args[0], 981), kwargs) is None
    assert graph_signature((args[0],), {**kwargs, "timestep": 981}) is None
    assert graph_signature((args[0],), {**kwargs, "timestep": args[1]}) is not None
    assert graph_signature(args, {**kwargs, "cross_attention_kwargs": {"scale": object()}}) is None


def no_op(*_: Any) -> None:
    return None


def keyed(key: Any) -> Any:
    def hook(*_: Any) -> None:
        return None

    hook.graph_key = key  # type: ignore[attr-defined]
    return hook


def test_only_hooks_inside_the_unet_without_a_graph_key_keep_it_eager() -> None:
    unet = build_tiny_sd_pipeline().unet
    assert inner_hook_keys(unet) == ()
    # The engine's call counter sits on the UNet itself and runs outside its forward.
    outer = unet.register_forward_pre_hook(no_op)
    assert inner_hook_keys(unet) == ()
    replayable = unet.down_blocks[0].register_forward_hook(keyed("a"))
    assert inner_hook_keys(unet) == ("a",)
    inner = unet.mid_block.register_forward_hook(no_op)
    assert inner_hook_keys(unet) is None
    for handle in (inner, replayable, outer):
        handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(keyed("global"))
    try:
        assert inner_hook_keys(unet) is None
    finally:
        handle.remove()


def tuned_stage(pipe: Any, pivot: torch.Tensor, mode: str = "per_step") -> StageRun:
    return StageRun(
        index=2, stages=2, size=StageSize(128, 128), previous_size=StageSize(64, 64),
        unet=pipe.unet, pivot_latents=pivot, upsampled_latents=pivot, pivot_strength=0.7,
        lr_features=mode,  # type: ignore[arg-type]
    )


def tuned_keys(hook: TunedStageHook, stage: StageRun) -> tuple[Any, ...] | None:
    with hook(stage):
        return inner_hook_keys(stage.unet)


@pytest.mark.parametrize(("mode", "replayable"), [("per_step", True), ("per_stage", False)])
def test_tuned_hooks_are_replayable_per_step_only(mode: str, replayable: bool) -> None:
    pipe = build_tiny_sd_pipeline()
    hook = TunedStageHook(FeatureUpsamplerSet.for_unet(pipe.unet.config), mode)  # type: ignore[arg-type]
    keys = tuned_keys(hook, tuned_stage(pipe, torch.zeros(1, 4, 8, 8), mode))
    assert (keys is not None) is replayable
    assert inner_hook_keys(pipe.unet) == ()  # all removed after the stage


def test_a_tuned_graph_is_keyed_by_its_pivot_buffer_and_upsampler_weights() -> None:
    """Two stages of one size share a graph only if their pivots share a buffer (same shape):
    a pivot of another shape reusing a graph would replay the earlier job's pivot."""
    pipe = build_tiny_sd_pipeline()
    ups = FeatureUpsamplerSet.for_unet(pipe.unet.config)
    hook = TunedStageHook(ups, "per_step")
    first = tuned_keys(hook, tuned_stage(pipe, torch.zeros(1, 4, 8, 8)))
    next_job = tuned_keys(hook, tuned_stage(pipe, torch.ones(1, 4, 8, 8)))
    other_shape = tuned_keys(hook, tuned_stage(pipe, torch.zeros(1, 4, 8, 6)))
    assert first and first == next_job  # the next job's pivot of this shape replays the graph
    assert other_shape and not set(first) & set(other_shape)
    ups.to(torch.float64)  # new weight storage: graphs captured before must not be replayed
    assert not set(first) & set(tuned_keys(hook, tuned_stage(pipe, torch.zeros(1, 4, 8, 8))) or ())


def test_pivot_buffers_are_bounded_and_reused() -> None:
    inputs = LRInputs(max_buffers=2)
    a = inputs.holding(torch.zeros(1, 4, 8, 8))
    assert inputs.holding(torch.ones(1, 4, 8, 8)) is a and bool(a.tensor.eq(1).all())
    b = inputs.holding(torch.zeros(1, 4, 8, 6))
    inputs.holding(torch.zeros(1, 4, 6, 6))  # a third shape drops the least recently used, a
    assert inputs.holding(torch.zeros(1, 4, 8, 6)) is b
    assert inputs.holding(torch.zeros(1, 4, 8, 8)) is not a


def test_pinned_pivot_buffers_are_never_dropped() -> None:
    # What a compiling worker pins after its tuned warm-up: its compiled stages read them.
    inputs = LRInputs(max_buffers=1)
    warm = inputs.holding(torch.zeros(1, 4, 8, 8))
    inputs.pin_all()
    for side in (2, 3, 4):
        inputs.holding(torch.zeros(1, 4, side, side))
    assert inputs.holding(torch.zeros(1, 4, 8, 8)) is warm
    other = inputs.holding(torch.zeros(1, 4, 5, 5))
    inputs.holding(torch.zeros(1, 4, 6, 6))  # unpinned ones still rotate
    assert inputs.holding(torch.zeros(1, 4, 5, 5)) is not other


def test_why_a_stage_runs_eager() -> None:
    unet = build_tiny_sd_pipeline().unet
    graphs = UNetGraphs(unet, max_pixels=64 * 64)
    assert graphs.why_eager(128 * 128) == "above 4096 pixels (arithmetic-bound)"
    assert graphs.why_eager(64 * 64) == "not on a CUDA device"
    handle = unet.mid_block.register_forward_hook(no_op)
    assert graphs.why_eager(64 * 64) == "a hook inside the UNet that a graph cannot replay"
    handle.remove()
    assert UNetGraphs(unet, max_pixels=None).why_eager(64) == "CUDA graphs are off"


def test_on_a_cpu_the_engine_runs_eager_and_leaves_the_unet_untouched() -> None:
    pipe = build_tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    request = GenerationRequest("a red circle", 128, 128, steps=3, seed=4)
    assert SelfCascadePipeline(pipe).unet_graphs.max_pixels == 1024 * 1024  # on by default
    graphed = SelfCascadePipeline(pipe).generate(request)
    assert "forward" not in vars(pipe.unet)
    eager = SelfCascadePipeline(pipe, cuda_graph_max_pixels=None).generate(request)
    assert np.array_equal(np.asarray(graphed.images[0]), np.asarray(eager.images[0]))


# -- on a GPU ------------------------------------------------------------------------------


def cuda_pipe(builder: Any) -> Any:
    pipe = builder().to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_pixel_difference(a: Any, b: Any) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@cuda
@pytest.mark.parametrize("builder", [build_tiny_sd_pipeline, build_tiny_sdxl_pipeline])
def test_graphed_stages_give_the_eager_image(builder: Any) -> None:
    pipe = cuda_pipe(builder)
    request = GenerationRequest("a red circle", 128, 128, steps=6, seed=3)
    eager = SelfCascadePipeline(pipe, cuda_graph_max_pixels=None).generate(request)
    engine = SelfCascadePipeline(pipe, cuda_graph_max_pixels=128 * 128)
    first = engine.generate(request)  # captures one graph per stage size
    second = engine.generate(request)  # replays them
    assert engine.unet_graphs.captures == 2  # 64^2 and 128^2, batch 2 (guidance)
    assert engine.unet_graphs.replays == 2 * (6 + 4)
    assert "forward" not in vars(pipe.unet)
    for run in (first, second):
        assert max_pixel_difference(run.images[0], eager.images[0]) <= 1


@cuda
def test_tuned_stages_replay_their_own_graphs_and_give_the_eager_image() -> None:
    pipe = cuda_pipe(build_tiny_sd_pipeline)
    ups = FeatureUpsamplerSet.random_for_unet(pipe.unet.config, std=0.05).to("cuda", torch.float16)
    request = GenerationRequest("a red circle", 256, 256, steps=4, seed=1)
    eager = SelfCascadePipeline(pipe, cuda_graph_max_pixels=None)
    engine = SelfCascadePipeline(pipe, cuda_graph_max_pixels=128 * 128)
    per_step, per_stage = TunedStageHook(ups, "per_step"), TunedStageHook(ups, "per_stage")

    other_seed = GenerationRequest("a red circle", 256, 256, steps=4, seed=2)
    want = {
        "tuned": eager.generate(request, stage_hooks=[per_step]).images[0],
        "free": eager.generate(request).images[0],
        "tuned, other seed": eager.generate(other_seed, stage_hooks=[per_step]).images[0],
        "per_stage": eager.generate(request, stage_hooks=[per_stage]).images[0],
    }
    assert max_pixel_difference(want["tuned"], want["free"]) > 0  # the upsamplers do act
    # Tuned, tuning-free and tuned again (another seed, so another pivot) through one engine:
    # the 128^2 stage's tuned and tuning-free graphs are distinct, and a replay of the tuned one
    # sees the new job's pivot.
    runs = (("tuned", request, [per_step]), ("free", request, []),
            ("tuned, other seed", other_seed, [per_step]))
    for name, job, hooks in runs:
        image = engine.generate(job, stage_hooks=hooks).images[0]
        assert max_pixel_difference(image, want[name]) <= 1, name
    # 64^2, 128^2 tuning-free and 128^2 tuned; 256^2 is above the limit.
    assert engine.unet_graphs.captures == 3
    assert engine.unet_graphs.replays == 3 * (4 + 2)
    # per_stage decides per call whether to recompute: its stages stay eager.
    image = engine.generate(request, stage_hooks=[per_stage]).images[0]
    assert max_pixel_difference(image, want["per_stage"]) <= 1
    assert engine.unet_graphs.captures == 3
    assert engine.unet_graphs.replays == 3 * (4 + 2) + 4


@cuda
def test_the_least_recently_used_graph_is_dropped_beyond_the_limit() -> None:
    pipe = cuda_pipe(build_tiny_sd_pipeline)
    engine = SelfCascadePipeline(pipe, cuda_graph_max_pixels=256 * 256)
    engine.unet_graphs.max_graphs = 2
    engine.generate(GenerationRequest("a red circle", 256, 256, steps=2, seed=1))
    assert engine.unet_graphs.captures == 3
    assert engine.unet_graphs.held == 2


@cuda
def test_one_tuned_stage_size_from_two_pivot_shapes_never_shares_a_graph() -> None:
    """104x192 and 120x200 both pass through a 72x128 stage, from 48x88 and 48x80 pivots."""
    pipe = cuda_pipe(build_tiny_sd_pipeline)
    hook = TunedStageHook(
        FeatureUpsamplerSet.random_for_unet(pipe.unet.config, std=0.05).to("cuda", torch.float16),
        "per_step",
    )
    jobs = [GenerationRequest("a red circle", w, h, steps=4, seed=1) for w, h in
            ((104, 192), (120, 200))]
    eager = SelfCascadePipeline(pipe, cuda_graph_max_pixels=None)
    want = [eager.generate(job, stage_hooks=[hook]).images[0] for job in jobs]
    engine = SelfCascadePipeline(pipe, cuda_graph_max_pixels=72 * 128)
    for job, image in zip(jobs, want, strict=True):
        assert max_pixel_difference(engine.generate(job, stage_hooks=[hook]).images[0], image) <= 1


@cuda
def test_graphs_are_dropped_when_the_unet_weights_move() -> None:
    pipe = cuda_pipe(build_tiny_sd_pipeline)
    request = GenerationRequest("a red circle", 128, 128, steps=3, seed=5)
    engine = SelfCascadePipeline(pipe, cuda_graph_max_pixels=128 * 128)
    before = engine.generate(request).images[0]
    pipe.unet.to("cpu").to("cuda")  # same values, new storage
    after = engine.generate(request).images[0]
    assert engine.unet_graphs.captures == 4  # both stages captured again
    assert max_pixel_difference(before, after) == 0

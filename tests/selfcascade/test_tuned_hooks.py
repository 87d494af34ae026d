"""Injection of feature upsamplers by hooks: exactness when untrained, cleanup, LR modes."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from selfcascade.checkpoint import save_upsamplers
from selfcascade.errors import CheckpointError, GenerationCancelled
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.plan import StageSize
from selfcascade.progress import Progress
from selfcascade.request import GenerationRequest
from selfcascade.tuned import (
    UPSAMPLERS_FILE,
    StageUpsamplers,
    TunedStageHook,
    inject_upsamplers,
    load_tuned_hook,
)
from selfcascade.tuning import UPSAMPLERS_FILE as TUNE_WRITES
from selfcascade.upsamplers import FeatureUpsamplerSet
from tests.selfcascade.single_thread import single_thread_torch  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def hook_count(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


def untrained(pipe: Any) -> FeatureUpsamplerSet:
    return FeatureUpsamplerSet.for_unet(pipe.unet.config)


def trained(pipe: Any, seed: int = 0) -> FeatureUpsamplerSet:
    """Stand-in for a trained set: every weight random, so the output really changes."""
    ups = untrained(pipe)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ups.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return ups


def unet_call(pipe: Any, batch: int = 2, size: int = 24, seed: int = 0) -> dict[str, Any]:
    """Arguments of one CFG-shaped UNet call at a 'high-resolution' latent size."""
    gen = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    kwargs: dict[str, Any] = {
        "sample": torch.randn(batch, 4, size, size, generator=gen),
        "timestep": 500,
        "encoder_hidden_states": torch.randn(
            batch, 7, unet.config.cross_attention_dim, generator=gen
        ),
        "return_dict": False,
    }
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=gen),
            "time_ids": torch.tensor([[size * 2, size * 2, 0, 0, size * 2, size * 2]] * batch),
        }
    return kwargs


def pivot(batch: int = 1, size: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["sd", "sdxl"])
def pipe(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.mark.parametrize("mode", ["per_step", "per_stage"])
@torch.no_grad()
def test_untrained_injection_is_bitwise_stock(pipe: Any, mode: Any) -> None:
    call = unet_call(pipe)
    stock = pipe.unet(**call)[0]
    with inject_upsamplers(pipe.unet, untrained(pipe), pivot(), mode) as injection:
        tuned = pipe.unet(**call)[0]
    assert torch.equal(stock, tuned)
    assert injection.lr_computations == 1
    assert hook_count(pipe.unet) == 0


@torch.no_grad()
def test_trained_injection_changes_the_output(pipe: Any) -> None:
    call = unet_call(pipe)
    stock = pipe.unet(**call)[0]
    with inject_upsamplers(pipe.unet, trained(pipe), pivot()):
        tuned = pipe.unet(**call)[0]
    assert not torch.allclose(stock, tuned)
    assert torch.equal(pipe.unet(**call)[0], stock)


@torch.no_grad()
def test_lr_features_are_the_frozen_encoder_on_the_clean_pivot(pipe: Any) -> None:
    """h_n^LR equals the stock UNet's own block outputs for the (repeated) pivot, same t/text."""
    call = unet_call(pipe)
    lr = pivot()
    recorded: dict[str, torch.Tensor] = {}
    blocks = [(f"down_{i}", b) for i, b in enumerate(pipe.unet.down_blocks)]
    blocks.append(("mid", pipe.unet.mid_block))
    handles = [
        block.register_forward_hook(
            lambda _m, _a, out, name=name: recorded.__setitem__(
                name, out[0] if isinstance(out, tuple) else out
            )
        )
        for name, block in blocks
    ]
    try:
        pipe.unet(**{**call, "sample": lr.repeat(2, 1, 1, 1)})
    finally:
        for h in handles:
            h.remove()
    # per_stage keeps the features it computed on the first call (per_step computes the same
    # ones, test_per_stage_caches_and_per_step_recomputes, but keeps none across calls).
    with inject_upsamplers(pipe.unet, untrained(pipe), lr, "per_stage") as injection:
        pipe.unet(**call)
    assert set(injection._features) == set(recorded)
    for name, features in recorded.items():
        assert torch.equal(injection._features[name], features), name


@torch.no_grad()
def test_per_stage_caches_and_per_step_recomputes(tiny_sd: Any) -> None:
    call = unet_call(tiny_sd)
    ups = trained(tiny_sd)
    outputs = {}
    for mode in ("per_step", "per_stage"):
        with inject_upsamplers(tiny_sd.unet, ups, pivot(), mode) as injection:
            first = tiny_sd.unet(**call)[0]
            second = tiny_sd.unet(**{**call, "timestep": 300})[0]
        outputs[mode] = (first, second)
        assert injection.unet_calls == 2
        assert injection.lr_computations == (2 if mode == "per_step" else 1)
    # Same first call; on the second, per_stage still uses the features from t=500.
    assert torch.equal(outputs["per_step"][0], outputs["per_stage"][0])
    assert not torch.equal(outputs["per_step"][1], outputs["per_stage"][1])


@torch.no_grad()
def test_skip_residuals_are_left_to_the_frozen_unet(tiny_sd: Any) -> None:
    call = unet_call(tiny_sd)
    block = tiny_sd.unet.down_blocks[0]

    def last_output(run: Any) -> Any:
        seen: list[Any] = []
        handle = block.register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            run()
        finally:
            handle.remove()
        return seen[-1]  # with injection, the LR pass of the block comes first

    stock_hidden, *stock_skips = last_output(lambda: tiny_sd.unet(**call))
    with inject_upsamplers(tiny_sd.unet, trained(tiny_sd), pivot()):
        # Registered after the injection's hook, the recorder sees the injected output.
        tuned_hidden, *tuned_skips = last_output(lambda: tiny_sd.unet(**call))
    stock_skips, tuned_skips = stock_skips[0], tuned_skips[0]
    assert not torch.equal(stock_hidden, tuned_hidden)
    assert all(torch.equal(a, b) for a, b in zip(stock_skips, tuned_skips, strict=True))


@torch.no_grad()
def test_hooks_removed_when_a_step_raises(tiny_sd: Any) -> None:
    call = unet_call(tiny_sd)
    stock = tiny_sd.unet(**call)[0]
    # Pivot batch 3 cannot be repeated to the UNet batch 2: the pre-hook raises mid-call.
    bad_pivot = pivot(batch=3)
    with (
        pytest.raises(ValueError, match="not a multiple"),
        inject_upsamplers(tiny_sd.unet, trained(tiny_sd), bad_pivot),
    ):
        tiny_sd.unet(**call)
    assert hook_count(tiny_sd.unet) == 0
    with (
        pytest.raises(RuntimeError, match="boom"),
        inject_upsamplers(tiny_sd.unet, trained(tiny_sd), pivot()),
    ):
        tiny_sd.unet(**call)
        raise RuntimeError("boom")
    assert hook_count(tiny_sd.unet) == 0
    assert torch.equal(tiny_sd.unet(**call)[0], stock)


# -- through the engine ------------------------------------------------------------------------


def request(**overrides: Any) -> GenerationRequest:
    values: dict[str, Any] = {
        "prompt": "a red fox",
        "width": 128,
        "height": 128,
        "steps": 4,
        "guidance_scale": 5.0,
        "seed": 7,
    }
    values.update(overrides)
    return GenerationRequest(**values)


@contextmanager
def recording_unet_outputs(unet: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    outputs: list[torch.Tensor] = []
    handle = unet.register_forward_hook(lambda _m, _a, out: outputs.append(out[0].clone()))
    try:
        yield outputs
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["per_step", "per_stage"])
def test_engine_untrained_tuned_equals_tuning_free_exactly(pipe: Any, mode: Any) -> None:
    engine = SelfCascadePipeline(pipe)
    with recording_unet_outputs(pipe.unet) as free_outputs:
        free = engine.generate(request(lr_features=mode))
    with recording_unet_outputs(pipe.unet) as tuned_outputs:
        tuned = engine.generate(
            request(lr_features=mode), stage_hooks=[TunedStageHook(untrained(pipe))]
        )
    assert len(free_outputs) == len(tuned_outputs) > 4  # stage 1 plus the re-noise stage
    assert all(torch.equal(a, b) for a, b in zip(free_outputs, tuned_outputs, strict=True))
    assert np.array_equal(np.asarray(free.images[0]), np.asarray(tuned.images[0]))
    assert hook_count(pipe.unet) == 0


def test_engine_trained_tuned_differs_and_resident_unet_serves_stock_after(tiny_sd: Any) -> None:
    engine = SelfCascadePipeline(tiny_sd)
    free = np.asarray(engine.generate(request()).images[0])
    tuned = np.asarray(
        engine.generate(request(), stage_hooks=[TunedStageHook(trained(tiny_sd))]).images[0]
    )
    assert not np.array_equal(free, tuned)
    assert np.array_equal(free, np.asarray(engine.generate(request()).images[0]))


def test_engine_cancel_inside_tuned_stage_leaves_no_hooks(tiny_sd: Any) -> None:
    engine = SelfCascadePipeline(tiny_sd)
    free = np.asarray(engine.generate(request()).images[0])
    cancel = threading.Event()

    def on_progress(p: Progress) -> None:
        if p.stage == 2 and p.step >= 1:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        engine.generate(
            request(),
            on_progress=on_progress,
            cancel=cancel,
            stage_hooks=[TunedStageHook(trained(tiny_sd))],
        )
    assert hook_count(tiny_sd.unet) == 0
    assert np.array_equal(free, np.asarray(engine.generate(request()).images[0]))


def test_nested_injection_is_refused(tiny_sd: Any) -> None:
    with (
        inject_upsamplers(tiny_sd.unet, untrained(tiny_sd), pivot()),
        pytest.raises(RuntimeError, match="already injected"),
        inject_upsamplers(tiny_sd.unet, untrained(tiny_sd), pivot()),
    ):
        pass
    assert hook_count(tiny_sd.unet) == 0


def test_several_sets_each_stage_gets_the_one_tuned_nearest_its_size(tiny_sd: Any) -> None:
    # 4x of the 64 px tiny model: stages 64 -> 128 -> 256, with a set tuned at each HR size.
    at_128, at_256 = trained(tiny_sd, seed=1), trained(tiny_sd, seed=2)
    hook = TunedStageHook(
        [StageUpsamplers(at_256, 2.0, hr_size=256), StageUpsamplers(at_128, 2.0, hr_size=128)]
    )
    assert hook.set_for(StageSize(128, 128)).upsamplers is at_128
    assert hook.set_for(StageSize(256, 256)).upsamplers is at_256
    assert hook.set_for(StageSize(512, 256)).upsamplers is at_256  # nearest in pixels
    assert hook.set_for(StageSize(96, 96)).upsamplers is at_128

    widths: dict[str, list[int]] = {"128": [], "256": []}
    handles = [
        phi.register_forward_hook(lambda _m, _a, out, seen=seen: seen.append(out.shape[-1]))
        for ups, seen in ((at_128, widths["128"]), (at_256, widths["256"]))
        for phi in ups.levels.values()
    ]
    try:
        result = SelfCascadePipeline(tiny_sd).generate(
            request(width=256, height=256), stage_hooks=[hook]
        )
    finally:
        for handle in handles:
            handle.remove()
    assert [s.width for s in result.stages] == [64, 128, 256]
    assert widths["128"] and widths["256"]
    assert max(widths["128"]) < min(widths["256"])  # each set ran only in its own stage
    assert hook_count(tiny_sd.unet) == 0


def test_several_sets_need_their_tuning_size(tiny_sd: Any) -> None:
    with pytest.raises(ValueError, match="hr_size"):
        TunedStageHook([StageUpsamplers(untrained(tiny_sd)), StageUpsamplers(untrained(tiny_sd))])
    with pytest.raises(ValueError, match="at least one"):
        TunedStageHook([])


def test_the_folder_tune_writes_loads_as_its_checkpoint(tiny_sd: Any, tmp_path: Path) -> None:
    assert UPSAMPLERS_FILE == TUNE_WRITES
    ups = trained(tiny_sd)
    save_upsamplers(tmp_path / "tuned" / UPSAMPLERS_FILE, ups, tiny_sd.unet, 2, 700)
    hook = load_tuned_hook(tmp_path / "tuned", tiny_sd)  # was: "... does not exist"
    loaded = hook.sets[0].upsamplers.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in ups.state_dict().items())


def test_a_folder_without_the_checkpoint_names_the_file_expected(
    tiny_sd: Any, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match=f"folder without {UPSAMPLERS_FILE}"):
        load_tuned_hook(tmp_path, tiny_sd)


def test_two_sets_tuned_at_one_size_are_refused_naming_both(tiny_sd: Any, tmp_path: Path) -> None:
    def saved(name: str, seed: int, hr_size: int) -> Path:
        return save_upsamplers(
            tmp_path / name, trained(tiny_sd, seed), tiny_sd.unet, 2, 700, hr_size=hr_size
        )

    first, other, second = saved("a.st", 1, 128), saved("b.st", 2, 256), saved("c.st", 3, 128)
    # Was: a stage tuned nearest 128 px always got the first, the second loaded for nothing.
    # The worker loads a models file's upsamplers here too, and refuses to start on this.
    with pytest.raises(CheckpointError, match=re.escape(
        f"{first} and {second} are both tuned at 128 px, so only the first would be used"
    )):
        load_tuned_hook([first, other, second], tiny_sd)
    assert [s.hr_size for s in load_tuned_hook([first, other], tiny_sd).sets] == [128, 256]

"""Tuned self-cascade: inject trained feature upsamplers into the resident UNet with hooks.

For every UNet call while injected:

1. The pivot latent (the previous stage's clean latent) is copied into a persistent buffer once,
   when the injection attaches. A forward pre-hook on the UNet records how many times the call's
   batch repeats it (classifier-free guidance doubles it) and whether this call recomputes the
   LR features; the first covered block's hook then repeats the buffer to the batch and runs
   `conv_in` on it. A video pivot (B, C, F, h, w) is first folded to (B*F, C, h, w), frames
   into the batch, as UNet3DConditionModel and UNetMotionModel fold their own input; their
   blocks then see the LR state exactly as they see the HR one (with `num_frames` among the
   reused keyword arguments), and UNet3DConditionModel's `transformer_in` joins the LR chain
   ahead of the down blocks.
2. A forward hook on each covered down block / the mid block runs that same block on the LR
   state, with the very keyword arguments the UNet passed for the HR state (timestep embedding
   incl. SDXL add-embeddings, text states, attention masks), giving h_n^LR. Reusing the UNet's own
   arguments means no part of the UNet's forward is re-implemented here.
3. The hook returns the HR block output plus phi_n(h_n^LR, temb).

Which tensors get phi_n: only the hidden state a down block hands to the next block (and the mid
block's output). The skip residuals a down block returns for the up path are left as the frozen
UNet made them, as the official code does; adding phi_n there too would push the same correction
into the decoder a second time through every skip connection of the level.

The pivot is NOT re-noised to t before the LR encoder. The official code (training and inference)
feeds the clean LR latent and conditions only through the timestep embedding, and the training
pairs here are clean E(down(x0)); feeding a noised pivot at inference would leave the training
distribution, and the clean pivot is what makes per-stage caching meaningful.

LR feature modes: "per_step" recomputes h_n^LR every UNet call with the current timestep
embedding (the official behaviour); "per_stage" computes them on the first call of the stage
(t close to the pivot timestep K) and reuses them, while phi_n still receives the current
timestep embedding.

Every hook is removed in `finally`, also when a denoising step raises, so one resident UNet can
serve tuned and tuning-free jobs back to back.

CUDA graphs (selfcascade/cuda_graphs.py): in "per_step" mode with persistent LR inputs (what
`TunedStageHook` gives), everything the block hooks compute depends only on the UNet call's own
arguments, the upsampler weights and a persistent pivot buffer (one per pivot shape, filled when
the stage starts; conv_in runs on it inside the UNet's forward). The block hooks then carry a
`graph_key` naming those: the buffer object itself (so a graph keeps it alive and a pivot of
another shape never replays it) and the upsampler weights' storage. A tuned stage may replay a
graph captured with them. "per_stage" decides per call whether to recompute, which a replay
cannot: its hooks carry no key.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from selfcascade.errors import CheckpointError
from selfcascade.upsamplers import FeatureUpsamplerSet

if TYPE_CHECKING:
    from selfcascade.plan import StageSize
    from selfcascade.request import LRFeatureMode
    from selfcascade.stage_hooks import StageRun

logger = logging.getLogger(__name__)

# A diffusers UNet2DConditionModel, UNet3DConditionModel or UNetMotionModel; mypy cannot see the
# attributes diffusers' classes set.
UNet = Any

# The checkpoint `selfcascade tune` writes into its --out folder (tuning imports it from here).
UPSAMPLERS_FILE = "upsamplers.safetensors"

# Keyword arguments the UNet passes to a block that must not be applied to the LR state:
# T2I-adapter residuals are computed for the HR resolution.
_HR_ONLY_KWARGS = ("additional_residuals",)


class PivotBuffer:
    """A persistent tensor the LR chain starts from, compared by identity (a graph key holds it:
    it lives as long as the graphs that read it)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class LRInputs:
    """Pivot buffers kept across the stages and jobs of one `TunedStageHook`, one per shape,
    dtype and device, so that a graph captured in one job is replayed in the next. At most
    `max_buffers` besides the pinned ones, the least recently used dropped (a graph still
    holding one keeps it). `pin_all` keeps those held now for good: the stages compiled at
    start-up are known by their buffers, and a new buffer of the same shape would run eager."""

    def __init__(self, max_buffers: int = 8) -> None:
        self.max_buffers = max_buffers
        self._buffers: OrderedDict[tuple[Any, ...], PivotBuffer] = OrderedDict()
        self._pinned: set[tuple[Any, ...]] = set()

    def pin_all(self) -> None:
        """Never drop the buffers held now (a few MB each: pivot latents)."""
        self._pinned.update(self._buffers)

    def holding(self, value: torch.Tensor) -> PivotBuffer:
        """The buffer for `value`'s shape, dtype and device, now holding a copy of `value`."""
        key = (tuple(value.shape), value.dtype, value.device)
        held = self._buffers.get(key)
        if held is None:
            held = self._buffers[key] = PivotBuffer(torch.empty_like(value))
            unpinned = [k for k in self._buffers if k not in self._pinned]  # oldest first
            for old in unpinned[: max(0, len(unpinned) - self.max_buffers)]:
                del self._buffers[old]
        self._buffers.move_to_end(key)
        held.tensor.copy_(value)
        return held


class FeatureInjection:
    """The per-run state of one injection: the pivot, the LR chain, the cached features."""

    def __init__(
        self,
        unet: UNet,
        upsamplers: FeatureUpsamplerSet,
        pivot_latents: torch.Tensor,
        lr_features: LRFeatureMode,
        lr_inputs: LRInputs | None = None,
    ) -> None:
        if lr_features not in ("per_step", "per_stage"):
            raise ValueError(f"lr_features must be per_step or per_stage, got {lr_features!r}")
        self.unet: UNet = unet
        self.upsamplers = upsamplers
        self.pivot = pivot_latents.detach()  # (B, C, h, w) or (B, C, F, h, w)
        self.mode = lr_features
        self.lr_inputs = lr_inputs
        self.unet_calls = 0
        self.lr_computations = 0
        # The pivot as conv_in takes it, frames folded into the batch (set by attach).
        self._lr_input: PivotBuffer | None = None
        self._repeats = 1  # copies of the pivot in the current call's batch (guidance)
        self._lr_state: torch.Tensor | None = None  # running LR hidden state of this call
        self._first_block: str | None = None  # where the LR chain starts (set by attach)
        self._features: dict[str, torch.Tensor] = {}  # h_n^LR by level name
        self._batch: int | None = None
        self._compute_lr = False
        self._in_lr = False  # set while a block runs on the LR state: its own hook passes through

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """Every block the LR chain must run through: up to the last level the set covers."""
        chain: list[tuple[str, nn.Module]] = []
        if getattr(self.unet, "transformer_in", None) is not None:
            # UNet3DConditionModel runs a temporal transformer between conv_in and the down
            # blocks: the LR state passes through it too (it never gets an upsampler).
            chain.append(("transformer_in", self.unet.transformer_in))
        chain += [(f"down_{i}", block) for i, block in enumerate(self.unet.down_blocks)]
        if self.unet.mid_block is not None:
            chain.append(("mid", self.unet.mid_block))
        names = [name for name, _ in chain]
        missing = [n for n in self.upsamplers.names() if n not in names]
        if missing:
            raise ValueError(f"the upsampler set has levels {missing}, which this UNet lacks")
        last = max(names.index(n) for n in self.upsamplers.names())
        return chain[: last + 1]

    def attach(self) -> list[RemovableHandle]:
        """Register every hook; the caller removes the returned handles."""
        for hook in self.unet._forward_pre_hooks.values():
            if isinstance(getattr(hook, "__self__", None), FeatureInjection):
                # Two injections would each run the other's hooks on their LR passes.
                raise RuntimeError("feature upsamplers are already injected into this UNet")
        chain = self.blocks()
        self._first_block = chain[0][0]
        lr = self._pivot_for_conv_in()
        self._lr_input = PivotBuffer(lr) if self.lr_inputs is None else self.lr_inputs.holding(lr)
        # What a captured graph of the block hooks reads besides the UNet's arguments
        # (selfcascade/cuda_graphs.py): the pivot buffer and the upsamplers' weight storage.
        replayable = self.mode == "per_step" and self.lr_inputs is not None
        weights = tuple(p.data_ptr() for p in self.upsamplers.parameters()) if replayable else ()
        handles = [self.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)]
        try:
            for name, block in chain:
                hook = self._after_block(name)
                if replayable:
                    hook.graph_key = ("tuned", name, self.upsamplers, weights, self._lr_input)
                handles.append(block.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _before_unet(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        sample = args[0] if args else kwargs["sample"]  # (kB, C, H, W) or (kB, C, F, H, W)
        self.unet_calls += 1
        batch = sample.shape[0]
        if batch % self.pivot.shape[0]:
            raise ValueError(
                f"UNet batch {batch} is not a multiple of the pivot batch {self.pivot.shape[0]}"
            )
        self._compute_lr = self.mode == "per_step" or not self._features or batch != self._batch
        self._batch = batch
        if not self._compute_lr:
            return
        self.lr_computations += 1
        self._features = {}
        # CFG batches are [uncond; cond], each a copy of the latents: the pivot is repeated the
        # same way when the chain starts.
        self._repeats = batch // self.pivot.shape[0]

    def _pivot_for_conv_in(self) -> torch.Tensor:
        """The pivot as conv_in takes it: frames folded into the batch, conv_in's device and
        dtype, centred if the UNet centres its input. (B[*F], C, h, w)"""
        conv_in = self.unet.conv_in
        lr = _frames_into_batch(self.pivot)
        lr = lr.to(device=conv_in.weight.device, dtype=conv_in.weight.dtype)
        if getattr(self.unet.config, "center_input_sample", False):
            lr = 2 * lr - 1.0
        return lr

    def _after_block(self, name: str) -> Any:
        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            if self._in_lr:
                return None
            if self._compute_lr:
                if name == self._first_block:
                    self._lr_state = self._start_lr_chain()
                lr_features = self._run_on_lr(module, args, kwargs)  # (kB, C_n, h_n, w_n)
                # Per step, the features live for this call only: state kept across calls
                # would be guarded by torch.compile, and a graph capture, which repeats the
                # forward without the UNet's pre-hook, would fail the guard and run eager.
                if self.mode == "per_stage":
                    self._features[name] = lr_features
            else:
                lr_features = self._features[name]  # per_stage: from the stage's first call
            if name not in self.upsamplers:
                return None  # a level the LR chain passes through without an upsampler
            temb = kwargs["temb"] if "temb" in kwargs else args[1]  # (kB, T)
            if isinstance(output, tuple):
                hidden, res_samples = output[0], output[1:]  # down block: (hidden, skips)
            else:
                hidden, res_samples = output, None  # mid block: hidden only
            phi = self.upsamplers[name]
            dtype = next(phi.parameters()).dtype
            delta = phi(
                lr_features.to(dtype), temb.to(dtype), (hidden.shape[-2], hidden.shape[-1])
            )  # (kB, C_n, H_n, W_n)
            hidden = hidden + delta.to(hidden.dtype)
            return hidden if res_samples is None else (hidden, *res_samples)

        return hook

    def _start_lr_chain(self) -> torch.Tensor:
        """conv_in of the pivot repeated to the call's batch: every pass starts here, never from
        a state an earlier call left (a graph capture calls the forward without the pre-hook).
        Repeating after folding the frames gives the batch-major order the video UNets use."""
        if self._lr_input is None:
            raise RuntimeError("LR input missing: a UNet block ran before the injection attached")
        lr = self._lr_input.tensor
        lr = lr.repeat(self._repeats, *(1,) * (lr.dim() - 1))  # (kB[*F], C, h, w)
        with torch.no_grad():  # the base is frozen: LR features never need autograd
            return self.unet.conv_in(lr)  # (kB[*F], C0, h, w)

    def _run_on_lr(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> torch.Tensor:
        if self._lr_state is None:
            raise RuntimeError("LR state missing: a UNet block ran outside a UNet call")
        lr_kwargs = {k: v for k, v in kwargs.items() if k not in _HR_ONLY_KWARGS}
        if args:
            lr_args: tuple[Any, ...] = (self._lr_state, *args[1:])
        else:
            lr_args = args
            lr_kwargs["hidden_states"] = self._lr_state
        self._in_lr = True
        try:
            with torch.no_grad():
                out = module(*lr_args, **lr_kwargs)
        finally:
            self._in_lr = False
        lr_hidden = out[0] if isinstance(out, tuple) else out  # (kB, C_n, h_n, w_n)
        self._lr_state = lr_hidden
        return lr_hidden


def _frames_into_batch(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, h, w) -> (B*F, C, h, w), batch-major as the video UNets fold their input; a
    4-D image latent passes unchanged."""
    if latents.dim() == 4:
        return latents
    b, c, f, h, w = latents.shape
    return latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


@contextmanager
def inject_upsamplers(
    unet: UNet,
    upsamplers: FeatureUpsamplerSet,
    pivot_latents: torch.Tensor,
    lr_features: LRFeatureMode = "per_step",
    lr_inputs: LRInputs | None = None,
) -> Iterator[FeatureInjection]:
    """Add phi_n(h_n^LR, t) to the UNet's block outputs inside the `with` block; undone on exit.
    With `lr_inputs`, per-step hooks may be replayed from CUDA graphs (see the module doc)."""
    injection = FeatureInjection(unet, upsamplers, pivot_latents, lr_features, lr_inputs)
    handles = injection.attach()
    try:
        yield injection
    finally:
        for handle in handles:
            handle.remove()
        logger.debug(
            "feature injection removed after %d UNet calls, %d LR feature computations",
            injection.unet_calls,
            injection.lr_computations,
        )


@dataclass(frozen=True)
class StageUpsamplers:
    """One trained set and what its checkpoint says it was tuned for."""

    upsamplers: FeatureUpsamplerSet
    trained_scale: float | None = None  # side growth of the tuning pairs (HR / LR)
    hr_size: int | None = None  # side in pixels of the HR crops: the stage it was made for


class TunedStageHook:
    """`StageHook` for the engine: inject trained upsamplers into every re-noise stage.

    With one set, every stage gets it (it resizes to any size). With several, as the official
    checkpoints come, one per stage size, each stage gets the set whose tuning crops are
    nearest its own size (in log pixels): a 4x demo run uses the set tuned at 128 px for its
    64 -> 128 stage and the one tuned at 256 px for 128 -> 256. Several sets must all record
    their `hr_size`, or there would be nothing to choose by.

    `lr_features` overrides the request's mode when given (the benchmark compares both).
    A set's `trained_scale` is only compared with each stage's growth, to log stages it was not
    tuned for. The sets are switched to inference (eval, no grad); don't pass a set that is
    being trained.
    """

    def __init__(
        self,
        upsamplers: FeatureUpsamplerSet | Sequence[StageUpsamplers],
        lr_features: LRFeatureMode | None = None,
    ) -> None:
        sets = (
            [StageUpsamplers(upsamplers)]
            if isinstance(upsamplers, FeatureUpsamplerSet)
            else list(upsamplers)
        )
        if not sets:
            raise ValueError("TunedStageHook needs at least one upsampler set")
        if len(sets) > 1 and any(s.hr_size is None for s in sets):
            raise ValueError(
                "several upsampler sets need each its tuning size (hr_size) to choose by"
            )
        for s in sets:
            s.upsamplers.eval().requires_grad_(False)
        self.sets = sets
        self.lr_features = lr_features
        self.lr_inputs = LRInputs()  # lets a worker's tuned stages replay CUDA graphs

    def __call__(self, stage: StageRun) -> AbstractContextManager[None]:
        return self._inject(stage)

    def set_for(self, size: StageSize) -> StageUpsamplers:
        """The set tuned nearest `size` (the only one when there is one)."""
        if len(self.sets) == 1:
            return self.sets[0]
        return min(self.sets, key=lambda s: abs(math.log(size.pixels / (s.hr_size or 1) ** 2)))

    @contextmanager
    def _inject(self, stage: StageRun) -> Iterator[None]:
        unet: UNet = stage.unet
        chosen = self.set_for(stage.size)
        # The set follows the resident UNet's device and dtype; a no-op after the first stage.
        chosen.upsamplers.to(device=unet.device, dtype=unet.dtype)
        mode = self.lr_features or stage.lr_features
        growth = stage.size.width / stage.previous_size.width
        if chosen.trained_scale and abs(growth - chosen.trained_scale) > 0.01:
            logger.info(
                "stage %d grows %.2fx per side; the upsamplers were tuned for %.2fx",
                stage.index,
                growth,
                chosen.trained_scale,
            )
        with inject_upsamplers(
            unet, chosen.upsamplers, stage.pivot_latents, mode, self.lr_inputs
        ):
            yield


def load_tuned_hook(
    paths: str | Path | Sequence[str | Path],
    pipe: Any,
    lr_features: LRFeatureMode | None = None,
) -> TunedStageHook:
    """A hook from one checkpoint or several (one per stage size), each verified against
    `pipe.unet` now (`CheckpointError` if not)."""
    from selfcascade.checkpoint import load_upsamplers

    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    sets = []
    tuned_at: dict[int, Path] = {}  # each set's file by its hr_size
    for given in paths:
        path = checkpoint_file(given)
        checkpoint = load_upsamplers(path, pipe.unet)
        if len(paths) > 1:
            if checkpoint.hr_size is None:
                raise CheckpointError(
                    f"{path} does not record the size it was tuned at (hr_size), so it cannot be "
                    "one of several upsampler sets; re-save it with that metadata or pass it alone"
                )
            _refuse_same_size(tuned_at, path, checkpoint.hr_size)
        # Moved now, outside any job's inference_mode, so the weights stay ordinary tensors.
        checkpoint.upsamplers.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
        logger.info(
            "loaded %d-parameter upsamplers from %s (scale %s, tuned at %s px, K %d)",
            checkpoint.parameter_count,
            path,
            checkpoint.scale,
            checkpoint.hr_size or "?",
            checkpoint.pivot_timestep,
        )
        sets.append(StageUpsamplers(checkpoint.upsamplers, checkpoint.scale, checkpoint.hr_size))
    return TunedStageHook(sets, lr_features)


def _refuse_same_size(tuned_at: dict[int, Path], path: Path, hr_size: int) -> None:
    """Record `path` as the set tuned at `hr_size`, refusing a second set of that size: a stage
    gets the set tuned nearest its size, and of two equally near only the first would ever run
    (the other loaded for nothing, the user none the wiser)."""
    earlier = tuned_at.setdefault(hr_size, path)
    if earlier is not path:
        raise CheckpointError(
            f"{earlier} and {path} are both tuned at {hr_size} px, so only the first would be "
            "used; pass one set per stage size"
        )


def checkpoint_file(path: str | Path) -> Path:
    """`path`, or the checkpoint inside it when it is the folder `selfcascade tune --out` wrote
    (what a user has at hand after tuning)."""
    path = Path(path)
    if not path.is_dir():
        return path
    inside = path / UPSAMPLERS_FILE
    if not inside.is_file():
        raise CheckpointError(
            f"{path} is a folder without {UPSAMPLERS_FILE}, the file `selfcascade tune` writes "
            "into its --out; give that folder or an upsampler checkpoint file"
        )
    return inside

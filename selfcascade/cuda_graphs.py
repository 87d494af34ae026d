"""CUDA graphs for the launch-bound stages: the UNet's forward replayed as one captured graph.

At the native size a UNet step is bound by launching its ~1,000 kernels from Python, not by
the GPU: SD2.1-base at 512^2 takes ~26 ms per step on an H200 for 2 ms of arithmetic
(bench/GPU_NOTES.md), and the first stages of a cascade run at such sizes. A CUDA graph records
the kernels of one forward once and replays them with a single launch. At 2048^2 and above the
step is bound by attention arithmetic, a graph would gain nothing there and would pin gigabytes
of activations, so only stages up to `max_pixels` are graphed.

A graph replays fixed memory: every call with the same argument shapes copies its tensors into
the graph's static inputs, replays, and returns a copy of the static output. One graph is kept
per argument signature (stage size, batch, dtypes), the least recently used evicted beyond
`max_graphs`; all share one memory pool, which is safe because they never run concurrently.

Hooks inside the UNet run inside its forward, so a graph records them too. That is only right
for a hook that declares it with a `graph_key` attribute: a hashable saying what it computes and
holding the persistent tensors it reads besides the UNet's arguments (the tuned upsamplers'
per-step hooks do, selfcascade/tuned.py). The keys of the hooks present join the signature, so
tuned and tuning-free calls of one size never share a graph.

A graph also bakes in the UNet's weight storage and its Python behaviour at capture. Moved or
re-cast weights are noticed (their storage addresses are checked at every stage, and all graphs
are dropped when they changed); anything else that changes what the forward does without a
hook, such as swapped attention processors or a patched submodule forward, needs `reset()`.

A stage runs eager, with a log line saying why, when a graph would be wrong or impossible: not
on CUDA, autograd recording, a hook inside the UNet without a `graph_key`, the forward already
wrapped (CPU offloading), or a capture that failed (then that signature stays eager for good,
also after a transient failure such as running out of memory).

With a `CompiledUNet` (selfcascade/compiled_unet.py), what runs "eager" above runs its compiled
forward instead, graphs capture the compiled kernels, and stages too large for graphs run it
directly, for every call whose signature (with the `graph_key`s of the hooks inside the UNet)
was compiled at start-up. A hook without a key keeps the stage uncompiled too.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from selfcascade.compiled_unet import CompiledUNet

log = logging.getLogger(__name__)

# Image pixels of the largest stage replayed from a graph. 1024^2 covers SD2.1's 512^2 and
# 1024^2 stages and SDXL's 1024^2 base stage; 2048^2 steps are attention-bound.
DEFAULT_CUDA_GRAPH_MAX_PIXELS = 1024 * 1024
DEFAULT_MAX_GRAPHS = 6
# Eager calls on a side stream before a capture: cuBLAS/cuDNN pick their kernels and allocate
# their workspaces there, which must not happen inside the capture.
CAPTURE_WARM_UP_CALLS = 2


def graph_signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable | None:
    """What one captured graph serves: every tensor's shape, dtype and device, every other value
    as it is, and the structure holding them. None when a call cannot be graphed (a value that
    is not hashable, or a timestep given as a Python number: a graph per step value)."""
    return _signature(args, kwargs, *tree_flatten((args, kwargs)))


def _signature(
    args: tuple[Any, ...], kwargs: dict[str, Any], leaves: list[Any], spec: TreeSpec
) -> Hashable | None:
    """`graph_signature` of a call already flattened into `leaves` and `spec`."""
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
    if timestep is not None and not isinstance(timestep, torch.Tensor):
        return None
    described: list[Hashable] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            described.append(("tensor", tuple(leaf.shape), leaf.dtype, str(leaf.device)))
        elif leaf is None or isinstance(leaf, bool | int | float | str):
            described.append(("value", leaf))
        else:
            return None
    return (str(spec), tuple(described))


def inner_hook_keys(module: torch.nn.Module) -> tuple[Hashable, ...] | None:
    """The `graph_key`s of the forward hooks and pre-hooks on `module`'s submodules (not on
    `module` itself: those run outside its forward); None if one has no key or a global module
    hook is set, i.e. a graph could not replay what the hooks do."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return None
    keys: list[Hashable] = []
    for m in module.modules():
        if m is module:
            continue
        for hook in (*m._forward_pre_hooks.values(), *m._forward_hooks.values()):
            key = getattr(hook, "graph_key", None)
            if key is None:
                return None
            keys.append(key)
    return tuple(keys)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_inputs: list[Any]  # the flattened arguments; tensors are the graph's own buffers
    static_output: Any


class UNetGraphs:
    """Captures and replays the forward of one resident UNet, stage by stage.

    `stage(pixels)` wraps one stage: inside it, calls of the UNet whose signature was seen
    before replay its graph. The engine enters it around every stage; it decides itself.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        *,
        max_pixels: int | None = DEFAULT_CUDA_GRAPH_MAX_PIXELS,
        max_graphs: int = DEFAULT_MAX_GRAPHS,
        compiled: CompiledUNet | None = None,
    ) -> None:
        self.unet = unet
        self.max_pixels = max_pixels
        self.max_graphs = max_graphs
        self.compiled = compiled
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._refused: set[Hashable] = set()
        self._pool: Any = None
        self._hook_keys: tuple[Hashable, ...] = ()  # of the stage being run
        self._graphing = False  # whether the stage being run may replay graphs
        self._weights: tuple[int, ...] = ()  # the UNet's weight storage the graphs read
        self.captures = 0  # for the benchmark and tests: graphs captured / calls replayed
        self.replays = 0

    @property
    def held(self) -> int:
        """Graphs held now."""
        return len(self._graphs)

    def stage(self, pixels: int) -> AbstractContextManager[None]:
        """Around one stage of `pixels` output pixels: graphs on when worthwhile and safe."""
        reason, hook_keys = self._eligibility(pixels)
        if reason is not None:
            compile_keys = self._compile_hook_keys()
            if compile_keys is not None:
                return self._installed(compile_keys, graphing=False)
            log.debug("stage of %d pixels runs eager: %s", pixels, reason)
            return nullcontext()
        weights = tuple(p.data_ptr() for p in self.unet.parameters())
        if weights != self._weights:
            if self._graphs:
                log.info("the UNet's weights moved: dropping %d CUDA graphs", len(self._graphs))
            self.reset()
            self._weights = weights
        return self._installed(hook_keys, graphing=True)

    def reset(self) -> None:
        """Forget every graph and refusal (their memory goes with the last reference)."""
        self._graphs.clear()
        self._refused.clear()
        self._pool = None

    def why_eager(self, pixels: int) -> str | None:
        """None if a stage of `pixels` may replay graphs now, else why it runs eager."""
        return self._eligibility(pixels)[0]

    def _eligibility(self, pixels: int) -> tuple[str | None, tuple[Hashable, ...]]:
        """Why a stage of `pixels` runs eager (None: it may replay graphs), and the graph keys
        of the hooks inside the UNet, which join every signature of the stage."""
        if self.max_pixels is None:
            return "CUDA graphs are off", ()
        if pixels > self.max_pixels:
            return f"above {self.max_pixels} pixels (arithmetic-bound)", ()
        if "forward" in vars(self.unet):
            return "the UNet's forward is already wrapped (offloading?)", ()
        hook_keys = inner_hook_keys(self.unet)
        if hook_keys is None:
            return "a hook inside the UNet that a graph cannot replay", ()
        if self._device().type != "cuda":
            return "not on a CUDA device", ()
        return None, hook_keys

    def _compile_hook_keys(self) -> tuple[Hashable, ...] | None:
        """For a stage that replays no graphs: the hook keys its compiled calls are known by,
        or None if it cannot run compiled (no compiled forward, the forward already wrapped, a
        hook inside the UNet without a `graph_key`)."""
        if self.compiled is None or not self.compiled.active or "forward" in vars(self.unet):
            return None
        return inner_hook_keys(self.unet)

    @contextmanager
    def _installed(self, hook_keys: tuple[Hashable, ...], *, graphing: bool) -> Iterator[None]:
        # An instance attribute shadows the class's forward; nn.Module.__call__ still runs the
        # UNet's own hooks (the engine's call counter, the tuned pre-hook) around it.
        self.unet.forward = self._forward  # type: ignore[method-assign]
        self._hook_keys, self._graphing = hook_keys, graphing
        try:
            yield
        finally:
            del self.unet.forward
            self._hook_keys, self._graphing = (), False

    def _device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _eager(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.unet).forward(self.unet, *args, **kwargs)

    def _direct(self, key: Hashable | None, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
        """One call without a graph: compiled when its key (signature and hook keys) was
        compiled at start-up, else eager."""
        compiled = self.compiled
        if compiled is None or not compiled.serves(key):
            return self._eager(*args, **kwargs)
        return compiled(key, *args, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        # Training records autograd history a replay would not; a model output object (the
        # default return_dict=True) is not a plain structure of tensors to copy out.
        if torch.is_grad_enabled() or kwargs.get("return_dict", True):
            return self._eager(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        signature = _signature(args, kwargs, leaves, spec)
        key = None if signature is None else (signature, self._hook_keys)
        if not self._graphing or key is None or key in self._refused:
            return self._direct(key, args, kwargs)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key, leaves, spec)
            if graph is None:
                return self._direct(key, args, kwargs)
        self._graphs.move_to_end(key)
        for static, leaf in zip(graph.static_inputs, leaves, strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(leaf)
        graph.graph.replay()
        self.replays += 1
        # The static output is overwritten by the next replay: the caller gets its own copy.
        return _map_tensors(graph.static_output, torch.Tensor.clone)

    def _capture(self, key: Hashable, leaves: list[Any], spec: TreeSpec) -> _Graph | None:
        static_inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_args, static_kwargs = _rebuild(static_inputs, spec)
        device = self._device()
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(CAPTURE_WARM_UP_CALLS):  # the first compiles, if it may
                    self._direct(key, static_args, static_kwargs)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                static_output = self._direct(key, static_args, static_kwargs)
        except Exception as exc:  # any capture failure (an op that syncs, memory): eager
            log.warning("CUDA graph capture failed, this UNet call signature stays eager: %s",
                        exc)
            self._refused.add(key)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        captured = _Graph(graph, static_inputs, static_output)
        self._graphs[key] = captured
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        log.info("captured a CUDA graph of the UNet (%d held)", len(self._graphs))
        return captured


def _rebuild(leaves: list[Any], spec: TreeSpec) -> tuple[tuple[Any, ...], dict[str, Any]]:
    args, kwargs = tree_unflatten(leaves, spec)
    return tuple(args), dict(kwargs)


def _map_tensors(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([fn(x) if isinstance(x, torch.Tensor) else x for x in leaves], spec)

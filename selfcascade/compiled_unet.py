"""`torch.compile` of the UNet's forward, for the stage sizes compiled at start-up.

Compiling fuses the normalisations, activations and residual adds around the attention and
convolution kernels: one SD2.1 UNet call took 194 ms instead of 226 ms at 2048^2 and 25.6
instead of 34.8 ms at 1024^2 on an H200 (bench/GPU_NOTES.md). It costs ~50-60 s of compiling
per call shape, so it happens only at start-up: inside `compiling()` (the worker's warm-up)
every new call signature is compiled; afterwards a call of a signature compiled then runs the
compiled code and anything else runs eager, so no job waits a minute for a size it brought.

Hooks inside the UNet are traced into the compiled code: the tuned upsamplers' per-step block
hooks (selfcascade/tuned.py) compile into one graph with the UNet, LR branch included. By
default dynamo does not guard on module hooks (`skip_nnmodule_hook_guards`), so code compiled
without hooks would run when hooks were added later, silently skipping them; this module turns
those guards on, so a call with other hooks never reuses code compiled without them. The
caller keys signatures by the hooks present as well (`selfcascade/cuda_graphs.py` adds their
`graph_key`s and never calls in with a hook that has none): a tuned stage runs compiled only
when the warm-up ran a tuned job of its size (and pivot buffer: `LRInputs.pin_all`).

A signature is the shapes, dtypes and Python values of a call: jobs with another scheduler
whose timesteps have another dtype (Euler's are floats, DDIM's integers) or without guidance
(batch 1) run eager. The warm-up uses a job's defaults: DDIM and guidance.

The dynamo settings changed here (hook guards, the recompile limit) hold for the process.

A signature whose compilation failed stays eager for good, with a warning. A call of a compiled
signature whose dynamo guards fail anyway (state the key does not cover) runs eager instead of
recompiling inside a job; it is counted in `fallbacks` and logged once per signature with
dynamo's reasons, because such a call silently loses the compiled speed (a tuned hook that kept
a dict across calls did: a graph capture repeats the forward without the UNet's pre-hook).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dynamo keeps at most this many compiled variants of one function (its default is 8): every
# stage size of every resident model is one.
RECOMPILE_LIMIT = 64
# How dynamo's RuntimeError starts under the "fail_on_recompile" stance (its eval_frame.py).
RECOMPILE_REFUSED = "Detected recompile when torch.compile stance is 'fail_on_recompile'"


class CompiledUNet:
    """The compiled forward of one resident UNet and the call signatures it serves."""

    def __init__(self, unet: torch.nn.Module, *, backend: str = "inductor") -> None:
        self.unet = unet
        self.backend = backend
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        # Process-wide: guard compiled code on the hooks it was traced with (see above).
        config.skip_nnmodule_hook_guards = False
        # One graph per call shape: dynamic shapes would make the kernels slower for all.
        self._compiled = torch.compile(self._forward, backend=backend, dynamic=False)
        self._signatures: set[Hashable] = set()
        self._refused: set[Hashable] = set()
        self._fell_back: set[Hashable] = set()
        self._learning = False
        self.calls = 0  # calls served compiled
        self.fallbacks = 0  # calls of compiled signatures that failed their guards: ran eager

    @property
    def compiled_signatures(self) -> int:
        return len(self._signatures)

    @property
    def active(self) -> bool:
        """Whether any call may run compiled now."""
        return self._learning or bool(self._signatures)

    @contextmanager
    def compiling(self) -> Iterator[None]:
        """Inside, calls of new signatures are compiled (start-up); outside they run eager."""
        self._learning = True
        try:
            yield
        finally:
            self._learning = False

    def serves(self, signature: Hashable | None) -> bool:
        """Whether a call of `signature` runs compiled (or is compiled now, inside
        `compiling()`)."""
        if signature is None or signature in self._refused:
            return False
        return signature in self._signatures or self._learning

    def __call__(self, signature: Hashable, *args: Any, **kwargs: Any) -> Any:
        """The compiled forward on `args`, or the uncompiled one when compiling this signature
        fails. Errors of an already compiled call (out of memory...) propagate as eager ones."""
        if signature in self._signatures:
            # A guard the signature does not cover (a swapped attention processor...) must not
            # make a job wait a minute for a recompile: that call runs eager instead. Dynamo
            # raises at the call's entry, before any compiled code ran, because the UNet
            # (tuned hooks included) traces into one graph without breaks; after a graph break
            # it could raise at a resumed frame, and the eager rerun would repeat the prefix.
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    output = self._compiled(*args, **kwargs)
            except RuntimeError as exc:
                if not str(exc).startswith(RECOMPILE_REFUSED):
                    raise
                return self._fall_back(signature, exc, args, kwargs)
            self.calls += 1
            return output
        started = time.perf_counter()
        try:
            output = self._compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise  # the warm-up's size does not fit: not a compiler problem
        except Exception as exc:  # a compiler error: this shape runs eager
            log.warning("torch.compile of the UNet failed, this call signature stays eager: %s",
                        exc)
            self._refused.add(signature)
            return self._forward(*args, **kwargs)
        seconds = time.perf_counter() - started
        self._signatures.add(signature)
        self.calls += 1
        log.info("compiled the UNet for a new call signature in %.1fs (%d compiled)", seconds,
                 len(self._signatures))
        return output

    def _fall_back(self, signature: Hashable, exc: RuntimeError, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> Any:
        """The uncompiled forward for a compiled signature whose guards failed."""
        self.fallbacks += 1
        if signature not in self._fell_back:
            self._fell_back.add(signature)
            log.warning("a call of a compiled UNet signature failed dynamo's guards and runs "
                        "uncompiled (%d such calls so far): %s", self.fallbacks, exc)
        return self._forward(*args, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """The UNet's own forward (what is compiled; the eager fallback)."""
        return type(self.unet).forward(self.unet, *args, **kwargs)

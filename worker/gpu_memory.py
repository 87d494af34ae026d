"""CUDA memory in use, for the worker's presence key (exported by the API's /metrics)."""

from __future__ import annotations

import sys


def gpu_memory_in_use() -> dict[str, int]:
    """{"cuda:0": bytes allocated by this process}; empty without CUDA.

    Reads torch from sys.modules rather than importing it: the presence thread must never be
    the one that pays for (or triggers) a torch import.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    return {
        f"cuda:{i}": int(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count())
    }

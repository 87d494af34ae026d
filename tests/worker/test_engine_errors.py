import torch

from worker.engine_errors import is_fatal_accelerator_error, is_out_of_memory


def test_out_of_memory_is_recoverable_not_fatal() -> None:
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(oom)
    assert not is_fatal_accelerator_error(oom)
    assert not is_fatal_accelerator_error(RuntimeError("CUDA error: out of memory"))


def test_a_poisoned_cuda_context_is_fatal() -> None:
    assert is_fatal_accelerator_error(RuntimeError("CUDA error: an illegal memory access"))
    assert is_fatal_accelerator_error(RuntimeError("device-side assert triggered"))


def test_ordinary_errors_are_neither() -> None:
    error = ValueError("bad value")
    assert not is_out_of_memory(error)
    assert not is_fatal_accelerator_error(error)

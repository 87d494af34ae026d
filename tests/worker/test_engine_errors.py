import weakref

import torch

from worker.engine_errors import (
    free_accelerator_memory,
    is_fatal_accelerator_error,
    is_out_of_memory,
)


def test_out_of_memory_is_recoverable_not_fatal() -> None:
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_out_of_memory(oom)
    assert not is_fatal_accelerator_error(oom)
    assert not is_fatal_accelerator_error(RuntimeError("CUDA error: out of memory"))


def test_the_cpu_allocators_failure_is_out_of_memory() -> None:
    # What make run's CPU worker sees for an image too large for the host.
    try:
        torch.empty(2**60, dtype=torch.uint8)
    except RuntimeError as exc:
        assert is_out_of_memory(exc), exc
        assert not is_fatal_accelerator_error(exc)
    else:  # pragma: no cover - an exabyte was allocated
        raise AssertionError("expected the allocation to fail")


def test_freeing_after_a_failure_releases_the_tensors_its_traceback_held() -> None:
    def job() -> None:
        big = torch.ones(1024)
        held.append(weakref.ref(big))
        raise torch.OutOfMemoryError("CUDA out of memory")

    held: list[weakref.ref] = []
    try:
        job()
    except torch.OutOfMemoryError as exc:
        assert held[0]() is not None  # the traceback's frame still holds it
        free_accelerator_memory(exc)
        assert held[0]() is None


def test_a_poisoned_cuda_context_is_fatal() -> None:
    assert is_fatal_accelerator_error(RuntimeError("CUDA error: an illegal memory access"))
    assert is_fatal_accelerator_error(RuntimeError("device-side assert triggered"))


def test_ordinary_errors_are_neither() -> None:
    error = ValueError("bad value")
    assert not is_out_of_memory(error)
    assert not is_fatal_accelerator_error(error)

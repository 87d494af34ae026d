"""A fixture for tests of tiny models: one intra-op thread.

On a model with 4-8 channels, torch's thread pool only adds synchronisation, and on a shared
2-core machine a second thread can make a 25 ms UNet call take seconds.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread_torch() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

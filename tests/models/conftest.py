"""Fixtures for the model tests.

The machines these tests run on have 2 cores that other jobs often share;
with 2 intra-op threads an oversubscribed OpenMP pool makes a MobileNet
forward pass 40x slower (measured: 2.2 s vs 0.05 s), so model tests run
single-threaded and give the thread count back afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

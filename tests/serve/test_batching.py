"""The micro-batcher without a model: concurrent jobs share passes, rows go back to their owners, failures reach every caller."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Sequence

import numpy as np
import pytest

from leuko.errors import LeukoError
from leuko.serve.batching import MicroBatcher
from leuko.serve.count import differential_count, wilson_interval


class SlowModel:
    """Logits = the image's mean pixel in column 0; records each pass's size and the thread it ran on."""

    def __init__(self, delay: float = 0.02) -> None:
        self.delay = delay
        self.passes: list[int] = []
        self.threads: set[str] = set()
        self.busy = threading.Lock()

    def __call__(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        assert self.busy.acquire(blocking=False), "two passes at once"
        try:
            self.passes.append(len(images))
            self.threads.add(threading.current_thread().name)
            time.sleep(self.delay)
            logits = np.array([[float(im.mean()), 0.0] for im in images])
            return logits, logits / 1000.0
        finally:
            self.busy.release()


def image(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, dtype=np.uint8)


async def concurrent_jobs(b: MicroBatcher, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    jobs = [b.predict([image(10 * j + k) for k in range(n)]) for j, n in enumerate(sizes)]
    return await asyncio.gather(*jobs)


def test_concurrent_jobs_share_passes_and_get_their_rows() -> None:
    model = SlowModel()
    b = MicroBatcher(model, max_batch=16, max_wait_ms=20)
    b.start()
    try:
        sizes = [1, 2, 3, 1, 1, 2, 1, 1, 3, 1]
        out = asyncio.run(concurrent_jobs(b, sizes))
    finally:
        b.stop()
    for j, ((logits, probs), n) in enumerate(zip(out, sizes)):
        assert logits[:, 0].tolist() == [float(10 * j + k) for k in range(n)]
        assert probs.shape == (n, 2)
    assert sum(model.passes) == sum(sizes) == b.stats.images
    assert len(model.passes) < len(sizes)  # shared forward passes
    assert max(model.passes) <= 16 + 3  # a batch closes once it reaches max_batch
    assert model.threads == {"leuko-inference"}
    assert b.stats.jobs == len(sizes) and not b.running


def test_max_batch_bounds_a_pass() -> None:
    model = SlowModel(delay=0.05)
    b = MicroBatcher(model, max_batch=4, max_wait_ms=50)
    b.start()
    try:
        asyncio.run(concurrent_jobs(b, [1] * 12))
    finally:
        b.stop()
    assert sum(model.passes) == 12 and max(model.passes) == 4


def test_failure_reaches_every_caller_and_thread_survives() -> None:
    calls = {"n": 0}

    def flaky(images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        z = np.zeros((len(images), 2))
        return z, z

    b = MicroBatcher(flaky, max_batch=8, max_wait_ms=30)
    b.start()
    try:
        async def go() -> list[object]:
            return await asyncio.gather(*(b.predict([image(1)]) for _ in range(3)), return_exceptions=True)

        first = asyncio.run(go())
        assert all(isinstance(r, RuntimeError) and str(r) == "boom" for r in first)
        logits, _ = asyncio.run(b.predict([image(1)]))  # the thread lives on
        assert logits.shape == (1, 2)
    finally:
        b.stop()


def test_call_runs_between_batches_on_the_inference_thread() -> None:
    model = SlowModel(delay=0.03)
    b = MicroBatcher(model, max_batch=8, max_wait_ms=10)
    b.start()
    seen: list[str] = []

    def exclusive() -> str:
        assert model.busy.acquire(blocking=False), "ran during a forward pass"
        model.busy.release()
        seen.append(threading.current_thread().name)
        return "done"

    try:
        async def go() -> list[object]:
            return await asyncio.gather(b.predict([image(1)]), b.call(exclusive), b.predict([image(2)]))

        out = asyncio.run(go())
    finally:
        b.stop()
    assert out[1] == "done" and seen == ["leuko-inference"]


def test_not_started_is_an_error() -> None:
    b = MicroBatcher(SlowModel())
    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(b.predict([image(1)]))


def test_wilson_interval_known_values() -> None:
    # Wilson 95% intervals (Newcombe 1998, table I): 0/10 -> 0-0.2775, 1/10 -> 0.0179-0.4042, 81/263 -> 0.2553-0.3662
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(1, 10) == pytest.approx((0.0179, 0.4042), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 0.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_differential_count() -> None:
    c = differential_count(["a", "b", "a", "a"], ["a", "b", "c"], [True, False, False, True])
    assert [r["count"] for r in c["counts"]] == [3, 1, 0]
    assert [r["percent"] for r in c["counts"]] == [75.0, 25.0, 0.0]
    assert c["n_cells"] == 4 and c["n_review"] == 2 and "only 4 cell(s)" in c["note"]
    assert differential_count(["a"] * 100, ["a", "b"])["note"] is None
    with pytest.raises(LeukoError, match=r"unknown class label\(s\) \['z'\]"):
        differential_count(["z"], ["a", "b"])

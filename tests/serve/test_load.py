"""Load on a real socket: many concurrent clients, every request answered, correctly, and batched."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from leuko.serve import create_app


def small_pngs(n: int, side: int = 40) -> list[bytes]:
    """``n`` distinct small images (random pixels, so every answer is tied to its own request)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


async def hammer(url: str, images: list[bytes], total: int, clients: int) -> tuple[list[Any], float]:
    """``clients`` concurrent clients send ``total`` one-image requests in all; returns the outcomes in request order."""
    outcomes: list[Any] = [None] * total
    next_i = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < total:
            i = next_i
            next_i += 1
            try:
                r = await http.post("/predict", files={"files": (f"req-{i}.png", images[i % len(images)], "image/png")})
                outcomes[i] = (r.status_code, r.json())
            except Exception as exc:  # a transport error counts as an error, not a crash of the test
                outcomes[i] = (None, repr(exc))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return outcomes, time.perf_counter() - t0


def run_load(serve_run: Path, start_server: Any, total: int, clients: int) -> None:
    app = create_app(serve_run / "model.onnx", max_batch=32)
    images = small_pngs(50)
    with start_server(app) as url:
        outcomes, wall = asyncio.run(hammer(url, images, total, clients))
        health = httpx.get(url + "/health").json()
    errors = [(i, o) for i, o in enumerate(outcomes) if o is None or o[0] != 200]
    assert not errors, f"{len(errors)} failed requests, e.g. {errors[:3]}"
    # no lost or crossed answers: request i got the answer for its own image
    names = [o[1]["results"][0]["name"] for o in outcomes]
    assert names == [f"req-{i}.png" for i in range(total)]
    probs = np.array([list(o[1]["results"][0]["probs"].values()) for o in outcomes])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # the same image always gets the same probabilities, whichever batch it rode in
    for k in range(3):
        same = probs[k::len(images)]
        np.testing.assert_allclose(same, np.broadcast_to(same[0], same.shape), atol=1e-5)
    assert health["images"] == total
    assert health["batches"] < total, "concurrent requests never shared a forward pass"
    print(f"\n{total} requests from {clients} clients in {wall:.1f}s ({total / wall:.0f} req/s); "
          f"{health['batches']} forward passes, largest batch {health['largest_batch']}")


def test_load_concurrent_clients(serve_run: Path, start_server: Any) -> None:
    """20 clients, 400 requests (~10 s): every one answered, answers not mixed up, passes shared."""
    run_load(serve_run, start_server, total=400, clients=20)


def test_limits_hold_on_a_real_socket(serve_run: Path, start_server: Any) -> None:
    """Through uvicorn the client still reads the 413 (the body is refused early, the answer arrives)."""
    from leuko.serve import UploadLimits

    app = create_app(serve_run / "model.onnx", limits=UploadLimits(max_file_bytes=100_000, max_request_bytes=400_000))
    with start_server(app) as url:
        r = httpx.post(url + "/predict", files={"files": ("big.png", b"\0" * 150_000, "image/png")})
        assert r.status_code == 413 and r.json()["detail"] == "big.png: file larger than the limit of 98 KiB per image"
        r = httpx.post(url + "/predict", files={"files": ("huge.png", b"\0" * 5_000_000, "image/png")})
        assert r.status_code == 413 and r.json()["detail"].startswith("request body is 4.8 MiB; the limit is 391 KiB")
        assert httpx.get(url + "/health").json()["images"] == 0


@pytest.mark.slow
def test_load_1000_requests(serve_run: Path, start_server: Any) -> None:
    """The issue's full load: 20 concurrent clients, 1,000 requests, zero errors (~20-35 s on 2 busy cores)."""
    run_load(serve_run, start_server, total=1000, clients=20)

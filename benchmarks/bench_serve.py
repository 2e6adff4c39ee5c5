"""Throughput and latency of ``leuko serve`` under concurrent clients, against a naive FastAPI server.

The model: EfficientNet-Lite0 with its bundled ImageNet weights and an 8-class
head (speed does not depend on training, so none is done), at the pbc-fast
recipe's input (128 px, centre crop 0.7), saved as a run with
:func:`leuko.run.folder.save_model` in a temporary folder and exported to ONNX.

Servers, each in its own process on 127.0.0.1, measured one after another:

* **naive**: the FastAPI app a tutorial would write: ``async def`` endpoint,
  ``UploadFile`` list, PIL decode, torchvision Resize/CenterCrop/ToTensor/
  Normalize, the PyTorch model (eval mode, ``no_grad``) on one image at a time;
* **leuko (pytorch)**: ``leuko serve RUN_DIR``: in-memory uploads, one decode
  at the model's size, micro-batched forward passes on the inference thread;
* **leuko (onnx)**: ``leuko serve RUN_DIR/model.onnx``: the same, onnxruntime.

Load: ``--clients`` concurrent clients (httpx, keep-alive) send ``--requests``
``POST /predict`` requests in all to each server, one real PBC image each
(what the review page sends), after ``--warmup`` untimed requests; no new
request starts after ``--time-limit`` seconds per round. All servers
start first; then ``--rounds`` rounds load each in turn, so a change in the
machine's load during the run hits every server alike. Reported: images/s,
p50/p95 latency per request, errors, and forward passes per request for leuko.

    python benchmarks/bench_serve.py                 # 20 clients, 1,000 requests per server
    python benchmarks/bench_serve.py --requests 300  # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from fastapi import File, UploadFile  # noqa: E402  (module level: the naive app's annotations resolve here)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "pbc"
IMAGE_SIZE = 128
PREPROCESS = ["center-crop:0.7"]


# --------------------------------------------------------------------------- the model
def build_run(out: Path) -> tuple[Path, Path]:
    """A run folder with model.pt (EfficientNet-Lite0, bundled weights, 8 classes) and its model.onnx."""
    from leuko.infer import export_onnx
    from leuko.models import build_model
    from leuko.run.folder import save_model
    from leuko.run.config import load_config
    from leuko.train.runner import model_meta

    classes = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    cfg = load_config(None, ["model.name=efficientnet_lite0", f"data.image_size={IMAGE_SIZE}", f"data.preprocess={PREPROCESS}"])
    model = build_model("efficientnet_lite0", len(classes), pretrained="bundled")
    out.mkdir(parents=True, exist_ok=True)
    model_pt = save_model(out / "model.pt", model, model_meta(cfg, classes, model.leuko_info, "bundled"))
    onnx = export_onnx(model_pt).path
    return model_pt, onnx


# --------------------------------------------------------------------------- the naive server
def naive_app(model_pt: Path):  # noqa: ANN201 - a FastAPI app
    """What a first FastAPI wrapper looks like: decode, transform and run one image at a time, in the handler."""
    import io

    import torch
    from fastapi import FastAPI
    from PIL import Image
    from torchvision import transforms as T

    from leuko.run.folder import load_model

    model, meta = load_model(model_pt)
    model.eval()
    inp = meta["input"]
    decode = round(IMAGE_SIZE / 0.7)
    tf = T.Compose([T.Resize((decode, decode)), T.CenterCrop(IMAGE_SIZE), T.ToTensor(), T.Normalize(inp["mean"], inp["std"])])
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(files: list[UploadFile] = File(...)) -> dict:
        results = []
        for f in files:
            image = Image.open(io.BytesIO(await f.read())).convert("RGB")
            with torch.no_grad():
                probs = torch.softmax(model(tf(image)[None]), dim=1)[0].tolist()
            results.append({"name": f.filename, "probs": dict(zip(meta["classes"], probs))})
        return {"results": results}

    return app


def serve_forever(kind: str, model: Path, port: int) -> None:
    import uvicorn

    if kind == "naive":
        app = naive_app(model)
    else:
        from leuko.serve import create_app

        app = create_app(model)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --------------------------------------------------------------------------- the load
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def load(url: str, images: list[tuple[str, bytes]], total: int, clients: int, time_limit: float | None = None) -> tuple[list[float], int, float]:
    """``(latencies_s, errors, wall_s)`` of up to ``total`` one-image requests from ``clients`` concurrent clients.

    No new request starts after ``time_limit`` seconds (those in flight finish), so
    a slow server on a busy machine cannot stretch the run without bound.
    """
    import httpx

    latencies: list[float] = []
    errors = 0
    counter = iter(range(total))
    start = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            if time_limit is not None and time.perf_counter() - start > time_limit:
                return
            name, data = images[i % len(images)]
            t0 = time.perf_counter()
            try:
                r = await http.post("/predict", files={"files": (name, data, "image/jpeg")})
                ok = r.status_code == 200 and r.json()["results"][0]["name"] == name
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return latencies, errors, time.perf_counter() - start


class Server:
    """One server in its own process on 127.0.0.1."""

    def __init__(self, kind: str, model: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--model", str(model), "--port", str(self.port)])

    def wait_ready(self, timeout: float = 240) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {self.kind} server did not start")
            time.sleep(0.3)

    def passes(self) -> int | None:
        import httpx

        return httpx.get(self.url + "/health").json().get("batches")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(models: dict[str, Path], kinds: list[str], images: list[tuple[str, bytes]], args: argparse.Namespace) -> list[dict]:
    """All servers up at once, then ``--rounds`` rounds that load each in turn (drift in the machine's load hits all alike)."""
    servers = {k: Server(k, models[k]) for k in kinds}
    try:
        for s in servers.values():
            s.wait_ready()
            asyncio.run(load(s.url, images, args.warmup, args.clients))
        lat: dict[str, list[float]] = {k: [] for k in kinds}
        errors = dict.fromkeys(kinds, 0)
        wall = dict.fromkeys(kinds, 0.0)
        passes0 = {k: servers[k].passes() for k in kinds}
        per_round = max(1, args.requests // args.rounds)
        for r in range(args.rounds):
            for k in kinds:
                lt, err, w = asyncio.run(load(servers[k].url, images, per_round, args.clients, args.time_limit))
                lat[k] += lt
                errors[k] += err
                wall[k] += w
                print(f"  round {r + 1}/{args.rounds} {k:<8} {len(lt):5d} requests {len(lt) / w:7.1f} images/s  "
                      f"(load average {load_average()})", flush=True)
        passes1 = {k: servers[k].passes() for k in kinds}
    finally:
        for s in servers.values():
            s.stop()
    rows = []
    for k in kinds:
        ms = np.array(lat[k]) * 1000
        n = len(lat[k])
        rows.append({
            "server": k,
            "requests": n,
            "images_s": n / wall[k],
            "p50": float(np.percentile(ms, 50)),
            "p95": float(np.percentile(ms, 95)),
            "errors": errors[k],
            "passes": None if passes0[k] is None else passes1[k] - passes0[k],
        })
    return rows


def load_average() -> str:
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PBC images (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=1000, help="timed requests per server")
    ap.add_argument("--clients", type=int, default=20, help="concurrent clients")
    ap.add_argument("--warmup", type=int, default=40, help="untimed requests first")
    ap.add_argument("--images", type=int, default=200, help="distinct PBC images cycled through")
    ap.add_argument("--servers", default="naive,pytorch,onnx", help="which servers, in order")
    ap.add_argument("--rounds", type=int, default=2, help="alternate the servers this many times (requests split evenly)")
    ap.add_argument("--time-limit", type=float, default=120.0,
                    help="seconds per server and round after which no new request starts (a slow server reports fewer)")
    ap.add_argument("--serve", choices=["naive", "pytorch", "onnx"], help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_forever(args.serve, args.model, args.port)
        return 0
    if not args.data.is_dir():
        print(f"error: PBC images not found at {args.data} (pass --data)", file=sys.stderr)
        return 2

    from leuko.infer.predict import collect_images

    paths = collect_images([args.data])
    rng = np.random.default_rng(0)
    chosen = [paths[i] for i in rng.choice(len(paths), size=min(args.images, len(paths)), replace=False)]
    images = [(p.name, p.read_bytes()) for p in chosen]
    print(f"load average {load_average()} at start; {len(images)} PBC images "
          f"({np.mean([len(d) for _, d in images]) / 1024:.0f} KiB each on average), "
          f"{args.clients} clients, {args.requests} requests per server, one image per request")
    with tempfile.TemporaryDirectory(prefix="leuko-bench-serve-") as tmp:
        model_pt, onnx = build_run(Path(tmp) / "run")
        models = {"naive": model_pt, "pytorch": model_pt.parent, "onnx": onnx}
        labels = {"naive": "naive FastAPI (PyTorch, 1 image/pass)", "pytorch": "leuko serve (PyTorch, micro-batched)",
                  "onnx": "leuko serve (ONNX, micro-batched)"}
        rows = measure(models, args.servers.split(","), images, args)
    base = next((r["images_s"] for r in rows if r["server"] == "naive"), None)
    print()
    print(f"{'server':<40} {'requests':>8} {'images/s':>9} {'vs naive':>9} {'p50 ms':>8} {'p95 ms':>8} {'errors':>7} {'passes/req':>11}")
    print(f"{'-' * 40} {'-' * 8} {'-' * 9} {'-' * 9} {'-' * 8} {'-' * 8} {'-' * 7} {'-' * 11}")
    for r in rows:
        ratio = f"{r['images_s'] / base:.1f}x" if base else "-"
        passes = f"{r['passes'] / r['requests']:.2f}" if r["passes"] is not None else "1.00"
        print(f"{labels[r['server']]:<40} {r['requests']:>8} {r['images_s']:>9.1f} {ratio:>9} {r['p50']:>8.0f} {r['p95']:>8.0f} {r['errors']:>7} {passes:>11}")
    print(f"\nload average {load_average()} at the end (other work on the machine shares these cores)")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

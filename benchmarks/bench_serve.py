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

**--store**: the lab store under load. ``leuko serve RUN --db DB`` (the model
above, or ``--run``) as a child process on 127.0.0.1 with a fresh SQLite file in
a temporary folder, then, when ``$LEUKO_TEST_POSTGRES_URL`` names a server, a
fresh database on it (``--db FILE_OR_URL``: that store only). ``--clients``
reviewers (20) work at once, each on its own samples, as a technologist does:
create a sample (an accession id), upload its cells (``--uploads-per-sample``
requests of ``--cells-per-upload`` PBC images; the model predicts each), accept
or relabel every new cell (40% relabels, and a second look at an earlier cell
one time in four), sign the sample off, start the next. No new request starts
after ``--seconds`` (120) or once ``--max-reviews`` reviews were sent. Then every
sample is read back through the API (``GET /samples/{id}`` and the store's event
export) and compared with what the clients were told: an acknowledged review
(by its ``request_id``) or cell missing is *lost*, one stored twice is
*duplicated*; a stored event or cell nobody sent, a label or count that differs,
a broken chain of ``label_before``/``label_after``, or any refused or failed call is an
*error*. Printed: p50/p95/p99 latency of review calls, uploads and the other calls
(create, sign-off), requests/s, and the counts; the exit status is 0 only if
errors, lost and duplicated are all 0.

    python benchmarks/bench_serve.py --store                    # 20 reviewers, 120 s, SQLite (+ PostgreSQL if set)
    python benchmarks/bench_serve.py --store --seconds 20       # quicker
    python benchmarks/bench_serve.py --store --db postgresql+psycopg://leuko@127.0.0.1:5432/lab --seconds 60
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
from contextlib import contextmanager as contextmanager_fn
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from fastapi import File, UploadFile  # noqa: E402  (module level: the naive app's annotations resolve here)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "pbc"
IMAGE_SIZE = 128
PREPROCESS = ["center-crop:0.7"]


# --------------------------------------------------------------------------- the model
def build_run(out: Path, onnx: bool = True) -> tuple[Path, Path | None]:
    """A run folder with model.pt (EfficientNet-Lite0, bundled weights, 8 classes) and its model.onnx (unless not ``onnx``)."""
    from leuko.infer import export_onnx
    from leuko.models import build_model
    from leuko.run.config import load_config
    from leuko.run.folder import save_model
    from leuko.train.runner import new_card

    classes = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    cfg = load_config(None, ["model.name=efficientnet_lite0", f"data.image_size={IMAGE_SIZE}", f"data.preprocess={PREPROCESS}"])
    model = build_model("efficientnet_lite0", len(classes), pretrained="bundled")
    out.mkdir(parents=True, exist_ok=True)
    model_pt = save_model(out / "model.pt", model, new_card(cfg, classes, model.leuko_info, "bundled"))
    return model_pt, (export_onnx(model_pt).path if onnx else None)


# --------------------------------------------------------------------------- the naive server
def naive_app(model_pt: Path):  # noqa: ANN201 - a FastAPI app
    """What a first FastAPI wrapper looks like: decode, transform and run one image at a time, in the handler."""
    import io

    import torch
    from fastapi import FastAPI
    from PIL import Image
    from torchvision import transforms as T

    from leuko.run.folder import load_model

    model, card = load_model(model_pt)
    model.eval()
    decode = round(IMAGE_SIZE / 0.7)
    tf = T.Compose([T.Resize((decode, decode)), T.CenterCrop(IMAGE_SIZE), T.ToTensor(),
                    T.Normalize(list(card.input.mean), list(card.input.std))])
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
            results.append({"name": f.filename, "probs": dict(zip(card.classes, probs))})
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


# --------------------------------------------------------------------------- the store under load (--store)
POSTGRES_ENV = "LEUKO_TEST_POSTGRES_URL"


class StoreService:
    """``leuko serve RUN --db DB`` as a child process on a free 127.0.0.1 port, its output in ``log``."""

    def __init__(self, run: Path, db: str, images: Path | None, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "leuko", "serve", str(run), "--db", db, "--host", "127.0.0.1", "--port", str(self.port)]
        if images is not None:
            cmd += ["--images", str(images)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 240) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).json().get("status") == "ok":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"leuko serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


class Tally:
    """What the reviewers sent and what the service acknowledged, for the read-back afterwards."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {"review": [], "upload": [], "other": []}
        self.errors: list[str] = []
        self.sent: dict[str, tuple[int, str, str, str]] = {}   # request id -> (cell, action, label after, reviewer)
        self.acked: dict[str, dict] = {}                        # request id -> the event the service answered with
        self.samples: dict[int, dict] = {}                      # sample id -> {"accession", "signed_off", "cells": [ids]}
        self.label: dict[int, str] = {}                         # cell id -> its label as the clients last saw it
        self.predicted: dict[int, str] = {}                     # cell id -> the model's label when it was added
        self.reviews_started = 0
        self.requests = 0

    def error(self, what: str) -> None:
        self.errors.append(what)


async def reviewer_load(url: str, images: list[tuple[str, bytes]], classes: list[str], tag: str, args: argparse.Namespace,
                        tally: Tally) -> float:
    """``args.clients`` reviewers working on their own samples until ``args.seconds`` or ``args.max_reviews``; the wall time."""
    import random
    import uuid

    import httpx

    start = time.perf_counter()

    def over() -> bool:
        return (time.perf_counter() - start > args.seconds or tally.reviews_started >= args.max_reviews
                or len(tally.errors) >= 100)  # a broken service: stop, don't spin

    async def call(kind: str, method: str, path: str, http: httpx.AsyncClient, expect: int, **kw) -> dict | None:
        t0 = time.perf_counter()
        try:
            r = await http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            tally.latency[kind].append(time.perf_counter() - t0)
            tally.requests += 1
            tally.error(f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        tally.latency[kind].append(time.perf_counter() - t0)
        tally.requests += 1
        if r.status_code != expect:
            tally.error(f"{method} {path}: {r.status_code} {r.text[:200]}")
            return None
        return r.json()

    async def review(k: int, http: httpx.AsyncClient, rng: random.Random, cell: int, name: str) -> None:
        rid = uuid.uuid4().hex
        current = tally.label[cell]
        if rng.random() < 0.4:
            action, after = "relabel", rng.choice([c for c in classes if c != current])
        else:
            action, after = "accept", current
        tally.sent[rid] = (cell, action, after, name)
        tally.reviews_started += 1
        body = {"action": action, "label": after, "reviewer": name, "request_id": rid}
        got = await call("review", "POST", f"/cells/{cell}/review", http, 200, json=body)
        if got is None:
            return
        ev = got["event"]
        if (ev["cell_id"], ev["action"], ev["label_after"], ev["reviewer"], ev["request_id"]) != (cell, action, after, name, rid):
            tally.error(f"review {rid}: answered with {ev}, not the review sent")
        tally.acked[rid] = ev
        tally.label[cell] = ev["label_after"]

    async def reviewer(k: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(k)
        name = f"reviewer-{k:02d}"
        per_sample = args.uploads_per_sample * args.cells_per_upload
        j = 0
        while not over():
            j += 1
            accession = f"LOAD-{tag}-{k:02d}-{j:04d}"
            got = await call("other", "POST", "/samples", http, 201, json={"accession": accession, "reviewer": name})
            if got is None:
                continue
            sid = got["id"]
            sample = tally.samples[sid] = {"accession": accession, "signed_off": False, "cells": []}
            picks = [images[i] for i in rng.sample(range(len(images)), min(per_sample, len(images)))]  # distinct in a sample
            done = True
            for u in range(args.uploads_per_sample):
                batch = picks[u * args.cells_per_upload:(u + 1) * args.cells_per_upload]
                if over() or not batch:
                    done = not batch
                    break
                files = [("files", (f"{u}-{i}-{n}", data, "image/jpeg")) for i, (n, data) in enumerate(batch)]
                got = await call("upload", "POST", f"/samples/{sid}/cells", http, 201, params={"reviewer": name}, files=files)
                if got is None:
                    done = False
                    break
                if len(got["added"]) != len(batch) or got["duplicates"]:
                    tally.error(f"sample {accession}: {len(batch)} new images gave {len(got['added'])} cells, duplicates {got['duplicates']}")
                new = [c["id"] for c in got["added"]]
                for c in got["added"]:
                    tally.label[c["id"]] = tally.predicted[c["id"]] = c["label"]
                sample["cells"] += new
                for cell in new:
                    if over():
                        break
                    await review(k, http, rng, cell, name)
                    if rng.random() < 0.25 and not over():  # a second look at an earlier cell of this sample
                        await review(k, http, rng, rng.choice(sample["cells"]), name)
                if over():
                    done = False
                    break
            if done and not over():
                got = await call("other", "POST", f"/samples/{sid}/sign-off", http, 200, json={"reviewer": name})
                if got is not None:
                    sample["signed_off"] = got["status"] == "signed-off"
                    if not sample["signed_off"]:
                        tally.error(f"sample {accession}: sign-off answered status {got['status']}")

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        await asyncio.gather(*(reviewer(k, http) for k in range(args.clients)))
    return time.perf_counter() - start


def read_back(url: str, tag: str, tally: Tally) -> dict[str, int]:
    """Every sample of this run through the API, against what the clients were told: lost, duplicated, wrong."""
    import csv
    import io

    import httpx

    wrong: list[str] = []
    with httpx.Client(base_url=url, timeout=300) as http:
        r = http.get("/export", params={"format": "csv", "what": "events"})
        r.raise_for_status()
        events = [e for e in csv.DictReader(io.StringIO(r.text)) if e["accession"].startswith(f"LOAD-{tag}-")]
        details = {}
        for sid in tally.samples:
            d = http.get(f"/samples/{sid}")
            if d.status_code != 200:
                wrong.append(f"sample {sid}: GET answered {d.status_code}")
                continue
            details[sid] = d.json()
        listed = http.get("/samples", params={"limit": 1000}).json()["total"]

    by_request: dict[str, dict] = {}
    duplicated = 0
    for ev in events:
        rid = ev["request_id"]
        if rid in by_request:
            duplicated += 1
        by_request[rid] = ev
    lost = sum(rid not in by_request for rid in tally.acked)
    for rid, ev in by_request.items():
        if rid not in tally.sent:
            wrong.append(f"event {ev['event_id']}: request id {rid!r} was never sent")
            continue
        cell, action, after, name = tally.sent[rid]
        if (int(ev["cell_id"]), ev["action"], ev["label_after"], ev["reviewer"]) != (cell, action, after, name):
            wrong.append(f"event {ev['event_id']}: stored as {ev}, sent as {tally.sent[rid]}")
        if rid in tally.acked and int(ev["event_id"]) != tally.acked[rid]["id"]:
            wrong.append(f"event {ev['event_id']}: the service acknowledged it as event {tally.acked[rid]['id']}")
    # each cell's events: a chain from its prediction to the label the clients last saw
    chains: dict[int, list[dict]] = {}
    for ev in events:
        chains.setdefault(int(ev["cell_id"]), []).append(ev)
    for cid, chain in chains.items():
        prev = tally.predicted.get(cid)
        for ev in sorted(chain, key=lambda e: int(e["event_id"])):
            if ev["label_before"] != prev:
                wrong.append(f"cell {cid}: event {ev['event_id']} starts from {ev['label_before']}, not {prev}")
            prev = ev["label_after"]
    cells_lost = cells_duplicated = 0
    acked_per_cell: dict[int, int] = {}
    for ev in tally.acked.values():
        acked_per_cell[ev["cell_id"]] = acked_per_cell.get(ev["cell_id"], 0) + 1
    for sid, want in tally.samples.items():
        d = details.get(sid)
        if d is None:
            cells_lost += len(want["cells"])
            continue
        ids = [c["id"] for c in d["cells"]]
        cells_duplicated += len(ids) - len(set(ids))
        cells_lost += len(set(want["cells"]) - set(ids))
        extra = set(ids) - set(want["cells"])
        if extra:
            wrong.append(f"sample {want['accession']}: cells nobody acknowledged {sorted(extra)}")
        if d["status"] != ("signed-off" if want["signed_off"] else "open"):
            wrong.append(f"sample {want['accession']}: status {d['status']}")
        if d["count"]["n_cells"] != len(ids):
            wrong.append(f"sample {want['accession']}: count of {d['count']['n_cells']} cells, has {len(ids)}")
        for c in d["cells"]:
            if c["label"] != tally.label.get(c["id"]) or c["n_reviews"] != acked_per_cell.get(c["id"], 0):
                wrong.append(f"cell {c['id']}: label {c['label']} after {c['n_reviews']} review(s); the clients saw "
                             f"{tally.label.get(c['id'])} after {acked_per_cell.get(c['id'], 0)}")
    if listed < len(tally.samples):
        wrong.append(f"GET /samples lists {listed} samples; the reviewers created {len(tally.samples)}")
    for line in wrong[:10]:
        print(f"  wrong: {line}")
    return {"events stored": len(events), "lost": lost + cells_lost, "duplicated": duplicated + cells_duplicated,
            "wrong": len(wrong)}


def percentiles(lat: list[float]) -> str:
    if not lat:
        return "-"
    ms = np.array(lat) * 1000
    p50, p95, p99 = (float(np.percentile(ms, q)) for q in (50, 95, 99))
    return f"{len(lat):6d} calls  p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  p99 {p99:7.1f} ms"


@contextmanager_fn
def postgres_database(base: str) -> Iterator[str]:
    """A new, empty database on the server ``base`` names (dropped afterwards)."""
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(base.replace("postgresql://", "postgresql+psycopg://", 1) if base.startswith("postgresql://") else base)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"leuko_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def store_round(run: Path, db: str, images_dir: Path | None, tmp: Path, images: list[tuple[str, bytes]],
                args: argparse.Namespace) -> bool:
    """One store under load, then read back; True when there were no errors, nothing lost and nothing duplicated."""
    import uuid

    import httpx

    kind = "sqlite" if "://" not in db or db.startswith("sqlite") else db.split("://")[0].split("+")[0]
    shown = db if "://" not in db else db.split("@")[-1]
    log = tmp / f"serve-{kind}.log"
    svc = StoreService(run, db, images_dir, log)
    tag = uuid.uuid4().hex[:6]
    tally = Tally()
    try:
        svc.wait_ready()
        classes = httpx.get(svc.url + "/model", timeout=30).json()["classes"]
        print(f"\n[{kind}] {shown}: {args.clients} reviewers for up to {args.seconds:.0f} s or {args.max_reviews} reviews "
              f"(load average {load_average()})", flush=True)
        wall = asyncio.run(reviewer_load(svc.url, images, classes, tag, args, tally))
        check = read_back(svc.url, tag, tally)
    finally:
        svc.stop()
    integrity = ""
    if kind == "sqlite":
        import sqlite3

        with sqlite3.connect(db) as con:
            integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    n_cells = sum(len(s["cells"]) for s in tally.samples.values())
    n_signed = sum(s["signed_off"] for s in tally.samples.values())
    print(f"[{kind}] {wall:.1f} s: {tally.requests} requests, {tally.requests / wall:.1f} requests/s "
          f"({len(tally.acked) / wall:.1f} reviews/s, {n_cells / wall:.1f} cells uploaded/s)")
    print(f"  reviews  {percentiles(tally.latency['review'])}")
    print(f"  uploads  {percentiles(tally.latency['upload'])}   ({args.cells_per_upload} images each)")
    print(f"  other    {percentiles(tally.latency['other'])}   (create sample, sign off)")
    print(f"  samples {len(tally.samples)} ({n_signed} signed off), cells {n_cells}, reviews sent {len(tally.sent)}, "
          f"acknowledged {len(tally.acked)}, events stored {check['events stored']}"
          + (f", SQLite integrity_check {integrity}" if integrity else ""))
    errors = len(tally.errors) + check["wrong"] + (integrity not in ("", "ok"))
    print(f"  errors {errors}, lost {check['lost']}, duplicated {check['duplicated']}")
    for line in tally.errors[:10]:
        print(f"  error: {line}")
    return errors == 0 and check["lost"] == 0 and check["duplicated"] == 0


def store_main(args: argparse.Namespace, images: list[tuple[str, bytes]]) -> int:
    with tempfile.TemporaryDirectory(prefix="leuko-bench-store-") as tmp_name:
        tmp = Path(tmp_name)
        if args.run is not None:
            run = args.run
        else:
            print("building the run (EfficientNet-Lite0, bundled weights, 8 classes) ...", flush=True)
            run = build_run(tmp / "run", onnx=False)[0].parent
        ok = True
        if args.db:
            images_dir = tmp / "images" if "://" in args.db and not args.db.startswith("sqlite") else None
            ok = store_round(run, args.db, images_dir, tmp, images, args)
        else:
            ok = store_round(run, str(tmp / "lab.db"), None, tmp, images, args)
            base = os.environ.get(POSTGRES_ENV)
            if base:
                with postgres_database(base) as url:
                    ok = store_round(run, url, tmp / "images-pg", tmp, images, args) and ok
            else:
                print(f"\n(no PostgreSQL round: set {POSTGRES_ENV}=postgresql+psycopg://USER@HOST:PORT/DB or give --db URL)")
    print(f"\nload average {load_average()} at the end (other work on the machine shares these cores)")
    return 0 if ok else 1


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
    store = ap.add_argument_group("--store: the lab store under load (reviewers, uploads, sign-offs, then a read-back)")
    store.add_argument("--store", action="store_true", help="load leuko serve's store instead of comparing /predict servers")
    store.add_argument("--seconds", type=float, default=120.0, help="no new request starts after this (default: %(default)s)")
    store.add_argument("--max-reviews", type=int, default=100_000, help="no new review starts after this many were sent")
    store.add_argument("--db", help="this store only: a SQLite file or postgresql+psycopg://... URL (default: a fresh SQLite "
                                    f"file in a temporary folder, then a fresh database on ${POSTGRES_ENV} if set)")
    store.add_argument("--run", type=Path, help="serve this run folder or model (default: the EfficientNet-Lite0 above)")
    store.add_argument("--uploads-per-sample", type=int, default=3, help="upload requests per sample")
    store.add_argument("--cells-per-upload", type=int, default=4, help="images per upload request")
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
    if args.store:
        print(f"load average {load_average()} at start; {len(images)} PBC images "
              f"({np.mean([len(d) for _, d in images]) / 1024:.0f} KiB each on average)")
        return store_main(args, images)
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

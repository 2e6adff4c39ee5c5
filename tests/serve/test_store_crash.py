"""The store survives the service being killed: a real ``leuko serve --db`` process, SIGKILLed in a burst of reviews.

Eight reviewers post relabels as fast as the service answers; once 120 have
been acknowledged the process is killed (SIGKILL: no shutdown, no flush, requests
in flight). After a restart on the same database every acknowledged review is
there exactly once and unchanged, nothing is there that was never sent, and
every cell's events form an unbroken chain (each one's ``label_before`` is the
previous one's ``label_after``): nothing half-written. Runs on SQLite, and on
PostgreSQL when ``LEUKO_TEST_POSTGRES_URL`` names a server (``.ci/run`` starts one).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
from serving import free_port

REVIEWERS = 8
KILL_AFTER = 120


@contextmanager
def service(run: Path, db: str, images: Path | None, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``leuko serve RUN --db DB`` as a child process on a free loopback port; killed (if still alive) on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "leuko", "serve", str(run), "--db", db, "--port", str(port)]
    if images is not None:
        cmd += ["--images", str(images)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"leuko serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"leuko serve did not come up in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)


def test_sigkill_in_a_burst_of_reviews_loses_nothing_acknowledged(
    serve_run: Path, cell_images: list[Path], store_target: tuple[str, Path | None], tmp_path: Path
) -> None:
    db, images = store_target
    log = tmp_path / "serve.log"
    sent: dict[str, tuple[int, str, str]] = {}       # request id -> (cell, label, reviewer): every review posted
    acked: dict[str, dict[str, Any]] = {}            # request id -> the event the service answered with
    lock = threading.Lock()
    enough = threading.Event()
    stop = threading.Event()

    with service(serve_run, db, images, log) as (url, proc):
        classes = httpx.get(url + "/model").json()["classes"]
        s = httpx.post(url + "/samples", json={"accession": "CRASH-1", "reviewer": "setup"}).json()
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in cell_images]
        r = httpx.post(url + f"/samples/{s['id']}/cells", params={"reviewer": "setup"}, files=files, timeout=60)
        assert r.status_code == 201, r.text
        cells = [c["id"] for c in r.json()["added"]]

        def reviewer(k: int) -> None:
            rng = random.Random(k)
            name = f"reviewer-{k}"
            with httpx.Client(base_url=url, timeout=30) as http:
                while not stop.is_set():
                    rid = uuid.uuid4().hex
                    cell, label = rng.choice(cells), rng.choice(classes)
                    with lock:
                        sent[rid] = (cell, label, name)
                    try:
                        resp = http.post(f"/cells/{cell}/review",
                                         json={"action": "relabel", "label": label, "reviewer": name, "request_id": rid})
                    except httpx.HTTPError:
                        return  # the service is gone: this review may or may not have been stored
                    assert resp.status_code == 200, resp.text
                    with lock:
                        acked[rid] = resp.json()["event"]
                        if len(acked) >= KILL_AFTER:
                            enough.set()

        threads = [threading.Thread(target=reviewer, args=(k,), daemon=True) for k in range(REVIEWERS)]
        for t in threads:
            t.start()
        assert enough.wait(240), f"only {len(acked)} reviews acknowledged in 240 s"
        os.kill(proc.pid, signal.SIGKILL)  # mid-burst: eight requests in flight
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    in_flight = set(sent) - set(acked)
    assert len(acked) >= KILL_AFTER and in_flight, "the kill should land with reviews in flight"
    assert "store: " in log.read_text()  # the service says where it keeps the work

    if db.endswith(".db"):
        import sqlite3

        with sqlite3.connect(db) as con:  # the file itself is sound (the WAL is replayed on open)
            assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    with service(serve_run, db, images, log) as (url, _):
        sample = httpx.get(url + f"/samples/{s['id']}").json()
        events: list[dict[str, Any]] = []
        for cid in cells:
            events += httpx.get(url + f"/cells/{cid}/history").json()["events"]
        by_request = {}
        for ev in events:
            assert ev["request_id"] not in by_request, f"review {ev['request_id']} stored twice"
            by_request[ev["request_id"]] = ev
        missing = [rid for rid in acked if rid not in by_request]
        assert not missing, f"{len(missing)} acknowledged review(s) lost after SIGKILL"
        for rid, ev in acked.items():
            assert by_request[rid] == ev  # exactly what the service answered
        unknown = set(by_request) - set(sent)
        assert not unknown, f"events nobody sent: {unknown}"
        for rid, ev in by_request.items():  # complete, and the review that was asked for
            cell, label, name = sent[rid]
            assert (ev["cell_id"], ev["label_after"], ev["reviewer"]) == (cell, label, name)
        # every cell's events are a chain from its prediction: none lost in the middle, none half-written
        predicted = {c["id"]: c["prediction"]["label"] for c in sample["cells"]}
        for cid in cells:
            chain = sorted((e for e in events if e["cell_id"] == cid), key=lambda e: e["id"])
            prev = predicted[cid]
            for e in chain:
                assert e["label_before"] == prev, f"cell {cid}: event {e['id']} starts from {e['label_before']}, not {prev}"
                prev = e["label_after"]
            current = next(c for c in sample["cells"] if c["id"] == cid)
            assert current["label"] == prev and current["n_reviews"] == len(chain)
        assert sample["n_reviewed"] == len({e["cell_id"] for e in events})
        assert sum(row["count"] for row in sample["count"]["counts"]) == len(cells)

        # a client that never got its answer retries with the same request id: stored once, whatever happened
        for rid in sorted(in_flight):
            cell, label, name = sent[rid]
            r = httpx.post(url + f"/cells/{cell}/review", json={"action": "relabel", "label": label, "reviewer": name, "request_id": rid})
            assert r.status_code == 200, r.text
            if rid in by_request:
                assert r.json()["event"]["id"] == by_request[rid]["id"]
        after = []
        for cid in cells:
            after += httpx.get(url + f"/cells/{cid}/history").json()["events"]
        assert len(after) == len(by_request) + len(in_flight - set(by_request))
        print(f"{db.split('://')[0] if '://' in db else 'sqlite'}: {len(acked)} acknowledged, {len(in_flight)} in flight at the "
              f"kill ({len(in_flight & set(by_request))} of them stored), all {len(acked)} present after restart")
        assert httpx.post(url + f"/samples/{s['id']}/sign-off", json={"reviewer": "lead"}).json()["status"] == "signed-off"

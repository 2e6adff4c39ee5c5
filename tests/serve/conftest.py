"""Fixtures for the lab service: one tiny trained run (with an evaluation and an ONNX export), live servers.

The run is trained once per session (custom_cnn at 32 px, head only on
cached features, a few seconds) because every serve test needs a real model.pt with a review policy
chosen on a validation split, a data.json and a held-out metrics.json.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cells import make_cell
from serving import live_server

CLASSES = ["basophil", "eosinophil", "lymphocyte", "neutrophil"]
TINY = [
    "model.name=custom_cnn",
    "model.pretrained=none",
    "model.freeze=backbone",  # with no augmentation: the frozen-feature path, no Lightning (seconds, not a minute)
    "data.augment=none",
    "data.image_size=32",
    "data.num_workers=0",
    "train.epochs=10",
    "train.batch_size=8",
    "train.lr=0.01",
    "trainer.progress=false",
]


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained run folder (4 classes of synthetic cells) with eval/test/metrics.json and model.onnx."""
    from leuko.evaluate.run import evaluate_run
    from leuko.infer import export_onnx
    from leuko.train import train

    base = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEUKO_CACHE_DIR", str(base / "cache"))
        data = base / "cells"
        for ci, cls in enumerate(CLASSES):
            for i in range(30):  # 120 images: >= 10 validation images, so a review policy is fitted
                make_cell(data / cls / f"{i}.png", size=(48, 48), seed=1000 * ci + i, hue=60 * ci)
        run = base / "run"
        train(None, run, overrides=TINY, data_path=data, echo=lambda s: None)
        evaluate_run(run, figures=False, echo=lambda s: None)
        export_onnx(run)
    return run


@pytest.fixture(scope="session")
def cell_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Twelve small JPEG cells (three per class) to upload."""
    root = tmp_path_factory.mktemp("uploads")
    return [make_cell(root / f"cell_{ci}_{i}.jpg", size=(56, 56), seed=7000 + 10 * ci + i, hue=60 * ci, fmt="JPEG")
            for ci in range(len(CLASSES)) for i in range(3)]


# --------------------------------------------------------------------------- smear fields
def fieldgen() -> Any:
    """tests/fields/fieldgen.py (synthetic smear fields with known boxes), loaded by path: both test folders have a conftest."""
    import importlib.util
    import sys

    if "fieldgen" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fieldgen", Path(__file__).resolve().parents[1] / "fields" / "fieldgen.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fieldgen"] = module
        spec.loader.exec_module(module)
    return sys.modules["fieldgen"]


MISSED_AT = (230, 110)
"""Where the small white cell of ``field_files["missed"]`` is: the finder leaves it out (its nucleus scores
below the operating point), a click on it grows its box from the nucleus."""


@pytest.fixture(scope="session")
def missed_at() -> tuple[int, int]:
    """``MISSED_AT`` as a fixture: ``from conftest import`` reads whichever test folder's conftest came first."""
    return MISSED_AT


@pytest.fixture(scope="session")
def field_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Generated smear fields as JPEGs: ``overlap/`` three overlapping 320 x 240 windows of one smear (five white
    cells; the stage moved 160 px, then 160 px; the cell at the top is cut in every window) and one field
    with no white cell; ``missed``: a field with a cell the finder finds and a small one it misses."""
    gen = fieldgen()
    root = tmp_path_factory.mktemp("fields")
    smear = gen.make_field((640, 300), wbcs=[(120, 150, 34), (300, 90, 32), (330, 220, 30), (520, 150, 34), (450, 40, 30)],
                           seed=7, n_rbc=60, n_platelets=10)
    out = {}
    for i, left in enumerate((0, 160, 320)):
        out[f"overlap_{i}"] = gen.cut(smear, left, 30, (320, 240)).save(root / "overlap" / f"field_{i}.jpg")
    out["empty"] = gen.make_field((320, 240), wbcs=[], seed=3).save(root / "overlap" / "field_3_empty.jpg")
    out["missed"] = gen.make_field((320, 240), wbcs=[(90, 120, 32), (*MISSED_AT, 18)], seed=4).save(root / "missed.jpg")
    return out


@pytest.fixture(scope="session")
def start_server() -> Any:
    """The :func:`live_server` context manager, for tests that need a real socket."""
    return live_server


# --------------------------------------------------------------------------- stores
POSTGRES_ENV = "LEUKO_TEST_POSTGRES_URL"
"""A PostgreSQL server the store tests may create databases on (``.ci/run`` starts a throwaway cluster and sets it)."""


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path | None]]:
    """A fresh store for each backend: ``(db, images)`` as ``leuko serve --db/--images`` take them.

    SQLite: a file in ``tmp_path`` (images beside it). PostgreSQL: a new database on the server
    named by ``$LEUKO_TEST_POSTGRES_URL`` (dropped afterwards); skipped with the reason when unset.
    """
    if request.param == "sqlite":
        yield str(tmp_path / "lab.db"), None
        return
    with postgres_database() as url:
        yield url, tmp_path / "images"


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty database on the test server; its URL."""
    import os
    import uuid

    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"no PostgreSQL: set {POSTGRES_ENV}=postgresql+psycopg://USER@HOST:PORT/DB (.ci/run starts one)")
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed")
    from sqlalchemy.engine import make_url

    url = make_url(base.replace("postgresql://", "postgresql+psycopg://", 1) if base.startswith("postgresql://") else base)
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"leuko_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"{POSTGRES_ENV} is set but the server cannot be used: {str(exc).strip().splitlines()[0]}")
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

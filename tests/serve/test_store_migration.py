"""Migration 0002 (smear fields) on a store that 0001 made and a lab used: everything kept, the models still match.

A database is built at revision 0001 and filled as the service of that revision filled it (two samples,
one signed off with its frozen count; cells, predictions, reviews, state changes), then opened by this
leuko: every row of every 0001 table is as it was, the samples read back the same (labels, counts, the
frozen count, the history), the append-only triggers still hold on the rebuilt ``review_events``, and the
new event kinds are accepted. A downgrade to 0001 and back keeps the rows too. SQLite, and PostgreSQL
when ``LEUKO_TEST_POSTGRES_URL`` names a server.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import MetaData, create_engine, inspect, text

from leuko.serve.store import Store, migrate
from leuko.serve.store.db import _resolve, _sqlite_engine

CLASSES = ["basophil", "eosinophil", "lymphocyte", "neutrophil"]
FP = "f" * 64
T0 = dt.datetime(2026, 5, 1, 8, 0, tzinfo=dt.timezone.utc)
TABLES_0001 = ("images", "samples", "cells", "predictions", "review_events", "sample_events")
FROZEN = {"n_cells": 2, "n_review": 0, "counts": [
    {"label": c, "count": int(c in ("lymphocyte", "neutrophil")), "percent": 50.0 if c in ("lymphocyte", "neutrophil") else 0.0,
     "ci95_low": 0.0, "ci95_high": 90.0} for c in CLASSES], "note": "only 2 cell(s) counted", "interval": "95% Wilson score interval, in percent"}


def engine_for(db: str) -> Any:
    url, path = _resolve(db)
    return _sqlite_engine(url, writer=True) if path is not None else create_engine(url)


def fill_0001(engine: Any) -> None:
    """What the 0001 service kept after a morning's work."""
    with engine.begin() as conn:
        command.upgrade(migrate.alembic_config(conn), "0001")
    with engine.begin() as conn:
        meta = MetaData()
        meta.reflect(conn, only=TABLES_0001)
        t = meta.tables
        at = lambda minutes: T0 + dt.timedelta(minutes=minutes)  # noqa: E731
        conn.execute(t["images"].insert(), [
            {"sha256": f"{i:064x}", "media_type": "image/jpeg", "n_bytes": 1000 + i, "width": 64, "height": 64, "stored_at": at(i)}
            for i in range(1, 4)])
        conn.execute(t["samples"].insert(), [
            {"id": 1, "accession": "OLD-1", "created_at": at(0), "created_by": "ann", "status": "signed-off", "model_name": "tiny",
             "model_fingerprint": FP, "classes": CLASSES, "signed_off_by": "bob", "signed_off_at": at(30), "signed_off_count": FROZEN},
            {"id": 2, "accession": "OLD-2", "created_at": at(40), "created_by": "ann", "status": "open", "model_name": "tiny",
             "model_fingerprint": FP, "classes": CLASSES, "signed_off_by": None, "signed_off_at": None, "signed_off_count": None},
        ])
        conn.execute(t["cells"].insert(), [
            {"id": 1, "sample_id": 1, "image_sha256": f"{1:064x}", "name": "a.jpg", "added_at": at(1), "added_by": "ann"},
            {"id": 2, "sample_id": 1, "image_sha256": f"{2:064x}", "name": "b.jpg", "added_at": at(1), "added_by": "ann"},
            {"id": 3, "sample_id": 2, "image_sha256": f"{3:064x}", "name": "c.jpg", "added_at": at(41), "added_by": "ann"},
        ])
        conn.execute(t["predictions"].insert(), [
            {"id": i, "cell_id": i, "label": lab, "confidence": 0.6, "probs": {c: (0.6 if c == lab else 0.4 / 3) for c in CLASSES},
             "review": flag, "review_reasons": ["low confidence"] if flag else [], "answered_by": None, "routed_because": None,
             "model_fingerprint": FP}
            for i, lab, flag in ((1, "neutrophil", True), (2, "lymphocyte", False), (3, "eosinophil", True))])
        conn.execute(t["review_events"].insert(), [
            {"id": 1, "sample_id": 1, "cell_id": 1, "action": "relabel", "label_before": "neutrophil", "label_after": "lymphocyte",
             "reviewer": "bob", "at": at(10), "request_id": "r-1"},
            {"id": 2, "sample_id": 1, "cell_id": 1, "action": "relabel", "label_before": "lymphocyte", "label_after": "neutrophil",
             "reviewer": "cy", "at": at(12), "request_id": None},
            {"id": 3, "sample_id": 1, "cell_id": 2, "action": "accept", "label_before": "lymphocyte", "label_after": "lymphocyte",
             "reviewer": "bob", "at": at(13), "request_id": "r-3"},
        ])
        conn.execute(t["sample_events"].insert(), [
            {"id": 1, "sample_id": 1, "action": "create", "actor": "ann", "at": at(0), "reason": None, "count": None},
            {"id": 2, "sample_id": 1, "action": "sign-off", "actor": "bob", "at": at(30), "reason": None, "count": FROZEN},
            {"id": 3, "sample_id": 2, "action": "create", "actor": "ann", "at": at(40), "reason": None, "count": None},
        ])
        if conn.dialect.name == "postgresql":  # the rows above came with their ids: move the id sequences past them
            for name in ("samples", "cells", "predictions", "review_events", "sample_events"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT max(id) FROM {name}))"))


def rows_0001(engine: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every 0001 table, in 0001's columns only, in key order."""
    meta = MetaData()
    with engine.connect() as conn:
        meta.reflect(conn, only=TABLES_0001)
        out = {}
        for name in TABLES_0001:
            table = meta.tables[name]
            cols = [c for c in table.columns if c.name in COLUMNS_0001[name]]
            out[name] = [tuple(r) for r in conn.execute(table.select().with_only_columns(*cols).order_by(*table.primary_key.columns))]
    return out


COLUMNS_0001 = {
    "images": {"sha256", "media_type", "n_bytes", "width", "height", "stored_at"},
    "samples": {"id", "accession", "created_at", "created_by", "status", "model_name", "model_fingerprint", "classes",
                "signed_off_by", "signed_off_at", "signed_off_count"},
    "cells": {"id", "sample_id", "image_sha256", "name", "added_at", "added_by"},
    "predictions": {"id", "cell_id", "label", "confidence", "probs", "review", "review_reasons", "answered_by",
                    "routed_because", "model_fingerprint"},
    "review_events": {"id", "sample_id", "cell_id", "action", "label_before", "label_after", "reviewer", "at", "request_id"},
    "sample_events": {"id", "sample_id", "action", "actor", "at", "reason", "count"},
}


def schema(engine: Any) -> dict[str, Any]:
    """Tables, columns, indexes, unique constraints and foreign keys, as the database reports them."""
    insp = inspect(engine)
    out = {}
    for name in sorted(insp.get_table_names()):
        out[name] = (
            sorted(c["name"] for c in insp.get_columns(name)),
            sorted((i["name"], tuple(i["column_names"])) for i in insp.get_indexes(name)),
            sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(name)),
            sorted((tuple(f["constrained_columns"]), f["referred_table"]) for f in insp.get_foreign_keys(name)),
        )
    return out


def test_0001_store_with_data_upgrades_to_0002_and_keeps_everything(store_target: tuple[str, Path | None], tmp_path: Path) -> None:
    db, images = store_target
    engine = engine_for(db)
    fill_0001(engine)
    before = rows_0001(engine)
    schema_0001 = schema(engine)
    engine.dispose()

    with Store.open(db, images=images) as store:  # opening upgrades
        assert migrate.current(store._writer) == migrate.head() == "0002"
        migrate.check(store._writer)  # the models are what the migrations made
        assert rows_0001(store._writer) == before
        old, new = store.get_sample(1), store.get_sample(2)
        assert (old.status, old.signed_off_by, old.edge_policy, old.n_fields) == ("signed-off", "bob", "count", 0)
        assert old.count.model_dump(include=set(FROZEN)) == FROZEN  # the frozen count, as frozen
        assert [c.label for c in old.cells] == ["neutrophil", "lymphocyte"] and [c.reviewed for c in old.cells] == [True, True]
        assert [c.origin for c in old.cells] == ["upload", "upload"] and old.cells[0].box is None and old.cells[0].counted
        assert [e.action for e in old.events] == ["create", "sign-off"] and old.events[1].count == FROZEN
        assert [(e.reviewer, e.label_after) for e in store.cell_history(1).events] == [("bob", "lymphocyte"), ("cy", "neutrophil")]
        assert new.status == "open" and new.n_needs_review == 1 and new.count.n_cells == 1
        assert [x.accession for x in store.list_samples().samples] == ["OLD-2", "OLD-1"]
        # the rebuilt review_events is still append-only, and takes the new kinds only
        for sql in ("UPDATE review_events SET reviewer = 'x'", "DELETE FROM review_events"):
            with pytest.raises(Exception, match="append-only"):
                with store._writer.begin() as conn:
                    conn.execute(text(sql))
        with pytest.raises(Exception, match="(?i)check constraint|ck_review_events_action"):
            with store._writer.begin() as conn:
                conn.execute(text("INSERT INTO review_events (sample_id, cell_id, action, label_before, label_after, reviewer, at) "
                                  "VALUES (2, 3, 'smash', 'a', 'a', 'x', :at)"), {"at": T0})
        assert rows_0001(store._writer) == before

        # down to 0001 and up again: the rows stay, the schema is 0001's again in between
        migrate.downgrade(store._writer, "0001")
        assert rows_0001(store._writer) == before and schema(store._writer) == schema_0001
        migrate.upgrade(store._writer)
        migrate.check(store._writer)
        assert rows_0001(store._writer) == before

        # the new kinds work on the old cells; and now a downgrade would lose them, so it is refused
        cell, ev, count = store.review(3, "delete", "dan")
        assert ev.action == "deleted" and cell.deleted and count.n_cells == 0 and count.deleted == 1
        assert store.review(3, "restore", "dan")[1].action == "restored"
        with pytest.raises(Exception, match="0001 cannot keep them"):
            migrate.downgrade(store._writer, "0001")
        assert migrate.current(store._writer) == "0002"

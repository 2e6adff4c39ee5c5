"""The lab store: samples, cells, predictions and every review, kept in a database.

Typical use::

    from leuko.serve.store import Store
    with Store.open("leuko-lab.db") as store:          # SQLite file; images in leuko-lab.images/
        for s in store.list_samples().samples:
            print(s.accession, s.status, s.n_cells)
        store.export_reviews(Path("reviews"))           # signed-off samples as a csv layout

The schema (:mod:`leuko.serve.store.models`) is migrated with Alembic on
open (:mod:`leuko.serve.store.migrate`); the answers are the pydantic models
of :mod:`leuko.serve.store.views`, which the HTTP API returns as they are.
"""

from __future__ import annotations

from leuko.serve.store.db import NewCell, Store, StoreError
from leuko.serve.store.views import ModelRef

__all__ = ["ModelRef", "NewCell", "Store", "StoreError", "open_store"]


def open_store(target: str, *, images: str | None = None) -> Store:
    """:meth:`Store.open`: a SQLite file path or a PostgreSQL URL."""
    return Store.open(target, images=images)

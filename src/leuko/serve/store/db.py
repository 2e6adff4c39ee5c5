"""The store: the lab service's samples, cells, predictions and reviews in a database.

SQLite is the embedded default (one file; WAL journal, so readers never wait
for the writer; ``synchronous=FULL``, so a review the service acknowledged is
on disk, whatever happens to the process after). PostgreSQL is used by URL
(``postgresql+psycopg://user@host/db``) for a lab with several reviewers.
Either way the schema comes from the migrations in the package, applied on
open (:mod:`leuko.serve.store.migrate`).

Every change is one short transaction that re-checks the state it depends on
under a lock: SQLite takes its write lock at ``BEGIN IMMEDIATE`` (and this
process keeps one writing connection, so its own writers queue in Python
instead of meeting ``SQLITE_BUSY``); PostgreSQL locks the sample's row
(``SELECT … FOR UPDATE``), so a review and a sign-off of one sample never
interleave. A refusal is a :class:`StoreError` with the HTTP status it maps to
and one line that says what to do.

Smear fields (:meth:`Store.add_fields`, :meth:`Store.add_field_cell`) arrive
already searched and classified (:mod:`leuko.serve.fields` does that, outside
any transaction); the store keeps the field, its cells with their boxes and the
repeats found, and counts them as ``leuko count`` does (:func:`tally`).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import shutil
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from sqlalchemy import Engine, and_, case, create_engine, event, func, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, aliased

from leuko.errors import LeukoError, Refusal
from leuko.serve.count import differential_count
from leuko.serve.store import migrate
from leuko.serve.store.images import SUFFIXES, ImageStore
from leuko.serve.store.models import (
    ACCEPT,
    ADDED,
    CREATE,
    DELETED,
    EDGE_POLICIES,
    OPEN,
    RELABEL,
    REOPEN,
    RESTORED,
    SIGN_OFF,
    SIGNED_OFF,
    Cell,
    CellRepeat,
    Image,
    Prediction,
    ReviewEvent,
    Sample,
    SampleEvent,
    utcnow,
)
from leuko.serve.store.models import Field as FieldRow
from leuko.serve.store.views import (
    AddedCells,
    AddedFieldCell,
    AddedFields,
    CellHistory,
    CellView,
    CountView,
    FieldDetail,
    FieldSummary,
    ModelRef,
    PredictionView,
    ReviewEventView,
    SampleDetail,
    SampleEventView,
    SampleList,
    SampleSummary,
)

ACCESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_NAME = 100
EXPORT_COLUMNS = (
    "accession", "sample_status", "cell_id", "name", "sha256", "predicted", "confidence", "flagged", "review_reasons",
    "label", "reviewed", "corrected", "n_reviews", "last_reviewer", "last_reviewed_at", "signed_off_by", "signed_off_at",
    "field", "field_id", "x0", "y0", "x1", "y1", "detection_score", "edge", "origin", "deleted", "counted", "repeat_of",
)
ACTIONS = {"accept": ACCEPT, "relabel": RELABEL, "delete": DELETED, "restore": RESTORED}
"""What a reviewer may do to a cell (:meth:`Store.review`), and the event kind each one records."""
MIN_BOX = 4.0
"""Smallest side (pixels) of a box a reviewer adds."""
OVERLAP = 0.5
"""A box added to a field is refused when it overlaps a cell there by this IoU or more (the same cell twice)."""
EVENT_COLUMNS = ("event_id", "accession", "cell_id", "name", "action", "label_before", "label_after", "reviewer", "at", "request_id")


class StoreError(Refusal):
    """A request the store refuses (nothing was changed): an HTTP status and one line."""


@dataclass(frozen=True)
class NewCell:
    """An image to add to a sample, with the model's prediction for it."""

    name: str
    data: bytes
    media_type: str
    width: int
    height: int
    prediction: PredictionView


@dataclass(frozen=True)
class NewFieldCell:
    """A white cell of a field, found (or placed by a reviewer), cut out and predicted."""

    data: bytes
    """The crop the classifier saw, as PNG (the cell's image)."""
    width: int
    height: int
    box: tuple[float, float, float, float]
    score: float | None
    edge: bool
    prediction: PredictionView


@dataclass(frozen=True)
class NewField:
    """A field image to add to a sample, with the cells found in it."""

    name: str
    data: bytes
    media_type: str
    width: int
    height: int
    rbc_measured: float | None
    rbc_diameter: float
    cells: list[NewFieldCell]


@dataclass(frozen=True)
class NewRepeat:
    """Cell ``cell`` of the new ones (their order in the upload, field by field) is cell ``other`` of them,
    or the stored cell ``other_id``: one cell in overlapping fields."""

    cell: int
    correlation: float
    other: int | None = None
    other_id: int | None = None


@dataclass(frozen=True)
class KnownFieldCell:
    """A stored cell of a field, as the repeat check and a reviewer's new box need it."""

    id: int
    field_id: int
    box: tuple[float, float, float, float]
    edge: bool
    deleted: bool


@dataclass(frozen=True)
class KnownField:
    """A stored field of a sample: where its image is and the ruler its cells were found with."""

    id: int
    sample_id: int
    name: str
    path: Path
    width: int
    height: int
    rbc_diameter: float
    rbc_measured: float | None


@dataclass(frozen=True)
class FieldContext:
    """What adding to a sample's fields needs to know of it (read in one transaction)."""

    sample_id: int
    accession: str
    fields: list[KnownField]
    cells: list[KnownFieldCell]
    field_shas: set[str]

    def field(self, field_id: int) -> KnownField:
        return next(f for f in self.fields if f.id == field_id)


@dataclass
class _CellState:
    cell: Cell
    prediction: Prediction
    events: list[ReviewEvent]

    @property
    def label(self) -> str:
        return self.events[-1].label_after if self.events else self.prediction.label

    @property
    def looks(self) -> list[ReviewEvent]:
        """Accepts and relabels: a person's word on the label."""
        return [e for e in self.events if e.action in (ACCEPT, RELABEL)]

    @property
    def reviewed(self) -> bool:
        return any(e.action in (ACCEPT, RELABEL) for e in self.events)

    @property
    def deleted(self) -> bool:
        marks = [e.action for e in self.events if e.action in (DELETED, RESTORED)]
        return bool(marks) and marks[-1] == DELETED

    @property
    def origin(self) -> str:
        if self.cell.field_id is None:
            return "upload"
        return "added" if any(e.action == ADDED for e in self.events) else "found"

    @property
    def needs_review(self) -> bool:
        return self.prediction.review and not self.reviewed and not self.deleted


@dataclass(frozen=True)
class _Counting:
    """Where one cell stands in its sample's count."""

    counted: bool
    repeat_of: int | None = None


def tally(classes: Sequence[str], edge_policy: str, states: Sequence[_CellState],
          repeats: Sequence[tuple[int, int]]) -> tuple[CountView, dict[int, _Counting]]:
    """The sample's count from its cells now, and where each cell stands in it.

    A deleted cell is not counted. Cells joined by ``repeats`` (one cell in overlapping fields)
    count once, as the copy :func:`leuko.fields.count_fields` keeps: not deleted, whole before
    cut by the edge, then the best detection score (a reviewer's own box ranks first), then the
    earliest; labelled by the copy a person accepted or relabelled last (else the kept copy's
    label). With ``edge_policy`` ``drop`` a kept copy cut by the edge is left out.
    """
    by_id = {st.cell.id: st for st in states}
    parent = {i: i for i in by_id}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in repeats:
        if a in by_id and b in by_id:
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[_CellState]] = defaultdict(list)
    for st in states:
        groups[root(st.cell.id)].append(st)
    info: dict[int, _Counting] = {}
    labels: list[str] = []
    review: list[bool] = []
    merged = deleted = edge_counted = edge_dropped = 0
    for members in groups.values():
        live = [m for m in members if not m.deleted]
        for m in members:
            if m.deleted:
                info[m.cell.id] = _Counting(False)
                deleted += 1
        if not live:
            continue
        keep = min(live, key=lambda m: (bool(m.cell.edge), -(1.0 if m.cell.score is None else m.cell.score), m.cell.id))
        for m in live:
            if m is not keep:
                info[m.cell.id] = _Counting(False, keep.cell.id)
                merged += 1
        looked = [m for m in live if m.reviewed]
        label = max(looked, key=lambda m: m.looks[-1].id).label if looked else keep.label
        if keep.cell.edge and edge_policy == "drop":
            info[keep.cell.id] = _Counting(False)
            edge_dropped += 1
            continue
        info[keep.cell.id] = _Counting(True)
        edge_counted += bool(keep.cell.edge)
        labels.append(label)
        review.append(bool(keep.prediction.review) and not looked)
    count = CountView(**differential_count(labels, classes, review), edge=edge_policy,  # type: ignore[arg-type]
                      repeats_merged=merged, deleted=deleted, edge_cells_counted=edge_counted,
                      edge_cells_dropped=edge_dropped)
    return count, info


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --------------------------------------------------------------------------- opening
def _resolve(target: str | Path) -> tuple[str, Path | None]:
    """A store argument as a SQLAlchemy URL, and the SQLite file it names (``None`` for a server)."""
    text = str(target)
    if "://" not in text:
        path = Path(text).expanduser().resolve()
        return f"sqlite:///{path}", path
    for prefix in ("postgresql://", "postgres://"):
        if text.startswith(prefix):
            text = "postgresql+psycopg://" + text[len(prefix):]
    try:
        url = make_url(text)
    except Exception:
        raise LeukoError(f"--db: not a database URL or file path: {text!r}") from None
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise LeukoError("--db: give the SQLite store a file (sqlite:///PATH or just PATH); an in-memory store keeps nothing")
        path = Path(url.database).expanduser().resolve()
        return f"sqlite:///{path}", path
    if url.get_backend_name() != "postgresql":
        raise LeukoError(f"--db: the store runs on SQLite (a file) or PostgreSQL (postgresql+psycopg://…); got {url.get_backend_name()!r}")
    return text, None


def _sqlite_engine(url: str, *, writer: bool) -> Engine:
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 30, "check_same_thread": False}}
    if writer:  # one writing connection per process: this process's writers queue here, never on SQLITE_BUSY
        kwargs.update(pool_size=1, max_overflow=0, pool_timeout=120)
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None  # the driver stays out of transactions; "begin" below starts them
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "busy_timeout=30000"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

    return engine


def _one_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


class Store:
    """The lab store: open it with :meth:`open`; every method is one transaction."""

    def __init__(self, url: str, sqlite_path: Path | None, images: Path) -> None:
        self.url = url
        self.sqlite_path = sqlite_path
        self.dialect = "sqlite" if sqlite_path is not None else "postgresql"
        if sqlite_path is not None:
            self._writer = _sqlite_engine(url, writer=True)
            self._reader = _sqlite_engine(url, writer=False)
        else:
            self._writer = self._reader = create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
        self.images = ImageStore(images)

    @classmethod
    def open(cls, target: str | Path, *, images: str | Path | None = None) -> "Store":
        """Open (and create or upgrade) the store at a file path or database URL.

        Args:
            target: a SQLite file (created if missing) or ``postgresql+psycopg://…``.
            images: the image store folder; by default ``NAME.images`` beside a SQLite ``NAME.db``
                (a PostgreSQL store needs it given).

        Raises:
            LeukoError: the folder is missing, the file is not a database, the server cannot be
                reached, or the database was made by a newer leuko.
        """
        url, path = _resolve(target)
        if path is not None:
            if path.is_dir():
                raise LeukoError(f"--db {path} is a folder; give a file for the SQLite store, e.g. {path / 'leuko-lab.db'}")
            if not path.parent.is_dir():
                raise LeukoError(f"--db {path}: folder {path.parent} does not exist")
            img = Path(images).expanduser() if images is not None else path.with_name(path.stem + ".images")
        elif images is None:
            raise LeukoError("a PostgreSQL store keeps its images in a folder: give --images DIR")
        else:
            img = Path(images).expanduser()
        store = cls(url, path, img.resolve())
        try:
            known = migrate.current(store._writer)
            if known is not None and known not in migrate.known_revisions():
                raise LeukoError(f"the store {store.display} is at schema revision {known}, newer than this leuko "
                                 f"knows (up to {migrate.head()}); upgrade leuko")
            migrate.upgrade(store._writer)
        except LeukoError:
            store.close()
            raise
        except SQLAlchemyError as exc:
            store.close()
            raise LeukoError(f"cannot open the store {store.display}: {_one_line(exc)}") from None
        return store

    @property
    def display(self) -> str:
        """Where the store is, for people (no password)."""
        if self.sqlite_path is not None:
            return str(self.sqlite_path)
        return make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self._writer.dispose()
        self._reader.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------- sessions
    @contextmanager
    def _write(self) -> Iterator[Session]:
        with Session(self._writer, expire_on_commit=False) as session:
            try:
                with session.begin():
                    yield session
            except OperationalError as exc:
                raise StoreError(503, f"the store is busy or unreachable ({_one_line(exc)}); try again") from None

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._reader, expire_on_commit=False) as session:
            try:
                with session.begin():
                    yield session
            except OperationalError as exc:
                raise StoreError(503, f"the store is busy or unreachable ({_one_line(exc)}); try again") from None

    # ----------------------------------------------------------------------- loading
    def _sample(self, s: Session, sample_id: int, *, lock: bool = False) -> Sample:
        q = select(Sample).where(Sample.id == sample_id)
        sample = s.scalars(q.with_for_update() if lock else q).one_or_none()
        if sample is None:
            raise StoreError(404, f"no sample with id {sample_id}")
        return sample

    def _states(self, s: Session, sample_ids: Sequence[int]) -> dict[int, list[_CellState]]:
        """Every cell of these samples with its prediction and review events, in upload order."""
        if not sample_ids:
            return {}
        rows = s.execute(
            select(Cell, Prediction).join(Prediction, Prediction.cell_id == Cell.id)
            .where(Cell.sample_id.in_(sample_ids)).order_by(Cell.id)
        ).all()
        events: dict[int, list[ReviewEvent]] = defaultdict(list)
        for ev in s.scalars(select(ReviewEvent).where(ReviewEvent.sample_id.in_(sample_ids)).order_by(ReviewEvent.id)):
            events[ev.cell_id].append(ev)
        out: dict[int, list[_CellState]] = {i: [] for i in sample_ids}
        for cell, pred in rows:
            out[cell.sample_id].append(_CellState(cell, pred, events.get(cell.id, [])))
        return out

    @staticmethod
    def _repeats(s: Session, sample_ids: Sequence[int]) -> dict[int, list[tuple[int, int]]]:
        """The repeat pairs of these samples' cells (one cell in overlapping fields)."""
        out: dict[int, list[tuple[int, int]]] = {i: [] for i in sample_ids}
        if sample_ids:
            for sid, a, b in s.execute(select(CellRepeat.sample_id, CellRepeat.cell_id, CellRepeat.other_id)
                                       .where(CellRepeat.sample_id.in_(sample_ids)).order_by(CellRepeat.id)):
                out[sid].append((a, b))
        return out

    @staticmethod
    def _field_rows(s: Session, sample_ids: Sequence[int]) -> dict[int, list[tuple[FieldRow, Image]]]:
        out: dict[int, list[tuple[FieldRow, Image]]] = {i: [] for i in sample_ids}
        if sample_ids:
            for f, im in s.execute(select(FieldRow, Image).join(Image, Image.sha256 == FieldRow.image_sha256)
                                   .where(FieldRow.sample_id.in_(sample_ids)).order_by(FieldRow.id)):
                out[f.sample_id].append((f, im))
        return out

    def _cell_state(self, s: Session, cell_id: int) -> _CellState:
        row = s.execute(
            select(Cell, Prediction).join(Prediction, Prediction.cell_id == Cell.id).where(Cell.id == cell_id)
        ).one_or_none()
        if row is None:
            raise StoreError(404, f"no cell with id {cell_id}")
        events = list(s.scalars(select(ReviewEvent).where(ReviewEvent.cell_id == cell_id).order_by(ReviewEvent.id)))
        return _CellState(row[0], row[1], events)

    # ----------------------------------------------------------------------- views
    @staticmethod
    def _event_view(ev: ReviewEvent) -> ReviewEventView:
        return ReviewEventView(id=ev.id, cell_id=ev.cell_id, action=ev.action, label_before=ev.label_before,  # type: ignore[arg-type]
                               label_after=ev.label_after, reviewer=ev.reviewer, at=ev.at, request_id=ev.request_id)

    def _cell_view(self, st: _CellState, where: _Counting | None = None) -> CellView:
        p = st.prediction
        c = st.cell
        where = where or _Counting(not st.deleted)
        return CellView(
            id=st.cell.id, sample_id=st.cell.sample_id, name=st.cell.name, sha256=st.cell.image_sha256,
            added_at=st.cell.added_at, added_by=st.cell.added_by,
            prediction=PredictionView(label=p.label, confidence=p.confidence, probs=p.probs, review=p.review,
                                      review_reasons=list(p.review_reasons), answered_by=p.answered_by,
                                      routed_because=p.routed_because),
            label=st.label, reviewed=st.reviewed, corrected=st.label != p.label, needs_review=st.needs_review,
            n_reviews=len(st.events), last_review=self._event_view(st.events[-1]) if st.events else None,
            field_id=c.field_id, box=list(c.box) if c.box is not None else None, score=c.score, edge=c.edge,
            origin=st.origin, deleted=st.deleted, counted=where.counted, repeat_of=where.repeat_of,  # type: ignore[arg-type]
        )

    @staticmethod
    def _count(sample: Sample, states: Sequence[_CellState], repeats: Sequence[tuple[int, int]]) -> tuple[CountView, dict[int, _Counting]]:
        """The count (frozen at sign-off: as it was then) and where each cell stands in it now."""
        count, info = tally(sample.classes, sample.edge_policy, states, repeats)
        if sample.status == SIGNED_OFF and sample.signed_off_count is not None:
            count = CountView(**sample.signed_off_count)
        return count, info

    @staticmethod
    def _summary(sample: Sample, states: Sequence[_CellState], n_fields: int) -> dict[str, Any]:
        live = [st for st in states if not st.deleted]
        return dict(
            id=sample.id, accession=sample.accession, status=sample.status, created_at=sample.created_at,
            created_by=sample.created_by, model_name=sample.model_name, model_fingerprint=sample.model_fingerprint,
            signed_off_by=sample.signed_off_by, signed_off_at=sample.signed_off_at, n_cells=len(live),
            n_reviewed=sum(st.reviewed for st in live), n_corrected=sum(st.label != st.prediction.label for st in live),
            n_needs_review=sum(st.needs_review for st in live), n_fields=n_fields, n_deleted=len(states) - len(live),
            edge_policy=sample.edge_policy,
        )

    @staticmethod
    def _field_summary(f: FieldRow, im: Image, states: Sequence[_CellState]) -> dict[str, Any]:
        mine = [st for st in states if st.cell.field_id == f.id]
        return dict(
            id=f.id, sample_id=f.sample_id, name=f.name, sha256=f.image_sha256, width=im.width, height=im.height,
            media_type=im.media_type, rbc_diameter=f.rbc_diameter, rbc_measured=f.rbc_measured, added_at=f.added_at,
            added_by=f.added_by, n_found=sum(st.origin == "found" for st in mine), n_cells=sum(not st.deleted for st in mine),
        )

    def _detail(self, s: Session, sample: Sample) -> SampleDetail:
        states = self._states(s, [sample.id])[sample.id]
        fields = self._field_rows(s, [sample.id])[sample.id]
        count, info = self._count(sample, states, self._repeats(s, [sample.id])[sample.id])
        events = s.scalars(select(SampleEvent).where(SampleEvent.sample_id == sample.id).order_by(SampleEvent.id))
        return SampleDetail(
            **self._summary(sample, states, len(fields)), classes=list(sample.classes),
            cells=[self._cell_view(st, info.get(st.cell.id)) for st in states], count=count,
            events=[SampleEventView(id=e.id, action=e.action, actor=e.actor, at=e.at, reason=e.reason, count=e.count)  # type: ignore[arg-type]
                    for e in events],
            fields=[FieldSummary(**self._field_summary(f, im, states)) for f, im in fields],
        )

    # ----------------------------------------------------------------------- samples
    def create_sample(self, accession: str, actor: str, model: ModelRef, *, edge: str = "count") -> SampleDetail:
        """A new, open sample pre-classified by ``model``; ``edge``: what its count does with cells of its
        fields cut by the frame (``count`` them once, or ``drop`` them), as ``leuko count --edge``.

        Raises:
            StoreError: 422 for a malformed accession id, name or edge policy, 409 when the accession id exists.
        """
        accession = _accession(accession)
        actor = _who(actor)
        if edge not in EDGE_POLICIES:
            raise StoreError(422, f"edge must be one of {', '.join(EDGE_POLICIES)}; got {edge!r}")
        now = utcnow()
        try:
            with self._write() as s:
                existing = s.scalar(select(Sample.id).where(Sample.accession == accession))
                if existing is not None:
                    raise StoreError(409, f"a sample with accession id {accession!r} exists already (id {existing})")
                sample = Sample(accession=accession, created_at=now, created_by=actor, status=OPEN, model_name=model.name,
                                model_fingerprint=model.fingerprint, classes=list(model.classes), edge_policy=edge)
                s.add(sample)
                s.flush()
                s.add(SampleEvent(sample_id=sample.id, action=CREATE, actor=actor, at=now))
                s.flush()
                return self._detail(s, sample)
        except IntegrityError:  # another writer (PostgreSQL) took the accession id between the check and the insert
            raise StoreError(409, f"a sample with accession id {accession!r} exists already") from None

    def list_samples(self, *, status: str | None = None, limit: int = 200, offset: int = 0) -> SampleList:
        """Samples newest first, with their cell counts."""
        if status is not None and status not in (OPEN, SIGNED_OFF):
            raise StoreError(422, f"status must be {OPEN!r} or {SIGNED_OFF!r}; got {status!r}")
        with self._read() as s:
            q = select(Sample)
            total_q = select(func.count()).select_from(Sample)
            if status is not None:
                q = q.where(Sample.status == status)
                total_q = total_q.where(Sample.status == status)
            samples = list(s.scalars(q.order_by(Sample.created_at.desc(), Sample.id.desc()).limit(limit).offset(offset)))
            ids = [x.id for x in samples]
            tallies = self._tallies(s, ids)
            n_fields = dict(s.execute(select(FieldRow.sample_id, func.count(FieldRow.id)).where(FieldRow.sample_id.in_(ids))
                                      .group_by(FieldRow.sample_id)).all()) if ids else {}
            out = []
            for x in samples:
                n, reviewed, corrected, pending, gone = tallies.get(x.id, (0, 0, 0, 0, 0))
                out.append(SampleSummary(
                    id=x.id, accession=x.accession, status=x.status, created_at=x.created_at, created_by=x.created_by,  # type: ignore[arg-type]
                    model_name=x.model_name, model_fingerprint=x.model_fingerprint, signed_off_by=x.signed_off_by,
                    signed_off_at=x.signed_off_at, n_cells=n, n_reviewed=reviewed, n_corrected=corrected, n_needs_review=pending,
                    n_fields=int(n_fields.get(x.id, 0)), n_deleted=gone, edge_policy=x.edge_policy))  # type: ignore[arg-type]
            return SampleList(samples=out, total=int(s.scalar(total_q) or 0))

    @staticmethod
    def _tallies(s: Session, sample_ids: Sequence[int]) -> dict[int, tuple[int, int, int, int, int]]:
        """Per sample, in one query: cells (not deleted), reviewed (accepted or relabelled), corrected (latest label
        differs from the prediction), awaiting review, and deleted; as :meth:`_summary` counts them."""
        if not sample_ids:
            return {}
        ev = ReviewEvent
        per_cell = (
            select(
                ev.cell_id,
                func.max(ev.id).label("last_id"),
                func.max(case((ev.action.in_((ACCEPT, RELABEL)), ev.id))).label("look_id"),
                func.max(case((ev.action.in_((DELETED, RESTORED)), ev.id))).label("mark_id"),
            )
            .where(ev.sample_id.in_(sample_ids)).group_by(ev.cell_id).subquery()
        )
        last, mark = aliased(ReviewEvent), aliased(ReviewEvent)
        live = or_(per_cell.c.mark_id.is_(None), mark.action != DELETED)
        one = lambda cond: func.sum(case((cond, 1), else_=0))  # noqa: E731
        q = (
            select(
                Cell.sample_id,
                one(live),
                one(and_(live, per_cell.c.look_id.is_not(None))),
                one(and_(live, per_cell.c.last_id.is_not(None), last.label_after != Prediction.label)),
                one(and_(live, per_cell.c.look_id.is_(None), Prediction.review)),
                one(~live),
            )
            .join(Prediction, Prediction.cell_id == Cell.id)
            .outerjoin(per_cell, per_cell.c.cell_id == Cell.id)
            .outerjoin(last, last.id == per_cell.c.last_id)
            .outerjoin(mark, mark.id == per_cell.c.mark_id)
            .where(Cell.sample_id.in_(sample_ids))
            .group_by(Cell.sample_id)
        )
        return {sid: (int(n or 0), int(r or 0), int(c or 0), int(w or 0), int(d or 0)) for sid, n, r, c, w, d in s.execute(q)}

    def get_sample(self, sample_id: int) -> SampleDetail:
        with self._read() as s:
            return self._detail(s, self._sample(s, sample_id))

    def find_sample(self, accession: str) -> SampleDetail:
        with self._read() as s:
            sample = s.scalars(select(Sample).where(Sample.accession == accession)).one_or_none()
            if sample is None:
                raise StoreError(404, f"no sample with accession id {accession!r}")
            return self._detail(s, sample)

    def check_can_add(self, sample_id: int, fingerprint: str) -> None:
        """Refuse early (before the model runs) what :meth:`add_cells` would refuse."""
        with self._read() as s:
            self._check_add(self._sample(s, sample_id), fingerprint)

    @staticmethod
    def _check_add(sample: Sample, fingerprint: str) -> None:
        if sample.status != OPEN:
            raise StoreError(409, f"sample {sample.accession} is signed off (by {sample.signed_off_by}); "
                                  "re-open it to add cells")
        if sample.model_fingerprint != fingerprint:
            raise StoreError(409, f"sample {sample.accession} was pre-classified by {sample.model_name} "
                                  f"({sample.model_fingerprint[:12]}); this service runs another model, so its cells "
                                  "cannot join it: serve that model, or start a new sample")

    def add_cells(self, sample_id: int, cells: Sequence[NewCell], actor: str, fingerprint: str) -> AddedCells:
        """Add images (already predicted by the model with ``fingerprint``) to an open sample.

        Each image's bytes go to the image store first (durably); an image this sample
        has already is not added again and is named in ``duplicates``.
        """
        actor = _who(actor)
        digests = [self.images.put(c.data) for c in cells]
        now = utcnow()
        with self._write() as s:
            sample = self._sample(s, sample_id, lock=True)
            self._check_add(sample, fingerprint)
            have = set(s.scalars(select(Cell.image_sha256).where(Cell.sample_id == sample_id)))
            stored = set(s.scalars(select(Image.sha256).where(Image.sha256.in_(set(digests)))))
            added: list[_CellState] = []
            dupes: list[str] = []
            for c, digest in zip(cells, digests):
                if digest in have:
                    dupes.append(c.name)
                    continue
                have.add(digest)
                if digest not in stored:
                    self._insert_image(s, Image(sha256=digest, media_type=c.media_type, n_bytes=len(c.data),
                                                width=c.width, height=c.height, stored_at=now))
                    stored.add(digest)
                cell = Cell(sample_id=sample_id, image_sha256=digest, name=c.name, added_at=now, added_by=actor)
                s.add(cell)
                s.flush()
                p = c.prediction
                pred = Prediction(cell_id=cell.id, label=p.label, confidence=p.confidence, probs=dict(p.probs),
                                  review=p.review, review_reasons=list(p.review_reasons), answered_by=p.answered_by,
                                  routed_because=p.routed_because, model_fingerprint=fingerprint)
                s.add(pred)
                added.append(_CellState(cell, pred, []))
            s.flush()
            n = s.scalar(select(func.count()).select_from(Cell).where(Cell.sample_id == sample_id))
            return AddedCells(sample_id=sample_id, added=[self._cell_view(st) for st in added], duplicates=dupes, n_cells=int(n or 0))

    def _insert_image(self, s: Session, image: Image) -> None:
        """Insert an image row unless a concurrent writer just did (PostgreSQL; SQLite has one writer)."""
        values = {c.key: getattr(image, c.key) for c in Image.__table__.columns}
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        s.execute(insert(Image).values(**values).on_conflict_do_nothing(index_elements=["sha256"]))

    # ----------------------------------------------------------------------- fields
    def _context(self, s: Session, sample: Sample) -> FieldContext:
        rows = self._field_rows(s, [sample.id])[sample.id]
        states = [st for st in self._states(s, [sample.id])[sample.id] if st.cell.field_id is not None and st.cell.box is not None]
        return FieldContext(
            sample_id=sample.id, accession=sample.accession,
            fields=[KnownField(f.id, f.sample_id, f.name, self.images.path(f.image_sha256), im.width, im.height,
                               f.rbc_diameter, f.rbc_measured) for f, im in rows],
            cells=[KnownFieldCell(st.cell.id, int(st.cell.field_id), st.cell.box, bool(st.cell.edge), st.deleted)  # type: ignore[arg-type]
                   for st in states],
            field_shas={f.image_sha256 for f, _ in rows},
        )

    def field_context(self, sample_id: int, fingerprint: str) -> FieldContext:
        """A sample's fields and their cells, for new fields (refused, as :meth:`add_fields` would, when it is signed
        off or was pre-classified by another model)."""
        with self._read() as s:
            sample = self._sample(s, sample_id)
            self._check_add(sample, fingerprint)
            return self._context(s, sample)

    def field_context_of(self, field_id: int, fingerprint: str) -> tuple[KnownField, FieldContext]:
        """The field and its sample's fields and cells, for a cell a reviewer adds (refused as :meth:`field_context`)."""
        with self._read() as s:
            row = s.get(FieldRow, field_id)
            if row is None:
                raise StoreError(404, f"no field with id {field_id}")
            sample = self._sample(s, row.sample_id)
            self._check_add(sample, fingerprint)
            ctx = self._context(s, sample)
            return ctx.field(field_id), ctx

    def _field_detail(self, s: Session, f: FieldRow, im: Image, sample: Sample, states: Sequence[_CellState],
                      info: dict[int, _Counting]) -> FieldDetail:
        return FieldDetail(**self._field_summary(f, im, states), accession=sample.accession, status=sample.status,  # type: ignore[arg-type]
                           classes=list(sample.classes),
                           cells=[self._cell_view(st, info.get(st.cell.id)) for st in states if st.cell.field_id == f.id])

    def get_field(self, field_id: int) -> FieldDetail:
        """One field: its boxes with their current labels, and where each stands in the sample's count."""
        with self._read() as s:
            row = s.execute(select(FieldRow, Image).join(Image, Image.sha256 == FieldRow.image_sha256)
                            .where(FieldRow.id == field_id)).one_or_none()
            if row is None:
                raise StoreError(404, f"no field with id {field_id}")
            f, im = row
            sample = self._sample(s, f.sample_id)
            states = self._states(s, [sample.id])[sample.id]
            _, info = self._count(sample, states, self._repeats(s, [sample.id])[sample.id])
            return self._field_detail(s, f, im, sample, states, info)

    def field_image(self, field_id: int) -> tuple[Path, str]:
        """The stored file of a field's image and its media type."""
        with self._read() as s:
            im = s.execute(select(Image).join(FieldRow, FieldRow.image_sha256 == Image.sha256)
                           .where(FieldRow.id == field_id)).scalar_one_or_none()
            if im is None:
                raise StoreError(404, f"no field with id {field_id}")
            return self.images.path(im.sha256), im.media_type

    def add_fields(self, sample_id: int, fields: Sequence[NewField], actor: str, fingerprint: str,
                   repeats: Sequence[NewRepeat] = (), notes: Sequence[str] = ()) -> AddedFields:
        """Add field images (their cells found, cut out and predicted by the model with ``fingerprint``) to an open
        sample, with the repeats found among the new cells and between them and the stored ones.

        Every image (fields and crops) goes to the image store first (durably). A field this sample has
        already is not added again and is named in ``duplicates``; a crop identical, pixel for pixel,
        to a cell the sample has is not added again either (a note says so).
        """
        actor = _who(actor)
        digests = [self.images.put(f.data) for f in fields]
        crops = [[self.images.put(c.data) for c in f.cells] for f in fields]
        now = utcnow()
        with self._write() as s:
            sample = self._sample(s, sample_id, lock=True)
            self._check_add(sample, fingerprint)
            have_fields = set(s.scalars(select(FieldRow.image_sha256).where(FieldRow.sample_id == sample_id)))
            have_cells = {sha: cid for sha, cid in s.execute(select(Cell.image_sha256, Cell.id).where(Cell.sample_id == sample_id))}
            known = set(have_cells.values())
            wanted = set(digests) | {d for ds in crops for d in ds}
            stored = set(s.scalars(select(Image.sha256).where(Image.sha256.in_(wanted))))
            out_notes, dupes = list(notes), []
            new_ids: list[int | None] = []
            added: list[FieldRow] = []
            for f, digest, cell_digests in zip(fields, digests, crops, strict=True):
                if digest in have_fields:
                    dupes.append(f.name)
                    new_ids.extend([None] * len(f.cells))
                    continue
                have_fields.add(digest)
                if digest not in stored:
                    self._insert_image(s, Image(sha256=digest, media_type=f.media_type, n_bytes=len(f.data), width=f.width,
                                                height=f.height, stored_at=now))
                    stored.add(digest)
                row = FieldRow(sample_id=sample_id, image_sha256=digest, name=f.name, rbc_measured=f.rbc_measured,
                               rbc_diameter=f.rbc_diameter, added_at=now, added_by=actor)
                s.add(row)
                s.flush()
                added.append(row)
                for i, (c, cd) in enumerate(zip(f.cells, cell_digests, strict=True), start=1):
                    if cd in have_cells:
                        out_notes.append(f"{f.name}: cell {i} is, pixel for pixel, cell {have_cells[cd]} of this sample; not added again")
                        new_ids.append(None)
                        continue
                    cell = self._insert_field_cell(s, sample_id, row.id, f"{f.name} #{i}", c, cd, stored, actor, fingerprint, now)
                    have_cells[cd] = cell.id
                    new_ids.append(cell.id)
            for r in repeats:
                a = new_ids[r.cell]
                b = new_ids[r.other] if r.other is not None else (r.other_id if r.other_id in known else None)
                if a is not None and b is not None and a != b:
                    s.add(CellRepeat(sample_id=sample_id, cell_id=a, other_id=b, correlation=float(r.correlation)))
            s.flush()
            states = self._states(s, [sample_id])[sample_id]
            count, info = self._count(sample, states, self._repeats(s, [sample_id])[sample_id])
            images = {im.sha256: im for im in s.scalars(select(Image).where(Image.sha256.in_([r.image_sha256 for r in added])))}
            n_fields = int(s.scalar(select(func.count()).select_from(FieldRow).where(FieldRow.sample_id == sample_id)) or 0)
            return AddedFields(
                sample_id=sample_id, added=[self._field_detail(s, r, images[r.image_sha256], sample, states, info) for r in added],
                duplicates=dupes, notes=out_notes, n_fields=n_fields, n_cells=sum(not st.deleted for st in states), count=count,
            )

    def _insert_field_cell(self, s: Session, sample_id: int, field_id: int, name: str, c: NewFieldCell, digest: str,
                           stored: set[str], actor: str, fingerprint: str, now: dt.datetime) -> Cell:
        if digest not in stored:
            self._insert_image(s, Image(sha256=digest, media_type="image/png", n_bytes=len(c.data), width=c.width,
                                        height=c.height, stored_at=now))
            stored.add(digest)
        x0, y0, x1, y1 = (float(v) for v in c.box)
        cell = Cell(sample_id=sample_id, image_sha256=digest, name=name[:200], added_at=now, added_by=actor, field_id=field_id,
                    box_x0=x0, box_y0=y0, box_x1=x1, box_y1=y1, score=None if c.score is None else float(c.score),
                    edge=bool(c.edge))
        s.add(cell)
        s.flush()
        p = c.prediction
        s.add(Prediction(cell_id=cell.id, label=p.label, confidence=p.confidence, probs=dict(p.probs), review=p.review,
                         review_reasons=list(p.review_reasons), answered_by=p.answered_by, routed_because=p.routed_because,
                         model_fingerprint=fingerprint))
        return cell

    def add_field_cell(
        self,
        field_id: int,
        cell: NewFieldCell,
        actor: str,
        fingerprint: str,
        *,
        label: str | None = None,
        request_id: str | None = None,
        box_from: str = "box",
        repeats: Sequence[NewRepeat] = (),
    ) -> AddedFieldCell:
        """A cell the finder missed, added to a field by a reviewer: the cell (its crop, box and prediction) with an
        ``added`` event, then an ``accept``/``relabel`` when the reviewer gave its ``label``.

        Raises:
            StoreError: 404 unknown field; 409 signed-off sample, another model's sample, a box over a cell of the
                field already there (IoU >= :data:`OVERLAP`), or a request id used for something else;
                422 a label the sample's model does not have.
        """
        actor = _who(actor)
        if request_id is not None and not (1 <= len(request_id) <= 64):
            raise StoreError(422, "request_id must be 1-64 characters")
        from leuko.serve.store.images import sha256_of

        with self._read() as s:  # refuse what the write would refuse before the crop reaches the image store
            row = s.get(FieldRow, field_id)
            if row is None:
                raise StoreError(404, f"no field with id {field_id}")
            seen = s.scalars(select(ReviewEvent).where(ReviewEvent.request_id == request_id)).one_or_none() if request_id else None
            if seen is None:
                sample = self._sample(s, row.sample_id)
                self._check_add(sample, fingerprint)
                self._check_new_cell(self._states(s, [sample.id])[sample.id], field_id, cell, sha256_of(cell.data))
        digest = self.images.put(cell.data)
        try:
            return self._add_field_cell(field_id, cell, digest, actor, fingerprint, label, request_id, box_from, repeats)
        except IntegrityError:
            if request_id is None:
                raise
            # a concurrent retry with this request id was stored first (PostgreSQL): answer with it
            return self._add_field_cell(field_id, cell, digest, actor, fingerprint, label, request_id, box_from, repeats)

    def _add_field_cell(self, field_id: int, cell: NewFieldCell, digest: str, actor: str, fingerprint: str, label: str | None,
                        request_id: str | None, box_from: str, repeats: Sequence[NewRepeat]) -> AddedFieldCell:
        now = utcnow()
        with self._write() as s:
            if request_id is not None:
                seen = s.scalars(select(ReviewEvent).where(ReviewEvent.request_id == request_id)).one_or_none()
                if seen is not None:
                    if seen.action != ADDED or seen.reviewer != actor:
                        raise StoreError(409, f"request id {request_id!r} belongs to another review (cell {seen.cell_id})")
                    return self._after_add(s, seen.cell_id, box_from)
            row = s.get(FieldRow, field_id)
            if row is None:
                raise StoreError(404, f"no field with id {field_id}")
            sample = self._sample(s, row.sample_id, lock=True)
            self._check_add(sample, fingerprint)
            if label is not None and label not in sample.classes:
                raise StoreError(422, f"unknown label {label!r}; the model's classes are {list(sample.classes)}")
            states = self._states(s, [sample.id])[sample.id]
            self._check_new_cell(states, field_id, cell, digest)
            n = sum(st.cell.field_id == field_id for st in states) + 1
            new = self._insert_field_cell(s, sample.id, field_id, f"{row.name} #{n}", cell, digest,
                                          set(s.scalars(select(Image.sha256).where(Image.sha256 == digest))), actor, fingerprint, now)
            predicted = cell.prediction.label
            s.add(ReviewEvent(sample_id=sample.id, cell_id=new.id, action=ADDED, label_before=predicted, label_after=predicted,
                              reviewer=actor, at=now, request_id=request_id))
            if label is not None:
                s.add(ReviewEvent(sample_id=sample.id, cell_id=new.id, action=RELABEL if label != predicted else ACCEPT,
                                  label_before=predicted, label_after=label, reviewer=actor, at=now))
            known = {st.cell.id for st in states}
            for r in repeats:
                if r.other_id in known:
                    s.add(CellRepeat(sample_id=sample.id, cell_id=new.id, other_id=r.other_id, correlation=float(r.correlation)))
            s.flush()
            return self._after_add(s, new.id, box_from)

    @staticmethod
    def _check_new_cell(states: Sequence[_CellState], field_id: int, cell: NewFieldCell, digest: str) -> None:
        """Refuse a new box over a cell of the field already there, or one whose crop is a cell of the sample."""
        for st in states:
            if st.cell.field_id == field_id and not st.deleted and st.cell.box is not None:
                overlap = iou(st.cell.box, cell.box)
                if overlap >= OVERLAP:
                    raise StoreError(409, f"cell {st.cell.id} ({st.label}) boxes this cell already (IoU {overlap:.2f}); "
                                          "relabel it rather than add it again")
        same = next((st for st in states if st.cell.image_sha256 == digest), None)
        if same is not None:
            raise StoreError(409, f"cell {same.cell.id} of this sample has exactly this box" +
                             ("; it is deleted: restore it" if same.deleted else ""))

    def _after_add(self, s: Session, cell_id: int, box_from: str) -> AddedFieldCell:
        st = self._cell_state(s, cell_id)
        sample = self._sample(s, st.cell.sample_id)
        states = self._states(s, [sample.id])[sample.id]
        count, info = self._count(sample, states, self._repeats(s, [sample.id])[sample.id])
        return AddedFieldCell(cell=self._cell_view(st, info.get(cell_id)), events=[self._event_view(e) for e in st.events],
                              count=count, box_from=box_from)  # type: ignore[arg-type]

    # ----------------------------------------------------------------------- reviews
    def review(
        self,
        cell_id: int,
        action: Literal["accept", "relabel", "delete", "restore"],
        reviewer: str,
        *,
        label: str | None = None,
        request_id: str | None = None,
    ) -> tuple[CellView, ReviewEventView, CountView]:
        """Record one review of one cell: ``accept`` keeps its current label, ``relabel`` sets ``label``,
        ``delete`` takes a false detection out of the count (event ``deleted``), ``restore`` undoes that
        (event ``restored``); neither changes the label.

        A relabel to the current label is recorded as an accept. ``accept`` with a
        ``label`` checks that the cell still has that label (another reviewer may have
        changed it). A ``request_id`` seen before answers with the review it stored,
        so a client may retry a review whose answer it never got.

        Raises:
            StoreError: 404 unknown cell; 409 signed-off sample, a stale accept, a deleted cell's
                label, a delete of a deleted cell (or restore of one that is not), or a
                request id used for another review; 422 a label the sample's model does not have.
        """
        reviewer = _who(reviewer, "reviewer")
        if action not in ACTIONS:
            raise StoreError(422, f"action must be one of {', '.join(ACTIONS)}; got {action!r}")
        if action == RELABEL and not label:
            raise StoreError(422, "a relabel needs the new label")
        if request_id is not None and not (1 <= len(request_id) <= 64):
            raise StoreError(422, "request_id must be 1-64 characters")
        try:
            return self._review(cell_id, action, reviewer, label, request_id)
        except IntegrityError:
            if request_id is None:
                raise
            # a concurrent retry with this request id was stored first (PostgreSQL): answer with it
            return self._review(cell_id, action, reviewer, label, request_id)

    def _review(self, cell_id: int, action: str, reviewer: str, label: str | None,
                request_id: str | None) -> tuple[CellView, ReviewEventView, CountView]:
        with self._write() as s:
            if request_id is not None:
                seen = s.scalars(select(ReviewEvent).where(ReviewEvent.request_id == request_id)).one_or_none()
                if seen is not None:
                    if seen.cell_id != cell_id or seen.reviewer != reviewer:
                        raise StoreError(409, f"request id {request_id!r} belongs to another review (cell {seen.cell_id})")
                    return self._after_review(s, seen)
            st = self._cell_state(s, cell_id)
            sample = self._sample(s, st.cell.sample_id, lock=True)
            if sample.status != OPEN:
                raise StoreError(409, f"sample {sample.accession} is signed off (by {sample.signed_off_by} at "
                                      f"{sample.signed_off_at:%Y-%m-%d %H:%M} UTC); re-open it to change a label")
            st = self._cell_state(s, cell_id)  # again, under the lock: the latest event may have changed
            if label is not None and label not in sample.classes:
                raise StoreError(422, f"unknown label {label!r}; the model's classes are {list(sample.classes)}")
            before = st.label
            kind = ACTIONS[action]
            if kind in (DELETED, RESTORED):
                if st.deleted == (kind == DELETED):
                    raise StoreError(409, f"cell {cell_id} is {'deleted already' if st.deleted else 'not deleted'}; reload it")
                after = before
            else:
                if st.deleted:
                    raise StoreError(409, f"cell {cell_id} is deleted (not a white cell); restore it to change its label")
                if action == ACCEPT and label is not None and label != before:
                    last = st.looks[-1].reviewer if st.looks else "the model"
                    raise StoreError(409, f"cell {cell_id} is labelled {before!r} now (by {last}), not {label!r}; reload it")
                after = label if action == RELABEL else before
                kind = RELABEL if after != before else ACCEPT
            ev = ReviewEvent(sample_id=sample.id, cell_id=cell_id, action=kind,
                             label_before=before, label_after=after, reviewer=reviewer, at=utcnow(), request_id=request_id)
            s.add(ev)
            s.flush()
            return self._after_review(s, ev)

    def _after_review(self, s: Session, ev: ReviewEvent) -> tuple[CellView, ReviewEventView, CountView]:
        sample = self._sample(s, ev.sample_id)
        states = self._states(s, [sample.id])[sample.id]
        count, info = self._count(sample, states, self._repeats(s, [sample.id])[sample.id])
        st = next(x for x in states if x.cell.id == ev.cell_id)
        return self._cell_view(st, info.get(st.cell.id)), self._event_view(ev), count

    def sign_off(self, sample_id: int, actor: str) -> SampleDetail:
        """Freeze the sample: its count is kept with it, and later reviews are refused until a re-open."""
        actor = _who(actor)
        with self._write() as s:
            sample = self._sample(s, sample_id, lock=True)
            if sample.status == SIGNED_OFF:
                raise StoreError(409, f"sample {sample.accession} is signed off already (by {sample.signed_off_by} at "
                                      f"{sample.signed_off_at:%Y-%m-%d %H:%M} UTC)")
            states = self._states(s, [sample.id])[sample.id]
            if not states:
                raise StoreError(409, f"sample {sample.accession} has no cells to sign off; add cell images or fields first")
            count = self._count(sample, states, self._repeats(s, [sample.id])[sample.id])[0].model_dump()
            now = utcnow()
            sample.status, sample.signed_off_by, sample.signed_off_at, sample.signed_off_count = SIGNED_OFF, actor, now, count
            s.add(SampleEvent(sample_id=sample.id, action=SIGN_OFF, actor=actor, at=now, count=count))
            s.flush()
            return self._detail(s, sample)

    def reopen(self, sample_id: int, actor: str, reason: str) -> SampleDetail:
        """Open a signed-off sample again (an event with who, when and why; the sign-off stays in the history)."""
        actor = _who(actor)
        reason = (reason or "").strip()
        if not reason or len(reason) > 1000:
            raise StoreError(422, "say why the sample is re-opened (a reason of 1-1000 characters)")
        with self._write() as s:
            sample = self._sample(s, sample_id, lock=True)
            if sample.status != SIGNED_OFF:
                raise StoreError(409, f"sample {sample.accession} is open; only a signed-off sample can be re-opened")
            sample.status, sample.signed_off_by, sample.signed_off_at, sample.signed_off_count = OPEN, None, None, None
            s.add(SampleEvent(sample_id=sample.id, action=REOPEN, actor=actor, at=utcnow(), reason=reason))
            s.flush()
            return self._detail(s, sample)

    # ----------------------------------------------------------------------- cells
    def cell_history(self, cell_id: int) -> CellHistory:
        with self._read() as s:
            st = self._cell_state(s, cell_id)
            sample = self._sample(s, st.cell.sample_id)
            _, info = self._count(sample, self._states(s, [sample.id])[sample.id], self._repeats(s, [sample.id])[sample.id])
            return CellHistory(cell=self._cell_view(st, info.get(cell_id)), accession=sample.accession,
                               events=[self._event_view(e) for e in st.events])

    def cell_image(self, cell_id: int) -> tuple[Path, str]:
        """The stored file of a cell's image and its media type."""
        with self._read() as s:
            row = s.execute(select(Image).join(Cell, Cell.image_sha256 == Image.sha256).where(Cell.id == cell_id)).scalar_one_or_none()
            if row is None:
                raise StoreError(404, f"no cell with id {cell_id}")
            return self.images.path(row.sha256), row.media_type

    # ----------------------------------------------------------------------- export
    def _export_samples(self, s: Session, sample_id: int | None) -> list[tuple[Sample, list[_CellState], dict[int, _Counting], dict[int, str]]]:
        """Each sample with its cells, where each stands in the count, and its fields' names."""
        if sample_id is not None:
            samples = [self._sample(s, sample_id)]
        else:
            samples = list(s.scalars(select(Sample).order_by(Sample.created_at, Sample.id)))
        ids = [x.id for x in samples]
        states, repeats, fields = self._states(s, ids), self._repeats(s, ids), self._field_rows(s, ids)
        return [(x, states[x.id], self._count(x, states[x.id], repeats[x.id])[1], {f.id: f.name for f, _ in fields[x.id]})
                for x in samples]

    def export_csv(self, sample_id: int | None = None, *, what: Literal["cells", "events"] = "cells") -> str:
        """One sample (or every sample) as CSV: a row per cell now, or a row per review event (the audit trail)."""
        with self._read() as s:
            pairs = self._export_samples(s, sample_id)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\r\n")
        if what == "events":
            w.writerow(EVENT_COLUMNS)
            for sample, states, _, _ in pairs:
                for st in states:
                    for e in st.events:
                        w.writerow([e.id, sample.accession, st.cell.id, st.cell.name, e.action, e.label_before, e.label_after,
                                    e.reviewer, _iso(e.at), e.request_id or ""])
            return buf.getvalue()
        if what != "cells":
            raise StoreError(422, f"what must be 'cells' or 'events'; got {what!r}")
        w.writerow(EXPORT_COLUMNS)
        for sample, states, info, names in pairs:
            for st in states:
                last = st.looks[-1] if st.looks else None
                p = st.prediction
                c = st.cell
                where = info.get(c.id) or _Counting(not st.deleted)
                box = [f"{v:.1f}" for v in c.box] if c.box is not None else ["", "", "", ""]
                w.writerow([sample.accession, sample.status, c.id, c.name, c.image_sha256, p.label,
                            f"{p.confidence:.4f}", _bool(p.review), "; ".join(p.review_reasons), st.label, _bool(st.reviewed),
                            _bool(st.label != p.label), len(st.events), last.reviewer if last else "",
                            _iso(last.at) if last else "", sample.signed_off_by or "", _iso(sample.signed_off_at),
                            names.get(c.field_id, "") if c.field_id is not None else "", c.field_id or "", *box,
                            "" if c.score is None else f"{c.score:.4f}", "" if c.edge is None else _bool(c.edge), st.origin,
                            _bool(st.deleted), _bool(where.counted), where.repeat_of or ""])
        return buf.getvalue()

    def export_json(self, sample_id: int | None = None) -> dict[str, Any]:
        """One sample (or every sample) with every cell, every review event and every state change."""
        with self._read() as s:
            pairs = self._export_samples(s, sample_id)
            docs = []
            for sample, states, _, _ in pairs:
                detail = self._detail(s, sample).model_dump(mode="json")
                detail["review_events"] = [self._event_view(e).model_dump(mode="json")
                                           for e in sorted((e for st in states for e in st.events), key=lambda e: e.id)]
                docs.append(detail)
        return {"exported_at": _iso(utcnow()), "store": self.display, "samples": docs}

    def export_reviews(self, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
        """The reviewed cells of signed-off samples as a ``csv`` layout leuko trains on.

        Writes ``OUT/reviews.csv`` (``path,label,group``: the image, its reviewed
        label, its sample's accession id, so one sample's cells stay on one side of
        a split) and ``OUT/images/ACCESSION/CELL.ext`` (copies, not links: editing
        the export never touches the store).

        Raises:
            LeukoError: ``out`` exists and is not empty (without ``overwrite``), or an image is missing.
        """
        out = Path(out).expanduser()
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not overwrite:
                raise LeukoError(f"{out} exists and is not empty; pick another --out or pass --overwrite")
            if out.is_dir():
                shutil.rmtree(out / "images", ignore_errors=True)
        with self._read() as s:
            samples = list(s.scalars(select(Sample).where(Sample.status == SIGNED_OFF).order_by(Sample.created_at, Sample.id)))
            states = self._states(s, [x.id for x in samples])
            media = {sha: kind for sha, kind in s.execute(select(Image.sha256, Image.media_type))}
        rows: list[tuple[str, str, str]] = []
        classes: set[str] = set()
        n_samples = 0
        for sample in samples:
            picked = [st for st in states[sample.id] if st.reviewed and not st.deleted]
            if not picked:
                continue
            n_samples += 1
            folder = out / "images" / sample.accession
            folder.mkdir(parents=True, exist_ok=True)
            for st in picked:
                digest = st.cell.image_sha256
                src = self.images.path(digest)
                if not src.is_file():
                    raise LeukoError(f"the image store {self.images.root} lacks {digest} (cell {st.cell.id} of {sample.accession})")
                rel = Path("images") / sample.accession / f"{st.cell.id}{SUFFIXES.get(media.get(digest, ''), '')}"
                shutil.copyfile(src, out / rel)
                rows.append((rel.as_posix(), st.label, sample.accession))
                classes.add(st.label)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".reviews.csv.partial"
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(("path", "label", "group"))
            w.writerows(rows)
        tmp.replace(out / "reviews.csv")
        return {"manifest": out / "reviews.csv", "n_cells": len(rows), "n_samples": n_samples, "classes": sorted(classes)}


# --------------------------------------------------------------------------- checks
def _accession(value: str) -> str:
    value = (value or "").strip()
    if not ACCESSION_RE.match(value):
        raise StoreError(422, f"accession id must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                              f"digit; got {value[:80]!r}")
    return value


def _who(value: str | None, what: str = "reviewer") -> str:
    name = (value or "").strip()
    if not name:
        raise StoreError(422, f"say who you are: the {what} name is missing (with --auth, the token names the reviewer)")
    if len(name) > MAX_NAME or not name.isprintable():
        raise StoreError(422, f"the {what} name must be 1-{MAX_NAME} printable characters")
    return name


def _iso(t: dt.datetime | None) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z") if t is not None else ""


def _bool(v: bool) -> str:
    return "true" if v else "false"

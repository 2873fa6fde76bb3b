"""The rating store: raters, candidates, ratings and pairwise preferences in one database.

SQLite (one file, WAL journal, busy timeout) is the default; any SQLAlchemy URL works instead,
e.g. `postgresql+psycopg://user@host/fundax` for a shared server. Everything goes through
SQLAlchemy Core, so the two back ends share one code path.

    store = Store("ratings.db")           # or Store("postgresql+psycopg://...")
    rater, token = store.create_rater("ana")
    store.add_rating(rater.id, candidate_id, request_id="r1", score=4, accept=True,
                     criteria={"artifacts": True})

Ratings are never dropped or duplicated: every write is one transaction (SQLite takes the write
lock up front with BEGIN IMMEDIATE, so two writers cannot deadlock on a lock upgrade), a busy
database is retried with backoff, and each rating carries a client request id that is unique
per rater, so a retried POST returns the row it already wrote.

The tables and migrations are in `schema`; opening a Store applies the missing migrations.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from typing import Any, Union

import sqlalchemy as sa

from fundax.feedback import schema
# Tables and constants by name (re-exported: callers need only `store`).
# pylint: disable=g-importing-member
from fundax.feedback.schema import CRITERIA, MAX_REQUEST_ID, PREFERENCES
from fundax.feedback.schema import candidates, meta, pairwise, raters, ratings, schema_version
# pylint: enable=g-importing-member

_RETRIES = 8  # attempts for a write that finds the database busy
MAX_WEIGHT = 100.0  # a rater's largest weight in Selector training
_MIGRATION_LOCK = 0x66756E64  # PostgreSQL advisory lock id held while migrating ("fund")
_log = logging.getLogger(__name__)


class StoreError(ValueError):
  """A request the store refuses (unknown id, bad value, conflicting retry)."""


class NotFound(StoreError):
  """An id that names no row."""


class Conflict(StoreError):
  """A request id reused for a different rating."""


@dataclasses.dataclass(frozen=True)
class Rater:
  id: int
  name: str
  is_admin: bool
  is_simulated: bool
  weight: float


def hash_token(token: str) -> str:
  """Tokens are 256-bit random strings, so an unsalted SHA-256 is enough to store them."""
  return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def make_engine(db: str) -> sa.Engine:
  """An engine for a SQLAlchemy URL or a SQLite file path.

  Args:
    db: a URL containing "://" or a path to a SQLite file (created if missing).

  Returns:
    The engine. SQLite connections use WAL, a 30 s busy timeout, enforced foreign keys and
    BEGIN IMMEDIATE transactions.

  Raises:
    StoreError: a SQLite path that is a directory or lies in a missing folder.
  """
  if "://" not in db:
    # SQLite creates the file but not its folder, and names neither when it cannot.
    folder = os.path.dirname(os.path.abspath(db))
    if os.path.isdir(db):
      raise StoreError(f"database path {db} is a directory; give a file name")
    if not os.path.isdir(folder):
      raise StoreError(f"the folder of the database {db} does not exist: create {folder} first")
    db = f"sqlite:///{db}"
  url = sa.make_url(db)
  if url.get_backend_name() != "sqlite":
    return sa.create_engine(url, pool_pre_ping=True)
  engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

  @sa.event.listens_for(engine, "connect")
  def _on_connect(dbapi_conn, _):
    # The driver's own transaction handling is turned off so that BEGIN IMMEDIATE below is the
    # only transaction start (pysqlite would otherwise begin lazily with a deferred lock).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    if url.database not in (None, "", ":memory:"):
      cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not only app crashes
    cur.close()

  @sa.event.listens_for(engine, "begin")
  def _on_begin(conn):
    conn.exec_driver_sql("BEGIN IMMEDIATE")

  return engine


def _is_busy(err: sa.exc.OperationalError) -> bool:
  text = str(err.orig).lower()
  return "locked" in text or "busy" in text


class Store:
  """Typed access to the rating database; safe to share between threads."""

  def __init__(self, db: str, *, migrations=schema.MIGRATIONS):
    """Opens (and creates or migrates) a database.

    Args:
      db: SQLite file path or SQLAlchemy URL.
      migrations: the schema steps to apply (tests pass extra ones).

    Raises:
      StoreError: naming the database: its folder is missing, it is a directory or not a
        database, or it cannot be opened.
    """
    self.url = db
    self.engine = make_engine(db)
    try:
      self.version = self._migrate(migrations)
    except sa.exc.DBAPIError as e:  # not a database, no permission, server down
      raise StoreError(f"cannot open the rating database {db}: {e.orig}") from e

  def _migrate(self, migrations) -> int:
    def run(conn):
      if conn.dialect.name == "postgresql":
        # Servers starting together must not both create the tables; SQLite's BEGIN IMMEDIATE
        # already serialises this.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
      schema_version.create(conn, checkfirst=True)
      row = conn.execute(sa.select(schema_version.c.version)).first()
      version = row.version if row else 0
      if version > len(migrations):
        raise StoreError(f"database schema version {version} is newer than this fundax "
                         f"({len(migrations)}); upgrade fundax")
      for step in range(version, len(migrations)):
        _log.info("migrating %s: schema version %d -> %d", self.url, step, step + 1)
        migrations[step](conn)
      if row is None:
        conn.execute(schema_version.insert().values(version=len(migrations)))
      else:
        conn.execute(schema_version.update().values(version=len(migrations)))
      return len(migrations)
    return self._write(run)

  def _write(self, fn: Callable[[sa.Connection], Any]) -> Any:
    """Runs `fn(conn)` in one transaction, retrying while the database is busy."""
    for attempt in range(_RETRIES):
      try:
        with self.engine.begin() as conn:
          return fn(conn)
      except sa.exc.OperationalError as err:
        if not _is_busy(err) or attempt == _RETRIES - 1:
          raise
        _log.warning("database busy, retrying (%d/%d)", attempt + 1, _RETRIES)
        time.sleep(0.05 * 2**attempt)

  def _read(self, fn: Callable[[sa.Connection], Any]) -> Any:
    return self._write(fn)  # same path: one consistent snapshot, same busy handling

  # --- settings ---

  def get_meta(self, key: str) -> str | None:
    return self._read(lambda c: c.execute(
        sa.select(meta.c.value).where(meta.c.key == key)).scalar())

  def set_meta_once(self, key: str, value: str) -> str:
    """Sets a setting if unset and returns the stored value (the earlier one if already set)."""
    def run(conn):
      old = conn.execute(sa.select(meta.c.value).where(meta.c.key == key)).scalar()
      if old is None:
        conn.execute(meta.insert().values(key=key, value=value))
        return value
      return old
    return self._write(run)

  # --- raters ---

  def create_rater(self, name: str, *, is_admin: bool = False, is_simulated: bool = False,
                   weight: float = 1.0) -> tuple[Rater, str]:
    """Adds a rater.

    Args:
      name: unique display name (1-100 characters).
      is_admin: may create raters, see progress and agreement, and export.
      is_simulated: a simulated rater (kept apart in the export).
      weight: how much the Selector trainer should trust this rater.

    Returns:
      The rater and its login token (shown once; only a hash is stored).
    """
    name = name.strip()
    if not 1 <= len(name) <= 100:
      raise StoreError("rater name must have 1-100 characters")
    if (isinstance(weight, bool) or not isinstance(weight, (int, float))
        or not math.isfinite(weight) or not 0 < weight <= MAX_WEIGHT):
      raise StoreError(f"rater weight must be a finite number in (0, {MAX_WEIGHT}], got "
                       f"{weight!r}")
    token = secrets.token_urlsafe(32)
    def run(conn):
      if conn.execute(sa.select(raters.c.id).where(raters.c.name == name)).first():
        raise Conflict(f"a rater named {name!r} exists")
      rid = conn.execute(raters.insert().values(
          name=name, token_hash=hash_token(token), is_admin=is_admin, is_simulated=is_simulated,
          weight=float(weight), created=_now())).inserted_primary_key[0]
      return Rater(rid, name, is_admin, is_simulated, float(weight))
    return self._write(run), token

  def rater_by_token(self, token: str) -> Rater | None:
    row = self._read(lambda c: c.execute(
        sa.select(raters).where(raters.c.token_hash == hash_token(token))).first())
    return _rater(row) if row else None

  def rater_by_name(self, name: str) -> Rater | None:
    row = self._read(lambda c: c.execute(
        sa.select(raters).where(raters.c.name == name)).first())
    return _rater(row) if row else None

  def list_raters(self) -> list[Rater]:
    rows = self._read(lambda c: c.execute(sa.select(raters).order_by(raters.c.id)).all())
    return [_rater(r) for r in rows]

  # --- candidates ---

  def add_candidates(self, rows: list[dict[str, Any]]) -> int:
    """Registers candidates, skipping any (run_id, path) already present.

    Args:
      rows: dicts with run_id, path, prompt and optional seed, model_step, labels (JSON str).

    Returns:
      How many were new.
    """
    def run(conn):
      new = 0
      for r in rows:
        exists = conn.execute(sa.select(candidates.c.id).where(
            candidates.c.run_id == r["run_id"], candidates.c.path == r["path"])).first()
        if not exists:
          conn.execute(candidates.insert().values(created=_now(), **r))
          new += 1
      return new
    return self._write(run)

  def candidate(self, candidate_id: int) -> dict[str, Any] | None:
    row = self._read(lambda c: c.execute(
        sa.select(candidates).where(candidates.c.id == candidate_id)).first())
    return dict(row._mapping) if row else None

  def has_candidate_path(self, path: str) -> bool:
    return self._read(lambda c: c.execute(
        sa.select(candidates.c.id).where(candidates.c.path == path).limit(1)).first()) is not None

  def candidates(self) -> list[dict[str, Any]]:
    rows = self._read(lambda c: c.execute(sa.select(candidates).order_by(candidates.c.id)).all())
    return [dict(r._mapping) for r in rows]

  def queue(self, rater_id: int, limit: int = 8) -> dict[str, Any]:
    """The next prompt with candidates this rater has not scored, and their progress.

    Returns:
      {"prompt", "candidates": [candidate dicts, at most `limit`], "rated", "total"}; prompt is
      None and candidates empty when everything is rated.
    """
    def run(conn):
      done = sa.select(ratings.c.candidate_id).where(ratings.c.rater_id == rater_id)
      total = conn.execute(sa.select(sa.func.count()).select_from(candidates)).scalar()
      rated = conn.execute(sa.select(sa.func.count(sa.distinct(ratings.c.candidate_id))).where(
          ratings.c.rater_id == rater_id)).scalar()
      first = conn.execute(sa.select(candidates).where(candidates.c.id.not_in(done)).order_by(
          candidates.c.id).limit(1)).first()
      if first is None:
        return {"prompt": None, "candidates": [], "rated": rated, "total": total}
      rows = conn.execute(sa.select(candidates).where(
          candidates.c.id.not_in(done), candidates.c.run_id == first.run_id,
          candidates.c.prompt == first.prompt).order_by(candidates.c.id).limit(limit)).all()
      return {"prompt": first.prompt, "candidates": [dict(r._mapping) for r in rows],
              "rated": rated, "total": total}
    return self._read(run)

  def next_pair(self, rater_id: int) -> tuple[dict, dict] | None:
    """Two candidates of one prompt that this rater has not compared yet (None when done)."""
    def run(conn):
      seen = {frozenset(p) for p in conn.execute(sa.select(
          pairwise.c.candidate_a, pairwise.c.candidate_b).where(
              pairwise.c.rater_id == rater_id)).all()}
      groups: dict[tuple[str, str], list] = {}
      for r in conn.execute(sa.select(candidates).order_by(candidates.c.id)).all():
        groups.setdefault((r.run_id, r.prompt), []).append(dict(r._mapping))
      for group in groups.values():
        for i, a in enumerate(group):
          for b in group[i + 1:]:
            if frozenset((a["id"], b["id"])) not in seen:
              return a, b
      return None
    return self._read(run)

  # --- ratings ---

  def add_rating(self, rater_id: int, candidate_id: int, *, request_id: str,
                 score: int | None = None, accept: bool | None = None,
                 criteria: dict[str, bool] | None = None) -> tuple[dict[str, Any], bool]:
    """Records one rating, at most once per (rater, request id).

    Args:
      rater_id: who rates.
      candidate_id: what is rated.
      request_id: client-made key; a retry with the same key returns the first row.
      score: 1-5 or None.
      accept: accept (True) / reject (False) / None.
      criteria: subset of CRITERIA -> bool (True: the rater flags a problem with it).

    Returns:
      (rating row as a dict, created) where created is False for a replayed request.

    Raises:
      StoreError: a bad value; NotFound: unknown candidate; Conflict: the request id was used
      for a different rating.
    """
    criteria = _check_criteria(criteria)
    if score is not None and (isinstance(score, bool) or score not in range(1, 6)):
      raise StoreError(f"score must be an integer 1-5 or null, got {score!r}")
    _check_request_id(request_id)
    values = dict(candidate_id=candidate_id, rater_id=rater_id, score=score, accept=accept,
                  criteria=json.dumps(criteria, sort_keys=True), request_id=request_id)
    return self._idempotent_insert(ratings, values, ("candidate_id", "score", "accept",
                                                     "criteria"), [candidate_id])

  def add_pair(self, rater_id: int, candidate_a: int, candidate_b: int, preferred: str, *,
               request_id: str) -> tuple[dict[str, Any], bool]:
    """Records a pairwise preference ("a", "b" or "tie"); idempotent like `add_rating`."""
    if preferred not in PREFERENCES:
      raise StoreError(f"preferred must be one of {PREFERENCES}, got {preferred!r}")
    if candidate_a == candidate_b:
      raise StoreError("a pair needs two different candidates")
    _check_request_id(request_id)
    values = dict(candidate_a=candidate_a, candidate_b=candidate_b, preferred=preferred,
                  rater_id=rater_id, request_id=request_id)
    return self._idempotent_insert(pairwise, values, ("candidate_a", "candidate_b", "preferred"),
                                   [candidate_a, candidate_b])

  def _idempotent_insert(self, table, values, compared, candidate_ids):
    key = (table.c.rater_id == values["rater_id"]) & (
        table.c.request_id == values["request_id"])
    def run(conn):
      old = conn.execute(sa.select(table).where(key)).first()
      if old is not None:
        if any(getattr(old, k) != values[k] for k in compared):
          raise Conflict(f"request id {values['request_id']!r} was already used for a "
                         f"different {table.name} entry")
        return _as_dict(old), False
      for cid in candidate_ids:
        if conn.execute(sa.select(candidates.c.id).where(candidates.c.id == cid)).first() is None:
          raise NotFound(f"no candidate with id {cid}")
      new_id = conn.execute(table.insert().values(created=_now(), **values)).inserted_primary_key[0]
      return _as_dict(conn.execute(sa.select(table).where(table.c.id == new_id)).first()), True
    try:
      return self._write(run)
    except sa.exc.IntegrityError:
      # Another server process inserted the same key between our check and insert (possible
      # on PostgreSQL; SQLite's BEGIN IMMEDIATE serialises writers). The row is theirs: reuse it.
      _log.info("request id %r raced with a retry; returning the stored row",
                values["request_id"])
      return self._write(run)

  def ratings(self) -> list[dict[str, Any]]:
    rows = self._read(lambda c: c.execute(sa.select(ratings).order_by(ratings.c.id)).all())
    return [_as_dict(r) for r in rows]

  def pairs(self) -> list[dict[str, Any]]:
    rows = self._read(lambda c: c.execute(sa.select(pairwise).order_by(pairwise.c.id)).all())
    return [dict(r._mapping) for r in rows]

  def progress(self) -> list[dict[str, Any]]:
    """Per rater: candidates scored (distinct), ratings and pairwise preferences given."""
    def run(conn):
      rated = dict(conn.execute(sa.select(
          ratings.c.rater_id, sa.func.count(sa.distinct(ratings.c.candidate_id))).group_by(
              ratings.c.rater_id)).all())
      n_ratings = dict(conn.execute(sa.select(ratings.c.rater_id, sa.func.count()).group_by(
          ratings.c.rater_id)).all())
      n_pairs = dict(conn.execute(sa.select(pairwise.c.rater_id, sa.func.count()).group_by(
          pairwise.c.rater_id)).all())
      return [{"rater": r.name, "is_admin": bool(r.is_admin),
               "simulated": bool(r.is_simulated), "rated": rated.get(r.id, 0),
               "ratings": n_ratings.get(r.id, 0), "pairs": n_pairs.get(r.id, 0)}
              for r in conn.execute(sa.select(raters).order_by(raters.c.id)).all()]
    return self._read(run)

  def counts(self) -> dict[str, int]:
    """Row counts per table (for tests and the admin page)."""
    def run(conn):
      return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
              for t in (raters, candidates, ratings, pairwise)}
    return self._read(run)


def _as_dict(row) -> dict[str, Any]:
  d = dict(row._mapping)
  if "criteria" in d:
    d["criteria"] = json.loads(d["criteria"])
  return d


DB = Union[Store, str, os.PathLike]  # what the public functions accept as a database


def as_store(db: DB) -> Store:
  """A Store for a Store, a SQLite path or a SQLAlchemy URL (what the CLI functions accept)."""
  return db if isinstance(db, Store) else Store(os.fspath(db))


def _rater(row) -> Rater:
  return Rater(row.id, row.name, bool(row.is_admin), bool(row.is_simulated), float(row.weight))


def _check_criteria(criteria) -> dict[str, bool]:
  criteria = dict(criteria or {})
  unknown = set(criteria) - set(CRITERIA)
  if unknown:
    raise StoreError(f"unknown criteria {sorted(unknown)}; known: {list(CRITERIA)}")
  if not all(isinstance(v, bool) for v in criteria.values()):
    raise StoreError("criteria values must be true or false")
  return criteria


def _check_request_id(request_id) -> None:
  if not isinstance(request_id, str) or not 1 <= len(request_id) <= MAX_REQUEST_ID:
    raise StoreError(f"request_id must be a string of 1-{MAX_REQUEST_ID} characters")

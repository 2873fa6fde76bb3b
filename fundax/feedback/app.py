"""The feedback web app: rating and admin pages, and the JSON API behind them (FastAPI).

    app = create_app("ratings.db")              # then any ASGI server, or:
    serve("ratings.db", host="127.0.0.1", port=8000)

Accounts: an admin creates raters (POST /api/admin/raters, or `store.Store.create_rater`) and
hands each its token. The login page exchanges a token for an HttpOnly, SameSite=Strict cookie;
API clients send `Authorization: Bearer TOKEN` instead. Nothing is written anonymously.

Routes (the OpenAPI spec at /openapi.json lists the JSON ones with their schemas):
  GET  /login, POST /login, POST /logout     sign in / out (form)
  GET  /rate?mode=score|pair                 rating page: a prompt and a grid of candidates,
                                             or a pairwise comparison
  GET  /admin                                progress, agreement, rater accounts, export
  GET  /media/{path}                         a candidate image, stamped SYNTHETIC
  GET  /api/me, /api/queue, /api/pairs/next
  POST /api/ratings, /api/pairwise           idempotent by (rater, request_id)
  GET  /api/admin/raters|progress|agreement|export;  POST /api/admin/raters

Images are served only if they are registered candidates under the media root, with a
SYNTHETIC stamp burnt in. Request bodies over `max_body` bytes are refused with 413. A body
that does not validate (a missing field, a value out of range, a non-finite number such as
NaN, Infinity or 1e400) is refused with 422 and a JSON detail naming the field.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import urllib.parse
from typing import Annotated, Literal

from PIL import Image, ImageDraw

try:
  import fastapi
  import python_multipart  # pylint: disable=unused-import  # fastapi's form parsing (login)
  import uvicorn
  from fastapi import encoders
  from fastapi import exceptions
  from fastapi import responses
  from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints
except ImportError as e:
  raise ImportError(f"the feedback web app needs fastapi, uvicorn and python-multipart ({e}): "
                    'pip install "fundax[web]"') from e

from fundax import images as images_lib
from fundax.feedback import agreement
from fundax.feedback import export
from fundax.feedback import importer
from fundax.feedback import pages
from fundax.feedback import store as store_lib

COOKIE = "fundax_token"
MAX_BODY = 64 * 1024  # bytes; a rating is ~300 bytes
_ID = Annotated[StrictInt, Field(ge=1, le=2**62)]  # bounded: SQLite integers are 64-bit
_RequestId = Annotated[str, StringConstraints(min_length=1, max_length=store_lib.MAX_REQUEST_ID)]
_log = logging.getLogger(__name__)


class RatingIn(BaseModel):
  model_config = ConfigDict(extra="forbid")
  request_id: _RequestId
  candidate_id: _ID
  score: Annotated[StrictInt, Field(ge=1, le=5)] | None = None
  accept: StrictBool | None = None
  criteria: dict[Literal[store_lib.CRITERIA], StrictBool] = {}


class PairIn(BaseModel):
  model_config = ConfigDict(extra="forbid")
  request_id: _RequestId
  candidate_a: _ID
  candidate_b: _ID
  preferred: Literal[store_lib.PREFERENCES]


class RaterIn(BaseModel):
  model_config = ConfigDict(extra="forbid")
  name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
  is_admin: StrictBool = False
  weight: Annotated[float, Field(gt=0, le=store_lib.MAX_WEIGHT, allow_inf_nan=False)] = 1.0


class BodyLimit:
  """ASGI middleware refusing request bodies larger than `max_bytes` (413), before parsing."""

  def __init__(self, app, max_bytes: int):
    self.app = app
    self.max_bytes = max_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    too_big = responses.JSONResponse(
        {"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
      return await too_big(scope, receive, send)
    # Bodies without a (truthful) length are read up to the limit before the app sees them.
    chunks, size, more = [], 0, True
    while more:
      message = await receive()
      if message["type"] == "http.disconnect":
        return None
      chunks.append(message.get("body", b""))
      size += len(chunks[-1])
      if size > self.max_bytes:
        return await too_big(scope, receive, send)
      more = message.get("more_body", False)
    body = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replay():
      return body.pop() if body else await receive()
    return await self.app(scope, replay, send)


def _token(request: fastapi.Request) -> str | None:
  auth = request.headers.get("authorization", "")
  if auth.lower().startswith("bearer "):
    return auth[7:].strip()
  return request.cookies.get(COOKIE)


def maybe_rater(request: fastapi.Request) -> store_lib.Rater | None:
  """The signed-in rater (Bearer token or cookie), or None."""
  token = _token(request)
  return request.app.state.store.rater_by_token(token) if token else None


def _rater(request: fastapi.Request) -> store_lib.Rater:
  who = maybe_rater(request)
  if who is None:
    raise fastapi.HTTPException(401, "missing or invalid token; log in at /login or send "
                                "'Authorization: Bearer TOKEN'",
                                headers={"WWW-Authenticate": "Bearer"})
  return who


def _admin(who: Annotated[store_lib.Rater, fastapi.Depends(_rater)]) -> store_lib.Rater:
  if not who.is_admin:
    raise fastapi.HTTPException(403, "admin only")
  return who


Rater = Annotated[store_lib.Rater, fastapi.Depends(_rater)]
Admin = Annotated[store_lib.Rater, fastapi.Depends(_admin)]


@functools.lru_cache(maxsize=256)
def _stamped_png(path: str, mtime: float) -> bytes:  # mtime: a changed file is re-stamped
  del mtime
  image = Image.open(path).convert("RGB")
  images_lib.stamp_synthetic(ImageDraw.Draw(image), (4, 4),
                             images_lib.font(max(10, image.width // 12)), pad=3)
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def create_app(store: store_lib.DB, *, max_body: int = MAX_BODY,
               secure_cookie: bool = False) -> fastapi.FastAPI:
  """Builds the app over a rating database.

  Args:
    store: a Store or a database path / URL. Images are served from its media root (set by
      the first `importer.import_run`).
    max_body: largest accepted request body in bytes.
    secure_cookie: mark the login cookie Secure (HTTPS only); set it behind an HTTPS proxy.

  Returns:
    The ASGI app.
  """
  store = store_lib.as_store(store)
  app = fastapi.FastAPI(title="fundax feedback", version="1")
  app.add_middleware(BodyLimit, max_bytes=max_body)
  app.state.store = store

  @app.exception_handler(exceptions.RequestValidationError)
  def _invalid(_, err):
    # FastAPI's own handler echoes the input, which cannot be serialised when it is NaN/inf.
    return responses.JSONResponse({"detail": _json_safe(encoders.jsonable_encoder(err.errors()))},
                                  status_code=422)

  @app.exception_handler(store_lib.StoreError)
  def _store_error(_, err):
    code = 404 if isinstance(err, store_lib.NotFound) else (
        409 if isinstance(err, store_lib.Conflict) else 422)
    return responses.JSONResponse({"detail": str(err)}, status_code=code)

  def image_url(c):
    return "/media/" + urllib.parse.quote(c["path"])

  # --- pages ---

  @app.get("/", include_in_schema=False)
  def index(request: fastapi.Request):
    who = maybe_rater(request)
    return responses.RedirectResponse("/rate" if who else "/login", status_code=303)

  @app.get("/login", response_class=responses.HTMLResponse, include_in_schema=False)
  def login_page():
    return pages.login()

  @app.post("/login", include_in_schema=False)
  def login(token: Annotated[str, fastapi.Form(max_length=200)] = ""):
    who = store.rater_by_token(token.strip()) if token.strip() else None
    if who is None:
      return responses.HTMLResponse(pages.login("Unknown token."), status_code=401)
    resp = responses.RedirectResponse("/admin" if who.is_admin else "/rate", status_code=303)
    resp.set_cookie(COOKIE, token.strip(), httponly=True, samesite="strict",
                    secure=secure_cookie, max_age=30 * 86400)
    return resp

  @app.post("/logout", include_in_schema=False)
  def logout():
    resp = responses.RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE)
    return resp

  @app.get("/rate", response_class=responses.HTMLResponse, include_in_schema=False)
  def rate_page(request: fastapi.Request, mode: Literal["score", "pair"] = "score"):
    who = maybe_rater(request)
    if who is None:
      return responses.RedirectResponse("/login", status_code=303)
    if mode == "pair":
      pair = store.next_pair(who.id)
      return pages.pair(who, pair and [(c, image_url(c)) for c in pair])
    q = store.queue(who.id)
    return pages.rate(who, q["prompt"], [(c, image_url(c)) for c in q["candidates"]],
                      q["rated"], q["total"])

  @app.get("/admin", response_class=responses.HTMLResponse, include_in_schema=False)
  def admin_page(request: fastapi.Request):
    who = maybe_rater(request)
    if who is None:
      return responses.RedirectResponse("/login", status_code=303)
    if not who.is_admin:
      return responses.HTMLResponse(pages.message("Admins only."), status_code=403)
    return pages.admin(who, store.progress(), len(store.candidates()), _agreement(store))

  @app.get("/media/{path:path}", response_class=responses.Response,
           responses={200: {"content": {"image/png": {}}}})
  def media(path: str, _: Rater):
    """A candidate image with SYNTHETIC burnt in; only registered candidates are served."""
    # The URL must name a registered candidate exactly (a string match, before any file system
    # call), and the file must still resolve inside the media root (symlinks included).
    root = importer.media_root(store)
    if root is None or len(path) > 1000 or not store.has_candidate_path(path):
      raise fastapi.HTTPException(404, "no such candidate image")
    target = (root / path).resolve()
    if not target.is_relative_to(root) or not target.is_file():
      raise fastapi.HTTPException(404, "no such candidate image")
    return responses.Response(_stamped_png(str(target), target.stat().st_mtime),
                              media_type="image/png")

  # --- rater API ---

  @app.get("/api/me")
  def me(who: Rater):
    return {"id": who.id, "name": who.name, "is_admin": who.is_admin,
            "is_simulated": who.is_simulated}

  @app.get("/api/queue")
  def queue(who: Rater, limit: Annotated[int, fastapi.Query(ge=1, le=64)] = 8):
    """The next prompt with candidates this rater has not scored, and the progress."""
    q = store.queue(who.id, limit)
    q["candidates"] = [{"id": c["id"], "image_url": image_url(c)} for c in q["candidates"]]
    return q

  @app.post("/api/ratings", status_code=201)
  def post_rating(body: RatingIn, who: Rater, response: fastapi.Response):
    """Stores a rating; a retry with the same request_id returns the stored one (200)."""
    row, created = store.add_rating(who.id, body.candidate_id, request_id=body.request_id,
                                    score=body.score, accept=body.accept,
                                    criteria=body.criteria)
    if not created:
      response.status_code = 200
    return _jsonable(row)

  @app.get("/api/pairs/next")
  def next_pair(who: Rater):
    pair = store.next_pair(who.id)
    if pair is None:
      return {"prompt": None, "a": None, "b": None}
    a, b = pair
    return {"prompt": a["prompt"], "a": {"id": a["id"], "image_url": image_url(a)},
            "b": {"id": b["id"], "image_url": image_url(b)}}

  @app.post("/api/pairwise", status_code=201)
  def post_pair(body: PairIn, who: Rater, response: fastapi.Response):
    """Stores a pairwise preference; idempotent like /api/ratings."""
    row, created = store.add_pair(who.id, body.candidate_a, body.candidate_b, body.preferred,
                                  request_id=body.request_id)
    if not created:
      response.status_code = 200
    return _jsonable(row)

  # --- admin API ---

  @app.get("/api/admin/raters")
  def list_raters(_: Admin):
    return [vars(r) for r in store.list_raters()]

  @app.post("/api/admin/raters", status_code=201)
  def create_rater(body: RaterIn, _: Admin):
    """Creates a rater; the token in the reply is shown only this once."""
    new, token = store.create_rater(body.name, is_admin=body.is_admin, weight=body.weight)
    return vars(new) | {"token": token}

  @app.get("/api/admin/progress")
  def progress(_: Admin):
    return {"total": len(store.candidates()), "raters": store.progress()}

  @app.get("/api/admin/agreement")
  def agreement_route(_: Admin):
    return _agreement(store)

  @app.get("/api/admin/export", response_class=responses.Response,
           responses={200: {"content": {"application/x-ndjson": {}}}})
  def export_route(_: Admin, include_simulated: bool = True):
    """The Selector training set as JSONL (format: fundax.feedback.export)."""
    lines = (json.dumps(r) + "\n" for r in export.records(
        store, include_simulated=include_simulated))
    return responses.Response("".join(lines), media_type="application/x-ndjson", headers={
        "Content-Disposition": 'attachment; filename="ratings.jsonl"'})

  return app


def _agreement(store: store_lib.Store) -> dict:
  names = {r.id: r.name for r in store.list_raters()}
  return agreement.report((names[r["rater_id"]], r["candidate_id"], r["score"])
                          for r in store.ratings())


def _json_safe(value):
  """`value` with its non-finite floats as strings ("nan", "inf"): valid JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def _jsonable(row: dict) -> dict:
  return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}


def serve(db: store_lib.DB, *, host: str = "127.0.0.1", port: int = 8000,
          secure_cookie: bool = False) -> None:
  """Runs the app with uvicorn until interrupted (`fundax feedback serve`).

  Args:
    db: SQLite file path or SQLAlchemy URL.
    host: interface to listen on; keep 127.0.0.1 unless behind an HTTPS proxy.
    port: TCP port, 1-65535.
    secure_cookie: HTTPS-only login cookie (when served behind an HTTPS proxy).

  Raises:
    ValueError: a port outside 1-65535 (which the socket layer would wrap onto another port).
  """
  if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
    raise ValueError(f"port must be an integer in 1-65535, got {port!r}")
  store = store_lib.as_store(db)
  if not any(r.is_admin for r in store.list_raters()):
    _log.warning("no admin rater yet: create one with fundax.feedback.app.create_rater(db, name, "
                 "is_admin=True) and log in with its token")
  if importer.media_root(store) is None:
    _log.warning("no candidates imported yet: nothing to rate")
  uvicorn.run(create_app(store, secure_cookie=secure_cookie), host=host, port=port,
              log_level="info")


def create_rater(db: store_lib.DB, name: str, *, is_admin: bool = False,
                 weight: float = 1.0) -> str:
  """Adds a rater to a database and returns its login token (`fundax feedback add-rater`)."""
  _, token = store_lib.as_store(db).create_rater(name, is_admin=is_admin, weight=weight)
  return token


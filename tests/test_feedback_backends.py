"""The same store behaviour on each database back end: SQLite always, PostgreSQL when given.

Set FUNDAX_TEST_POSTGRES_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/fundax_test, a
scratch database: its tables are dropped) to run the PostgreSQL cases; they are skipped otherwise.
"""

import collections
import concurrent.futures
import json
import os

import httpx
import pytest
import sqlalchemy as sa

from fundax.feedback import app as app_lib
from fundax.feedback import export
from fundax.feedback import importer
from fundax.feedback import schema
from fundax.feedback import store as store_lib
import feedback_helpers

PG_URL = os.environ.get("FUNDAX_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
  if request.param == "sqlite":
    return str(tmp_path / "ratings.db")
  if not PG_URL:
    pytest.skip("set FUNDAX_TEST_POSTGRES_URL to test PostgreSQL")
  engine = sa.create_engine(PG_URL)
  with engine.begin() as conn:  # a scratch database: start from nothing
    schema.metadata.drop_all(conn)
  engine.dispose()
  return PG_URL


def test_import_rate_export(db_url, tmp_path):
  store = store_lib.Store(db_url)
  assert store.version == len(schema.MIGRATIONS)
  run_dir = importer.write_phantom_run(tmp_path / "media" / "run1", num_prompts=1, per_prompt=2,
                                       resolution=64)
  assert importer.import_run(run_dir, db_url) == 2 and importer.import_run(run_dir, store) == 0
  rater, _ = store.create_rater("ana", weight=0.5)
  row, created = store.add_rating(rater.id, 1, request_id="a", score=5, accept=True,
                                  criteria={"vessel_structure": True})
  assert created and not store.add_rating(rater.id, 1, request_id="a", score=5, accept=True,
                                          criteria={"vessel_structure": True})[1]
  with pytest.raises(store_lib.Conflict):
    store.add_rating(rater.id, 1, request_id="a", score=1)
  with pytest.raises(store_lib.NotFound):
    store.add_rating(rater.id, 99, request_id="b", score=1)
  store.add_pair(rater.id, 1, 2, "b", request_id="p")
  assert store_lib.Store(db_url).version == store.version  # reopening migrates nothing
  out = tmp_path / "out.jsonl"
  assert export.export_jsonl(db_url, out) == 2
  first = json.loads(out.read_text().splitlines()[0])
  assert first["rater_weight"] == 0.5 and first["criteria"]["vessel_structure"] is True


def test_simultaneous_retries_store_one_row(db_url, tmp_path):
  """Eight clients send the same 40 requests at once: 40 rows, each created exactly once."""
  store = store_lib.Store(db_url)
  run_dir = importer.write_phantom_run(tmp_path / "media" / "run1", num_prompts=1, per_prompt=2,
                                       resolution=64)
  importer.import_run(run_dir, store)
  _, token = store.create_rater("ana")

  def send(_):
    codes = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                      timeout=60) as client:
      for j in range(40):
        body = {"request_id": f"req-{j}", "candidate_id": 1 + j % 2, "score": 1 + j % 5}
        codes.append(client.post("/api/ratings", json=body).status_code)
    return codes

  with feedback_helpers.live_server(app_lib.create_app(db_url)) as url:
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      codes = collections.Counter(c for cs in pool.map(send, range(8)) for c in cs)
  assert codes == {201: 40, 200: 7 * 40}
  rows = store.ratings()
  assert len(rows) == 40 and len({r["request_id"] for r in rows}) == 40

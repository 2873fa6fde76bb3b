"""Rating store, run import, export format and simulated raters (no web server)."""

import concurrent.futures
import json
import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from fundax.data import labels as labels_lib
from fundax.feedback import export
from fundax.feedback import importer
from fundax.feedback import schema
from fundax.feedback import simulate
from fundax.feedback import store as store_lib
import feedback_helpers


@pytest.fixture
def db(tmp_path):
  return feedback_helpers.make_store(tmp_path)


def test_schema_versions_and_sqlite_settings(tmp_path):
  path = str(tmp_path / "s.db")
  assert store_lib.Store(path).version == len(schema.MIGRATIONS) == 1
  con = sqlite3.connect(path)
  assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  assert con.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
  con.close()
  calls = []

  def v1_to_v2(conn):
    calls.append(1)
    conn.execute(sa.text("ALTER TABLE raters ADD COLUMN note TEXT"))

  steps = schema.MIGRATIONS + (v1_to_v2,)
  assert store_lib.Store(path, migrations=steps).version == 2
  assert store_lib.Store(path, migrations=steps).version == 2
  assert calls == [1]  # applied once, not on every open
  with pytest.raises(store_lib.StoreError, match="newer"):
    store_lib.Store(path)  # an old fundax refuses a newer database


def test_rating_idempotent_and_validated(db):
  store, _ = db
  rater, token = store.create_rater("ana")
  assert store.rater_by_token(token) == rater and store.rater_by_token("nope") is None
  row, created = store.add_rating(rater.id, 1, request_id="r1", score=4, accept=True,
                                  criteria={"artifacts": True})
  again, created2 = store.add_rating(rater.id, 1, request_id="r1", score=4, accept=True,
                                     criteria={"artifacts": True})
  assert created and not created2 and again["id"] == row["id"]
  assert row["criteria"] == {"artifacts": True}
  before = store.counts()
  bad = [dict(candidate_id=999, score=3), dict(candidate_id=1, score=6),
         dict(candidate_id=1, score=True), dict(candidate_id=1, criteria={"colour": True}),
         dict(candidate_id=1, criteria={"artifacts": "yes"})]
  for i, kwargs in enumerate(bad):
    with pytest.raises(store_lib.StoreError):
      store.add_rating(rater.id, request_id=f"bad{i}", **kwargs)
  with pytest.raises(store_lib.Conflict):  # same key, different rating
    store.add_rating(rater.id, 1, request_id="r1", score=2)
  with pytest.raises(store_lib.StoreError):
    store.add_pair(rater.id, 1, 1, "a", request_id="p")
  with pytest.raises(store_lib.StoreError):
    store.add_pair(rater.id, 1, 2, "left", request_id="p")
  assert store.counts() == before
  # The same request id is fine for another rater.
  other, _ = store.create_rater("ben")
  assert store.add_rating(other.id, 1, request_id="r1", score=2)[1]
  with pytest.raises(store_lib.Conflict):
    store.create_rater("ana")


def test_writers_in_separate_engines_wait_for_locks(tmp_path, db):
  """Separate Store objects behave like separate server processes on one SQLite file."""
  store, _ = db
  path = store.url
  raters = [store.create_rater(f"w{i}")[0] for i in range(4)]
  locked, release = threading.Event(), threading.Event()

  def hold_lock():  # another process holding the write lock for a while
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    locked.set()
    release.wait(10)
    con.execute("COMMIT")
    con.close()

  def write(i):
    own = store_lib.Store(path)
    for j in range(25):
      own.add_rating(raters[i].id, 1 + j % 6, request_id=str(j), score=1 + j % 5)
      own.add_rating(raters[i].id, 1 + j % 6, request_id=str(j), score=1 + j % 5)  # a retry

  holder = threading.Thread(target=hold_lock)
  holder.start()
  locked.wait(10)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = [pool.submit(write, i) for i in range(4)]
    time.sleep(0.5)
    assert not any(f.done() for f in futures)  # waiting on the lock, not failed
    release.set()
    for f in futures:
      f.result()
  holder.join()
  rows = store.ratings()
  assert len(rows) == 100 and len({(r["rater_id"], r["request_id"]) for r in rows}) == 100


def test_queue_groups_by_prompt_and_tracks_progress(db):
  store, _ = db
  rater, _ = store.create_rater("ana")
  q = store.queue(rater.id)
  assert q["rated"] == 0 and q["total"] == 6 and len(q["candidates"]) == 3
  assert {c["prompt"] for c in q["candidates"]} == {q["prompt"]}
  for i, c in enumerate(q["candidates"]):
    store.add_rating(rater.id, c["id"], request_id=str(i), score=3)
  q2 = store.queue(rater.id)
  assert q2["rated"] == 3 and q2["prompt"] != q["prompt"]
  a, b = store.next_pair(rater.id)
  assert a["prompt"] == b["prompt"]
  store.add_pair(rater.id, a["id"], b["id"], "tie", request_id="p")
  assert {a["id"], b["id"]} != {c["id"] for c in store.next_pair(rater.id)}


def test_import_is_idempotent_and_checks_manifest(tmp_path, db):
  store, run_dir = db
  assert importer.import_run(run_dir, store) == 0
  lines = (run_dir / importer.MANIFEST).read_text().splitlines()
  entry = json.loads(lines[0])
  assert set(entry) == {"image", "prompt", "seed", "model_step", "labels"}
  (run_dir / importer.MANIFEST).write_text("\n".join(lines + [lines[0]]) + "\n")
  assert importer.import_run(run_dir, store) == 0  # duplicate line: same (run, path)
  paths = [c["path"] for c in store.candidates()]
  assert paths[0] == "run1/" + entry["image"] and len(set(paths)) == 6
  assert importer.media_root(store) == (tmp_path / "media").resolve()
  broken = tmp_path / "media" / "broken"
  broken.mkdir()
  (broken / "m.txt").write_text("not an image")
  for text, match in [("{not json", "not JSON"), ('{"image": "x.png"}', "prompt"),
                      ('{"image": "../run1/images/p000_c00.png", "prompt": "p"}', "inside"),
                      ('{"image": "a.png", "prompt": "p", "seed": "1"}', "seed"),
                      ('{"image": "m.txt", "prompt": "p"}', "PNG")]:
    (broken / importer.MANIFEST).write_text(text + "\n")
    with pytest.raises(ValueError, match=match):
      importer.import_run(broken, store)
  elsewhere = importer.write_phantom_run(tmp_path / "other", num_prompts=1, per_prompt=1,
                                         resolution=64)
  with pytest.raises(ValueError, match="media root"):
    importer.import_run(elsewhere, store)
  assert len(store.candidates()) == 6


def test_simulated_raters_follow_the_truth(db):
  store, _ = db
  good = labels_lib.FundusLabels(quality="good", laterality="left", quality_defects=())
  bad = labels_lib.FundusLabels(quality="reject", laterality="right",
                                quality_defects=("defocus", "dust_artifact"))
  assert simulate.true_rating(good, "OS, disc-centred.") == {
      "score": 5, "accept": True, "criteria": {k: False for k in store_lib.CRITERIA}}
  t = simulate.true_rating(bad, "Left eye.")
  assert t["score"] == 1 and not t["accept"]
  assert {k for k, v in t["criteria"].items() if v} == {
      "optic_disc_clarity", "vessel_structure", "artifacts", "prompt_match"}
  # Phantom candidates made under their prompt's constraints match it.
  on_prompt = [c for c in store.candidates() if simulate.matches_prompt(
      labels_lib.FundusLabels.from_json(c["labels"]), c["prompt"])]
  assert len(on_prompt) >= 3
  perfect = simulate.RaterSpec("sim-perfect", noise=0.0, flip_rate=0.0)
  noisy = simulate.RaterSpec("sim-noisy", noise=3.0, bias=1.0)
  added = simulate.simulate(store, raters=(perfect, noisy), seed=1)
  assert added == {"ratings": 12, "pairs": 8}
  assert simulate.simulate(store, raters=(perfect, noisy), seed=1) == {"ratings": 0, "pairs": 0}
  perfect_id = store.rater_by_name("sim-perfect").id
  for r in store.ratings():
    c = store.candidate(r["candidate_id"])
    truth = simulate.true_rating(labels_lib.FundusLabels.from_json(c["labels"]), c["prompt"])
    if r["rater_id"] == perfect_id:
      assert {k: r[k] for k in truth} == truth
  assert all(r.is_simulated for r in store.list_raters())
  human, _ = store.create_rater("human")
  with pytest.raises(ValueError, match="human"):
    simulate.simulate(store, raters=(simulate.RaterSpec("human"),))


def test_export_format(tmp_path, db):
  store, run_dir = db
  ana, _ = store.create_rater("ana", weight=2.0)
  simulate.simulate(store, raters=(simulate.RaterSpec("sim"),), pairs=True)
  store.add_rating(ana.id, 2, request_id="x", score=None, accept=False,
                   criteria={"prompt_match": True})
  out = tmp_path / "ratings.jsonl"
  n = export.export_jsonl(store, out)
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert n == len(lines) == 6 + 1 + 2 * 2
  ratings = [x for x in lines if x["kind"] == "rating"]
  pairs = [x for x in lines if x["kind"] == "pair"]
  assert len(ratings) == 7 and len(pairs) == 4
  mine = [x for x in ratings if x["rater"] == "ana"][0]
  assert mine["rater_weight"] == 2.0 and mine["simulated"] is False
  assert mine["score"] is None and mine["accept"] is False
  assert mine["criteria"] == {k: k == "prompt_match" for k in store_lib.CRITERIA}
  assert mine["image_path"] == str(run_dir.resolve() / "images" / "p000_c01.png")
  assert all(x["synthetic"] is True for x in lines)
  assert all(x["simulated"] for x in pairs)
  for p in pairs:
    assert p["preferred"] in ("a", "b", "tie") and p["image_a"] != p["image_b"]
  assert export.export_jsonl(store, out, include_simulated=False) == 1

"""The feedback app's routes: auth, rating, admin, bad input, traversal, escaping, concurrency."""

import concurrent.futures
import http.client
import io
import json
import os
import subprocess
import sys
import time
import urllib.parse

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fundax.feedback import app as app_lib
import feedback_helpers

RATER_ROUTES = [("GET", "/api/me"), ("GET", "/api/queue"), ("GET", "/api/pairs/next"),
                ("POST", "/api/ratings"), ("POST", "/api/pairwise"),
                ("GET", "/media/run1/images/p000_c00.png")]
ADMIN_ROUTES = [("GET", "/api/admin/raters"), ("POST", "/api/admin/raters"),
                ("GET", "/api/admin/progress"), ("GET", "/api/admin/agreement"),
                ("GET", "/api/admin/export")]


@pytest.fixture
def env(tmp_path):
  store, run_dir = feedback_helpers.make_store(tmp_path)
  _, admin_token = store.create_rater("boss", is_admin=True)
  _, rater_token = store.create_rater("ana")
  client = TestClient(app_lib.create_app(store))
  return {"store": store, "run_dir": run_dir, "client": client, "tmp": tmp_path,
          "admin": {"Authorization": f"Bearer {admin_token}"},
          "rater": {"Authorization": f"Bearer {rater_token}"}}


def test_auth_required_everywhere(env):
  c = env["client"]
  for method, path in RATER_ROUTES + ADMIN_ROUTES:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
      r = c.request(method, path, headers=headers, json={})
      assert r.status_code == 401, (method, path, headers)
      assert "token" in r.json()["detail"]
  for method, path in ADMIN_ROUTES:
    r = c.request(method, path, headers=env["rater"], json={"name": "x"})
    assert r.status_code == 403 and r.json()["detail"] == "admin only"
  assert env["store"].counts()["ratings"] == 0 and len(env["store"].list_raters()) == 2
  for page in ("/", "/rate", "/admin"):
    r = c.get(page, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
  assert c.get("/admin", headers=env["rater"]).status_code == 403


def test_login_cookie_and_logout(env):
  c = env["client"]
  assert "token" in c.get("/login").text
  assert c.post("/login", data={"token": "wrong"}).status_code == 401
  token = env["rater"]["Authorization"].split()[1]
  r = c.post("/login", data={"token": token}, follow_redirects=False)
  assert r.status_code == 303 and r.headers["location"] == "/rate"
  cookie = r.headers["set-cookie"].lower()
  assert "httponly" in cookie and "samesite=strict" in cookie
  assert c.get("/api/me").json()["name"] == "ana"  # the cookie authenticates
  c.post("/logout")
  assert c.get("/api/me").status_code == 401


def test_rating_flow(env):
  c, h, store = env["client"], env["rater"], env["store"]
  q = c.get("/api/queue", headers=h).json()
  assert q["rated"] == 0 and q["total"] == 6 and len(q["candidates"]) == 3
  page = c.get("/rate", headers=h).text
  assert "0 / 6 rated" in page and page.count('class="synthetic">SYNTHETIC') == 3
  cid = q["candidates"][0]["id"]
  body = {"request_id": "r-1", "candidate_id": cid, "score": 4, "accept": True,
          "criteria": {"artifacts": True}}
  first = c.post("/api/ratings", headers=h, json=body)
  assert first.status_code == 201 and first.json()["criteria"] == {"artifacts": True}
  retry = c.post("/api/ratings", headers=h, json=body)
  assert retry.status_code == 200 and retry.json()["id"] == first.json()["id"]
  clash = c.post("/api/ratings", headers=h, json=body | {"score": 2})
  assert clash.status_code == 409 and "r-1" in clash.json()["detail"]
  assert store.counts()["ratings"] == 1
  assert c.get("/api/queue", headers=h).json()["rated"] == 1
  pair = c.get("/api/pairs/next", headers=h).json()
  assert "SYNTHETIC" in c.get("/rate?mode=pair", headers=h).text
  pbody = {"request_id": "p-1", "candidate_a": pair["a"]["id"], "candidate_b": pair["b"]["id"],
           "preferred": "b"}
  assert c.post("/api/pairwise", headers=h, json=pbody).status_code == 201
  assert c.post("/api/pairwise", headers=h, json=pbody).status_code == 200
  assert store.counts()["pairwise"] == 1


def test_images_are_stamped_synthetic(env):
  c = env["client"]
  r = c.get("/media/run1/images/p000_c00.png", headers=env["rater"])
  assert r.status_code == 200 and r.headers["content-type"] == "image/png"
  served = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
  original = np.asarray(Image.open(env["run_dir"] / "images" / "p000_c00.png")).astype(int)
  corner = served[2:12, 2:30]
  assert (np.abs(corner - [170, 0, 0]).sum(-1) < 10).mean() > 0.3  # the red stamp
  assert np.array_equal(served[-20:], original[-20:])  # the rest is the image


def test_admin_routes(env):
  c, h = env["client"], env["admin"]
  new = c.post("/api/admin/raters", headers=h, json={"name": "cy", "weight": 0.5})
  assert new.status_code == 201 and new.json()["weight"] == 0.5
  assert c.get("/api/me", headers={"Authorization": f"Bearer {new.json()['token']}"}).json()[
      "name"] == "cy"
  assert c.post("/api/admin/raters", headers=h, json={"name": "cy"}).status_code == 409
  listed = c.get("/api/admin/raters", headers=h).json()
  assert [r["name"] for r in listed] == ["boss", "ana", "cy"]
  assert all("token" not in k for r in listed for k in r)
  for rater, score in (("ana", 3), ("cy", 3)):
    tok = env["rater"] if rater == "ana" else {"Authorization": f"Bearer {new.json()['token']}"}
    c.post("/api/ratings", headers=tok, json={"request_id": "x", "candidate_id": 1,
                                              "score": score})
  prog = c.get("/api/admin/progress", headers=h).json()
  assert prog["total"] == 6 and {p["rater"]: p["rated"] for p in prog["raters"]} == {
      "boss": 0, "ana": 1, "cy": 1}
  agree = c.get("/api/admin/agreement", headers=h).json()
  assert agree["units"] == 1 and agree["pairs"][0]["n"] == 1
  export = c.get("/api/admin/export", headers=h)
  lines = [json.loads(x) for x in export.text.splitlines()]
  assert export.headers["content-type"].startswith("application/x-ndjson")
  assert len(lines) == 2 and all(x["synthetic"] for x in lines)
  page = c.get("/admin", headers=h).text
  assert "Fleiss" in page and "Krippendorff" in page and "ratings.jsonl" in page


BAD_RATINGS = [
    ({"request_id": "b", "candidate_id": 999, "score": 3}, 404),
    ({"request_id": "b", "candidate_id": 1, "score": 0}, 422),
    ({"request_id": "b", "candidate_id": 1, "score": 6}, 422),
    ({"request_id": "b", "candidate_id": 1, "score": "4"}, 422),
    ({"request_id": "b", "candidate_id": 1, "score": 4.5}, 422),
    ({"request_id": "b", "candidate_id": 1, "accept": "yes"}, 422),
    ({"request_id": "b", "candidate_id": 1, "criteria": {"colour": True}}, 422),
    ({"request_id": "b", "candidate_id": 2**70}, 422),
    ({"request_id": "", "candidate_id": 1}, 422),
    ({"candidate_id": 1, "score": 3}, 422),
    ({"request_id": "b", "candidate_id": 1, "score": 3, "rater_id": 1}, 422),
]


def test_bad_input_is_refused_and_changes_nothing(env):
  c, h, store = env["client"], env["rater"], env["store"]
  before = store.counts()
  for body, code in BAD_RATINGS:
    r = c.post("/api/ratings", headers=h, json=body)
    assert r.status_code == code, body
    assert r.json()["detail"], body
  for body in ({"request_id": "p", "candidate_a": 1, "candidate_b": 1, "preferred": "a"},
               {"request_id": "p", "candidate_a": 1, "candidate_b": 2, "preferred": "left"},
               {"request_id": "p", "candidate_a": 1, "candidate_b": 999, "preferred": "a"}):
    assert 400 <= c.post("/api/pairwise", headers=h, json=body).status_code < 500
  assert c.post("/api/ratings", headers=h, content=b"{not json",
                params={}).status_code == 422
  big = {"request_id": "big", "candidate_id": 1, "score": 3, "pad": "x" * 100_000}
  r = c.post("/api/ratings", headers=h, json=big)
  assert r.status_code == 413 and "bytes" in r.json()["detail"]
  chunks = (b"x" * 10_000 for _ in range(10))  # no Content-Length: streamed, still refused
  assert c.post("/api/ratings", headers=h, content=chunks).status_code == 413
  assert c.get("/api/queue?limit=0", headers=h).status_code == 422
  assert c.get("/rate?mode=nope", headers=h).status_code == 422
  assert store.counts() == before


def test_path_traversal_is_refused(env):
  store = env["store"]
  (env["tmp"] / "secret.png").write_bytes(b"secret")
  token = env["rater"]["Authorization"]
  paths = ["/media/..%2Fsecret.png", "/media/run1/..%2F..%2Fsecret.png",
           "/media/%2e%2e/secret.png", "/media/run1/../../secret.png",
           "/media/%2Fetc%2Fpasswd", "/media/run1/candidates.jsonl", "/media/run1/images/",
           "/media/run1/images/nope.png", "/media/run1%00.png", "/media/" + "a" * 5000,
           "/media/run1/images/p000_c00.png/..%2F..%2F..%2Fsecret.png"]
  with feedback_helpers.live_server(app_lib.create_app(store)) as url:
    host, port = urllib.parse.urlsplit(url).netloc.split(":")
    for path in paths:
      # http.client sends the path byte for byte (httpx would normalise the dots away).
      conn = http.client.HTTPConnection(host, int(port), timeout=10)
      conn.request("GET", path, headers={"Authorization": token})
      resp = conn.getresponse()
      body = resp.read()
      conn.close()
      assert resp.status == 404, path
      assert b"secret" not in body and b"root:" not in body


def test_html_in_prompts_and_names_is_escaped(env):
  store, c = env["store"], env["client"]
  evil = "<script>alert(1)</script><img src=x onerror=alert(2)> & \"q\""
  store.add_candidates([{"run_id": "run0", "path": "run1/images/p000_c00.png",
                         "prompt": evil}])
  store.create_rater("<b>mallory</b>")
  ana = store.rater_by_name("ana")
  for cand in store.candidates()[:6]:  # rate everything else so the evil prompt comes up
    store.add_rating(ana.id, cand["id"], request_id=f"q{cand['id']}", score=3)
  page = c.get("/rate", headers=env["rater"]).text
  assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;" in page
  assert "<script>alert" not in page and "<img src=x" not in page
  admin = c.get("/admin", headers=env["admin"]).text
  assert "&lt;b&gt;mallory&lt;/b&gt;" in admin and "<b>mallory" not in admin


def test_concurrent_raters_lose_and_duplicate_nothing(env):
  store = env["store"]
  raters, per_rater = 8, 200
  tokens = [store.create_rater(f"r{i}")[1] for i in range(raters)]

  def rate(i):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[i]}"},
                      timeout=60) as client:
      for j in range(per_rater):
        body = {"request_id": f"{i}-{j}", "candidate_id": 1 + j % 6, "score": 1 + j % 5}
        for _ in range(2 if j % 10 == 0 else 1):  # every tenth POST is retried
          r = client.post("/api/ratings", json=body)
          assert r.status_code in (200, 201), r.text
    return i

  with feedback_helpers.live_server(app_lib.create_app(store)) as url:
    with concurrent.futures.ThreadPoolExecutor(raters) as pool:
      assert sorted(pool.map(rate, range(raters))) == list(range(raters))
  rows = store.ratings()
  assert len(rows) == raters * per_rater
  keys = {(r["rater_id"], r["request_id"]) for r in rows}
  assert len(keys) == len(rows)
  by_rater = {p["rater"]: p["ratings"] for p in store.progress()}
  assert all(by_rater[f"r{i}"] == per_rater for i in range(raters))
  for r in rows:  # each stored rating is the one its request asked for
    j = int(r["request_id"].split("-")[1])
    assert (r["candidate_id"], r["score"]) == (1 + j % 6, 1 + j % 5)


def test_serve_runs_uvicorn_in_a_process(env):
  """`app.serve` (what `fundax feedback serve` calls) answers on 127.0.0.1."""
  port = feedback_helpers.free_port()
  code = ("from fundax.feedback import app; "
          f"app.serve({env['store'].url!r}, host='127.0.0.1', port={port})")
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=os.environ | {
                              "PYTHONPATH": os.pathsep.join(sys.path)})
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        r = httpx.get(f"http://127.0.0.1:{port}/api/me", headers=env["rater"], timeout=5)
        break
      except httpx.TransportError:
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)
    assert r.status_code == 200 and r.json()["name"] == "ana"
  finally:
    proc.terminate()
    proc.wait(20)

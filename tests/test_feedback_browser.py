"""End to end in a real browser (Debian's chromium through Playwright): log in, rate, compare.

Needs the `playwright` Python package and a chromium binary (apt-get install chromium); Playwright
cannot download its own browsers here, so it launches /usr/bin/chromium.
"""

import os
import shutil

import pytest

from fundax.feedback import app as app_lib
import feedback_helpers

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("FUNDAX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]


def _ratings(store, name):
  rid = store.rater_by_name(name).id
  return {r["candidate_id"]: r for r in store.ratings() if r["rater_id"] == rid}


def test_rate_with_mouse_and_keyboard_then_compare(tmp_path):
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
  store, _ = feedback_helpers.make_store(tmp_path)
  _, token = store.create_rater("ana")
  _, admin_token = store.create_rater("boss", is_admin=True)
  with feedback_helpers.live_server(app_lib.create_app(store)) as url, \
      playwright_api.sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    page = browser.new_page()
    page.set_default_timeout(15_000)
    page.goto(f"{url}/login")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/rate")
    expect = playwright_api.expect
    expect(page.locator("#progress")).to_have_text("0 / 6 rated")
    tiles = page.locator(".tile")
    expect(tiles).to_have_count(3)
    expect(page.locator(".tile .synthetic").first).to_be_visible()
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    ids = [int(tiles.nth(i).get_attribute("data-id")) for i in range(3)]

    # Mouse: score, accept/reject and a criterion on two tiles, then the submit button.
    tiles.nth(0).locator("button.score[data-score='4']").click()
    tiles.nth(0).locator("button.accept").click()
    tiles.nth(0).locator("input[data-crit=artifacts]").check()
    tiles.nth(1).locator("button.score[data-score='2']").click()
    tiles.nth(1).locator("button.reject").click()
    page.click("#submit")
    expect(page.locator("#progress")).to_have_text("2 / 6 rated")
    got = _ratings(store, "ana")
    assert (got[ids[0]]["score"], got[ids[0]]["accept"], got[ids[0]]["criteria"]) == (
        4, True, {"artifacts": True})
    assert (got[ids[1]]["score"], got[ids[1]]["accept"]) == (2, False)

    # Keyboard: the remaining tile of this prompt, then the next prompt's grid.
    expect(tiles).to_have_count(1)
    last = int(tiles.nth(0).get_attribute("data-id"))
    page.keyboard.press("5")
    page.keyboard.press("a")
    page.keyboard.press("Enter")
    expect(page.locator("#progress")).to_have_text("3 / 6 rated")
    expect(tiles).to_have_count(3)
    ids2 = [int(tiles.nth(i).get_attribute("data-id")) for i in range(3)]
    for key in ("3", "ArrowRight", "1", "r", "ArrowRight", "ArrowRight", "ArrowLeft", "4",
                "Enter"):
      page.keyboard.press(key)
    expect(page.locator("#progress")).to_have_text("6 / 6 rated")
    got = _ratings(store, "ana")
    assert (got[last]["score"], got[last]["accept"]) == (5, True)
    assert [(got[i]["score"], got[i]["accept"]) for i in ids2] == [(3, None), (1, False),
                                                                   (4, None)]
    assert len(got) == 6 and store.counts()["ratings"] == 6

    # Pairwise: left arrow, right arrow, then the tie button.
    page.goto(f"{url}/rate?mode=pair")
    expected = []
    for action in ("ArrowLeft", "ArrowRight", "tie"):
      box = page.locator("#pair")
      pair = (int(box.get_attribute("data-a")), int(box.get_attribute("data-b")))
      expected.append(pair + ({"ArrowLeft": "a", "ArrowRight": "b"}.get(action, "tie"),))
      with page.expect_navigation():  # the page reloads with the next pair once stored
        if action == "tie":
          page.click("button[data-pref=tie]")
        else:
          page.keyboard.press(action)
    pairs = [(p["candidate_a"], p["candidate_b"], p["preferred"]) for p in store.pairs()]
    assert pairs == expected

    # The admin sees the progress.
    page.click("text=log out")
    page.fill("input[name=token]", admin_token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/admin")
    expect(page.locator("#progress")).to_contain_text("6 / 6")
    browser.close()

"""The feedback export and the Selector's ratings reader agree on what a criterion means.

The rating page's checkboxes are problem flags (ticked = problem seen); the Selector's
criterion heads predict "criterion met". A ticked "artifacts" box must therefore become a LOW
artifacts target, an unticked one a high target.
"""

import numpy as np

from feedback_helpers import make_store
from fundax.feedback import export
from fundax.models.selector import CRITERIA
from fundax.selector import data as data_lib
from fundax.selector import ratings as ratings_lib


def test_exported_problem_flags_become_low_targets(tmp_path):
  store, _ = make_store(tmp_path, num_prompts=1, per_prompt=2)
  rater, _ = store.create_rater("dr_a")
  first, second = (c["id"] for c in store.candidates()[:2])
  store.add_rating(rater.id, first, request_id="r1", score=2, accept=False,
                   criteria={"artifacts": True, "prompt_match": True})
  store.add_rating(rater.id, second, request_id="r2", score=5, accept=True, criteria={})
  out = tmp_path / "ratings.jsonl"
  assert export.export_jsonl(store, out) == 2

  ratings, _ = ratings_lib.read_ratings(out, check_files=True)
  flagged, clean = sorted(ratings, key=lambda r: r.score)
  assert flagged.criteria["artifacts"] is False and flagged.criteria["prompt_match"] is False
  assert flagged.criteria["vessel_structure"] is True  # unticked: no problem seen
  assert all(clean.criteria[name] is True for name in CRITERIA)

  builder = data_lib.ExamplesBuilder(32)
  data_lib.add_ratings(builder, [flagged, clean], [], crop_fov=False)
  rows = builder.build().rows
  targets = dict(zip(CRITERIA, np.asarray(rows["criteria"][0])))
  assert targets["artifacts"] == 0.0 and targets["prompt_match"] == 0.0
  assert targets["optic_disc_clarity"] == 1.0
  np.testing.assert_array_equal(rows["criteria"][1], 1.0)
  assert rows["criteria_mask"].all()

  # write_ratings writes problem flags again: the same file meaning both ways.
  ratings_lib.write_ratings(tmp_path / "again.jsonl", [flagged], [])
  line = (tmp_path / "again.jsonl").read_text()
  assert '"artifacts": true' in line and '"vessel_structure": false' in line

"""`evaluate` end to end on phantom images standing in for generated ones (no diffusion model)."""

import json
import re

import jax
import numpy as np
import pytest

from fundax.data import captions
from fundax.data import labels as labels_lib
from fundax.data import phantom
from fundax.eval import evaluator as ev
from fundax.eval import run

CONFIG = {"width": 8, "stage_sizes": (1, 1), "heads": ev.HEADS, "contrast": True,
          "max_pool": True, "resolution": 64}


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory):
  # An untrained evaluator is enough to exercise the pipeline; its accuracy is not tested here.
  directory = tmp_path_factory.mktemp("ev") / "evaluator"
  model = ev.make_model(CONFIG)
  ev.save_evaluator(directory, ev.init_params(model, jax.random.key(0), 64), CONFIG)
  return str(directory)


def _stand_ins():
  """Two prompts x 3 phantom 'samples' each, plus 10 reference phantoms with other seeds."""
  asks = [labels_lib.FundusLabels(laterality="right", field="macula", dr_grade=2),
          labels_lib.FundusLabels(laterality="left", field="macula", dr_grade=0)]
  images, prompts = [], []
  for a, ask in enumerate(asks):
    for k in range(3):
      sample = phantom.generate(100 * a + k, 64, laterality=ask.laterality, field=ask.field,
                                dr_grade=ask.dr_grade)
      images.append(sample.image)
      prompts.append(captions.caption(ask))
  reference = [phantom.generate(1000 + i, 64) for i in range(10)]
  return np.stack(images), prompts, reference


def test_evaluate_on_phantom_stand_ins(evaluator_dir, tmp_path):
  images, prompts, reference = _stand_ins()
  ref_images = np.stack([r.image for r in reference])
  images[4] = ref_images[6]  # a planted copy of a "training" image
  heldout = [phantom.generate(2000 + i, 64) for i in range(8)]
  out = run.evaluate(
      images, prompts, evaluator_dir=evaluator_dir, reference_images=ref_images,
      out_dir=str(tmp_path / "report"), reference_labels=[r.labels for r in reference],
      heldout_images=np.stack([h.image for h in heldout]).astype(np.float32) / 127.5 - 1,
      heldout_labels=[h.labels for h in heldout], selector_scores=np.linspace(0, 1, 6),
      config={"kid_subsets": 5, "utility": {"width": 8, "stage_sizes": (1,), "steps": 3,
                                            "batch_size": 4}},
      note="phantom images standing in for generated ones")

  metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
  assert metrics["privacy"]["flagged"] == [False] * 4 + [True, False]
  assert metrics["privacy"]["closest_pairs"][0][:2] == [4, 6]
  assert set(metrics["diversity"]) == set(prompts)
  assert metrics["consistency"]["dr_grade"]["n"] == 6
  assert metrics["consistency"]["laterality"]["n"] == 6
  # Phantom discs sit where the laterality says, except in the planted (random) copy.
  assert metrics["anatomy"]["disc_side"]["n"] == 6
  assert metrics["anatomy"]["disc_side"]["accuracy"] >= 5 / 6
  assert set(metrics["utility"]) == {"synthetic", "synthetic+real"}
  assert metrics["selector"]["mean"] == pytest.approx(0.5)
  assert -1 <= metrics["selector"]["spearman_vs_consistency"] <= 1 or np.isnan(
      metrics["selector"]["spearman_vs_consistency"])
  assert np.isfinite(metrics["fidelity"]["frechet_distance"])

  html = (tmp_path / "report" / "report.html").read_text()
  assert out["report"].endswith("report.html")
  assert "SYNTHETIC IMAGES" in html and "Selector" in html
  srcs = re.findall(r'src="([^"]*)"', html)
  assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # self-contained
  # 2 prompt grids + 2 confusion plots at least + privacy pairs + 2 histograms.
  assert len(srcs) >= 2 + 2 + 1 + 2


def test_evaluate_rejects_mismatched_prompts(evaluator_dir, tmp_path):
  images = np.zeros((2, 64, 64, 3), np.float32)
  with pytest.raises(ValueError, match="2 images but 1 prompts"):
    run.evaluate(images, ["x"], evaluator_dir=evaluator_dir, reference_images=images,
                 out_dir=str(tmp_path))


def test_generate_from_checkpoint_glue(monkeypatch):
  # Only fundax.eval's use of fundax.sampling is tested here (a stub sampler): real sampling
  # from a trained checkpoint is tested by the sampling module's own tests.
  from fundax import sampling
  calls = []
  monkeypatch.setattr(sampling, "load_pipeline", lambda d: type("P", (), {
      "models": None, "params": {"checkpoint": d}})())
  monkeypatch.setattr(sampling, "tokenize_prompts", lambda p, prompts: {
      "input_ids": np.array([[len(t)] for t in prompts]), "attention_mask": None})

  def make_generate_fn(models, num_steps):
    def fn(params, ids, mask, key, guidance):
      calls.append((params["checkpoint"], len(ids), num_steps, guidance))
      return np.broadcast_to(ids[:, :, None, None] / 100.0, (len(ids), 64, 64, 3))
    return fn
  monkeypatch.setattr(sampling, "make_generate_fn", make_generate_fn)
  config = {**run.DEFAULTS, "samples_per_prompt": 3, "batch_size": 4, "num_steps": 7}
  images, prompts = run.generate_from_checkpoint("/ckpt", ["a", "bb"], config)
  assert prompts == ["a"] * 3 + ["bb"] * 3
  assert images.shape == (6, 64, 64, 3)
  np.testing.assert_allclose(images[:, 0, 0, 0], [0.01] * 3 + [0.02] * 3)
  assert calls == [("/ckpt", 4, 7, 7.5)] * 2  # the last batch is padded: one compile

"""Selector unit tests: losses, threshold and metrics by hand, the ratings reader, batches, model."""

import functools
import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fundax.data import labels as labels_lib
from fundax.models import selector as selector_lib
from fundax.selector import data as data_lib
from fundax.selector import losses
from fundax.selector import ratings as ratings_lib
from fundax.selector import threshold as threshold_lib

C = len(selector_lib.CRITERIA)


# ----------------------------------------------------------------------------- losses

def test_bradley_terry_hand_values():
  bt = lambda a, b, t: float(losses.bradley_terry_loss(  # noqa: E731
      jnp.array([a]), jnp.array([b]), jnp.array([t]))[0])
  for target in (0.0, 0.5, 1.0):  # equal logits: log 2 whatever the preference
    assert bt(0.7, 0.7, target) == pytest.approx(math.log(2.0), abs=1e-6)
  assert bt(1.0, 0.0, 1.0) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)  # 0.3133
  assert bt(1.0, 0.0, 0.0) == pytest.approx(math.log(1 + math.exp(1)), abs=1e-6)  # 1.3133
  assert bt(3.0, 1.0, 0.5) == pytest.approx(
      0.5 * (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))), abs=1e-6)
  # Only the difference matters.
  assert bt(5.0, 4.0, 1.0) == pytest.approx(bt(1.0, 0.0, 1.0), abs=1e-6)


def _batch(b=4):
  rng = np.random.default_rng(0)
  return {
      "accept": jnp.array([1.0, 0.0, 0.5, 1.0]), "accept_mask": jnp.array([1, 1, 0, 1], bool),
      "score_target": jnp.array([0.75, 0.0, 0.0, 0.25]),
      "score_mask": jnp.array([1, 0, 0, 1], bool),
      "criteria": jnp.asarray(rng.integers(0, 2, (b, C)), jnp.float32),
      "criteria_mask": jnp.asarray(rng.integers(0, 2, (b, C)), bool),
      "weight": jnp.array([1.0, 2.0, 1.0, 0.5]),
      "pair_other": jnp.array([0, 1, 3, 3]), "pair_target": jnp.array([0.0, 0.0, 1.0, 0.0]),
      "pair_mask": jnp.array([0, 0, 1, 0], bool),
  }


_OUT = {"logit": jnp.array([0.3, -1.2, 0.8, 2.0]),
        "criteria": jnp.asarray(np.random.default_rng(1).normal(size=(4, C)), jnp.float32)}
_LW = {"accept": 1.0, "score": 1.0, "pair": 1.0, "criteria": 0.5}


def test_masked_labels_do_not_change_the_loss():
  batch = _batch()
  total, metrics = losses.selector_loss(_OUT, batch, _LW)
  changed = dict(batch)
  changed["accept"] = batch["accept"].at[2].set(jnp.nan)  # masked accept label
  changed["score_target"] = batch["score_target"].at[1].set(1.0)  # masked score
  cm = np.asarray(batch["criteria_mask"])
  changed["criteria"] = jnp.where(cm, batch["criteria"], 1.0 - batch["criteria"])
  changed["pair_target"] = batch["pair_target"].at[0].set(1.0)  # row 0 is not a pair row
  total2, metrics2 = losses.selector_loss(_OUT, changed, _LW)
  assert float(total2) == pytest.approx(float(total), abs=1e-6)
  # A label that is *not* masked does change it: the test can fail.
  changed["accept"] = batch["accept"].at[0].set(0.0)
  assert float(losses.selector_loss(_OUT, changed, _LW)[0]) != pytest.approx(float(total))
  assert float(metrics["num_accept"]) == 3 and float(metrics["num_pair"]) == 1


def test_accept_term_by_hand():
  batch = _batch()
  _, m = losses.selector_loss(_OUT, batch, _LW)
  bce = lambda z, y: -(y * math.log(1 / (1 + math.exp(-z)))  # noqa: E731
                       + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
  expected = (1.0 * bce(0.3, 1.0) + 2.0 * bce(-1.2, 0.0) + 0.5 * bce(2.0, 1.0)) / 3
  assert float(m["loss_accept"]) == pytest.approx(expected, rel=1e-5)
  # Pair term: row 2 against row 3, target 1, weight 1.
  assert float(m["loss_pair"]) == pytest.approx(math.log(1 + math.exp(-(0.8 - 2.0))), rel=1e-5)


def test_rater_weights_scale_the_loss():
  batch = _batch()
  _, m = losses.selector_loss(_OUT, batch, _LW)
  doubled = dict(batch, weight=batch["weight"] * 2)
  _, m2 = losses.selector_loss(_OUT, doubled, _LW)
  for term in losses.TERMS:
    assert float(m2[f"loss_{term}"]) == pytest.approx(2 * float(m[f"loss_{term}"]), rel=1e-6)
  # Weight 0 silences a row: its label no longer matters.
  silenced = dict(batch, weight=batch["weight"].at[0].set(0.0))
  a = losses.selector_loss(_OUT, silenced, _LW)[0]
  b = losses.selector_loss(_OUT, dict(silenced, accept=batch["accept"].at[0].set(0.0)), _LW)[0]
  assert float(a) == pytest.approx(float(b), abs=1e-7)


# ----------------------------------------------------------------------------- threshold

SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
LABELS = np.array([0, 0, 1, 0, 1, 0, 1, 1, 1])


@pytest.mark.parametrize("target, threshold, precision, recall", [
    (0.8, 0.5, 4 / 5, 4 / 5),
    (0.7, 0.3, 5 / 7, 1.0),  # precision is not monotone: 0.6 gives 0.75, 0.4 gives 0.67
    (1.0, 0.7, 1.0, 3 / 5),
])
def test_choose_threshold_hand_cases(target, threshold, precision, recall):
  t = threshold_lib.choose_threshold(SCORES, LABELS, target)
  assert t.reached
  assert t.threshold == pytest.approx(threshold)
  assert t.precision == pytest.approx(precision)
  assert t.recall == pytest.approx(recall)
  assert t.num_accepted == int((SCORES >= threshold).sum())


def test_unreachable_target_takes_highest_threshold(caplog):
  with caplog.at_level(logging.WARNING):
    t = threshold_lib.choose_threshold(SCORES, np.zeros(9, int), 0.9)
  assert not t.reached and t.threshold == pytest.approx(0.9) and t.precision == 0.0
  assert "unreachable" in caplog.text
  # Tied scores are accepted together: 0.5 can only give 1/2.
  t = threshold_lib.choose_threshold([0.5, 0.5, 0.4], [1, 0, 1], 0.9)
  assert not t.reached and t.threshold == 0.5 and t.precision == 0.5 and t.num_accepted == 2
  with pytest.raises(ValueError):
    threshold_lib.choose_threshold([], [], 0.9)


def test_auroc_and_average_precision_hand_cases():
  s, y = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
  assert threshold_lib.roc_auc(s, y) == pytest.approx(0.75)
  assert threshold_lib.average_precision(s, y) == pytest.approx((1 + 2 / 3) / 2)
  assert threshold_lib.roc_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # a tie counts 1/2
  assert threshold_lib.roc_auc([0.2, 0.9], [0, 1]) == pytest.approx(1.0)
  assert math.isnan(threshold_lib.roc_auc([0.2, 0.9], [1, 1]))


def test_ece_hand_cases():
  s, y = [0.15, 0.25, 0.85, 0.95], [0, 1, 1, 1]
  ece, bins = threshold_lib.expected_calibration_error(s, y, num_bins=10)
  assert ece == pytest.approx((0.15 + 0.75 + 0.15 + 0.05) / 4)
  assert sum(bins["count"]) == 4 and len(bins["edges"]) == 11
  ece2, _ = threshold_lib.expected_calibration_error(s, y, num_bins=2)
  assert ece2 == pytest.approx(0.5 * abs(0.5 - 0.2) + 0.5 * abs(1.0 - 0.9))
  assert threshold_lib.expected_calibration_error([1.0, 0.0], [1, 0], 15)[0] == 0.0


def test_evaluate_and_plots(tmp_path):
  report = threshold_lib.evaluate(SCORES, LABELS, 0.8, num_bins=10)
  assert report["num"] == 9 and report["num_positive"] == 5
  assert report["threshold"]["threshold"] == pytest.approx(0.5)
  json.dumps(report)
  paths = threshold_lib.plot_report(report, tmp_path, prefix="x_")
  assert sorted(p.rsplit("/", 1)[1] for p in paths) == [
      "x_pr.png", "x_reliability.png", "x_roc.png"]
  for p in paths:
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- ratings reader

def _rating(**kw):
  obj = {"kind": "rating", "candidate_id": "c1", "image_path": "/x/a.png", "prompt": "left eye",
         "rater": "r1", "rater_weight": 1.5, "simulated": False, "score": 4, "accept": True,
         "criteria": {"optic_disc_clarity": True, "vessel_structure": None,
                      "contrast_illumination": False, "artifacts": True, "prompt_match": None}}
  obj.update(kw)
  return obj


def _pair(**kw):
  obj = {"kind": "pair", "image_a": "/x/a.png", "image_b": "/x/b.png", "prompt": None,
         "preferred": "a", "rater": "r2", "rater_weight": 1}
  obj.update(kw)
  return obj


def _write(path, objs):
  path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
  return path


def test_read_ratings_valid(tmp_path):
  path = _write(tmp_path / "r.jsonl", [_rating(), "", _pair(), _rating(score=None, accept=None,
                                                                        extra_field=3)])
  ratings, pairs = ratings_lib.read_ratings(path)
  assert len(ratings) == 2 and len(pairs) == 1
  r = ratings[0]
  assert r.rater_weight == 1.5 and r.score == 4 and r.accept is True and r.line == 1
  # File flags are problems (true = problem seen); Rating.criteria says "met".
  assert r.criteria["contrast_illumination"] is True and r.criteria["vessel_structure"] is None
  assert r.criteria["artifacts"] is False and r.criteria["optic_disc_clarity"] is False
  assert pairs[0].target == 1.0 and pairs[0].line == 3
  ratings_lib.write_ratings(tmp_path / "w.jsonl", ratings, pairs)
  again = ratings_lib.read_ratings(tmp_path / "w.jsonl")
  assert again[0][0].criteria == r.criteria and again[1][0].preferred == "a"


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (_rating(kind="vote"), "unknown kind"),
    (_rating(score=6), "score must be"),
    (_rating(score=3.5), "'score'"),
    (_rating(accept="yes"), "'accept'"),
    (_rating(image_path="rel/a.png"), "absolute path"),
    (_rating(rater_weight=-1), "rater_weight"),
    (_rating(rater_weight=True), "rater_weight"),
    (_rating(criteria={"sharpness": True}), "unknown criteria"),
    (_rating(criteria={"artifacts": 1}), "'artifacts'"),
    ({k: v for k, v in _rating().items() if k != "image_path"}, "missing required field"),
    (_pair(preferred="c"), "preferred must be"),
])
def test_read_ratings_rejects_malformed_line_naming_it(tmp_path, bad, message):
  path = _write(tmp_path / "r.jsonl", [_rating(), _pair(), bad])
  with pytest.raises(ratings_lib.RatingsFormatError) as err:
    ratings_lib.read_ratings(path)
  assert "r.jsonl:3:" in str(err.value) and message in str(err.value)


def test_read_ratings_check_files(tmp_path):
  path = _write(tmp_path / "r.jsonl", [_rating(image_path=str(tmp_path / "missing.png"))])
  with pytest.raises(FileNotFoundError, match="r.jsonl:1"):
    ratings_lib.read_ratings(path, check_files=True)


# ----------------------------------------------------------------------------- data and model

def test_labels_from_grades_and_defects():
  assert data_lib.grade_target("good", 0.5) == 1.0
  assert data_lib.grade_target("usable", 0.3) == 0.3
  assert data_lib.grade_target("reject", 0.5) == 0.0
  crit = data_lib.defect_criteria(("dust_artifact",))
  assert crit == {"optic_disc_clarity": True, "vessel_structure": True,
                  "contrast_illumination": True, "artifacts": False}
  assert all(v is None for v in data_lib.defect_criteria(None).values())


def _examples(num_pairs=2):
  b = data_lib.ExamplesBuilder(16)
  img = lambda v: (lambda: np.full((20, 20, 3), v, np.uint8))  # noqa: E731
  for i in range(5):
    idx = b.add_image(f"i{i}", img(40 * i))
    b.add_row(idx, f"prompt {i}" if i % 2 else None, accept=float(i % 2), score=i + 1,
              criteria={"artifacts": bool(i % 2)}, weight=1.0 + i, eval_label=i % 2)
  for k in range(num_pairs):
    b.add_pair(k, k + 1, "pair prompt", 1.0, 3.0)
  ex = b.build()
  data_lib.embed_prompts(ex, lambda ps: np.stack([np.full(4, len(p), np.float32) for p in ps]), 4)
  return ex


def test_sample_batch_layout_and_determinism():
  ex = _examples()
  batch = data_lib.sample_batch(ex, 0, 3, 8, pairs_per_batch=2)
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
  assert batch["criteria"].shape == (8, C)
  np.testing.assert_array_equal(batch["pair_mask"], [0, 0, 0, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(batch["pair_other"][[4, 6]], [5, 7])
  assert (batch["weight"][[4, 6]] == 3.0).all() and (batch["weight"][[5, 7]] == 0).all()
  assert not batch["accept_mask"][4:].any() and not batch["criteria_mask"][4:].any()
  # Rows without a prompt never get a prompt_match label.
  pm = selector_lib.CRITERIA.index("prompt_match")
  assert not (ex.rows["criteria_mask"][:, pm] & ~ex.has_text).any()
  again = data_lib.sample_batch(ex, 0, 3, 8, pairs_per_batch=2)
  other = data_lib.sample_batch(ex, 0, 4, 8, pairs_per_batch=2)
  np.testing.assert_array_equal(batch["image"], again["image"])
  assert not all(np.array_equal(batch[k], other[k]) for k in batch)
  no_pairs = data_lib.sample_batch(_examples(0), 0, 0, 8, pairs_per_batch=2)
  assert not no_pairs["pair_mask"].any()


def test_model_outputs_and_null_prompt():
  model = selector_lib.Selector(width=8, patch_size=4, stage_multipliers=(1, 2), head_dim=16,
                                text_dim=6)
  params = jax.jit(selector_lib.init_params, static_argnums=(0, 2))(model, jax.random.key(0), 32)
  apply = jax.jit(lambda m, *a: m.apply({"params": params}, *a), static_argnums=0)
  image = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3), minval=-1, maxval=1)
  text = jax.random.normal(jax.random.key(2), (3, 6))
  out = apply(model, image, text, jnp.array([True, False, True]))
  assert out["logit"].shape == (3,) and out["criteria"].shape == (3, C)
  no_text = apply(model, image, None)
  np.testing.assert_allclose(out["logit"][1], no_text["logit"][1], rtol=1e-5, atol=1e-6)
  assert abs(float(out["logit"][0] - no_text["logit"][0])) > 0  # the prompt is used
  # Other image sizes and bfloat16 compute work; logits stay float32.
  bf = selector_lib.make_selector(model.to_config(), dtype=jnp.bfloat16)
  out64 = apply(bf, jnp.zeros((2, 64, 64, 3)), text[:2])
  assert out64["logit"].dtype == jnp.float32 and out64["criteria"].shape == (2, C)
  assert selector_lib.make_selector(json.loads(json.dumps(model.to_config()))) == model


def test_train_step_skips_a_nan_batch():
  """A NaN image makes the loss NaN: the step leaves params and optimizer state as they were,
  advances the step and reports nonfinite = 1; a clean batch updates as usual."""
  from fundax.selector import train as train_lib  # pylint: disable=g-import-not-at-top
  from fundax.train import optim  # pylint: disable=g-import-not-at-top
  from fundax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  model = selector_lib.Selector(width=8, patch_size=4, stage_multipliers=(1,), head_dim=8,
                                text_dim=4)
  optimizer = optim.make_optimizer({"lr": 1e-2, "total_steps": 10, "warmup_steps": 0})
  state = state_lib.create(selector_lib.init_params(model, jax.random.key(0), 16), optimizer)
  step = jax.jit(functools.partial(train_lib.train_step, model=model, optimizer=optimizer,
                                   loss_weights=_LW))
  clean = data_lib.sample_batch(_examples(), 0, 0, 8, pairs_per_batch=2)
  bad = {**clean, "image": clean["image"].copy()}
  bad["image"][0, 0, 0, 0] = np.nan
  skipped, metrics = step(state, bad, jax.random.key(0))
  assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
  assert int(skipped.step) == 1
  jax.tree.map(np.testing.assert_array_equal, (skipped.params, skipped.opt_state),
               (state.params, state.opt_state))
  updated, metrics = step(state, clean, jax.random.key(0))
  assert float(metrics["nonfinite"]) == 0.0 and int(updated.step) == 1
  assert not np.array_equal(updated.params["overall"]["kernel"],
                            state.params["overall"]["kernel"])


def test_graded_rows_from_a_tfds_style_source():
  # EyeQ-style records: a quality grade but no defects -> image criteria unlabelled.
  def record(i, quality):
    labels = labels_lib.FundusLabels(laterality="left", quality=quality, dr_grade=i % 5)
    return {"image": np.full((40, 30, 3), 60 + i, np.uint8), "labels": labels.to_json(),
            "caption": "x", "id": f"img{i}", "synthetic": False}
  source = [record(i, q) for i, q in enumerate(("good", "usable", "reject", "good"))]
  items = data_lib.source_items(source, crop_fov=False)
  builder = data_lib.ExamplesBuilder(16)
  data_lib.add_graded(builder, items, np.random.default_rng(0), usable_target=0.4,
                      mismatch_fraction=1.0)
  ex = builder.build()
  first = ex.rows["image_index"] != np.r_[-1, ex.rows["image_index"][:-1]]
  np.testing.assert_allclose(ex.rows["accept"][first], [1.0, 0.4, 0.0, 1.0])
  np.testing.assert_array_equal(ex.rows["eval_label"][first], [1, -1, 0, 1])
  pm = selector_lib.CRITERIA.index("prompt_match")
  assert not ex.rows["criteria_mask"][:, :pm].any()  # no defects known
  # Mismatched-prompt rows carry only prompt_match = False.
  mism = ~first
  assert mism.any() and not ex.rows["accept_mask"][mism].any()
  assert (ex.rows["criteria"][mism, pm] == 0).all() and ex.rows["criteria_mask"][mism, pm].all()
  assert all("quality" not in p and "ungradable" not in p for p in ex.prompts)
  assert ex.images.shape == (4, 16, 16, 3)


@pytest.mark.parametrize("variant", [None, "tiny", "eyeq"])
def test_config_variants_load_locked(variant):
  from fundax import configlib  # pylint: disable=g-import-not-at-top
  config = configlib.load_config("configs/selector.py" + (f":{variant}" if variant else ""))
  with pytest.raises(AttributeError):
    config.not_a_field = 1
  configlib.apply_overrides(config, ["num_steps=7"])
  assert config.optim.total_steps == 7  # the schedule follows the run length
  assert set(config.loss_weights) == set(losses.TERMS)
  assert config.batch_size % 8 == 0 and config.eval_batch_size % 8 == 0

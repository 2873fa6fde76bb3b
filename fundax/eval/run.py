"""`evaluate`: every independent metric of a set of generated images, written as JSON + HTML.

The images come either from a checkpoint directory (generated here through `fundax.sampling`)
or pre-generated with their prompts. They are measured by judges the generator never trains
against (fundax.eval.readings), each beside what real images score and what a known failure
scores (fundax.eval.references):

  fidelity      Fréchet distance, KID, precision/recall on evaluator features (and on a
                user-supplied Inception feature function when `inception_path` is set)
  C2ST          a classifier trained to tell the images from prompt-matched phantoms
  diversity     mean pairwise MS-SSIM among samples of the same prompt
  consistency   prompt (parsed) vs the evaluator's readings, per attribute it reads reliably
  anatomy       laterality from the detected disc (fovea), vessel fraction as a ratio
  privacy       nearest training image in pixel and feature space; near-copies flagged
  utility       TSTR DR-grade classifier (when held-out labelled images are given)

The Selector's scores, when passed, are reported beside these but used by none of them.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
import tqdm
from scipy import stats

from fundax import images as images_lib
from fundax.data import captions
from fundax.eval import anatomy_checks
from fundax.eval import c2st as c2st_lib
from fundax.eval import evaluator as evaluator_lib
from fundax.eval import metrics as metrics_lib
from fundax.eval import readings as readings_lib
from fundax.eval import references
from fundax.eval import report
from fundax.eval import utility

log = logging.getLogger(__name__)

DEFAULTS = {
    "kid_subsets": 50,  # random subset pairs for KID
    "kid_subset_size": 1000,  # samples per KID subset (clipped to the set sizes)
    "pr_k": 3,  # neighbourhood size of precision/recall
    "pixel_threshold": 0.05,  # privacy: RMS pixel distance ([-1, 1] scale) below = near-copy
    "feature_threshold": 0.2,  # privacy: feature NN distance / median train NN distance
    "num_pairs": 8,  # closest pairs shown in the report
    "inception_path": None,  # serialized jax.export feature function (metrics.load_feature_fn)
    "utility": {},  # overrides of utility.DEFAULTS for the TSTR classifier
    "seed": 0,  # KID subsets and generation noise
    "samples_per_prompt": 4,  # images per prompt when generating from a checkpoint
    "num_steps": 50,  # sampler steps when generating from a checkpoint
    "guidance_scale": 7.5,  # classifier-free guidance when generating from a checkpoint
    "batch_size": 8,  # images per generation call
    "c2st": {},  # overrides of c2st.DEFAULTS for the two-sample tests' classifier
    "num_workers": 0,  # processes rendering the prompt-matched phantoms
}


def generate_from_checkpoint(checkpoint, prompts: Sequence[str],
                             config: Mapping) -> tuple[np.ndarray, list[str]]:
  """Samples `samples_per_prompt` images per prompt with `fundax.sampling`.

  Args:
    checkpoint: an LDM trainer's checkpoint directory, or a `sampling.Pipeline` loaded from one.
    prompts: distinct prompts.
    config: evaluate options (samples_per_prompt, num_steps, guidance_scale, batch_size, seed).

  Returns:
    (images [N, H, W, 3] float32 in [-1, 1], the N prompts, each repeated per sample).

  Raises:
    FloatingPointError: the images hold NaN/inf (damaged or diverged weights).
  """
  from fundax import sampling  # pylint: disable=g-import-not-at-top  (only this path needs it)
  pipeline = (checkpoint if isinstance(checkpoint, sampling.Pipeline)
              else sampling.load_pipeline(checkpoint))
  generate_fn = sampling.make_generate_fn(pipeline.models, num_steps=config["num_steps"])
  repeated = [p for p in prompts for _ in range(config["samples_per_prompt"])]
  key = jax.random.key(config["seed"])
  images = []
  bs = config["batch_size"]
  for start in tqdm.trange(0, len(repeated), bs, desc="generating"):
    batch = repeated[start:start + bs]
    # The last batch is padded to full size so the jitted sampler compiles once.
    tokens = sampling.tokenize_prompts(pipeline, batch + [batch[-1]] * (bs - len(batch)))
    out = generate_fn(pipeline.params, tokens["input_ids"], tokens["attention_mask"],
                      jax.random.fold_in(key, start), config["guidance_scale"],
                      mirror=tokens["mirror"])
    images.append(np.asarray(out)[:len(batch)])
  return sampling.check_finite(np.concatenate(images), "the generated images"), repeated


def _to_float(images) -> np.ndarray:
  """NHWC images as float32 in [-1, 1] (uint8 is rescaled)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


def _spearman(a, b) -> float:
  """Spearman's rho of two paired series over their finite pairs; NaN when undefined."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  ok = np.isfinite(a) & np.isfinite(b)
  a, b = a[ok], b[ok]
  if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return float("nan")
  return float(stats.spearmanr(a, b).statistic)


def _selector_section(scores, generated: Mapping) -> dict:
  """The Selector's scores beside the independent judges: its mean and its Spearman with each
  per-image independent measure (a Selector the generator has learnt to please stops tracking
  them)."""
  scores = np.asarray(scores, float)
  c = generated["consistency"]
  measures = {"share of stated attributes confirmed": c["per_image_fraction"],
              "evaluator P(good quality)": generated["quality_good"]}
  if "anatomy" in generated:
    measures["vessel fraction"] = generated["anatomy"]["vessel_fraction"]
  spearman = {name: _spearman(scores, values) for name, values in measures.items()}
  return {"mean": float(scores.mean()), "scores": scores.tolist(), "spearman": spearman,
          "spearman_vs_consistency": spearman["share of stated attributes confirmed"]}


def _c2st_rows(matched, sets: Mapping[str, np.ndarray], config: Mapping) -> tuple[dict, list]:
  """C2ST of the generated images, the second phantom set and the blurred control against the
  prompt-matched phantoms, and its table row."""
  results = {name: c2st_lib.c2st(matched, sets[name], config["c2st"])
             for name in ("generated", "phantoms", "blurred")}
  row = readings_lib.Row("C2ST accuracy vs prompt-matched phantoms (0.5 = indistinguishable)",
                         None, readings_lib.HALF, "blurred", "C2ST classifier")
  values = [results[n]["accuracy"] for n in ("generated", "phantoms", "blurred")]
  return results, [readings_lib.table_row(row, *values)]


def _privacy_row(readings: Mapping) -> dict:
  row = readings_lib.Row("near-copies of training images (fraction)", None, readings_lib.LOWER,
                         "copies", "NN audit")
  return readings_lib.table_row(row, *(readings[n]["privacy"]["fraction_flagged"]
                                       for n in ("generated", "phantoms", "copies")))


def _utility_rows(utility: Mapping) -> list[dict]:
  out = []
  for key, label in (("qwk", "DR QWK"), ("referable_auroc", "referable-DR AUROC")):
    row = readings_lib.Row(f"TSTR {label} (train on generated, test on held-out phantoms)",
                           None, readings_lib.HIGHER, "shuffled labels", "TSTR classifier")
    out.append(readings_lib.table_row(row, utility["synthetic"][key], utility["real"][key],
                                      utility["shuffled labels"][key]))
  return out


def evaluate(source, prompts: Sequence[str], *, evaluator_dir: str, reference_images,
             out_dir: str, reference_labels=None, heldout_images=None, heldout_labels=None,
             selector_scores=None, config: Mapping | None = None,
             note: str = "", sections: Sequence[str] = ()) -> dict:
  """Evaluates generated images with judges independent of the Selector, against references.

  Every figure is read beside what real images score on the same number of images and what
  a negative control scores (`fundax.eval.references`): the generated images are compared
  with phantoms drawn with the facts their prompts state ("matched"), a second such set
  stands for real data ("phantoms": the floor of a distance, the ceiling of an agreement),
  and each metric's control (blurred, mirrored, shifted prompts, collapsed, noisy copies of
  training images, shuffled TSTR labels) must score clearly worse than "phantoms".

  Args:
    source: a checkpoint directory (str / PathLike: images are generated from `prompts`,
      `samples_per_prompt` each) or an array [N, H, W, 3] of pre-generated images (float in
      [-1, 1] or uint8), one per entry of `prompts`.
    prompts: the prompts (distinct ones for a checkpoint; one per image otherwise).
    evaluator_dir: the trained evaluator's params directory.
    reference_images: [M, H', W', 3] real (or phantom) images: the fidelity reference and the
      training set of the privacy audit; resized to the generated images' size.
    out_dir: where metrics.json and report.html go (created).
    reference_labels: optional FundusLabels of the reference images; with held-out data, the
      DR-graded ones are added to the synthetic images in the synthetic + real TSTR arm.
    heldout_images: optional [T, H', W', 3] labelled held-out images for TSTR (resized too).
    heldout_labels: their FundusLabels (DR grade needed).
    selector_scores: optional [N] Selector scores of the images, shown beside the metrics.
    config: overrides of DEFAULTS.
    note: a line shown at the top of the report (e.g. what the images really are).
    sections: HTML sections appended to the report (e.g. the main job's RLHF rounds).

  Returns:
    The metrics dict (also written to out_dir/metrics.json), with "report" and "metrics_json"
    paths. "table" holds the rows (metric, generated, phantoms, control, control_set,
    better, separated, measured_by); "fidelity", "diversity", "consistency", "anatomy",
    "privacy" and "utility" are the generated images' readings, "sets" every set's summary,
    "c2st" the two-sample tests.
  """
  config = {**DEFAULTS, **dict(config or {})}
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if isinstance(source, (str, os.PathLike)):
    images, prompts = generate_from_checkpoint(os.fspath(source), prompts, config)
  else:
    images = np.asarray(source)
    prompts = list(prompts)
  images = _to_float(images)
  if not np.isfinite(images).all():
    raise FloatingPointError("the images to evaluate hold NaN/inf pixels (damaged or diverged "
                             "weights?); no metrics were written")
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
  size = images.shape[1]
  # Reference and held-out images are compared at the generated size (pixel-space privacy).
  reference = evaluator_lib.resize(reference_images, size)

  steps = tqdm.tqdm(total=5, desc="evaluate")
  matched, matched_labels = references.prompt_matched(prompts, size,
                                                      num_workers=config["num_workers"])
  second, _ = references.prompt_matched(prompts, size, first_seed=references.SECOND_SEED,
                                        num_workers=config["num_workers"])
  matched, second = _to_float(matched), _to_float(second)
  ev = evaluator_lib.load_evaluator(evaluator_dir)
  reference_features = ev.features(reference)
  vessel_reference = float(np.mean([anatomy_checks.vessel_fraction(x) for x in matched]))
  blurred = references.blurred(second)
  sets = {  # name -> (images, prompts, anatomy, privacy)
      "generated": (images, prompts, True, True),
      "phantoms": (second, prompts, True, True),
      "blurred": (blurred, prompts, True, False),
      "mirrored": (references.mirrored(second), prompts, True, False),
      "shifted prompts": (second, references.shifted_prompts(prompts), False, False),
      "collapsed": (references.collapsed(second, prompts), prompts, False, False),
      "copies": (references.noisy_copies(reference, len(images)), prompts, False, True),
  }
  steps.update()
  readings = {}
  for name, (set_images, set_prompts, anatomy, audit) in sets.items():
    readings[name] = readings_lib.read(
        set_images, set_prompts, ev, reference_features, config=config,
        vessel_reference=vessel_reference, anatomy=anatomy,
        reference_images=reference if audit else None)
  steps.update()
  c2st_results, c2st_rows = _c2st_rows(
      matched, {"generated": images, "phantoms": second, "blurred": blurred}, config)
  steps.update()
  generated = readings["generated"]
  results = {"num_images": len(images), "num_reference": len(reference), "note": note,
             "config": config, "readable": list(ev.readable or ()),
             "evaluator_heldout": dict(ev.heldout), "c2st": c2st_results,
             "vessel_fraction_matched": vessel_reference}
  for key in ("fidelity", "diversity", "consistency", "anatomy", "privacy"):
    results[key] = generated[key]
  results["diversity_by_prompt"] = generated["diversity_by_prompt"]
  extra = c2st_rows + [_privacy_row(readings)]
  if config["inception_path"]:
    feature_fn = metrics_lib.load_feature_fn(config["inception_path"])
    reference_inception = feature_fn(reference)
    inception = {name: metrics_lib.fidelity(
        reference_inception, feature_fn(sets[name][0]), k=config["pr_k"],
        kid_subsets=config["kid_subsets"], kid_subset_size=config["kid_subset_size"])
                 for name in ("generated", "phantoms", "blurred")}
    results["fidelity_inception"] = inception["generated"]
    row = readings_lib.Row("FID (user-supplied Inception)", None, readings_lib.LOWER, "blurred",
                           "Inception", relative=True)
    extra.append(readings_lib.table_row(
        row, *(inception[n]["frechet_distance"] for n in ("generated", "phantoms", "blurred"))))
  if heldout_images is not None:
    asked = [captions.parse_caption(p).dr_grade for p in prompts]
    keep = np.array([g is not None for g in asked])
    real = {}
    if reference_labels is not None:
      graded = np.array([l.dr_grade is not None for l in reference_labels])
      real = {"real_images": reference[graded],
              "real_grades": np.array([l.dr_grade for l in reference_labels])[graded]}
    results["utility"] = utility.tstr(
        images[keep], np.array([g for g in asked if g is not None]),
        evaluator_lib.resize(heldout_images, size),
        np.array([l.dr_grade for l in heldout_labels]),
        matched_images=matched[keep],
        matched_grades=np.array([l.dr_grade for l in matched_labels])[keep],
        config=config["utility"], **real)
    extra += _utility_rows(results["utility"])
  steps.update()
  results["table"] = readings_lib.rows(readings, extra)
  results["sets"] = {name: {k: v for k, v in r.items() if k not in ("features", "predictions")}
                     for name, r in readings.items()}
  generated["quality_good"] = evaluator_lib.predict_proba(
      ev.model, ev.params, ev.prepare(images))["quality"][:, 0].tolist()
  if selector_scores is not None:
    results["selector"] = _selector_section(selector_scores, generated)
  steps.update()
  steps.close()

  metrics_path = out / "metrics.json"
  metrics_path.write_text(json.dumps(results, indent=2, default=_json_default))
  report_path = out / "report.html"
  report_path.write_text(report.render(results, images=images, prompts=prompts,
                                       training_images=reference, sections=sections),
                         encoding="utf-8")
  log.info("wrote %s and %s", metrics_path, report_path)
  return {**results, "metrics_json": str(metrics_path), "report": str(report_path)}


def _json_default(value):
  """numpy scalars and arrays in metrics.json."""
  if isinstance(value, np.ndarray):
    return value.tolist()
  return float(value)


PHANTOM = "phantom"  # `evaluate_checkpoint(data=...)`: the phantom splits, rendered from seeds
SAMPLES_DIR = "samples"  # `evaluate_checkpoint`'s generated PNGs, under its out_dir

# `evaluate_checkpoint(data=...)`: (split, num) -> (`num` images of the split, at most, uint8
# or float in [-1, 1]; their FundusLabels).
Loader = Callable[[str, int], tuple[np.ndarray, list]]


def phantom_data(split: str, num: int, resolution: int) -> tuple[np.ndarray, list]:
  """The first `num` images (uint8) and labels of a fundus_phantom split, rendered from seeds.

  The phantom dataset's example i of a split is `phantom.generate(split_seed(split, i))`, so
  this reproduces the images an LDM trained on that split saw, without the built dataset.
  """
  from fundax.data import phantom  # pylint: disable=g-import-not-at-top
  from fundax.data.builders import fundus_phantom  # pylint: disable=g-import-not-at-top
  samples = [phantom.generate(fundus_phantom.split_seed(split, i), resolution)
             for i in tqdm.trange(num, desc=f"phantom {split} images")]
  return np.stack([s.image for s in samples]), [s.labels for s in samples]


def dataset_data(name: str, data_dir: str | None, split: str, num: int,
                 seed: int) -> tuple[np.ndarray, list]:
  """`num` randomly chosen images (uint8, at the first one's size) and labels of a built
  fundax dataset split (`fundax data build`)."""
  from fundax.data import datasets  # pylint: disable=g-import-not-at-top
  from fundax.data import pipeline  # pylint: disable=g-import-not-at-top
  from fundax.data.builders import features  # pylint: disable=g-import-not-at-top
  source = datasets.load(name, split, data_dir)
  if not len(source):
    raise ValueError(f"split {split!r} of dataset {name} is empty")
  picks = np.sort(np.random.default_rng(seed).choice(len(source), min(num, len(source)),
                                                     replace=False))
  examples = [features.decode_example(source[int(i)])
              for i in tqdm.tqdm(picks, desc=f"{name} {split} images")]
  size = examples[0]["image"].shape[0]
  return (np.stack([pipeline.resize(e["image"], size) for e in examples]),
          [e["labels"] for e in examples])


def read_prompts(path: str) -> list[str]:
  """Non-empty lines of a prompt file, in order, without duplicates."""
  with open(path, encoding="utf-8") as f:
    prompts = list(dict.fromkeys(line.strip() for line in f if line.strip()))
  if not prompts:
    raise ValueError(f"prompt file {path} holds no prompts")
  return prompts


def evaluate_checkpoint(checkpoint_dir: str, out_dir: str, *, evaluator_dir: str | None = None,
                        selector_dir: str | None = None, data: str | Loader = PHANTOM,
                        data_dir: str | None = None, prompts: Sequence[str] | None = None,
                        num_prompts: int = 8, num_reference: int = 64, num_heldout: int = 32,
                        config: Mapping | None = None, note: str = "",
                        sections: Sequence[str] = ()) -> dict:
  """Generates from an LDM checkpoint and evaluates the images: `fundax evaluate` and the main
  job's report stage.

  Args:
    checkpoint_dir: an LDM trainer's workdir or checkpoints directory, or an RLHF run's best/.
    out_dir: output directory: metrics.json, report.html, samples/*.png (and evaluator_run/
      when no evaluator is given).
    evaluator_dir: a trained evaluator (`train_evaluator`'s workdir/evaluator); None trains the
      tiny one (configs/evaluator.py:tiny) into out_dir/evaluator_run first: a smoke test.
    selector_dir: a Selector workdir; its scores of the samples are shown beside the metrics.
    data: where the reference and held-out images come from: PHANTOM (the reference is the
      phantom train split the LDM learns from, rendered from its seeds; held-out images and
      default prompts come from the test split), the name of a built fundax dataset in
      `data_dir` (its train and test splits likewise, randomly drawn), or a `Loader` (the main
      job's: the first images of its own dataset's splits).
    data_dir: TFDS data directory of a built dataset.
    prompts: distinct prompts; None: the first `num_prompts` distinct captions of the held-out
      images (`captions.caption`, the captions fundax datasets store).
    num_prompts: prompts drawn when none are given.
    num_reference: reference (training) images for fidelity and the privacy audit.
    num_heldout: labelled held-out images for the TSTR utility classifier; 0 skips it.
    config: overrides of DEFAULTS (samples_per_prompt, num_steps, guidance_scale, ...).
    note: what the images are, shown at the top of the report after the counts (PHANTOM and
      dataset names describe their data themselves).
    sections: HTML sections appended to the report (`fundax.eval.report`, e.g. RLHF rounds).

  Returns:
    As `evaluate`, plus "samples" (the PNG paths) and "accepted_by_selector" (the share of the
    samples the Selector accepts; None without one).

  Raises:
    ValueError: bad sizes or an empty prompt list, before any generation.
  """
  config = {**DEFAULTS, **dict(config or {})}
  if min(num_reference, num_prompts, config["samples_per_prompt"]) < 1 or num_heldout < 0:
    raise ValueError("num_reference, num_prompts and samples_per_prompt must be >= 1 and "
                     f"num_heldout >= 0; got {num_reference}, {num_prompts}, "
                     f"{config['samples_per_prompt']}, {num_heldout}")
  if prompts is not None and not prompts:
    raise ValueError("an empty prompt list: nothing to generate")
  if config["num_steps"] < 1 or not np.isfinite(config["guidance_scale"]):
    raise ValueError("num_steps must be >= 1 and guidance_scale finite; got "
                     f"{config['num_steps']} and {config['guidance_scale']}")
  from fundax import checkpoint  # pylint: disable=g-import-not-at-top
  from fundax import sampling  # pylint: disable=g-import-not-at-top
  for name, path in (("evaluator_dir", evaluator_dir), ("selector_dir", selector_dir)):
    if path is not None and not os.path.isdir(path):
      raise FileNotFoundError(f"{name} {path} is not a directory")
  ldm_config = checkpoint.load_config(checkpoint_dir)
  sampling.check_ldm_config(ldm_config, checkpoint_dir)
  job_data = ldm_config.get("job", {}).get("data", {})
  pipeline = sampling.load_pipeline(checkpoint_dir)  # a damaged checkpoint fails before any work
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  num_labelled = max(num_heldout, 0 if prompts else num_prompts)
  if callable(data):
    load, data_note = data, ""
  elif data == PHANTOM:
    resolution = int(job_data.get("resolution", 128))
    load = lambda split, num: phantom_data(split, num, resolution)
    data_note = ("Reference: the first images of the phantom train split (what a "
                 "phantom-trained LDM learns from); held-out images and default prompts: its "
                 "test split.")
  else:
    load = lambda split, num: dataset_data(data, data_dir, split, num, config["seed"])
    data_note = (f"Reference: {data} train split; held-out images and default prompts: its "
                 "test split.")
  reference, reference_labels = load("train", num_reference)
  heldout, heldout_labels = load("test", num_labelled) if num_labelled else (None, [])
  if prompts is None:
    prompts = list(dict.fromkeys(captions.caption(l) for l in heldout_labels))[:num_prompts]
  if evaluator_dir is None:
    from fundax import configlib  # pylint: disable=g-import-not-at-top
    from fundax.eval import evaluator_train  # pylint: disable=g-import-not-at-top
    log.warning("no evaluator given: training the tiny one (a smoke test; its grades are weak)")
    trained = evaluator_train.train_evaluator(configlib.load_config("evaluator:tiny"),
                                              str(out / "evaluator_run"))
    if "preempted" in trained:  # saved at its step: the CLI exits 75, a rerun resumes it
      return trained
    evaluator_dir = trained["evaluator_dir"]
  images, repeated = generate_from_checkpoint(pipeline, prompts, config)
  samples = images_lib.save_pngs(images, out / SAMPLES_DIR)
  scores = None
  if selector_dir is not None:
    from fundax.selector import score  # pylint: disable=g-import-not-at-top
    scores = score.score_images(selector_dir, samples, repeated)
  graded = [i for i, l in enumerate(heldout_labels[:num_heldout]) if l.dr_grade is not None]
  counts = (f"{len(images)} images generated from {os.path.abspath(checkpoint_dir)} for "
            f"{len(prompts)} prompts, against {len(reference)} reference images"
            + (f"; TSTR tested on {len(graded)} held-out images." if graded else "."))
  results = evaluate(
      images, repeated, evaluator_dir=evaluator_dir, reference_images=reference,
      out_dir=out_dir, reference_labels=reference_labels,
      heldout_images=heldout[graded] if graded else None,
      heldout_labels=[heldout_labels[i] for i in graded] if graded else None,
      selector_scores=None if scores is None else [r["score"] for r in scores], config=config,
      note=" ".join(filter(None, (counts, data_note, note))), sections=sections)
  accepted = None if scores is None else float(np.mean([r["accepted"] for r in scores]))
  return {**results, "samples": samples, "accepted_by_selector": accepted}

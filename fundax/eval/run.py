"""`evaluate`: every independent metric of a set of generated images, written as JSON + HTML.

The images come either from a checkpoint directory (generated here through `fundax.sampling`)
or pre-generated with their prompts. They are compared with a reference set (real images, or
phantom images standing in for them; also the training set of the privacy audit) through the
independent evaluator (`evaluator_dir`, from `evaluator_train.train_evaluator`):

  fidelity      Fréchet distance, KID, precision/recall on evaluator features (and on a
                user-supplied Inception feature function when `inception_path` is set)
  diversity     mean pairwise MS-SSIM among samples of the same prompt
  consistency   prompt (parsed) vs evaluator predictions, per attribute
  anatomy       vessel density vs the reference, optic-disc side vs the prompt's laterality
  privacy       nearest training image in pixel and feature space; near-copies flagged
  utility       TSTR DR-grade classifier (when held-out labelled images are given)

The Selector's scores, when passed, are reported beside these but used by none of them.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import tqdm
from scipy import stats

from fundax.data import captions
from fundax.eval import anatomy_checks
from fundax.eval import consistency as consistency_lib
from fundax.eval import evaluator as evaluator_lib
from fundax.eval import metrics as metrics_lib
from fundax.eval import privacy
from fundax.eval import report
from fundax.eval import ssim
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
}


def generate_from_checkpoint(checkpoint_dir: str, prompts: Sequence[str],
                             config: Mapping) -> tuple[np.ndarray, list[str]]:
  """Samples `samples_per_prompt` images per prompt with `fundax.sampling`.

  Args:
    checkpoint_dir: an LDM trainer's checkpoint directory.
    prompts: distinct prompts.
    config: evaluate options (samples_per_prompt, num_steps, guidance_scale, batch_size, seed).

  Returns:
    (images [N, H, W, 3] float32 in [-1, 1], the N prompts, each repeated per sample).
  """
  from fundax import sampling  # pylint: disable=g-import-not-at-top  (only this path needs it)
  pipeline = sampling.load_pipeline(checkpoint_dir)
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
                      jax.random.fold_in(key, start), config["guidance_scale"])
    images.append(np.asarray(out)[:len(batch)])
  return np.concatenate(images), repeated


def _to_float(images) -> np.ndarray:
  """NHWC images as float32 in [-1, 1] (uint8 is rescaled)."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


def _table(results: Mapping) -> list[tuple[str, object, str]]:
  """The report's (metric, value, measured by) rows."""
  ev = "independent evaluator"
  rows = []
  if "selector" in results:
    rows += [("Selector score (mean): the generator's own reward",
              results["selector"]["mean"], "Selector"),
             ("Spearman(Selector score, share of its prompt the image agrees with)",
              results["selector"]["spearman_vs_consistency"], "Selector vs evaluator")]
  f = results["fidelity"]
  rows += [("Fréchet distance (evaluator features)", f["frechet_distance"], ev),
           ("KID (evaluator features)", f["kid"], ev),
           ("precision", f["precision"], ev), ("recall", f["recall"], ev)]
  if "fidelity_inception" in results:
    rows.append(("FID (user-supplied Inception)",
                 results["fidelity_inception"]["frechet_distance"], "Inception"))
  if results["diversity"]:
    rows.append(("mean MS-SSIM within prompt (lower = more diverse)",
                 float(np.mean(list(results["diversity"].values()))), "MS-SSIM"))
  c = results["consistency"]
  for name, entry in c.items():
    if isinstance(entry, Mapping):
      rows.append((f"consistency: {name} accuracy", entry["accuracy"], ev))
      if "qwk" in entry:
        rows.append((f"consistency: {name} QWK", entry["qwk"], ev))
  rows.append(("consistency: all stated attributes agree", c["all_stated_agree"], ev))
  rows.append(("consistency: fraction of stated attributes agreeing",
               c["stated_agree_fraction"], ev))
  a = results["anatomy"]
  rows += [("vessel density |generated - reference|", a["vessel_density"]["abs_difference"],
            "Frangi vesselness"),
           ("optic disc on the prompt's side", a["disc_side"]["accuracy"], "brightest blob")]
  p = results["privacy"]
  rows += [("near-copies of training images (fraction)", p["fraction_flagged"], "NN audit"),
           ("min RMS distance to a training image", p["min_pixel_rms"], "NN audit")]
  for arm, scores in results.get("utility", {}).items():
    rows += [(f"TSTR ({arm}) DR QWK", scores["qwk"], "TSTR classifier"),
             (f"TSTR ({arm}) referable-DR AUROC", scores["referable_auroc"], "TSTR classifier")]
  return rows


def evaluate(source, prompts: Sequence[str], *, evaluator_dir: str, reference_images,
             out_dir: str, reference_labels=None, heldout_images=None, heldout_labels=None,
             selector_scores=None, config: Mapping | None = None,
             note: str = "", sections: Sequence[str] = ()) -> dict:
  """Evaluates generated images with metrics independent of the Selector.

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
    paths.
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
  # Reference and held-out images are compared at the generated size (pixel-space privacy).
  reference = evaluator_lib.resize(reference_images, images.shape[1])
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts")

  steps = tqdm.tqdm(total=7, desc="evaluate")
  ev = evaluator_lib.load_evaluator(evaluator_dir)
  gen_feat, ref_feat = ev.features(images), ev.features(reference)
  predictions = ev.predict(images)
  steps.update()
  results = {"num_images": len(images), "num_reference": len(reference), "note": note,
             "config": config}
  results["fidelity"] = metrics_lib.fidelity(
      ref_feat, gen_feat, k=config["pr_k"], kid_subsets=config["kid_subsets"],
      kid_subset_size=config["kid_subset_size"], seed=config["seed"])
  if config["inception_path"]:
    feature_fn = metrics_lib.load_feature_fn(config["inception_path"])
    results["fidelity_inception"] = metrics_lib.fidelity(
        feature_fn(reference), feature_fn(images), k=config["pr_k"],
        kid_subsets=config["kid_subsets"], kid_subset_size=config["kid_subset_size"])
  steps.update()
  results["diversity"] = ssim.diversity_by_prompt(images, prompts)
  steps.update()
  results["consistency"] = consistency_lib.consistency(prompts, predictions)
  steps.update()
  density = anatomy_checks.vessel_density_comparison(images, reference)
  results["anatomy"] = {
      "vessel_density": {k: density[k] for k in ("generated_mean", "reference_mean",
                                                 "abs_difference")},
      "disc_side": anatomy_checks.disc_side_agreement(images, prompts)}
  results["plots"] = {"vessel_density": {"generated": density["generated"],
                                         "reference": density["reference"]}}
  steps.update()
  results["privacy"] = privacy.audit(
      images, reference, gen_feat, ref_feat, pixel_threshold=config["pixel_threshold"],
      feature_threshold=config["feature_threshold"], num_pairs=config["num_pairs"])
  steps.update()
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
        evaluator_lib.resize(heldout_images, images.shape[1]),
        np.array([l.dr_grade for l in heldout_labels]),
        config=config["utility"], **real)
  steps.update()
  steps.close()
  if selector_scores is not None:
    scores = np.asarray(selector_scores, float)
    agree = np.asarray(results["consistency"]["per_image_fraction"], float)
    # A Selector the generator has learnt to please stops tracking independent agreement.
    # Partial agreement: the all-or-nothing rate is constant (0) for a small model.
    stated = np.isfinite(agree)
    scores_stated, agree = scores[stated], agree[stated]
    rho = (float(stats.spearmanr(scores_stated, agree).statistic)
           if len(agree) > 1 and np.ptp(scores_stated) > 0 and np.ptp(agree) > 0
           else float("nan"))
    results["selector"] = {"mean": float(scores.mean()), "scores": scores.tolist(),
                           "spearman_vs_consistency": rho}
  results["table"] = _table(results)

  metrics_path = out / "metrics.json"
  metrics_path.write_text(json.dumps(results, indent=2, default=float))
  report_path = out / "report.html"
  report_path.write_text(report.render(results, images=images, prompts=prompts,
                                       training_images=reference, sections=sections),
                         encoding="utf-8")
  log.info("wrote %s and %s", metrics_path, report_path)
  return {**results, "metrics_json": str(metrics_path), "report": str(report_path)}


PHANTOM = "phantom"  # `evaluate_checkpoint(data=...)`: the phantom splits, rendered from seeds


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


def write_samples(images, directory: pathlib.Path) -> list[str]:
  """Writes generated images as PNG files (for rescoring and inspection); returns the paths."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, image in enumerate(np.asarray(images)):
    path = directory / f"{i:05d}.png"
    Image.fromarray(np.round((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8)).save(path)
    paths.append(str(path))
  return paths


def evaluate_checkpoint(checkpoint_dir: str, out_dir: str, *, evaluator_dir: str | None = None,
                        selector_dir: str | None = None, data: str = PHANTOM,
                        data_dir: str | None = None, prompts: Sequence[str] | None = None,
                        num_prompts: int = 8, num_reference: int = 64, num_heldout: int = 32,
                        config: Mapping | None = None) -> dict:
  """`fundax evaluate`: generates from an LDM checkpoint and evaluates the images.

  Args:
    checkpoint_dir: an LDM trainer's workdir or checkpoints directory.
    out_dir: output directory: metrics.json, report.html, samples/*.png (and evaluator_run/
      when no evaluator is given).
    evaluator_dir: a trained evaluator (`train_evaluator`'s workdir/evaluator); None trains the
      tiny one (configs/evaluator.py:tiny) into out_dir/evaluator_run first: a smoke test.
    selector_dir: a Selector workdir; its scores of the samples are shown beside the metrics.
    data: PHANTOM (the reference is the phantom train split the LDM learns from, rendered from
      its seeds; held-out images and default prompts come from the test split) or the name of a
      built fundax dataset in `data_dir` (its train and test splits likewise).
    data_dir: TFDS data directory of a built dataset.
    prompts: distinct prompts; None: captions of the first `num_prompts` held-out images.
    num_prompts: prompts drawn when none are given.
    num_reference: reference (training) images for fidelity and the privacy audit.
    num_heldout: labelled held-out images for the TSTR utility classifier; 0 skips it.
    config: overrides of DEFAULTS (samples_per_prompt, num_steps, guidance_scale, ...).

  Returns:
    As `evaluate`, plus "samples" (the PNG paths).

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
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  from fundax import checkpoint  # pylint: disable=g-import-not-at-top
  job_data = checkpoint.load_config(checkpoint_dir).get("job", {}).get("data", {})
  num_labelled = max(num_heldout, 0 if prompts else num_prompts)
  if data == PHANTOM:
    resolution = int(job_data.get("resolution", 128))
    load = lambda split, num: phantom_data(split, num, resolution)
    note = ("Reference: the first images of the phantom train split (what a phantom-trained "
            "LDM learns from); held-out images and default prompts: its test split.")
  else:
    load = lambda split, num: dataset_data(data, data_dir, split, num, config["seed"])
    note = f"Reference: {data} train split; held-out images and default prompts: its test split."
  reference, reference_labels = load("train", num_reference)
  heldout, heldout_labels = load("test", num_labelled) if num_labelled else (None, [])
  if prompts is None:
    prompts = list(dict.fromkeys(captions.caption(l) for l in heldout_labels[:num_prompts]))
  if evaluator_dir is None:
    from fundax import configlib  # pylint: disable=g-import-not-at-top
    from fundax.eval import evaluator_train  # pylint: disable=g-import-not-at-top
    log.warning("no evaluator given: training the tiny one (a smoke test; its grades are weak)")
    evaluator_dir = evaluator_train.train_evaluator(
        configlib.load_config("configs/evaluator.py:tiny"), str(out / "evaluator_run"))[
            "evaluator_dir"]
  images, repeated = generate_from_checkpoint(checkpoint_dir, prompts, config)
  samples = write_samples(images, out / "samples")
  scores = None
  if selector_dir is not None:
    from fundax.selector import score  # pylint: disable=g-import-not-at-top
    scores = [r["score"] for r in score.score_images(selector_dir, samples, repeated)]
  graded = [i for i, l in enumerate(heldout_labels[:num_heldout]) if l.dr_grade is not None]
  results = evaluate(
      images, repeated, evaluator_dir=evaluator_dir, reference_images=reference,
      out_dir=out_dir, reference_labels=reference_labels,
      heldout_images=heldout[graded] if graded else None,
      heldout_labels=[heldout_labels[i] for i in graded] if graded else None,
      selector_scores=scores, config=config,
      note=f"Images generated from {os.path.abspath(checkpoint_dir)}. {note}")
  return {**results, "samples": samples}

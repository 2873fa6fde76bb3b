"""How much the pixels carry arteriolar narrowing (hypertensive grade 1) at 64 and 128 px.

    python bench/ht_signal.py   # ~1 min on one core; writes bench/results/ht_signal.json

The evaluator reads hypertensive grade 1 (arteriolar narrowing: arteries drawn at 0.55-0.7 of
their calibre) barely better than chance at both sizes (bench/results/evaluator_{64,128}.json,
`hypertensive_grade_auroc_1`). This asks whether the images could say more. Each phantom is
rendered with its ground truth, good quality and no other disease (the most favourable case),
half at grade 0 and half at grade 1, and scored two ways, each knowing exactly which pixels are
arteries, which no image-reading network does:
  * mask: artery-mask pixels / vein-mask pixels. The masks draw a vessel narrower than a pixel
    a pixel wide, so at 64 px a narrowed artery and a normal one cover much the same pixels;
  * opacity: summed artery opacity / summed vein opacity (`PhantomSample.vessel_opacity`, the
    sub-pixel coverage that darkens the image), what the pixels carry before noise, blur and
    the other layers.
The AUROC (grade 0 scoring higher) says how separable the grades are by that measure: the
opacity's is what the image holds, the mask's what a pixel-wide vessel map keeps.
"""

import argparse
import datetime
import json
import pathlib
import sys

import numpy as np

from fundax.data import phantom
from fundax.eval import consistency

FIRST_SEED = 760_000_000  # a range no training set or other benchmark draws from


def artery_vein_ratios(num: int, resolution: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(grade [num], {"mask", "opacity"}: artery / vein ratio [num]) for num phantoms, grades 0
  and 1 alternating."""
  grades = np.arange(num) % 2
  ratios = {"mask": np.empty(num), "opacity": np.empty(num)}
  for i, grade in enumerate(grades):
    sample = phantom.generate(FIRST_SEED + i, resolution, hypertensive_grade=int(grade),
                              dr_grade=0, amd_stage=0, quality="good")
    ratios["mask"][i] = sample.masks["arteries"].sum() / max(sample.masks["veins"].sum(), 1)
    opacity = sample.vessel_opacity.sum(axis=(0, 1))
    ratios["opacity"][i] = opacity[0] / max(opacity[1], 1e-6)
  return grades, ratios


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num", type=int, default=400, help="phantoms per resolution")
  parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--out", default="bench/results/ht_signal.json")
  args = parser.parse_args(argv)
  results = {}
  for resolution in args.resolutions:
    grades, ratios = artery_vein_ratios(args.num, resolution)
    results[str(resolution)] = {
        name: {"auroc_grade1_vs_0": consistency.auroc(grades == 0, r),
               "mean_ratio_grade0": float(r[grades == 0].mean()),
               "mean_ratio_grade1": float(r[grades == 1].mean())}
        for name, r in ratios.items()}
    print(resolution, results[str(resolution)])
  out = {"benchmark": "artery/vein ratios of phantom ground truth, hypertensive grade 1 vs 0 "
                      "(issue 17)",
         "command": "python bench/ht_signal.py", "date": datetime.date.today().isoformat(),
         "num_per_resolution": args.num, "results": results}
  pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

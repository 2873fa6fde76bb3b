"""Does a text-to-fundus checkpoint draw the anatomy its prompts ask for? (issue 18)

    python bench/generator_probe.py --checkpoint runs/quickstart/ldm --name quickstart
    python bench/generator_probe.py --checkpoint runs/ldm --step 600 --guidance 1 3 --num 64

Through the public sampling API (`fundax.sampling`, left-eye samples mirrored for a model with
a canonical eye), on held-out prompts (captions of phantom
cases from the test split, every caption style, both fields), reads with the anatomy detectors
(no learning):

  * disc side: the optic disc on the prompt's eye's side (macula-centred prompts; the fovea's
    side for disc-centred ones), beside the same detector on the prompts' own phantoms (the
    ceiling);
  * vessel ratio: vessel fraction of the samples / the prompts' phantoms';
  * eye sensitivity: one fixed caption with only the eye changed, the same noise: how much
    the samples change (mean absolute, [-1, 1] images) and the mean brightness asymmetry
    (right half - left half) for each eye. A model that reads the eye moves brightness (the
    disc) to the named side; one that ignores it gives nearly equal asymmetries.

Writes bench/results/generator_<name>.json and a SYNTHETIC-stamped grid PNG beside it.
"""

import argparse
import datetime
import json
import pathlib
import sys
import time

import jax
import numpy as np

from fundax import sampling
from fundax.data import captions
from fundax.data import phantom
from fundax.data.builders import fundus_phantom
from fundax.eval import anatomy_checks
from fundax.train import loop

PROMPT_SEED = 500  # test-split cases from this index on (never seen in training)
EYE_PROMPT = ("Colour fundus photograph of the {} eye, macula-centred, good quality. Moderately "
              "pigmented fundus. No diabetic retinopathy, macular oedema, glaucoma, AMD or "
              "hypertensive retinopathy.")


def _uint8(images: np.ndarray) -> np.ndarray:
  return ((np.asarray(images) + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)


def _sample(pipe, generate, prompts, guidance, seed, batch=16):
  out = []
  for i in range(0, len(prompts), batch):
    tokens = sampling.tokenize_prompts(pipe, prompts[i:i + batch])
    out.append(np.asarray(generate(pipe.params, tokens["input_ids"], tokens["attention_mask"],
                                   jax.random.key(seed + i), guidance,
                                   mirror=tokens["mirror"])))
  return np.concatenate(out)


def probe(pipe, num: int, guidance: float, num_steps: int) -> tuple[dict, np.ndarray, list]:
  """The readings at one guidance scale, the samples and their prompts."""
  generate = sampling.make_generate_fn(pipe.models, sampler="ddim", num_steps=num_steps)
  resolution = pipe.models.unet.config.sample_size * pipe.models.vae.config.downsample_factor
  cases = [phantom.generate(fundus_phantom.split_seed("test", PROMPT_SEED + i), resolution)
           for i in range(num)]
  prompts = [captions.caption(c.labels, style=i % captions.NUM_STYLES)
             for i, c in enumerate(cases)]
  start = time.time()
  images = _sample(pipe, generate, prompts, guidance, seed=0)
  seconds = time.time() - start
  own = np.stack([c.image for c in cases])
  side = anatomy_checks.disc_side_agreement(_uint8(images), prompts)
  eyes = {eye: _sample(pipe, generate, [EYE_PROMPT.format(eye)] * 16, guidance, seed=10_000)
          for eye in ("right", "left")}
  asymmetry = {}
  for eye, x in eyes.items():
    luminance = x.mean(-1)
    half = luminance.shape[2] // 2
    asymmetry[eye] = float((luminance[:, :, half:] - luminance[:, :, :half][:, :, ::-1]).mean())
  readings = {
      "guidance": guidance, "num_prompts": num, "sampler_steps": num_steps,
      "disc_side": side,
      "disc_side_ceiling": anatomy_checks.disc_side_agreement(own, prompts)["accuracy"],
      "disc_found": float(np.mean([anatomy_checks.detect_disc(x).found
                                   for x in _uint8(images)])),
      "vessel_ratio": anatomy_checks.vessel_ratio(_uint8(images), own),
      "eye_change_mean_abs": float(np.abs(eyes["right"] - eyes["left"]).mean()),
      "brightness_right_minus_left": asymmetry,
      "sampling_seconds": seconds,
  }
  return readings, images, prompts


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="an LDM run or checkpoints dir")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: last)")
  parser.add_argument("--name", required=True, help="results file suffix")
  parser.add_argument("--num", type=int, default=32, help="held-out prompts")
  parser.add_argument("--guidance", type=float, nargs="+", default=[3.0])
  parser.add_argument("--num-steps", type=int, default=25, help="DDIM steps")
  parser.add_argument("--out-dir", default="bench/results")
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  pipe = sampling.load_pipeline(args.checkpoint, step=args.step)
  out_dir = pathlib.Path(args.out_dir)
  results = {"benchmark": "generator probe on held-out prompts (issue 18)",
             "command": "python bench/generator_probe.py " + " ".join(argv),
             "date": datetime.date.today().isoformat(), "checkpoint": args.checkpoint,
             "step": args.step, "readings": []}
  for guidance in args.guidance:
    readings, images, prompts = probe(pipe, args.num, guidance, args.num_steps)
    results["readings"].append(readings)
    print(json.dumps({"guidance": guidance, "disc_side": readings["disc_side"]["accuracy"],
                      "disc_side_macula": readings["disc_side"]["accuracy_macula"],
                      "vessel_ratio": readings["vessel_ratio"]["ratio"],
                      "eye_change_mean_abs": readings["eye_change_mean_abs"],
                      "brightness_right_minus_left": readings["brightness_right_minus_left"]}))
    loop.save_grid(out_dir / f"generator_{args.name}_g{guidance:g}.png", images[:16],
                   prompts[:16], synthetic=True,
                   title=f"{args.checkpoint} step {args.step or 'last'}, guidance {guidance:g}")
  path = out_dir / f"generator_{args.name}.json"
  path.write_text(json.dumps(results, indent=2, default=float) + "\n")
  print(f"-> {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

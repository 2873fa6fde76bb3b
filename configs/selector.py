"""The Selector: the image-quality judge of the self-improvement loop.

  fundax train selector --config configs/selector.py --workdir runs/selector
  fundax train selector --config configs/selector.py:tiny --workdir runs/selector_tiny
  fundax train selector --config configs/selector.py:eyeq --workdir runs/selector_eyeq \
      --config.data.manual_dir=~/downloads/eyeq --config.ratings.train_path=ratings.jsonl
  fundax score --checkpoint runs/selector_tiny image1.png image2.png

Variants: default (128 px phantom grades + ratings from `ratings.train_path`, MiniLM prompts),
"tiny" (64 px, a few hundred phantom images plus a synthetic rating export written into the
workdir, random small text encoder; well under a minute on a laptop CPU), "eyeq" (EyeQ's real
Good/Usable/Reject grades through its TFDS builder, from the user's own download).

Expect in the workdir: `checkpoints/` (params + this config + model config + text-encoder spec
as JSON), `metrics.jsonl` and `tensorboard/` (training losses), `selector_eval.json`
(held-out AUROC, AUPRC, ECE and the learned threshold with its precision/recall),
`plots/*_{roc,pr,reliability}.png`. SIGTERM or Ctrl-C saves the step and exits 75; rerun the
same command to resume.
"""

import ml_collections

from fundax.data.config import data_config

VARIANTS = ("default", "tiny", "eyeq")


def get_config(arg=None):
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"configs/selector.py variants: {', '.join(VARIANTS)}; got {variant!r}")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.seed = 0  # root seed: parameter init, batch order, prompt styles
  c.resolution = 64 if tiny else 128  # side of the images the Selector sees, px
  c.text_encoder = "random" if tiny else "minilm"  # load_text_encoder spec, or "none"
  c.max_length = 160  # prompt length in tokens: no phantom caption is cut (longer ones are)
  c.mesh = ml_collections.ConfigDict({"data": -1})  # parallelism degrees (-1: all devices)

  c.model = ml_collections.ConfigDict()
  c.model.width = 16 if tiny else 32  # channels of the CNN stem
  c.model.patch_size = 2 if tiny else 4  # side (and stride) of the patchify stem conv, px
  c.model.stage_multipliers = (1, 2, 2) if tiny else (1, 2, 4, 4)  # channels per stage / width
  c.model.blocks_per_stage = 1  # residual blocks per stage
  c.model.head_dim = 64 if tiny else 128  # text projection and head hidden width
  c.model.groups = 8  # GroupNorm groups
  c.model.dtype = "float32"  # compute dtype ("bfloat16" for mixed precision on TPU)
  c.model.param_dtype = "float32"  # parameter storage dtype

  c.graded = ml_collections.ConfigDict()
  c.graded.source = "tfds" if variant == "eyeq" else "phantom"  # "phantom", "tfds" or "none"
  c.graded.num_train = 256 if tiny else 4000  # phantom: images rendered for training
  c.graded.num_heldout = 128 if tiny else 600  # phantom: held-out images (disjoint seeds)
  c.graded.seed = 100_000  # phantom: first case seed (held-out seeds follow the train ones)
  c.graded.quality_mix = (0.4, 0.2, 0.4)  # phantom: fractions of good, usable, reject
  c.graded.usable_target = 0.5  # accept target of a "usable" grade (soft label)
  c.graded.mismatch_fraction = 0.25  # extra rows with another image's prompt: match False
  c.graded.crop_fov = variant == "eyeq"  # tfds: crop real photographs to the field of view
  c.graded.heldout_split = "validation"  # tfds: split used for held-out evaluation
  c.graded.max_examples = 0  # tfds: cap on examples read per split (0: all)
  c.data = data_config("eyeq" if variant == "eyeq" else "phantom")  # tfds: dataset to read

  c.ratings = ml_collections.ConfigDict()
  c.ratings.train_path = ""  # feedback export (JSONL); "" = none (or the synthetic one)
  c.ratings.heldout_path = ""  # held-out export; "" = split heldout_fraction off train_path
  c.ratings.heldout_fraction = 0.25  # fraction of rated images held out (split by image)
  c.ratings.crop_fov = False  # crop rated images to the field of view (generated ones: no)
  c.ratings.num_synthetic = 128 if tiny else 0  # >0 and no train_path: simulated ratings
  c.ratings.synthetic_seed = 500_000  # first phantom case seed of the synthetic export

  c.batch_size = 32  # global rows per step (a multiple of the device count)
  c.pairs_per_batch = 4  # pairwise preferences per batch (2 rows each) when there are any
  c.num_steps = 300 if tiny else 5000  # optimizer steps
  c.eval_batch_size = 64  # rows per evaluation call (a multiple of the device count)
  c.log_every = 25  # steps between metrics lines
  c.checkpoint_every = 150 if tiny else 1000  # steps between checkpoints (and the last step)
  c.keep_checkpoints = 2  # checkpoints kept in the workdir
  c.max_nonfinite_steps = 10  # stop after this many consecutive NaN/inf-loss (skipped) steps

  c.loss_weights = ml_collections.ConfigDict()
  c.loss_weights.accept = 1.0  # BCE of the overall logit vs accept targets
  c.loss_weights.score = 1.0  # BCE of the overall logit vs (score - 1) / 4
  c.loss_weights.pair = 1.0  # Bradley-Terry loss of preferences
  c.loss_weights.criteria = 0.5  # BCE of each criterion logit vs its flag

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-3 if tiny else 1e-3  # peak learning rate
  c.optim.total_steps = c.get_ref("num_steps")  # cosine decay length, steps
  c.optim.warmup_steps = 20 if tiny else 200  # linear warmup, steps
  c.optim.weight_decay = 1e-4  # AdamW decoupled weight decay
  c.optim.grad_clip_norm = 1.0  # global gradient norm clip

  c.target_precision = 0.9  # precision of accepted images the threshold must reach
  c.calibration_bins = 15  # equal-width bins of the ECE and reliability diagram
  return c

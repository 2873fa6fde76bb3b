"""The independent fundus evaluator, trained on phantom images (fundax/eval/evaluator_train.py).

  fundax train evaluator --config configs/evaluator.py:tiny --workdir runs/evaluator_tiny

Variants: default (128 px, 20k phantom images, 20k steps; not yet run end to end: hours on a
CPU) and "tiny" (64 px, 256 images, 150 steps: ~80 s on 2 shared CPU cores; held-out accuracy
at chance level, a smoke test only). Measured on 2 CPU cores, tiny with 2000 images, width 16
and 1200 steps (10 min): laterality 0.98, quality 0.83, CDR MAE 0.08, but DR / DME / AMD /
hypertensive grades stayed at the majority-class rate (lesions are a few pixels at 64 px).
Writes workdir/evaluator, the params directory that `fundax.eval.run.evaluate(evaluator_dir=...)`
loads, workdir/heldout.json and workdir/metrics.jsonl; resumes from workdir/checkpoints.
The phantom seeds start at data.first_seed, a range no other fundax job draws from.
"""

import ml_collections


def get_config(arg=None):
  tiny = arg == "tiny"
  if arg not in (None, "tiny"):
    raise ValueError(f"unknown evaluator variant {arg!r}; known: default (None), 'tiny'")
  c = ml_collections.ConfigDict()
  c.seed = 0  # init and batch-order seed
  c.batch_size = 32 if tiny else 64  # images per optimizer step
  c.log_every = 25 if tiny else 100  # steps between metrics.jsonl rows
  c.checkpoint_every = 100 if tiny else 1000  # steps between checkpoints
  c.class_balance = True  # weight each class's cross-entropy by its inverse frequency

  c.data = ml_collections.ConfigDict()
  c.data.resolution = 64 if tiny else 128  # image side in pixels
  c.data.num_train = 256 if tiny else 20_000  # phantom training images
  c.data.num_heldout = 64 if tiny else 1_000  # phantom held-out images (seeds after training's)
  c.data.first_seed = 900_000_000  # first phantom seed; a range reserved for the evaluator
  c.data.balance = True  # pin one attribute per image to a uniform value (rare grades)

  c.model = ml_collections.ConfigDict()
  c.model.width = 16 if tiny else 32  # channels of the first stage (doubled per stage)
  c.model.stage_sizes = (1, 1, 1) if tiny else (2, 2, 2, 2)  # residual blocks per stage
  c.model.contrast = True  # add image - Gaussian blur channels (small lesions stand out)
  c.model.max_pool = True  # global max beside average pooling (a few lesions are enough)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-3 if tiny else 1e-3  # peak learning rate
  c.optim.total_steps = 150 if tiny else 20_000  # optimizer steps
  c.optim.warmup_steps = 10 if tiny else 500  # linear warmup steps
  c.optim.weight_decay = 1e-4  # AdamW decoupled weight decay (kernels only)
  c.optim.grad_clip_norm = 1.0  # global gradient-norm clip
  return c

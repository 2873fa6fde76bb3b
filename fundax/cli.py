"""The `fundax` command line: parses flags and calls library functions, nothing else.

Every subcommand that runs a job takes `--config NAME[:ARG]` (a shipped config) or
`--config FILE[:ARG]` and `--config.a.b=VALUE` overrides (checked against the config before
any compute starts) and prints where its outputs went.

Arguments and paths are checked before any work (`fundax.arguments`). Every anticipated failure
is one line on stderr, `fundax: error: ...` naming the file or flag (a traceback only for a
bug, or with `--debug`), and the exit status says how a command ended:

  0    done (including a run stopped where its config asked: stop_at_step, stop_after)
  1    the run stopped on NaN/inf losses, weights, metrics or images (its last good state is
       saved), or crashed on a bug (with a traceback)
  2    a user error: a bad flag, config, path, image, or a missing or damaged checkpoint
  75   preempted (EX_TEMPFAIL): SIGTERM, or a first Ctrl-C in a training loop, which saves
       its state first; rerun the same command to resume (every job resumes from what it
       has written)
  130  interrupted by a second Ctrl-C (at once, without saving), or by Ctrl-C outside a
       training loop
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import sys
import threading
import traceback

from fundax import arguments
from fundax import configlib

EXIT_FAILED = 1  # stopped on non-finite values, or a bug
EXIT_USAGE = 2  # a user error
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: state saved, rerun to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class Preempted(BaseException):
  """SIGTERM arrived outside a training loop (which handles it by saving); like
  KeyboardInterrupt, not an Exception, so that no library handler swallows it."""


def _sampler(name: str) -> str:
  """An argparse type: a sampler registered in `fundax.diffusion.registry`.

  The registry is read when the flag is parsed, not when the parser is built, so `--help`
  does not import jax and a sampler registered by an imported module is accepted.
  """
  from fundax.diffusion import registry  # pylint: disable=g-import-not-at-top  (jax)
  if name not in registry.sampler_names():
    raise argparse.ArgumentTypeError(f"must be one of {registry.sampler_names()}, got {name!r}")
  return name


def _load_config(spec: str):
  """`configlib.load_config`, with a failure of the config file's own code as one line."""
  try:
    return configlib.load_config(spec)
  except (configlib.ConfigError, FileNotFoundError):
    raise
  except SyntaxError as e:
    raise configlib.ConfigError(f"config file {e.filename}, line {e.lineno}: {e.msg}") from e
  except Exception as e:  # pylint: disable=broad-except  (the user's code: any error)
    where = traceback.extract_tb(e.__traceback__)[-1]
    raise configlib.ConfigError(f"config {spec!r} failed to load: {type(e).__name__}: {e} "
                                f"({where.filename}, line {where.lineno})") from e


def _job_config(args, overrides, default: str | None = None):
  config = _load_config(args.config or default)
  configlib.apply_overrides(config, overrides)
  return config


def _add_config(parser: argparse.ArgumentParser, default: str):
  parser.add_argument(
      "--config", default=default,
      help=f"config and variant, NAME[:ARG] (a shipped config: main, data, vae, ldm, ...) or "
      f"FILE[:ARG] (default {default}); override fields with --config.a.b=VALUE")


def _finish(outputs: dict) -> int:
  """Prints a job's outputs; returns EXIT_PREEMPTED when a signal stopped it, else 0."""
  preempted = outputs.pop("preempted", None)
  for name, value in outputs.items():
    print(f"{name}: {value if isinstance(value, str) else json.dumps(value, default=float)}")
  if preempted:
    print(f"fundax: preempted by {preempted}: the state is saved; rerun the same command to "
          "resume", file=sys.stderr)
    return EXIT_PREEMPTED
  return 0


def _data_config(args, overrides):
  if args.data_dir:
    if args.data_command == "build":
      arguments.writable_dir(args.data_dir, "--data-dir")
    elif os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
      raise arguments.UsageError(f"--data-dir {args.data_dir} is a file, not a directory")
  if args.manual_dir:
    arguments.existing(args.manual_dir, "--manual-dir", directory=True)
  config = _job_config(args, overrides)
  with config.unlocked():
    if args.data_dir:
      config.data.data_dir = args.data_dir
    if args.manual_dir:
      config.data.manual_dir = args.manual_dir
  return config


def cmd_main(args, overrides):
  arguments.writable_dir(args.workdir, "--workdir")
  from fundax.trainers import main_job  # pylint: disable=g-import-not-at-top
  return _finish(main_job.run(_job_config(args, overrides), args.workdir))


def cmd_data_build(args, overrides):
  from fundax.data import datasets  # pylint: disable=g-import-not-at-top
  config = _data_config(args, overrides)
  summary = datasets.build_from_config(config.data)
  print(json.dumps(summary, indent=2))


def cmd_data_preview(args, overrides):
  arguments.writable_file(args.out, "--out", (".png",))
  from fundax.data import datasets, preview  # pylint: disable=g-import-not-at-top
  config = _data_config(args, overrides)
  source = datasets.load_from_config(config.data, args.split)
  grid = preview.preview_source(source, num_images=args.num_images, seed=config.seed,
                                columns=args.columns,
                                title=f"{config.data.name} / {args.split}")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  grid.save(out)
  print(f"preview: {out}")


def cmd_data_stats(args, overrides):
  from fundax.data import datasets  # pylint: disable=g-import-not-at-top
  config = _data_config(args, overrides)
  print(json.dumps(datasets.stats_from_config(config.data), indent=2))


def cmd_convert(args, overrides):
  del overrides
  arguments.existing(args.src, "SRC", directory=True)
  arguments.writable_dir(args.dst, "DST")
  from fundax.interop import convert  # pylint: disable=g-import-not-at-top
  summary = convert.convert(args.kind, args.src, args.dst, overwrite=args.overwrite)
  print(json.dumps(summary, indent=2))


def cmd_export(args, overrides):
  del overrides
  arguments.existing(args.checkpoint, "CHECKPOINT", directory=True)
  arguments.writable_dir(args.dst, "DST")
  from fundax.interop import convert  # pylint: disable=g-import-not-at-top
  summary = convert.export_diffusers(args.checkpoint, args.dst)
  print(json.dumps(summary, indent=2))


# `fundax train JOB`: the config file each job reads by default, and its entry point
# (module, function), each called as `function(config, workdir)`.
TRAIN_JOBS = {
    "vae": ("fundax.trainers.vae", "run"),
    "ldm": ("fundax.trainers.ldm", "run"),
    "selector": ("fundax.selector.train", "train_selector"),
    "evaluator": ("fundax.eval.evaluator_train", "train_evaluator"),
}


def cmd_train(args, overrides):
  import importlib  # pylint: disable=g-import-not-at-top
  arguments.writable_dir(args.workdir, "--workdir")
  config = _job_config(args, overrides, default=args.job)
  module, function = TRAIN_JOBS[args.job]
  return _finish(getattr(importlib.import_module(module), function)(config, args.workdir))


def cmd_sample(args, overrides):
  del overrides
  arguments.existing(args.checkpoint, "--checkpoint", directory=True)
  arguments.writable_file(args.out, "--out", (".png",))
  from fundax import sampling  # pylint: disable=g-import-not-at-top
  result = sampling.write_sample_grid(
      args.checkpoint, args.prompt, args.out, num_per_prompt=args.num, sampler=args.sampler,
      num_steps=args.steps, guidance_scale=args.guidance, eta=args.eta, seed=args.seed,
      use_ema=not args.no_ema)
  print(f"grid ({result['images']} SYNTHETIC images): {result['grid']}")


def cmd_score(args, overrides):
  del overrides
  arguments.existing(args.checkpoint, "--checkpoint", directory=True)
  prompts = args.prompt
  if prompts and len(prompts) == 1 and len(args.images) > 1:
    prompts = prompts * len(args.images)
  if prompts and len(prompts) != len(args.images):
    raise arguments.UsageError(f"--prompt given {len(prompts)} times for {len(args.images)} "
                               "images: give it once (for all) or once per image")
  from fundax.selector import score  # pylint: disable=g-import-not-at-top
  rows = score.score_images(args.checkpoint, args.images, prompts or None,
                            threshold=args.threshold)
  if args.json:
    print(json.dumps(rows, indent=2))
    return
  names = list(rows[0]["criteria"]) if rows else []
  print("\t".join(["score", "accepted", *names, "path"]))
  for row in rows:
    criteria = [("-" if row["criteria"][n] is None else f"{row['criteria'][n]:.3f}")
                for n in names]
    print("\t".join([f"{row['score']:.3f}", "yes" if row["accepted"] else "no", *criteria,
                     row["path"]]))
  if rows:
    print(f"threshold {rows[0]['threshold']:.3f}: {sum(r['accepted'] for r in rows)} of "
          f"{len(rows)} accepted")


def cmd_aot(args, overrides):
  if args.out:
    arguments.writable_file(args.out, "--out")
  # The host's own accelerators are not needed (and a TPU VM's would be locked by libtpu).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from fundax import aot  # pylint: disable=g-import-not-at-top
  config = _job_config(args, overrides)
  if args.per_chip_batch:
    with config.unlocked():
      config.batch_size = args.per_chip_batch * aot.get_topology(args.topology).chips
  rlhf = None if args.no_rlhf else _load_config(args.rlhf_config)
  if rlhf is not None and args.rlhf_micro_batches:
    with rlhf.unlocked():
      rlhf.stage1.micro_batches = args.rlhf_micro_batches
  report = aot.run(config, args.topology, cached_latents=args.cached_latents,
                   train=not args.no_train, sampler=not args.no_sampler, rlhf=rlhf)
  print(aot.format_report(report))
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.out}")


def cmd_evaluate(args, overrides):
  del overrides
  arguments.existing(args.checkpoint, "--checkpoint", directory=True)
  arguments.writable_dir(args.out, "--out")
  for flag, path in (("--evaluator", args.evaluator), ("--selector", args.selector),
                     ("--data-dir", args.data_dir)):
    if path:
      arguments.existing(path, flag, directory=True)
  if args.prompts:
    arguments.existing(args.prompts, "--prompts", directory=False)
  from fundax.eval import run  # pylint: disable=g-import-not-at-top
  results = run.evaluate_checkpoint(
      args.checkpoint, args.out, evaluator_dir=args.evaluator, selector_dir=args.selector,
      data=args.data, data_dir=args.data_dir,
      prompts=run.read_prompts(args.prompts) if args.prompts else None,
      num_prompts=args.num_prompts, num_reference=args.num_reference,
      num_heldout=args.num_heldout,
      config={"samples_per_prompt": args.samples_per_prompt, "num_steps": args.num_steps,
              "guidance_scale": args.guidance_scale, "seed": args.seed})
  if "preempted" in results:  # the evaluator it was training stopped on a signal, saved
    return _finish(results)
  print("metric: generated | phantoms (floor / ceiling) | negative control")
  for row in results["table"]:
    print(f"{row['metric']}: {row['generated']:.4g} | {row['phantoms']:.4g} | "
          f"{row['control']:.4g} ({row['control_set']}"
          f"{'' if row['separated'] else ', NOT separated'}; {row['measured_by']})")
  print(f"metrics: {results['metrics_json']}\nreport: {results['report']}")


def cmd_rlhf(args, overrides):
  arguments.writable_dir(args.workdir, "--workdir")
  # pylint: disable=g-import-not-at-top
  from fundax.rl import ablation, rounds
  config = _job_config(args, overrides)
  run = ablation.run if args.command == "rlhf-ablate" else rounds.run
  outputs = run(config, args.workdir)
  outputs.pop("results", None)
  return _finish(outputs)


def cmd_feedback(args, overrides):
  del overrides
  action = args.feedback_command
  if action == "import":
    arguments.existing(args.run_dir, "RUN_DIR", directory=True)
    if args.media:
      arguments.existing(args.media, "--media", directory=True)
  elif action == "demo-run":
    arguments.writable_dir(args.run_dir, "RUN_DIR")
  elif action == "export":
    arguments.writable_file(args.out, "--out")
  # pylint: disable=g-import-not-at-top
  from fundax.feedback import export, importer, simulate
  if action in ("add-rater", "serve"):
    from fundax.feedback import app  # the web stack: the "web" extra, only where it is needed
  if action == "import":
    count = importer.import_run(args.run_dir, args.db, media=args.media)
    print(f"imported {count} new candidates from {args.run_dir} into {args.db}")
  elif action == "demo-run":
    path = importer.write_phantom_run(args.run_dir, num_prompts=args.num_prompts,
                                      per_prompt=args.per_prompt, seed=args.seed)
    print(f"demo run (phantom candidates): {path}")
  elif action == "add-rater":
    token = app.create_rater(args.db, args.name, is_admin=args.admin, weight=args.weight)
    print(f"rater {args.name}: token {token}")
  elif action == "simulate":
    counts = simulate.simulate(args.db, seed=args.seed)
    print(f"simulated raters wrote {counts['ratings']} ratings and {counts['pairs']} pairs "
          f"into {args.db}")
  elif action == "export":
    lines = export.export_jsonl(args.db, args.out, include_simulated=not args.humans_only)
    print(f"ratings dataset ({lines} lines): {args.out}")
  elif action == "serve":
    app.serve(args.db, host=args.host, port=args.port, secure_cookie=args.secure_cookie)


def make_parser() -> argparse.ArgumentParser:
  parser = arguments.Parser(
      prog="fundax",
      description="Synthetic colour fundus photographs from clinical text (JAX/Flax). Exit "
      "status: 0 done, 1 stopped on NaN/inf values or a bug, 2 a user error, 75 preempted "
      "(state saved; rerun to resume), 130 interrupted.")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  parser.add_argument("--debug", action="store_true",
                      help="show the traceback of any error (accepted anywhere on the line)")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

  p = sub.add_parser("main", help="the main job on the embedded default (phantom data)")
  _add_config(p, "main")
  p.add_argument("--workdir", required=True, help="output directory")
  p.set_defaults(func=cmd_main)

  data = sub.add_parser("data", help="build, preview and describe datasets")
  data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
  for name, func, text in (
      ("build", cmd_data_build, "build a dataset (phantom, or a real one from --manual-dir)"),
      ("preview", cmd_data_preview, "write a PNG grid of images with their captions"),
      ("stats", cmd_data_stats, "label distribution, counts and skipped files as JSON"),
  ):
    p = data_sub.add_parser(name, help=text)
    _add_config(p, "data:phantom")
    p.add_argument("--data-dir", help="TFDS data directory (overrides config.data.data_dir)")
    p.add_argument("--manual-dir", help="your download of a real dataset")
    if name == "preview":
      p.add_argument("--out", required=True, help="PNG file to write")
      p.add_argument("--split", default="train")
      p.add_argument("--num-images", type=arguments.number(int, 1), default=16)
      p.add_argument("--columns", type=arguments.number(int, 1), default=4)
    p.set_defaults(func=func)

  feedback = sub.add_parser("feedback", help="the human-feedback rating app and its database")
  fb = feedback.add_subparsers(dest="feedback_command", metavar="ACTION", required=True)
  db_help = "SQLite file or SQLAlchemy URL of the rating database"
  p = fb.add_parser("import", help="register a run's candidates (RUN_DIR/candidates.jsonl)")
  p.add_argument("run_dir")
  p.add_argument("--db", required=True, help=db_help)
  p.add_argument("--media", help="media root for a new database (default: RUN_DIR's parent)")
  p = fb.add_parser("demo-run", help="write a run of phantom candidates to rate (a demo)")
  p.add_argument("run_dir")
  p.add_argument("--num-prompts", type=arguments.number(int, 1), default=4)
  p.add_argument("--per-prompt", type=arguments.number(int, 1), default=4)
  p.add_argument("--seed", type=arguments.number(int, 0), default=0)
  p = fb.add_parser("add-rater", help="create a rater account and print its token")
  p.add_argument("name")
  p.add_argument("--db", required=True, help=db_help)
  p.add_argument("--admin", action="store_true", help="may see the admin page and export")
  p.add_argument("--weight", type=arguments.number(float, 0, 100, above=True), default=1.0,
                 help="the rater's weight in training, in (0, 100]")
  p = fb.add_parser("simulate", help="ratings from simulated raters (phantom ground truth)")
  p.add_argument("--db", required=True, help=db_help)
  p.add_argument("--seed", type=arguments.number(int, 0), default=0)
  p = fb.add_parser("export", help="write the ratings dataset (JSONL) the Selector reads")
  p.add_argument("--db", required=True, help=db_help)
  p.add_argument("--out", required=True, help="JSONL file to write")
  p.add_argument("--humans-only", action="store_true", help="leave simulated ratings out")
  p = fb.add_parser("serve", help="run the rating web app")
  p.add_argument("--db", required=True, help=db_help)
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=arguments.number(int, 1, 65535), default=8000,
                 help="TCP port, 1-65535")
  p.add_argument("--secure-cookie", action="store_true", help="when served behind HTTPS")
  feedback.set_defaults(func=cmd_feedback)

  p = sub.add_parser("convert", help="Hugging Face BERT / diffusers VAE or UNet -> fundax params")
  p.add_argument("kind", choices=("bert", "vae", "unet"))
  p.add_argument("src", help="source checkpoint directory")
  p.add_argument("dst", help="fundax params directory to write")
  p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
  p.set_defaults(func=cmd_convert)

  p = sub.add_parser("export", help="fundax params -> another ecosystem's layout")
  p.add_argument("format", choices=("diffusers",))
  p.add_argument("checkpoint", help="fundax params directory (kind vae or unet)")
  p.add_argument("dst", help="directory to write")
  p.set_defaults(func=cmd_export)

  p = sub.add_parser("train", help="train a model: vae, ldm (latent diffusion), selector "
                     "(reward model) or evaluator; rerun the same command to resume")
  p.add_argument("job", choices=tuple(TRAIN_JOBS))
  p.add_argument("--config", help="config and variant, NAME[:ARG] or FILE[:ARG] (default: "
                 "the shipped config named JOB); override fields with --config.a.b=VALUE")
  p.add_argument("--workdir", required=True, help="output directory (resumes what is there)")
  p.set_defaults(func=cmd_train)

  p = sub.add_parser("sample", help="generate images from prompts with an LDM checkpoint "
                     "into a SYNTHETIC-stamped PNG grid")
  p.add_argument("--checkpoint", required=True, help="LDM trainer workdir or checkpoints dir")
  p.add_argument("--prompt", action="append", required=True,
                 help="prompt text; repeat for several; \"\" samples unconditionally")
  p.add_argument("--num", type=arguments.number(int, 1), default=4, help="images per prompt")
  p.add_argument("--sampler", default="ddim", type=_sampler,
                 help="a registered sampler: ddim (default), ddpm, dpm_solver or one a module "
                 "registers with fundax.diffusion.registry.register_sampler")
  p.add_argument("--steps", type=arguments.number(int, 1), default=50,
                 help="reverse-diffusion steps")
  p.add_argument("--guidance", type=arguments.number(float), default=7.5,
                 help="classifier-free guidance weight")
  p.add_argument("--eta", type=arguments.number(float, 0), default=0.0,
                 help="DDIM stochasticity (0 = deterministic)")
  p.add_argument("--seed", type=arguments.number(int, 0), default=0,
                 help="seed of the initial noise")
  p.add_argument("--no-ema", action="store_true", help="use the raw UNet params, not the EMA")
  p.add_argument("--out", required=True, help="PNG file to write")
  p.set_defaults(func=cmd_sample)

  p = sub.add_parser("score", help="score image files with a trained Selector")
  p.add_argument("--checkpoint", required=True, help="Selector workdir (fundax train selector)")
  p.add_argument("images", nargs="+", help="PNG/JPEG files")
  p.add_argument("--prompt", action="append",
                 help="the images' prompt (once for all, or once per image) for prompt match")
  p.add_argument("--threshold", type=arguments.number(float),
                 help="override the learned acceptance threshold (scores are in [0, 1])")
  p.add_argument("--json", action="store_true", help="print JSON instead of a table")
  p.set_defaults(func=cmd_score)

  p = sub.add_parser("evaluate", help="generate from an LDM checkpoint; independent metrics "
                     "and a self-contained HTML report")
  p.add_argument("--checkpoint", required=True, help="LDM trainer workdir or checkpoints dir")
  p.add_argument("--out", required=True, help="directory for metrics.json, report.html, samples")
  p.add_argument("--evaluator", help="trained evaluator directory (default: train the tiny "
                 "evaluator into OUT/evaluator_run first, a smoke test)")
  p.add_argument("--selector", help="Selector workdir: its scores are shown beside the metrics")
  p.add_argument("--data", default="phantom", help="reference and held-out images: 'phantom' "
                 "(the phantom splits, rendered from their seeds) or a built dataset's name")
  p.add_argument("--data-dir", help="TFDS data directory of a built dataset")
  p.add_argument("--prompts", help="text file, one prompt per line (default: captions of "
                 "held-out images)")
  p.add_argument("--num-prompts", type=arguments.number(int, 1), default=8,
                 help="prompts drawn without --prompts")
  p.add_argument("--samples-per-prompt", type=arguments.number(int, 1), default=4)
  p.add_argument("--num-steps", type=arguments.number(int, 1), default=50, help="sampler steps")
  p.add_argument("--guidance-scale", type=arguments.number(float), default=7.5)
  p.add_argument("--num-reference", type=arguments.number(int, 1), default=64,
                 help="reference (training) images")
  p.add_argument("--num-heldout", type=arguments.number(int, 0), default=32,
                 help="labelled held-out images for the TSTR classifier; 0 skips it")
  p.add_argument("--seed", type=arguments.number(int, 0), default=0,
                 help="generation noise and KID subsets")
  p.set_defaults(func=cmd_evaluate)

  p = sub.add_parser("aot", help="compile an LDM config's train step, sampler and RLHF update "
                     "for a TPU topology on this host (needs libtpu); print per-chip memory "
                     "and cost")
  _add_config(p, "sd15_fundus")
  p.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:4x4, v4:2x2x2, v5p:2x2x4")
  p.add_argument("--per-chip-batch", type=arguments.number(int, 0), default=0,
                 help="set batch_size to this many images per chip (default: the config's)")
  p.add_argument("--cached-latents", action="store_true",
                 help="batches hold precomputed latents and text embeddings (no VAE in the step)")
  p.add_argument("--no-train", action="store_true", help="do not compile the train step")
  p.add_argument("--no-sampler", action="store_true", help="do not compile the sampler")
  p.add_argument("--rlhf-config", default="rlhf",
                 help="RLHF config whose DDPO update is compiled on batch_size rollouts")
  p.add_argument("--no-rlhf", action="store_true", help="do not compile the RLHF update")
  p.add_argument("--rlhf-micro-batches", type=arguments.number(int, 0), default=0,
                 help="split the DDPO update's backward pass into this many parts (default: "
                 "the RLHF config's stage1.micro_batches)")
  p.add_argument("--out", help="also write the report as JSON here")
  p.set_defaults(func=cmd_aot)

  for name, text in (
      ("rlhf", "two-stage RLHF rounds (DDPO, then active selection) with the reward-hacking "
       "guard; needs LDM, Selector and evaluator checkpoints (config paths)"),
      ("rlhf-ablate", "RLHF ablation on the same Selector-query budget: RWR only, DDPO only, "
       "both")):
    p = sub.add_parser(name, help=text)
    _add_config(p, "rlhf")
    p.add_argument("--workdir", required=True, help="output directory (rerun to resume)")
    p.set_defaults(func=cmd_rlhf)
  return parser


def _one_line(error: BaseException) -> str:
  """An error's message on one line (an OSError as 'file: reason')."""
  if isinstance(error, OSError) and error.filename and error.strerror:
    text = f"{error.filename}: {error.strerror}"
  else:
    text = str(error) or type(error).__name__
  return " ".join(line.strip() for line in text.splitlines())


def _exit_status(error: BaseException) -> tuple[int, str] | None:
  """The exit status and stderr line of an anticipated failure; None for a bug."""
  if isinstance(error, KeyboardInterrupt):
    return EXIT_INTERRUPTED, "fundax: interrupted (Ctrl-C); rerun the same command to resume"
  if isinstance(error, Preempted):
    return EXIT_PREEMPTED, "fundax: preempted by SIGTERM; rerun the same command to resume"
  if isinstance(error, FloatingPointError):
    return EXIT_FAILED, f"fundax: stopped: {_one_line(error)}"
  if isinstance(error, (ValueError, OSError, ImportError)):
    # Bad input (a flag, config, path, image, or a missing or damaged checkpoint: ValueErrors
    # all) or a missing optional dependency (the message names its extra).
    return EXIT_USAGE, f"fundax: error: {_one_line(error)}"
  return None


def _preempted(signum, frame):
  del signum, frame
  raise Preempted


def _run(argv: list[str]) -> int:
  rest, overrides = configlib.split_config_args(argv)
  args = make_parser().parse_args(rest)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  return args.func(args, overrides) or 0


def main(argv: list[str] | None = None) -> int:
  """Runs one `fundax` command line; returns its exit status (see the module docstring)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  argv = [a for a in argv if a != "--debug"]
  # SIGTERM outside a training loop (which saves first) stops the command like Ctrl-C does.
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _preempted) if main_thread else None
  try:
    return _run(argv)
  except (Exception, KeyboardInterrupt, Preempted) as e:  # pylint: disable=broad-except
    status = None if debug else _exit_status(e)
    if status is None:
      if debug:
        raise
      traceback.print_exc()
      print("fundax: internal error (a bug in fundax): please report it with the traceback "
            "above", file=sys.stderr)
      return EXIT_FAILED
    print(status[1], file=sys.stderr)
    return status[0]
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
  sys.exit(main())

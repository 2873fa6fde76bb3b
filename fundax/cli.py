"""The `fundax` command line: parses flags and calls library functions, nothing else.

Every subcommand that runs a job takes `--config FILE[:ARG]` and `--config.a.b=VALUE`
overrides (checked against the config before any compute starts) and prints where its
outputs went.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

from fundax import configlib


def _add_config(parser: argparse.ArgumentParser, default: str):
  parser.add_argument(
      "--config", default=default,
      help=f"config file and variant, FILE[:ARG] (default {default}); "
      "override fields with --config.a.b=VALUE")


def _data_config(args, overrides):
  config = configlib.load_config(args.config)
  configlib.apply_overrides(config, overrides)
  with config.unlocked():
    if getattr(args, "data_dir", None):
      config.data.data_dir = args.data_dir
    if getattr(args, "manual_dir", None):
      config.data.manual_dir = args.manual_dir
  return config


def cmd_main(args, overrides):
  from fundax.trainers import main_job  # pylint: disable=g-import-not-at-top
  config = configlib.load_config(args.config)
  configlib.apply_overrides(config, overrides)
  outputs = main_job.run(config, args.workdir)
  for name, path in outputs.items():
    print(f"{name}: {path}")


def cmd_data_build(args, overrides):
  from fundax.data import datasets  # pylint: disable=g-import-not-at-top
  config = _data_config(args, overrides)
  summary = datasets.build_from_config(config.data)
  print(json.dumps(summary, indent=2))


def cmd_data_preview(args, overrides):
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
  from fundax.interop import convert  # pylint: disable=g-import-not-at-top
  summary = convert.convert(args.kind, args.src, args.dst, overwrite=args.overwrite)
  print(json.dumps(summary, indent=2))


def cmd_export(args, overrides):
  del overrides
  from fundax.interop import convert  # pylint: disable=g-import-not-at-top
  summary = convert.export_diffusers(args.checkpoint, args.dst)
  print(json.dumps(summary, indent=2))


def cmd_feedback(args, overrides):
  del overrides
  # pylint: disable=g-import-not-at-top
  from fundax.feedback import app, export, importer, simulate
  action = args.feedback_command
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
  parser = argparse.ArgumentParser(
      prog="fundax",
      description="Synthetic colour fundus photographs from clinical text (JAX/Flax).")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

  p = sub.add_parser("main", help="the main job on the embedded default (phantom data)")
  _add_config(p, "configs/main.py")
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
    _add_config(p, "configs/data.py:phantom")
    p.add_argument("--data-dir", help="TFDS data directory (overrides config.data.data_dir)")
    p.add_argument("--manual-dir", help="your download of a real dataset")
    if name == "preview":
      p.add_argument("--out", required=True, help="PNG file to write")
      p.add_argument("--split", default="train")
      p.add_argument("--num-images", type=int, default=16)
      p.add_argument("--columns", type=int, default=4)
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
  p.add_argument("--num-prompts", type=int, default=4)
  p.add_argument("--per-prompt", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p = fb.add_parser("add-rater", help="create a rater account and print its token")
  p.add_argument("name")
  p.add_argument("--db", required=True, help=db_help)
  p.add_argument("--admin", action="store_true", help="may see the admin page and export")
  p.add_argument("--weight", type=float, default=1.0, help="the rater's weight in training")
  p = fb.add_parser("simulate", help="ratings from simulated raters (phantom ground truth)")
  p.add_argument("--db", required=True, help=db_help)
  p.add_argument("--seed", type=int, default=0)
  p = fb.add_parser("export", help="write the ratings dataset (JSONL) the Selector reads")
  p.add_argument("--db", required=True, help=db_help)
  p.add_argument("--out", required=True, help="JSONL file to write")
  p.add_argument("--humans-only", action="store_true", help="leave simulated ratings out")
  p = fb.add_parser("serve", help="run the rating web app")
  p.add_argument("--db", required=True, help=db_help)
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
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
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = make_parser()
  try:
    rest, overrides = configlib.split_config_args(argv)
  except configlib.ConfigError as e:
    parser.error(str(e))
  args = parser.parse_args(rest)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  try:
    args.func(args, overrides)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    # Bad input (missing file, invalid config or value): one clear line and a non-zero exit;
    # --verbose keeps the traceback for debugging.
    if args.verbose:
      raise
    print(f"fundax {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

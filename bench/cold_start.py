"""Cold start of the fundax UNet at benchmark size S: from nothing to a compiled train step.

    python bench/cold_start.py                 # writes bench/results/cold_start_S.json
    python bench/cold_start.py --size M --out /tmp/cold_M.json
    python bench/cold_start.py --attention-impl flash --conv-impl matmul --matmul-dtype bfloat16 \
        --out bench/results/cold_start_S_levers.json    # the UNet lowered as unet_bench's levers

Each variant runs in a fresh process (nothing cached between them), one after the other, and
records its wall time per phase and the load average. Variants:

  baseline      `jax.jit(model.init)` with a threefry key, then `jit(tx.init)`, then the donating
                train step compiled ahead of time (what bench/unet_bench.py does, minus the
                diffusers import);
  init_rbg      the same with an `unsafe_rbg` key: threefry's many integer ops dominate the
                init program's compile time;
  init_no_opt   `model.init` compiled with `xla_backend_optimization_level=0`: it runs once, so
                LLVM's optimisation of it is wasted time;
  cache_warm    baseline with JAX's persistent compilation cache, second process (the first one
                fills the cache): what a resumed or repeated run pays.
The train step is the same program in every variant (AdamW, epsilon MSE, as unet_bench.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = ("baseline", "init_rbg", "init_no_opt", "cache_warm")


def worker(size: str, variant: str, cache_dir: str, lowering: dict) -> dict:
  """One cold start in this (fresh) process; returns seconds per phase."""
  t_start = time.perf_counter()
  import jax  # pylint: disable=import-outside-toplevel
  if variant == "cache_warm":
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import unet_bench  # pylint: disable=import-outside-toplevel
  from fundax.models import unet  # pylint: disable=import-outside-toplevel
  t_import = time.perf_counter()

  spec = unet_bench.SIZES[size]
  config = unet.UNetConfig.from_diffusers(dict(spec["unet"]), **lowering)
  model = unet.UNet2DConditionModel(config)
  key = jax.random.key(0, impl="unsafe_rbg" if variant == "init_rbg" else "threefry2x32")
  options = {"xla_backend_optimization_level": 0} if variant == "init_no_opt" else None
  params = jax.jit(lambda k: model.init(k, *unet.dummy_inputs(config))["params"],
                   compiler_options=options)(key)
  params = jax.block_until_ready(params)
  t_params = time.perf_counter()

  tx = optax.adamw(unet_bench.LR, eps=unet_bench.EPS, weight_decay=unet_bench.WEIGHT_DECAY)
  opt_state = jax.block_until_ready(jax.jit(tx.init)(params))
  t_opt = time.perf_counter()

  b, s, length = spec["batch"], spec["unet"]["sample_size"], spec["text_length"]
  batch = dict(latents=jnp.zeros((b, s, s, 4)), noise=jnp.zeros((b, s, s, 4)),
               timesteps=jnp.zeros((b,), jnp.int32),
               text=jnp.zeros((b, length, spec["unet"]["cross_attention_dim"])))
  ac_table = jnp.asarray(unet_bench.alphas_cumprod())

  def train_step(state, batch):
    params, opt_state = state
    ac = ac_table[batch["timesteps"]][:, None, None, None]
    noisy = jnp.sqrt(ac) * batch["latents"] + jnp.sqrt(1 - ac) * batch["noise"]

    def loss_fn(p):
      pred = model.apply({"params": p}, noisy, batch["timesteps"], batch["text"])
      return jnp.mean((pred - batch["noise"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  jax.jit(train_step, donate_argnums=0).lower((params, opt_state), batch).compile()
  t_train = time.perf_counter()
  return dict(import_s=t_import - t_start, params_s=t_params - t_import,
              opt_init_s=t_opt - t_params, train_compile_s=t_train - t_opt,
              cold_start_s=t_train - t_import)


def run(size: str, lowering: dict) -> dict:
  results = {}
  with tempfile.TemporaryDirectory(prefix="jax_cache_") as cache_dir:
    for variant in VARIANTS:
      passes = 2 if variant == "cache_warm" else 1  # the first pass fills the cache
      for _ in range(passes):
        load = os.getloadavg()[0]
        out = subprocess.run(
            [sys.executable, __file__, "--worker", variant, "--size", size, "--cache", cache_dir,
             "--lowering", json.dumps(lowering)],
            capture_output=True, text=True, check=True, cwd=ROOT,
            env=dict(os.environ, JAX_PLATFORMS="cpu"))
        record = json.loads(out.stdout.strip().splitlines()[-1])
      record["load_avg_1min_at_start"] = load
      results[variant] = record
      print(variant, json.dumps(record), flush=True)
  return dict(benchmark="fundax UNet cold start (init + optimizer init + train-step compile)",
              size=size, lowering=lowering, date=datetime.datetime.now(
                  datetime.timezone.utc).isoformat(timespec="seconds"), variants=results,
              cpu_count=os.cpu_count())


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=("S", "M"), default="S")
  parser.add_argument("--out", help="results JSON (default bench/results/cold_start_<size>.json)")
  parser.add_argument("--attention-impl", choices=("xla", "flash"), default="xla")
  parser.add_argument("--conv-impl", choices=("native", "matmul"), default="native")
  parser.add_argument("--matmul-dtype", choices=("", "bfloat16"), default="")
  parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
  parser.add_argument("--cache", help=argparse.SUPPRESS)
  parser.add_argument("--lowering", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.size, args.worker, args.cache, json.loads(args.lowering))))
    return
  result = run(args.size, dict(attention_impl=args.attention_impl, conv_impl=args.conv_impl,
                               matmul_dtype=args.matmul_dtype))
  path = pathlib.Path(args.out or ROOT / "bench" / "results" / f"cold_start_{args.size}.json")
  path.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()

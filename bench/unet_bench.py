"""fundax's Flax UNet next to diffusers' PyTorch UNet2DConditionModel, same weights, float32.

    python bench/unet_bench.py --size S          # writes bench/results/unet_S.json
    python bench/unet_bench.py --size M          # writes bench/results/unet_M.json
    python bench/unet_bench.py --size S --quick  # smoke run: few iterations, writes nothing
    python bench/unet_bench.py --size S --quick --skip-sample  # forward and train only

What one run does:
  1. A PyTorch worker process builds diffusers' UNet2DConditionModel after `torch.manual_seed`
     (timed: "construction"), saves it with `save_pretrained` and writes its forward output on
     the benchmark batch and its final sample (see below) from fixed initial noise.
  2. A JAX worker process imports that directory with `fundax.interop.diffusers.import_unet`
     (timed with the transfer to the device: "params"), compiles the jitted forward, the
     jitted, donating train step and the sampler ahead of time (each timed), and checks its
     forward output against PyTorch's (max|a - b| / max|b| < 1e-4) and its final sample
     against PyTorch's (< 1e-4 in float32) before anything is timed.
  3. Both workers stay alive and take turns: the parent asks one for a block of timed
     iterations, then the other, alternating forward, train and sample blocks for several
     rounds, so the load from other users of the machine falls on both alike. A warm-up round
     of forward and train is dropped; each worker's parity sample is its sampler's warm-up.
     Throughput is batch / median per-iteration wall time (results are block_until_ready'd).
  4. Each worker reports its own peak RSS (`ru_maxrss`), so memory is not mixed.

The train step is the same on both sides: epsilon-prediction MSE on a fixed batch of random
latents, noise, timesteps and text states (noised with the scaled-linear DDPM schedule inside
the step), then AdamW (lr 1e-4, weight decay 1e-2, eps 1e-8) - `optax.adamw` vs
`torch.optim.AdamW` (default foreach implementation). PyTorch runs eager with 2 threads. The first
step's loss is compared too (same weights, same batch). Every timed block records
`os.getloadavg()`: the machine is shared, so read the ratios, not the absolute numbers.

The sample workload is text-to-image inference as Stable Diffusion runs it: 50 DDIM steps
(eta 0, SD's scaled-linear scheduler config `DDIM_CONFIG`) with classifier-free guidance 7.5,
for a batch of the size's batch, conditioned on the batch's text states with zeros as the
unconditional states, so every step runs the UNet on the doubled batch [uncond; cond]. PyTorch
runs the per-step Python loop of diffusers' pipelines (`DDIMScheduler`, `torch.cat`, model,
`chunk`, guidance, `scheduler.step`) under `torch.no_grad`; fundax runs its own sampler,
`fundax.diffusion.sample_loop`: the whole reverse process as one jitted `lax.scan`. One sample
per timed block (a sample costs 100 UNet forwards at the batch size), in the first
`sample_rounds` rounds only. The project's target is fundax sampling at >= 2x PyTorch's
per-step loop (`sample_images_per_s` in `ratios_fundax_over_pytorch`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TOL = 1e-4
TOL_BF16 = 5e-2  # bfloat16 compute keeps ~3 significant digits
# Defaults of the fundax levers (command-line flags); a run's JSON records the ones it used.
LEVERS = dict(attention_impl="xla", conv_impl="native", matmul_dtype="", dtype="float32",
              remat=False, xla_flags="")

# The two benchmark UNets (diffusers UNet2DConditionModel kwargs) and their batches.
SIZES = {
    "S": dict(
        unet=dict(sample_size=16, block_out_channels=(64, 128, 256), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=384, attention_head_dim=8),
        text_length=32, batch=16, rounds=6, block_seconds=4.0, sample_rounds=6),
    "M": dict(
        unet=dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8),
        text_length=64, batch=8, rounds=4, block_seconds=5.0, sample_rounds=2),
}
QUICK = dict(rounds=2, block_seconds=0.5, sample_rounds=1)
LR, WEIGHT_DECAY, EPS = 1e-4, 1e-2, 1e-8
# The sampling workload: Stable Diffusion's DDIM scheduler config (diffusers' kwargs; fundax's
# `make_schedule_from_config` reads the same dict), 50 steps, classifier-free guidance 7.5.
DDIM_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                   clip_sample=False, timestep_spacing="leading")
SAMPLE_STEPS, GUIDANCE_SCALE, ETA = 50, 7.5, 0.0
SAMPLE_ITERS = 1  # per timed block: one sample is 50 UNet calls on the doubled batch
TOL_SAMPLE = 1e-4  # float32, over all 50 steps (measured 1.3e-6 at S)


# ---------------------------------------------------------------------------------------------
# Shared by both workers: the batch and the noise schedule, as numpy (NCHW, like diffusers).

def make_batch(spec: dict, seed: int = 0) -> dict:
  """The fixed benchmark batch: latents, noise [B, 4, s, s], timesteps [B], text [B, L, D]."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  b, s, u = spec["batch"], spec["unet"]["sample_size"], spec["unet"]
  shape = (b, 4, s, s)
  return dict(latents=rng.standard_normal(shape, np.float32),
              noise=rng.standard_normal(shape, np.float32),
              timesteps=rng.integers(0, 1000, (b,)).astype(np.int64),
              text=rng.standard_normal((b, spec["text_length"], u["cross_attention_dim"]),
                                       np.float32))


def make_sample_noise(spec: dict, seed: int = 1):
  """The sampler's initial noise x_T [B, 4, s, s] (NCHW), the same on both sides for parity."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  s = spec["unet"]["sample_size"]
  return np.random.default_rng(seed).standard_normal((spec["batch"], 4, s, s), np.float32)


def alphas_cumprod():
  """Stable Diffusion's scaled-linear schedule, 1000 steps: [1000] float32."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas).astype(np.float32)


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def time_iterations(fn, iters: int) -> dict:
  """Runs `fn` (which blocks until its result is ready) `iters` times; wall and CPU seconds."""
  load = os.getloadavg()[0]
  cpu0 = time.process_time()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return dict(times=times, cpu_s=(time.process_time() - cpu0) / iters, load=load)


# ---------------------------------------------------------------------------------------------
# Workers: each answers JSON requests on its own stdout (stray library prints go to stderr).

def torch_ddim_sampler(model, text, x_T):
  """The reference sampler: the per-step loop of diffusers' Stable Diffusion pipeline.

  Args:
    model: the diffusers UNet (in eval mode).
    text: conditional text states [B, L, D]; the unconditional ones are zeros.
    x_T: initial noise [B, 4, s, s].

  Returns:
    A function that runs DDIM (`DDIM_CONFIG`, SAMPLE_STEPS steps, eta ETA) with
    classifier-free guidance from x_T and returns the final latents: each step runs the model
    once on the doubled batch [uncond; cond] and combines the two noise predictions.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel
  scheduler = diffusers.DDIMScheduler(**DDIM_CONFIG)
  both = torch.cat([torch.zeros_like(text), text])  # encoded once per call, as pipelines do

  @torch.no_grad()
  def sample():
    scheduler.set_timesteps(SAMPLE_STEPS)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
      model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
      eps_uncond, eps_cond = model(model_input, t, encoder_hidden_states=both).sample.chunk(2)
      eps = eps_uncond + GUIDANCE_SCALE * (eps_cond - eps_uncond)
      x = scheduler.step(eps, t, x, eta=ETA).prev_sample
    return x

  return sample


def torch_worker(spec: dict, directory: str, threads: int, sample: bool):
  """Builds the reference model, saves it and its outputs, then serves timing requests.

  With `sample`, it also runs the reference sampler once (saved for the fundax worker's parity
  check; it doubles as the sampler's warm-up) and serves "sample" requests.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import diffusers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(threads)
  t0 = time.perf_counter()
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**spec["unet"])
  construction = time.perf_counter() - t0
  model.save_pretrained(directory)
  batch = {k: torch.from_numpy(v) for k, v in make_batch(spec).items()}
  model.eval()
  with torch.no_grad():
    ref = model(batch["latents"], batch["timesteps"], batch["text"]).sample
  np.save(os.path.join(directory, "reference_output.npy"), ref.numpy().transpose(0, 2, 3, 1))
  ops = {}
  if sample:
    ops["sample"] = torch_ddim_sampler(model, batch["text"],
                                       torch.from_numpy(make_sample_noise(spec)))
    np.save(os.path.join(directory, "reference_sample.npy"),
            ops["sample"]().numpy().transpose(0, 2, 3, 1))
  ready = dict(init=dict(construction_s=construction),
               param_count=sum(p.numel() for p in model.parameters()),
               version=torch.__version__, diffusers_version=diffusers.__version__,
               threads=torch.get_num_threads(),
               omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp default)"))

  @torch.no_grad()
  def forward():
    model(batch["latents"], batch["timesteps"], batch["text"])

  optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS)
  ac = torch.from_numpy(alphas_cumprod())[batch["timesteps"]].view(-1, 1, 1, 1)
  losses = []

  def train():
    noisy = ac.sqrt() * batch["latents"] + (1 - ac).sqrt() * batch["noise"]
    pred = model(noisy, batch["timesteps"], batch["text"]).sample
    loss = torch.nn.functional.mse_loss(pred, batch["noise"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses.append(float(loss.detach()))

  def set_mode(op):
    model.train(op == "train")

  return ready, dict(ops, forward=forward, train=train), set_mode, losses


def relative_error(out, ref) -> float:
  """max|out - ref| / max|ref|, in float64."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())


def is_float32(levers: dict) -> bool:
  """Whether fundax computes in float32 throughout (parity at TOL), else bfloat16 (TOL_BF16)."""
  return levers["dtype"] == "float32" and not levers["matmul_dtype"]


def jax_worker(spec: dict, directory: str, threads: int, levers: dict, sample: bool):
  """Imports the saved model into fundax, compiles, checks parity, then serves requests.

  `levers` (see LEVERS) change how fundax computes, never what: the UNet's lowering
  (attention_impl, conv_impl, matmul_dtype; fundax.models.lowering), dtype, remat.
  With `sample`, it also compiles fundax's DDIM sampler (`fundax.diffusion.sample_loop`, one
  jitted `lax.scan` with classifier-free guidance) and checks its final latents against the
  PyTorch worker's reference sample from the same noise.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from fundax import diffusion  # pylint: disable=import-outside-toplevel
  from fundax.interop import diffusers as dfx  # pylint: disable=import-outside-toplevel
  from fundax.models import unet  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  config, params = dfx.import_unet(directory, remat=levers["remat"])
  config = dataclasses.replace(config, attention_impl=levers["attention_impl"],
                               conv_impl=levers["conv_impl"],
                               matmul_dtype=levers["matmul_dtype"])
  params = jax.block_until_ready(jax.device_put(params))
  params_s = time.perf_counter() - t0

  model = unet.UNet2DConditionModel(config, dtype=jnp.dtype(levers["dtype"]))
  tx = optax.adamw(LR, eps=EPS, weight_decay=WEIGHT_DECAY)
  raw = make_batch(spec)
  batch = dict(latents=jnp.asarray(raw["latents"].transpose(0, 2, 3, 1)),
               noise=jnp.asarray(raw["noise"].transpose(0, 2, 3, 1)),
               timesteps=jnp.asarray(raw["timesteps"].astype(np.int32)),
               text=jnp.asarray(raw["text"]))
  ac_table = jnp.asarray(alphas_cumprod())

  def denoise(params, x, t, text):
    return model.apply({"params": params}, x, t, text).astype(jnp.float32)

  def forward_fn(params, batch):
    return denoise(params, batch["latents"], batch["timesteps"], batch["text"])

  schedule = diffusion.make_schedule_from_config(DDIM_CONFIG)

  def sample_fn(params, x_T, text):
    """The whole guided DDIM reverse process; uncond text states are zeros, as in PyTorch's."""
    return diffusion.sample_loop(
        functools.partial(denoise, params), schedule, x_T, text, jnp.zeros_like(text),
        jax.random.key(0), sampler="ddim", num_steps=SAMPLE_STEPS,
        guidance_scale=GUIDANCE_SCALE, eta=ETA,
        timestep_spacing=DDIM_CONFIG["timestep_spacing"],
        steps_offset=DDIM_CONFIG["steps_offset"])

  def train_step(state, batch):
    params, opt_state = state
    ac = ac_table[batch["timesteps"]][:, None, None, None]
    noisy = jnp.sqrt(ac) * batch["latents"] + jnp.sqrt(1 - ac) * batch["noise"]

    def loss_fn(p):
      pred = model.apply({"params": p}, noisy, batch["timesteps"], batch["text"])
      return jnp.mean((pred.astype(jnp.float32) - batch["noise"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  t0 = time.perf_counter()
  forward = jax.jit(forward_fn).lower(params, batch).compile()
  forward_compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  opt_state = jax.block_until_ready(jax.jit(tx.init)(params))
  opt_init_s = time.perf_counter() - t0
  state = (params, opt_state)
  t0 = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
  train_compile_s = time.perf_counter() - t0
  init = dict(params_s=params_s, forward_compile_s=forward_compile_s, opt_init_s=opt_init_s,
              train_compile_s=train_compile_s)
  if sample:
    x_T = jnp.asarray(make_sample_noise(spec).transpose(0, 2, 3, 1))
    t0 = time.perf_counter()
    sampler = jax.jit(sample_fn).lower(params, x_T, batch["text"]).compile()
    init["sample_compile_s"] = time.perf_counter() - t0

  f32 = is_float32(levers)
  err = relative_error(forward(params, batch),
                       np.load(os.path.join(directory, "reference_output.npy")))
  tol = TOL if f32 else TOL_BF16
  if not err < tol:
    raise SystemExit(f"fundax and diffusers outputs differ: rel err {err:.2e} >= {tol}")
  parity = dict(parity_rel_err=err)
  if sample:  # the parity sample doubles as the sampler's warm-up
    err = relative_error(sampler(params, x_T, batch["text"]),
                         np.load(os.path.join(directory, "reference_sample.npy")))
    tol = TOL_SAMPLE if f32 else TOL_BF16
    if not err < tol:
      raise SystemExit(f"fundax and diffusers samples differ: rel err {err:.2e} >= {tol}")
    parity["sample_parity_rel_err"] = err
  ready = dict(parity, init=init, version=jax.__version__,
               param_count=sum(x.size for x in jax.tree.leaves(params)),
               devices=str(jax.devices()), threads=threads,
               xla_flags=os.environ.get("XLA_FLAGS", ""), levers=levers,
               ld_preload=os.environ.get("LD_PRELOAD", ""))
  holder = dict(state=state)
  losses = []

  def run_forward():
    forward(holder["state"][0], batch).block_until_ready()

  def run_train():
    holder["state"], loss = step(holder["state"], batch)
    losses.append(float(loss))  # blocks until the step is done

  ops = dict(forward=run_forward, train=run_train)
  if sample:
    ops["sample"] = lambda: sampler(holder["state"][0], x_T, batch["text"]).block_until_ready()
  return ready, ops, lambda op: None, losses


def worker_main(framework: str, size: str, directory: str, threads: int, levers: dict,
                sample: bool):
  """Serves the parent: one JSON line per request on the original stdout."""
  channel = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # library prints must not corrupt the channel
  if framework == "jax":
    sys.path.insert(0, str(ROOT))
  if framework == "torch":
    ready, ops, set_mode, losses = torch_worker(SIZES[size], directory, threads, sample)
  else:
    ready, ops, set_mode, losses = jax_worker(SIZES[size], directory, threads, levers, sample)
  ready["rss_after_init_mib"] = peak_rss_mib()
  channel.write(json.dumps(ready) + "\n")
  for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "exit":
      channel.write(json.dumps(dict(peak_rss_mib=peak_rss_mib(), losses=losses)) + "\n")
      return
    set_mode(request["op"])
    channel.write(json.dumps(time_iterations(ops[request["op"]], request["iters"])) + "\n")


# ---------------------------------------------------------------------------------------------
# Parent: starts the workers one after the other, alternates their timed blocks, reports.

# One thread for XLA's CPU client (its default is one per core).
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"  # Debian's libjemalloc2
# Never return freed pages to the OS: both frameworks free and reallocate their large buffers
# every step, and each fresh page costs a page fault (XLA at M: 810k faults, 1.2 s of system
# time per train step with glibc's malloc, none with this).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


class Worker:
  """A worker subprocess and its request/response channel."""

  def __init__(self, framework: str, size: str, directory: str, threads: int,
               omp_wait_policy: str, allocator: str, levers: dict, sample: bool):
    self.framework = framework
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if framework == "torch" and omp_wait_policy != "default":
      env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    if allocator == "jemalloc":
      if not os.path.isfile(JEMALLOC):
        raise SystemExit(f"--allocator jemalloc: {JEMALLOC} missing (apt install libjemalloc2)")
      env.update(LD_PRELOAD=JEMALLOC, MALLOC_CONF=JEMALLOC_CONF)
    if framework == "jax":
      # The CPU backend only: with the tpu extra installed jax would also initialise libtpu
      # (about 100 MiB of RSS, and a lock file), which this benchmark never uses.
      env.setdefault("JAX_PLATFORMS", "cpu")
      env["XLA_FLAGS"] = " ".join(filter(None, [
          env.get("XLA_FLAGS"), XLA_ONE_THREAD if threads == 1 else "", levers["xla_flags"]]))
    self.load_at_start = os.getloadavg()[0]
    self.proc = subprocess.Popen(
        [sys.executable, __file__, "--worker", framework, "--size", size, "--dir", directory,
         "--threads", str(threads), "--levers", json.dumps(levers)]
        + ([] if sample else ["--skip-sample"]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    self.ready = self.receive()
    self.ready["load_during_init"] = [self.load_at_start, os.getloadavg()[0]]

  def receive(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"{self.framework} worker died (exit {self.proc.wait()}); see stderr")
    return json.loads(line)

  def request(self, **kwargs) -> dict:
    self.proc.stdin.write(json.dumps(kwargs) + "\n")
    self.proc.stdin.flush()
    return self.receive()

  def close(self) -> dict:
    final = self.request(op="exit")
    self.proc.wait()
    return final


def fundax_init_s(init: dict) -> float:
  """fundax's init as `init_time` counts it: params, forward compile, opt init, train compile.

  The sampler's compile is reported on its own, so init_time compares across runs with and
  without the sampling workload.
  """
  return (init["params_s"] + init["forward_compile_s"] + init["opt_init_s"]
          + init["train_compile_s"])


def cold_start(init: dict) -> float:
  """Seconds from nothing to a compiled train step: params, optimizer init, train compile."""
  return init["params_s"] + init["opt_init_s"] + init["train_compile_s"]


def load_stats(blocks: list[dict]) -> dict:
  loads = [b["load"] for b in blocks]
  return dict(median=statistics.median(loads), min=min(loads), max=max(loads))


def summarize(blocks: list[dict], batch: int) -> dict:
  """Throughput from timed blocks: wall-clock (headline) and per CPU second of the process."""
  times = [t for b in blocks for t in b["times"]]
  median = statistics.median(times)
  cpu = statistics.median(b["cpu_s"] for b in blocks)
  return dict(images_per_s=batch / median, median_s=median, min_s=min(times),
              max_s=max(times), iterations=len(times), images_per_cpu_s=batch / cpu,
              cpu_s_per_iteration=cpu, load_avg_1min=load_stats(blocks))


def run(size: str, quick: bool, threads: int, omp_wait_policy: str, allocator: str,
        levers: dict, sample: bool) -> dict:
  spec = dict(SIZES[size], **(QUICK if quick else {}))
  load_start = os.getloadavg()
  with tempfile.TemporaryDirectory(prefix=f"unet_bench_{size}_") as directory:
    print(f"[{size}] starting PyTorch worker (builds and saves the model)", flush=True)
    workers = {"pytorch": Worker("torch", size, directory, threads, omp_wait_policy, allocator,
                                 levers, sample)}
    print(f"[{size}] starting fundax worker (import, compile, parity)", flush=True)
    workers["fundax"] = Worker("jax", size, directory, threads, omp_wait_policy, allocator,
                               levers, sample)
    fx_ready = workers["fundax"].ready
    sample_parity = (f", sample {fx_ready['sample_parity_rel_err']:.2e} "
                     f"({SAMPLE_STEPS}-step DDIM)" if sample else "")
    print(f"[{size}] parity rel err {fx_ready['parity_rel_err']:.2e}{sample_parity}; "
          f"init: {json.dumps({k: w.ready['init'] for k, w in workers.items()})}", flush=True)
    ops = ("forward", "train") + (("sample",) if sample else ())
    blocks = {name: {op: [] for op in ops} for name in workers}
    iters = {}
    for op in ("forward", "train"):  # warm-up (dropped); it also sizes the timed blocks
      slowest = 0.0
      for w in workers.values():
        slowest = max(slowest, statistics.median(w.request(op=op, iters=2)["times"]))
      iters[op] = max(2, round(spec["block_seconds"] / slowest))
    if sample:  # no warm-up here: each worker's parity sample was its first
      iters["sample"] = SAMPLE_ITERS
    print(f"[{size}] iterations per block: {iters}; rounds: {spec['rounds']}"
          + (f" (sample in the first {spec['sample_rounds']})" if sample else ""), flush=True)
    for r in range(spec["rounds"]):
      order = list(workers) if r % 2 == 0 else list(workers)[::-1]
      for op in ops:
        if op == "sample" and r >= spec["sample_rounds"]:
          continue
        for name in order:
          blocks[name][op].append(workers[name].request(op=op, iters=iters[op]))
      print(f"[{size}] round {r + 1}/{spec['rounds']} done, load "
            f"{os.getloadavg()[0]:.2f}", flush=True)
    finals = {name: w.close() for name, w in workers.items()}

  frameworks = {}
  for name, w in workers.items():
    ready = w.ready
    frameworks[name] = dict(
        version=ready["version"], threads=ready["threads"], init=ready["init"],
        load_avg_1min_during_init=ready["load_during_init"],
        forward=summarize(blocks[name]["forward"], spec["batch"]),
        train=summarize(blocks[name]["train"], spec["batch"]),
        load_avg_1min_timed=load_stats([b for op in ops for b in blocks[name][op]]),
        peak_rss_mib=finals[name]["peak_rss_mib"], rss_after_init_mib=ready["rss_after_init_mib"],
        first_train_loss=finals[name]["losses"][0], param_count=ready["param_count"])
    if sample:
      frameworks[name]["sample"] = summarize(blocks[name]["sample"], spec["batch"])
  frameworks["pytorch"].update(diffusers_version=workers["pytorch"].ready["diffusers_version"],
                               omp_wait_policy=workers["pytorch"].ready["omp_wait_policy"])
  frameworks["fundax"].update(devices=workers["fundax"].ready["devices"],
                              xla_flags=workers["fundax"].ready["xla_flags"],
                              ld_preload=workers["fundax"].ready["ld_preload"],
                              levers=levers)
  fx, pt = frameworks["fundax"], frameworks["pytorch"]
  ratios = dict(  # fundax / pytorch: above 1 means fundax is faster (throughput)
      forward_images_per_s=fx["forward"]["images_per_s"] / pt["forward"]["images_per_s"],
      train_images_per_s=fx["train"]["images_per_s"] / pt["train"]["images_per_s"],
      forward_images_per_cpu_s=(fx["forward"]["images_per_cpu_s"]
                                / pt["forward"]["images_per_cpu_s"]),
      train_images_per_cpu_s=fx["train"]["images_per_cpu_s"] / pt["train"]["images_per_cpu_s"],
      peak_rss=fx["peak_rss_mib"] / pt["peak_rss_mib"],
      init_time=fundax_init_s(fx["init"]) / pt["init"]["construction_s"],
      cold_start_s=cold_start(fx["init"]))
  config = dict(unet=spec["unet"], text_length=spec["text_length"], batch=spec["batch"],
                threads=threads, allocator=allocator, rounds=spec["rounds"],
                iterations_per_block=iters,
                warmup_iterations=2,
                optimizer=dict(name="adamw", lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS))
  loss_a, loss_b = fx["first_train_loss"], pt["first_train_loss"]
  f32 = is_float32(levers)
  parity = dict(forward_rel_err=fx_ready["parity_rel_err"], tolerance=TOL if f32 else TOL_BF16,
                first_train_loss_rel_diff=abs(loss_a - loss_b) / abs(loss_b))
  if sample:
    ratios.update(
        sample_images_per_s=fx["sample"]["images_per_s"] / pt["sample"]["images_per_s"],
        sample_images_per_cpu_s=(fx["sample"]["images_per_cpu_s"]
                                 / pt["sample"]["images_per_cpu_s"]))
    config["sample"] = dict(
        sampler="ddim", steps=SAMPLE_STEPS, guidance_scale=GUIDANCE_SCALE, eta=ETA,
        scheduler=DDIM_CONFIG, rounds=spec["sample_rounds"], uncond_text="zeros",
        warmup="the parity sample (one per worker)")
    parity.update(sample_rel_err=fx_ready["sample_parity_rel_err"],
                  sample_tolerance=TOL_SAMPLE if f32 else TOL_BF16)
  return dict(
      benchmark="fundax Flax UNet vs diffusers PyTorch UNet2DConditionModel, same weights, f32",
      size=size, quick=quick, date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      config=config, parity=parity, frameworks=frameworks, ratios_fundax_over_pytorch=ratios,
      machine=dict(cpu_count=os.cpu_count(), processor=platform.processor(),
                   load_avg_at_start=load_start, load_avg_at_end=os.getloadavg()),
      git_commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True).stdout.strip())


def markdown(result: dict) -> str:
  """The README table for one run."""
  fx, pt = result["frameworks"]["fundax"], result["frameworks"]["pytorch"]
  ratio = result["ratios_fundax_over_pytorch"]
  init, cfg = fx["init"], result["config"]
  u = cfg["unet"]

  def rate(framework, op, spec=".1f"):
    r = framework[op]
    return f"{r['images_per_s']:{spec}} ({r['images_per_cpu_s']:{spec}})"

  def load(framework):
    s = framework["load_avg_1min_timed"]
    return f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"

  sample_parity, sample_rows = "", []
  if "sample" in fx:
    steps = cfg["sample"]["steps"]
    sample_parity = f", {steps}-step sample rel err {result['parity']['sample_rel_err']:.1e}"
    sample_rows = [
        f"| sample ({steps}-step DDIM, CFG {cfg['sample']['guidance_scale']}), images/s "
        f"(per CPU-s) | {rate(fx, 'sample', '.3g')} | {rate(pt, 'sample', '.3g')} | "
        f"{ratio['sample_images_per_s']:.2f}x ({ratio['sample_images_per_cpu_s']:.2f}x) |",
        f"| sampler compile (one `lax.scan`), s | {init['sample_compile_s']:.1f} | | |"]
  return "\n".join([
      f"UNet {result['size']}: channels {tuple(u['block_out_channels'])}, "
      f"{u['layers_per_block']} layer(s)/block, {u['sample_size']}x{u['sample_size']} latents, "
      f"text {cfg['text_length']}x{u['cross_attention_dim']}, batch {cfg['batch']}, "
      f"{fx['param_count'] / 1e6:.1f}M params, f32, {cfg['threads']} thread(s) each, "
      f"{result['date'][:10]}, jax {fx['version']} / torch {pt['version']} "
      f"(OMP_WAIT_POLICY {pt['omp_wait_policy']}), malloc {cfg.get('allocator', 'default')}; "
      f"forward parity rel err "
      f"{result['parity']['forward_rel_err']:.1e}, first-step loss rel diff "
      f"{result['parity']['first_train_loss_rel_diff']:.1e}{sample_parity}; fundax levers "
      f"{ {k: v for k, v in fx.get('levers', LEVERS).items() if v != LEVERS.get(k)} or 'none'}",
      "",
      "| | fundax (JAX/XLA) | diffusers (PyTorch) | fundax / PyTorch |",
      "|---|---|---|---|",
      f"| forward, images/s (per CPU-s) | {rate(fx, 'forward')} | {rate(pt, 'forward')} | "
      f"{ratio['forward_images_per_s']:.2f}x ({ratio['forward_images_per_cpu_s']:.2f}x) |",
      f"| train step (AdamW), images/s (per CPU-s) | {rate(fx, 'train')} | "
      f"{rate(pt, 'train')} | {ratio['train_images_per_s']:.2f}x "
      f"({ratio['train_images_per_cpu_s']:.2f}x) |",
      *sample_rows,
      f"| init, s | {fundax_init_s(init):.1f}: params {init['params_s']:.1f}, forward compile "
      f"{init['forward_compile_s']:.1f}, opt init {init['opt_init_s']:.1f}, train compile "
      f"{init['train_compile_s']:.1f} | {pt['init']['construction_s']:.1f} (construction) | "
      f"{ratio['init_time']:.1f}x |",
      f"| cold start to a compiled train step, s | {cold_start(init):.1f} | | |",
      f"| peak RSS, MiB | {fx['peak_rss_mib']:.0f} | {pt['peak_rss_mib']:.0f} | "
      f"{ratio['peak_rss']:.2f}x |",
      f"| load avg (1 min) in timed blocks, median [min-max] | {load(fx)} | {load(pt)} | |",
  ])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", choices=sorted(SIZES), default="S")
  parser.add_argument("--quick", action="store_true", help="smoke run; writes no results")
  parser.add_argument("--threads", type=int, choices=(1, 2), default=2,
                      help="threads for each framework (1: XLA single-threaded too)")
  parser.add_argument("--omp-wait-policy", choices=("passive", "active", "default"),
                      default="default", help="OMP_WAIT_POLICY for PyTorch's OpenMP threads "
                      "(libgomp's default spins: fastest on an idle machine; passive on a busy "
                      "one)")
  parser.add_argument("--out", help="results JSON (default bench/results/unet_<size>.json)")
  parser.add_argument("--attention-impl", choices=("xla", "flash"),
                      default=LEVERS["attention_impl"],
                      help="fundax: XLA's attention or the cache-blocked one")
  parser.add_argument("--conv-impl", choices=("native", "matmul"),
                      default=LEVERS["conv_impl"],
                      help="fundax: convolutions as XLA convs or as row-tap matmuls")
  parser.add_argument("--matmul-dtype", choices=("", "bfloat16"),
                      default=LEVERS["matmul_dtype"],
                      help="fundax: dense/conv operand dtype (float32 accumulation)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                      default=LEVERS["dtype"],
                      help="fundax compute dtype (params and optimizer stay float32)")
  parser.add_argument("--remat", action="store_true", help="fundax: rematerialise blocks")
  parser.add_argument("--allocator", choices=("default", "jemalloc"), default="default",
                      help="both workers' malloc: glibc's, or Debian's jemalloc keeping freed "
                      "pages (LD_PRELOAD)")
  parser.add_argument("--xla-flags", default=LEVERS["xla_flags"],
                      help="extra XLA_FLAGS for the fundax worker")
  parser.add_argument("--skip-sample", action="store_true",
                      help=f"leave out the {SAMPLE_STEPS}-step DDIM sampling workload")
  parser.add_argument("--levers", help=argparse.SUPPRESS)
  parser.add_argument("--worker", choices=("torch", "jax"), help=argparse.SUPPRESS)
  parser.add_argument("--dir", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker_main(args.worker, args.size, args.dir, args.threads, json.loads(args.levers),
                not args.skip_sample)
    return
  levers = dict(attention_impl=args.attention_impl, conv_impl=args.conv_impl,
                matmul_dtype=args.matmul_dtype, dtype=args.dtype, remat=args.remat,
                xla_flags=args.xla_flags)
  result = run(args.size, args.quick, args.threads, args.omp_wait_policy, args.allocator, levers,
               not args.skip_sample)
  print(json.dumps(result["ratios_fundax_over_pytorch"]))
  print()
  print(markdown(result))
  if not args.quick or args.out:
    suffix = "" if args.threads == 2 else f"_{args.threads}thread"
    path = pathlib.Path(args.out or RESULTS / f"unet_{args.size}{suffix}.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
  main()

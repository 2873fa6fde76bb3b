"""Ahead-of-time compilation for a TPU topology on a CPU host: does a run fit, what does it cost.

    fundax aot --config configs/sd15_fundus.py --topology v5e:4x4 --per-chip-batch 16 \
        --cached-latents

XLA's TPU compiler ships in the `libtpu` package (`pip install -e .[tpu]`), and
`jax.experimental.topologies` describes a slice (`v5e:4x4`, `v4:2x2x2`, `v5p:2x2x4`, ...)
without any TPU attached. This module builds everything an LDM config (configs/ldm.py,
configs/sd15_fundus.py) trains as abstract, sharded `jax.ShapeDtypeStruct`s on that
topology's devices - the mesh and sharding rules from the config, the train state, the frozen
networks' params, a batch - and compiles the real `ldm_train_step` (through the same
`parallel.jit_step` the trainer uses) and the jitted sampler `sampling.make_generate_fn`. No
weights are read and nothing runs: the answer is XLA's own per-device memory analysis (the
compiler also refuses a program that does not fit in HBM) and its cost analysis.

Architecture sources, since nothing is loaded: the UNet and VAE come from the config's
`unet.*` and `vae.*` fields (`unet_init` and `vae_checkpoint` hold the same shapes and are not
read); the text encoder from `text_encoder`'s config.json when it names a local directory or
the packaged MiniLM, and BERT-base's shape (BiomedBERT's) when it names a hub id, which is
never downloaded here.

With `cached_latents` the batch holds precomputed "latents" and "text_embeddings" (the
trainer's cached-latents path): the VAE is then not an input of the step at all. Otherwise the
batch holds 512 px images and token ids and the frozen VAE and text encoder run in the step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import topologies

from fundax import parallel
from fundax import sampling
from fundax.data import tokenizer as tokenizer_lib
from fundax.interop import hf_bert
from fundax.interop import params_io
from fundax.models import bert as bert_lib
from fundax.models import ldm as ldm_lib
from fundax.models import text_encoder as text_lib
from fundax.models import unet as unet_lib
from fundax.models import vae as vae_lib
from fundax.train import ldm_step
from fundax.train import optim
from fundax.train import state as state_lib

log = logging.getLogger(__name__)

# HBM per chip, GiB, by jax's device_kind (public Cloud TPU figures).
HBM_GIB_PER_CHIP = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
# The text encoder's shape for a hub id, which ahead-of-time compilation does not download:
# BERT-base uncased, the architecture of BiomedBERT (microsoft/BiomedNLP-BiomedBERT-*).
BERT_BASE = bert_lib.BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                num_attention_heads=12, intermediate_size=3072)
_TOPOLOGY = re.compile(r"^(v[0-9a-z]+):([0-9]+(?:x[0-9]+)*)$")
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice described without a TPU: its devices and how they map to chips."""
  name: str
  devices: tuple[Any, ...]
  chips: int
  device_kind: str

  @property
  def devices_per_chip(self) -> int:
    return len(self.devices) // self.chips

  @property
  def hbm_bytes_per_device(self) -> int | None:
    gib = HBM_GIB_PER_CHIP.get(self.device_kind)
    return None if gib is None else gib * GIB // self.devices_per_chip


def get_topology(name: str) -> Topology:
  """The devices of a TPU topology such as "v5e:4x4" (chip grid), from libtpu, no TPU needed.

  Raises:
    ValueError: a malformed name, or libtpu missing or rejecting the topology (its message).
  """
  match = _TOPOLOGY.match(name)
  if not match:
    raise ValueError(f"TPU topology {name!r}: expected GENERATION:GRID such as v5e:4x4, "
                     "v4:2x2x2 or v5p:2x2x4")
  # libtpu otherwise takes a host-wide lock file, held by any other process that loaded it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  chips = math.prod(int(d) for d in match.group(2).split("x"))
  try:
    devices = tuple(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    if len(devices) > chips:
      # v4 is described by default with one device per TensorCore (two per chip); jax meshes
      # on TPU > v3 need megacore mode, one device per chip, which is how v4 pods train.
      devices = tuple(topologies.get_topology_desc(
          platform="tpu", topology_name=name, chip_config_name="megacore").devices)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"TPU topology {name!r} is not available: {e} (ahead-of-time compilation "
                     "needs the libtpu package: pip install -e .[tpu])") from e
  return Topology(name=name, devices=devices, chips=chips, device_kind=devices[0].device_kind)


def text_encoder_shape(spec: str) -> tuple[bert_lib.BertConfig, int | None]:
  """The BERT architecture (and projection width) a text-encoder spec names, reading no weights.

  Args:
    spec: as `text_encoder.load_text_encoder` takes: "minilm", "random", a local directory
      (Hugging Face BERT or fundax params) or a hub id (BERT-base's shape is assumed).

  Returns:
    (BertConfig, projection_dim or None).
  """
  if spec in ("minilm", None):
    directory = tokenizer_lib.minilm_dir()
    spec = str(directory) if directory is not None else "random"
  if spec == "random":
    return text_lib.FALLBACK_CONFIG, None
  if os.path.isdir(spec):
    with open(os.path.join(spec, params_io.CONFIG_FILE), encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("kind") is not None:  # a fundax params directory
      config = meta["config"]
      return bert_lib.BertConfig.from_hf(config["bert"]), config.get("projection_dim")
    return hf_bert.read_hf_config(spec), None
  log.info("text encoder %r: not downloaded for AOT; assuming BERT-base's shape", spec)
  return BERT_BASE, None


def abstract_models(config: ml_collections.ConfigDict) -> tuple[ldm_lib.Models, dict]:
  """The models of an LDM config and the frozen networks' abstract params (nothing loaded).

  Returns:
    (Models, {"vae": ..., "text": ...} of `jax.ShapeDtypeStruct`s, unsharded).
  """
  dtype = jnp.dtype(config.dtype)
  bert, projection = text_encoder_shape(config.text_encoder)
  text = text_lib.TextEncoder(bert, projection, dtype=dtype)
  ids = jnp.zeros((1, 2), jnp.int32)
  text_params = jax.eval_shape(text.init, jax.random.key(0), ids)["params"]
  vae_config = ldm_lib.fresh_vae_config(config)
  vae = vae_lib.AutoencoderKL(vae_config, dtype=dtype)
  image = jnp.zeros((1, config.resolution, config.resolution, 3))
  vae_params = jax.eval_shape(vae.init, jax.random.key(0), image)["params"]
  unet_config = ldm_lib.make_unet_config(config, vae_config, text.output_dim)
  models = ldm_lib.Models(
      unet=unet_lib.UNet2DConditionModel(unet_config, dtype=dtype), vae=vae, text=text,
      scheduler=config.scheduler.to_dict(), text_mask=config.unet.text_mask)
  return models, {"vae": vae_params, "text": text_params}


def _with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def abstract_batch(config: ml_collections.ConfigDict, models: ldm_lib.Models, batch: int,
                   sharding: Any, *, cached_latents: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """The train batch's shapes: cached latents + text embeddings, or images + token ids."""
  length = config.max_length
  if cached_latents:
    shapes = {"latents": ((batch,) + models.latent_shape, jnp.float32),
              "text_embeddings": ((batch, length, models.text.output_dim), jnp.float32),
              "attention_mask": ((batch, length), jnp.int32)}
  else:
    side = config.resolution
    shapes = {"image": ((batch, side, side, 3), jnp.float32),
              "input_ids": ((batch, length), jnp.int32),
              "attention_mask": ((batch, length), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def memory_report(compiled: Any, hbm_bytes: int | None) -> dict[str, Any]:
  """Per-device memory of a compiled program (XLA's memory analysis), in GiB.

  peak = arguments + outputs - aliased (donated) + temporaries + generated code.
  """
  m = compiled.memory_analysis()
  parts = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
               aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
               code=m.generated_code_size_in_bytes)
  peak = (parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"]
          + parts["code"])
  report = {k: v / GIB for k, v in parts.items()}
  report["peak"] = peak / GIB
  if hbm_bytes is not None:
    report["hbm"] = hbm_bytes / GIB
    report["fits"] = peak <= hbm_bytes
  return report


def cost_report(compiled: Any) -> dict[str, float]:
  """XLA's cost analysis of a compiled program, per device: flops, bytes accessed, seconds."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  names = {"flops": "flops", "bytes accessed": "bytes_accessed",
           "optimal_seconds": "optimal_seconds"}
  return {out: float(cost[k]) for k, out in names.items() if k in cost}


def _analyse(name: str, compile_fn, hbm_bytes: int | None) -> dict[str, Any]:
  """Runs `compile_fn`; returns {"memory", "cost", "compile_s"} of the compiled program.

  The TPU compiler refuses a program that cannot fit in HBM (RESOURCE_EXHAUSTED); that is an
  answer, not a crash: it is reported as not fitting, with XLA's message (which says how much
  the program needed). Compiling an SD-size program takes minutes on a CPU host, so each one
  is logged as it starts and ends.
  """
  logging.info("aot: compiling %s ...", name)
  start = time.perf_counter()
  try:
    compiled = compile_fn()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    memory = {"fits": False, "error": str(e).splitlines()[0]}
    if hbm_bytes is not None:
      memory["hbm"] = hbm_bytes / GIB
    result = {"memory": memory, "cost": {}}
  else:
    result = {"memory": memory_report(compiled, hbm_bytes), "cost": cost_report(compiled)}
  result["compile_s"] = round(time.perf_counter() - start, 1)
  logging.info("aot: %s done in %.0f s (fits: %s)", name, result["compile_s"],
               result["memory"].get("fits"))
  return result


def compile_train_step(config: ml_collections.ConfigDict, models: ldm_lib.Models,
                       frozen: dict, mesh: Any, *, cached_latents: bool) -> Any:
  """Compiles `ldm_train_step` for the mesh's devices exactly as the trainer jits it."""
  rules = [tuple(r) for r in config.sharding_rules]
  tx = optim.make_optimizer({**config.optim.to_dict(), "total_steps": config.num_steps})
  rng = jax.random.key(config.seed, impl=config.prng_impl)

  def make_state(rng):
    params = models.unet.init(rng, *unet_lib.dummy_inputs(models.unet.config))["params"]
    return state_lib.create(params, tx, ema=config.train.ema_decay > 0)

  state = parallel.abstract_sharded(make_state, rng, mesh, rules)
  if cached_latents:  # the VAE is not an input of the step
    frozen = {"text": frozen["text"]}
  frozen = _with_shardings(frozen, parallel.state_shardings(frozen, mesh, rules))
  divisor = parallel.batch_size_divisor(mesh)
  if config.batch_size % divisor:
    raise ValueError(f"batch_size {config.batch_size} is not a multiple of the {divisor} "
                     f"batch shards of mesh {dict(mesh.shape)}")
  batch = abstract_batch(config, models, config.batch_size, parallel.batch_sharding(mesh),
                         cached_latents=cached_latents)
  step = parallel.jit_step(
      functools.partial(ldm_step.ldm_train_step, models=models, tx=tx, config=config.train),
      jax.tree.map(lambda x: x.sharding, state), parallel.batch_sharding(mesh),
      extra_shardings=(jax.tree.map(lambda x: x.sharding, frozen),))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=parallel.replicated(mesh))
  return step.lower(state, batch, rng, frozen).compile()


def compile_sampler(config: ml_collections.ConfigDict, models: ldm_lib.Models, frozen: dict,
                    mesh: Any, batch: int) -> Any:
  """Compiles the jitted sampler (`sampling.make_generate_fn`) of the config's sample.* fields."""
  rules = [tuple(r) for r in config.sharding_rules]
  unet = jax.eval_shape(models.unet.init, jax.random.key(0),
                        *unet_lib.dummy_inputs(models.unet.config))["params"]
  params = {"unet": unet, **frozen}
  params = _with_shardings(params, parallel.state_shardings(params, mesh, rules))
  tokens = jax.ShapeDtypeStruct((batch, config.max_length), jnp.int32,
                                sharding=parallel.batch_sharding(mesh))
  key = jax.random.key(config.seed, impl=config.prng_impl)
  scalar = parallel.replicated(mesh)
  generate = sampling.make_generate_fn(models, sampler=config.sample.sampler,
                                       num_steps=config.sample.num_steps)
  return generate.lower(params, tokens, tokens,
                        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=scalar),
                        jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar),
                        jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar)).compile()


def compile_rlhf_update(config: ml_collections.ConfigDict, rlhf: ml_collections.ConfigDict,
                        models: ldm_lib.Models, mesh: Any) -> Any:
  """Compiles the DDPO update (`fundax.rl.ddpo.ddpo_update_step`) on a batch of rollouts.

  The batch is what `fundax.rl.rounds` feeds it: `rlhf.rollout.num_steps` + 1 latents per
  trajectory, their log-probs, advantages and the guided sampler's conditioning, all split over
  the batch shards, with `config.batch_size` trajectories (the per-chip batch times the chips).
  The state is the UNet's, sharded by the LDM config's rules; the reference UNet (the KL's)
  has the same shardings and is an input like the trainer's frozen networks.

  Returns:
    The compiled update.
  """
  # Imported here: the RLHF package pulls in the evaluators and the feedback store.
  from fundax.rl import ddpo  # pylint: disable=g-import-not-at-top
  from fundax.rl import rollout as rollout_lib  # pylint: disable=g-import-not-at-top
  rules = [tuple(r) for r in config.sharding_rules]
  tx = optim.make_optimizer({**rlhf.optim.to_dict(), "total_steps": 1})
  rng = jax.random.key(config.seed, impl=config.prng_impl)
  init = lambda rng: models.unet.init(rng, *unet_lib.dummy_inputs(models.unet.config))["params"]
  state = parallel.abstract_sharded(lambda rng: state_lib.create(init(rng), tx), rng, mesh, rules)
  reference = state.params
  b, steps_, length = config.batch_size, rlhf.rollout.num_steps, config.max_length
  if b % parallel.batch_size_divisor(mesh):
    raise ValueError(f"batch_size {b} is not a multiple of the batch shards of {dict(mesh.shape)}")
  axes = parallel.batch_axes(mesh)
  on = lambda shape, dtype, *spec: jax.ShapeDtypeStruct(
      shape, dtype, sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
  text = lambda: (on((b, length, models.text.output_dim), jnp.float32, axes),
                  on((b, length), jnp.int32, axes))
  batch = {"latents": on((steps_ + 1, b) + models.latent_shape, jnp.float32, None, axes),
           "log_probs": on((steps_, b), jnp.float32, None, axes),
           "timesteps": on((steps_,), jnp.int32), "prev_timesteps": on((steps_,), jnp.int32),
           "advantages": on((b,), jnp.float32, axes), "cond": text(), "uncond": text(),
           **{k: on((), jnp.float32) for k in ("guidance_scale", "eta", "clip_range")}}
  stochastic = rollout_lib.stochastic_steps(models, rlhf.rollout.sampler, steps_)
  step = jax.jit(functools.partial(ddpo.ddpo_update_step, models=models, tx=tx,
                                   config=rlhf.stage1, sampler=rlhf.rollout.sampler,
                                   stochastic=stochastic),
                 donate_argnums=(0,))
  key = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=parallel.replicated(mesh))
  return step.lower(state, batch, key, {"reference": reference}).compile()


def rlhf_trained_steps(rlhf: ml_collections.ConfigDict, models: ldm_lib.Models) -> int:
  """How many denoising steps of each trajectory the DDPO update trains on."""
  from fundax.rl import ddpo  # pylint: disable=g-import-not-at-top
  from fundax.rl import rollout as rollout_lib  # pylint: disable=g-import-not-at-top
  stochastic = rollout_lib.stochastic_steps(models, rlhf.rollout.sampler,
                                            rlhf.rollout.num_steps)
  return ddpo.num_train_steps(len(stochastic), rlhf.stage1.timestep_fraction)


def run(config: ml_collections.ConfigDict, topology: str, *, cached_latents: bool = False,
        train: bool = True, sampler: bool = True,
        rlhf: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Compiles an LDM config's train step (and sampler) for a TPU topology; no TPU needed.

  Args:
    config: a configs/ldm.py-style config (mesh, sharding_rules, batch_size, ...).
    topology: e.g. "v5e:4x4".
    cached_latents: the batch holds precomputed latents and text embeddings.
    train: compile the train step (off to measure only the other programs: each SD1.5-size
      compile takes minutes and most of a small host's memory).
    sampler: also compile the sampler, one prompt per batch shard.
    rlhf: a configs/rlhf.py config: also compile its DDPO update on `batch_size` rollouts.

  Returns:
    A JSON-serialisable report: topology, mesh, batch per chip, parameter count and, for
    each compiled program ("train_step", "sampler", "rlhf_update"), per-device memory (GiB)
    and cost analysis.
  """
  topo = get_topology(topology)
  mesh = parallel.make_mesh(config.mesh, devices=list(topo.devices))
  models, frozen = abstract_models(config)
  unet_params = jax.eval_shape(models.unet.init, jax.random.key(0),
                               *unet_lib.dummy_inputs(models.unet.config))["params"]
  report = dict(
      topology=topology, device_kind=topo.device_kind, chips=topo.chips,
      devices=len(topo.devices), mesh=dict(mesh.shape), batch_size=config.batch_size,
      batch_per_chip=config.batch_size / topo.chips, resolution=config.resolution,
      latent_shape=list(models.latent_shape), dtype=config.dtype, remat=bool(config.unet.remat),
      attention_chunk=int(config.unet.attention_chunk), cached_latents=cached_latents,
      unet_params=sum(math.prod(x.shape) for x in jax.tree.leaves(unet_params)),
      text_params=sum(math.prod(x.shape) for x in jax.tree.leaves(frozen["text"])),
      vae_params=sum(math.prod(x.shape) for x in jax.tree.leaves(frozen["vae"])))
  hbm = topo.hbm_bytes_per_device
  if train:
    report["train_step"] = _analyse("train step", functools.partial(
        compile_train_step, config, models, frozen, mesh, cached_latents=cached_latents), hbm)
  if sampler:
    batch = parallel.batch_size_divisor(mesh)
    analysis = _analyse(
        "sampler", functools.partial(compile_sampler, config, models, frozen, mesh, batch), hbm)
    report["sampler"] = dict(batch=batch, sampler=config.sample.sampler,
                             num_steps=config.sample.num_steps, **analysis)
  if rlhf is not None:
    analysis = _analyse(
        "RLHF update", functools.partial(compile_rlhf_update, config, rlhf, models, mesh), hbm)
    report["rlhf_update"] = dict(batch=config.batch_size, num_steps=rlhf.rollout.num_steps,
                                 trained_steps=rlhf_trained_steps(rlhf, models),
                                 micro_batches=int(rlhf.stage1.micro_batches), **analysis)
  return report


def format_report(report: dict[str, Any]) -> str:
  """A few human-readable lines for the CLI."""
  lines = [
      f"{report['topology']}: {report['chips']} chips, {report['devices']} devices "
      f"({report['device_kind']}), mesh {report['mesh']}",
      f"UNet {report['unet_params'] / 1e6:.0f}M params, text encoder "
      f"{report['text_params'] / 1e6:.0f}M, VAE {report['vae_params'] / 1e6:.0f}M; "
      f"{report['resolution']} px, latents {report['latent_shape']}, {report['dtype']}, "
      f"remat {report['remat']}, attention chunk {report['attention_chunk'] or 'none'}, "
      f"cached latents {report['cached_latents']}",
      f"global batch {report['batch_size']} = {report['batch_per_chip']:g} per chip"]
  for name in ("train_step", "sampler", "rlhf_update"):
    if name not in report:
      continue
    mem, cost = report[name]["memory"], report[name]["cost"]
    if "error" in mem:
      lines.append(f"{name}: DOES NOT FIT in {mem.get('hbm', float('nan')):.1f} GiB HBM: "
                   f"{mem['error']}")
      continue
    fits = "" if "hbm" not in mem else (
        f" of {mem['hbm']:.1f} GiB HBM: {'fits' if mem['fits'] else 'DOES NOT FIT'}")
    lines.append(
        f"{name}: per device peak {mem['peak']:.2f} GiB{fits} (arguments "
        f"{mem['arguments']:.2f}, outputs {mem['outputs']:.2f}, donated {mem['aliased']:.2f}, "
        f"temporaries {mem['temporaries']:.2f}); {cost.get('flops', 0) / 1e12:.2f} TFLOP, "
        f"{cost.get('bytes_accessed', 0) / GIB:.1f} GiB accessed, XLA's optimal "
        f"{cost.get('optimal_seconds', float('nan')):.3f} s per device; compiled in "
        f"{report[name].get('compile_s', float('nan')):.0f} s")
  return "\n".join(lines)

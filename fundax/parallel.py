"""Device mesh, batch sharding, host-local <-> global arrays and multi-host initialisation.

All parallelism in fundax is chosen here, from config, and applied from outside: library code
is written for one device, and jit places it with the shardings built in this module.

The mesh is sized from parallelism degrees (maxdiffusion style): a config such as
`{"data": -1, "fsdp": 2}` gives each axis a size, and one axis may be -1 to take the remaining
devices. The batch dimension is sharded over all of the batch axes ("data" and "fsdp" when
present), so a global batch of B examples is split across every device of those axes.

Parameter sharding is config data (big_vision style): a list of `(regex, spec)` rules over
'/'-joined parameter paths, first match wins, unmatched parameters are replicated. A spec is a
PartitionSpec-like tuple (`("fsdp", None)`), "replicate", or "fsdp": the built-in tactic that
shards the largest dimension divisible by the fsdp axis size, for parameters of at least
`fsdp_min_size` elements. Optimizer states and EMA copies follow the sharding of the parameter
whose path they end with. `init_sharded` creates parameters already sharded, and `jit_step`
compiles a train step once, with explicit shardings and the state donated. In a config:

    config.mesh = {"data": -1, "fsdp": 4}
    config.sharding_rules = [("embedding$", ("fsdp", None)),  # first match wins
                             ("norm|bias", "replicate"),
                             (".*", "fsdp")]

Multi-host: each process holds only its own slice of the batch (host-local numpy arrays);
`host_local_to_global` assembles them into global `jax.Array`s. `maybe_initialize_distributed`
must run before any other jax call on every host.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Axes over which the batch dimension is sharded, in mesh order.
BATCH_AXES = ("data", "fsdp")

# Environment variables that ask for multi-host initialisation when no explicit flag is given:
#   FUNDAX_DISTRIBUTED=1       set by fundax's launch scripts on every host of a pod/cluster;
#                              jax then auto-detects the cluster (Cloud TPU, SLURM, MPI, ...).
#   JAX_COORDINATOR_ADDRESS    host:port of process 0, read by jax.distributed.initialize()
#                              (as is JAX_COORDINATOR_BIND_ADDRESS, e.g. 127.0.0.1:port to
#                              listen on loopback only).
#   JAX_NUM_PROCESSES, JAX_PROCESS_ID
#                              for clusters jax cannot detect (a few hosts, localhost tests):
#                              jax itself does not read them, so they are passed on here.
DISTRIBUTED_ENV = "FUNDAX_DISTRIBUTED"
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
PROCESS_ENVS = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}

# The default sharding policy: every large parameter gets the fsdp tactic (which replicates
# when the mesh has no "fsdp" axis or it has size 1, i.e. pure data parallelism).
DEFAULT_RULES = ((".*", "fsdp"),)
# Parameters smaller than this many elements stay replicated under the fsdp tactic: sharding
# biases and norm scales saves no memory and costs an all-gather each.
FSDP_MIN_SIZE = 2 ** 12

# A rule: (regex searched in the '/'-joined parameter path, spec).
Rule = tuple[str, Any]


def _env_wants_distributed() -> bool:
  flag = os.environ.get(DISTRIBUTED_ENV, "").strip().lower()
  return flag in ("1", "true", "yes") or bool(os.environ.get(COORDINATOR_ENV))


def maybe_initialize_distributed(flag: bool | None = None) -> bool:
  """Initialises the multi-host runtime when asked; call before any other jax computation.

  Idempotent: a second call (or a call after someone else initialised) does nothing.

  Args:
    flag: True forces `jax.distributed.initialize()`, False never calls it, None decides from
      the environment: `FUNDAX_DISTRIBUTED=1` or a set `JAX_COORDINATOR_ADDRESS` mean multi-host.
      `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, when set, are passed to it.

  Returns:
    Whether the distributed runtime is initialised after the call.
  """
  wanted = _env_wants_distributed() if flag is None else flag
  if not wanted:
    return jax.distributed.is_initialized()
  if not jax.distributed.is_initialized():
    kwargs = {arg: int(os.environ[env]) for arg, env in PROCESS_ENVS.items() if env in os.environ}
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
  return True


def mesh_shape(config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves axis sizes (one may be -1 = the remaining devices) into an ordered dict.

  Args:
    config: axis name -> size, e.g. `{"data": -1, "fsdp": 1}` (a dict or ConfigDict).
    num_devices: how many devices the mesh spans.

  Returns:
    Axis name -> size, batch axes first ("data", "fsdp"), then the others by name, with every
    size resolved and their product equal to `num_devices`.

  Raises:
    ValueError: more than one -1, a size < 1, or a product that does not match the devices.
  """
  sizes = {str(k): int(v) for k, v in dict(config).items()}
  names = [a for a in BATCH_AXES if a in sizes] + sorted(a for a in sizes if a not in BATCH_AXES)
  if not names:
    raise ValueError("the mesh config names no axes; use e.g. {'data': -1}")
  fill = [a for a in names if sizes[a] == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {fill} in {sizes}")
  bad = [a for a in names if sizes[a] < 1 and sizes[a] != -1]
  if bad:
    raise ValueError(f"mesh axis sizes must be >= 1 or -1, got {sizes}")
  fixed = math.prod(sizes[a] for a in names if sizes[a] != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(f"mesh {sizes}: the fixed axes (product {fixed}) do not divide the "
                       f"{num_devices} devices")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"mesh {sizes} has {fixed} devices but {num_devices} are available")
  return {a: sizes[a] for a in names}


def make_mesh(config: Mapping[str, int], devices: list[jax.Device] | None = None) -> Mesh:
  """Builds the device mesh from parallelism degrees.

  Args:
    config: axis name -> size (-1 fills), e.g. `config.mesh` = `{"data": -1, "fsdp": 1}`.
    devices: devices to span; default all devices of all processes.

  Returns:
    A `jax.sharding.Mesh` with Auto axis types: library code stays single-device math and jit
    propagates the shardings chosen here (Explicit axes would make every op carry a sharding).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(config, len(devices))
  mesh = jax.make_mesh(tuple(shape.values()), tuple(shape),
                       axis_types=(AxisType.Auto,) * len(shape), devices=devices)
  logging.info("mesh %s over %d devices", dict(mesh.shape), len(devices))
  return mesh


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is sharded over (those of BATCH_AXES in the mesh)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_size_divisor(mesh: Mesh) -> int:
  """How many ways the batch dimension is split: global batch sizes must be multiples of it."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding for batch arrays: leading dim over all batch axes, other dims replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def host_local_to_global(batch: Any, mesh: Mesh) -> Any:
  """Turns this process's slice of a batch into global arrays sharded over the batch axes.

  Every process calls this with its own host-local rows (same shapes on all processes); the
  result's leading dim is the global batch (local rows x process count).

  Args:
    batch: pytree of numpy arrays, each [local_B, ...].
    mesh: the device mesh.

  Returns:
    The same pytree of `jax.Array`s, each [global_B, ...] with `batch_sharding(mesh)`.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding on `mesh` (scalars, RNG keys, metrics)."""
  return NamedSharding(mesh, P())


def path_str(path: tuple[Any, ...]) -> str:
  """Joins a jax key path into the '/'-separated string that sharding rules match.

  Args:
    path: a key path from `jax.tree_util.tree_flatten_with_path`.

  Returns:
    E.g. "Dense_0/kernel" for params, "opt_state/0/mu/Dense_0/kernel" for an Adam moment.
  """
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return "/".join(parts)


def fsdp_spec(shape: Sequence[int], mesh: Mesh, *, axis: str = "fsdp",
              min_size: int = FSDP_MIN_SIZE) -> P:
  """The fsdp tactic: shard the largest dimension divisible by the fsdp axis size.

  Args:
    shape: the parameter's shape.
    mesh: the device mesh; without `axis` (or with size 1) everything is replicated.
    axis: the mesh axis to shard over.
    min_size: parameters with fewer elements stay replicated.

  Returns:
    A PartitionSpec with `axis` on one dimension (the largest divisible one; among equal
    sizes the last, i.e. a kernel's output features), or `P()` when none qualifies.
  """
  size = dict(mesh.shape).get(axis, 1)
  if size == 1 or math.prod(shape) < min_size:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % size == 0]
  if not candidates:
    return P()
  best = max(candidates, key=lambda i: (shape[i], i))
  return P(*(axis if i == best else None for i in range(len(shape))))


def _as_spec(spec: Any) -> P:
  # Configs hold specs as lists or tuples (ConfigDicts turn tuples into lists); each entry
  # is None, an axis name, or a list of axis names.
  entries = [tuple(e) if isinstance(e, (list, tuple)) else e for e in spec]
  return P(*entries)


def _check_spec(path: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
  if len(spec) > len(shape):
    raise ValueError(f"sharding rule for parameter {path!r}: spec {spec} has more entries "
                     f"than its shape {shape}")
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    unknown = [a for a in names if a not in mesh.axis_names]
    if unknown:
      raise ValueError(f"sharding rule for parameter {path!r}: spec {spec} names mesh axes "
                       f"{unknown} that are not in the mesh {dict(mesh.shape)}")
    ways = math.prod(mesh.shape[a] for a in names)
    if dim % ways:
      raise ValueError(f"sharding rule for parameter {path!r}: dimension of size {dim} is not "
                       f"divisible by mesh axes {names} ({ways} devices); shape {shape}, "
                       f"spec {spec}")


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Sequence[Rule] | None = None,
             *, fsdp_min_size: int = FSDP_MIN_SIZE) -> P:
  """The PartitionSpec the rules give one parameter.

  Args:
    path: '/'-joined parameter path, relative to the params tree (e.g. "Dense_0/kernel").
    shape: the parameter's shape.
    mesh: the device mesh.
    rules: `(regex, spec)` pairs; the first whose regex `re.search`es the path wins (anchor
      with ^ and $ for exact matches). spec is a tuple/list of mesh axis names or None per
      dimension, "fsdp" (the fsdp tactic) or "replicate". None means DEFAULT_RULES; no match
      means replicated.
    fsdp_min_size: size threshold of the fsdp tactic.

  Returns:
    The PartitionSpec.

  Raises:
    ValueError: naming the parameter, when an explicit spec does not fit its shape or mesh.
  """
  shape = tuple(shape)
  for pattern, spec in DEFAULT_RULES if rules is None else rules:
    if re.search(pattern, path):
      break
  else:
    return P()
  if isinstance(spec, str):
    if spec == "fsdp":
      return fsdp_spec(shape, mesh, min_size=fsdp_min_size)
    if spec == "replicate":
      return P()
    raise ValueError(f"sharding rule {pattern!r} for parameter {path!r}: unknown tactic "
                     f"{spec!r} (use 'fsdp', 'replicate' or a tuple of mesh axes)")
  spec = _as_spec(spec)
  _check_spec(path, shape, spec, mesh)
  return spec


def param_shardings(abstract_params: Any, mesh: Mesh, rules: Sequence[Rule] | None = None, *,
                    fsdp_min_size: int = FSDP_MIN_SIZE) -> Any:
  """Applies the sharding rules to every parameter.

  Args:
    abstract_params: pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
    mesh: the device mesh.
    rules: see `spec_for`; None means DEFAULT_RULES.
    fsdp_min_size: size threshold of the fsdp tactic.

  Returns:
    The same pytree structure with a `NamedSharding` per leaf.

  Raises:
    ValueError: naming the first parameter whose explicit spec does not fit.
  """
  shardings = jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(
          mesh, spec_for(path_str(p), x.shape, mesh, rules, fsdp_min_size=fsdp_min_size)),
      abstract_params)
  leaves = jax.tree.leaves(shardings)
  logging.info("sharding rules: %d of %d parameters sharded",
               sum(not s.is_fully_replicated for s in leaves), len(leaves))
  return shardings


def shardings_like_params(abstract_tree: Any, abstract_params: Any, params_shardings: Any,
                          mesh: Mesh) -> Any:
  """Gives every leaf the sharding of the parameter its path ends with (if shapes agree).

  This is how optimizer states follow the params: an Adam moment at
  "opt_state/0/mu/Dense_0/kernel" ends with the parameter path "Dense_0/kernel" and has its
  shape, so it gets that parameter's sharding. Leaves matching no parameter (step counters,
  scalars) are replicated.

  Args:
    abstract_tree: pytree of arrays or `jax.ShapeDtypeStruct`s, e.g. a whole train state.
    abstract_params: the params pytree (paths relative to it are what leaves are matched to).
    params_shardings: `param_shardings(abstract_params, ...)`.
    mesh: the device mesh.

  Returns:
    A pytree of `NamedSharding`s with the structure of `abstract_tree`.
  """
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  by_path = {path_str(p): (tuple(x.shape), s)
             for (p, x), s in zip(flat_params, jax.tree.leaves(params_shardings))}
  default = replicated(mesh)

  def pick(path, x):
    parts = path_str(path).split("/")
    for start in range(len(parts)):  # longest suffix first
      hit = by_path.get("/".join(parts[start:]))
      if hit is not None and hit[0] == tuple(x.shape):
        return hit[1]
    return default

  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def _params_of(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return tree.get("params")
  return getattr(tree, "params", None)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[Rule] | None = None, *,
                    fsdp_min_size: int = FSDP_MIN_SIZE) -> Any:
  """Shardings for a train state (or a params tree, or a flax variables dict).

  If the tree has a `params` field or key, the rules apply to it (paths relative to it) and
  every other leaf (optimizer state, EMA params, other collections) follows the parameter
  its path ends with; otherwise the whole tree is treated as params.

  Args:
    abstract_state: pytree of arrays or `jax.ShapeDtypeStruct`s.
    mesh: the device mesh.
    rules: see `spec_for`; None means DEFAULT_RULES.
    fsdp_min_size: size threshold of the fsdp tactic.

  Returns:
    A pytree of `NamedSharding`s with the structure of `abstract_state`.
  """
  params = _params_of(abstract_state)
  if params is None:
    return param_shardings(abstract_state, mesh, rules, fsdp_min_size=fsdp_min_size)
  shardings = param_shardings(params, mesh, rules, fsdp_min_size=fsdp_min_size)
  return shardings_like_params(abstract_state, params, shardings, mesh)


def abstract_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                     rules: Sequence[Rule] | None = None, *,
                     fsdp_min_size: int = FSDP_MIN_SIZE) -> Any:
  """Shapes, dtypes and target shardings of `init_fn(rng)`, without computing anything.

  Args:
    init_fn: rng -> state (or params); traced, never run.
    rng: the PRNG key `init_fn` takes.
    mesh: the device mesh.
    rules: see `spec_for`.
    fsdp_min_size: size threshold of the fsdp tactic.

  Returns:
    A pytree of `jax.ShapeDtypeStruct`s carrying their shardings: the restore target for
    checkpoints and the abstract input for ahead-of-time compilation.
  """
  abstract = jax.eval_shape(init_fn, rng)
  shardings = state_shardings(abstract, mesh, rules, fsdp_min_size=fsdp_min_size)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


# XLA options of a program that runs once (a model's init): no backend optimisation. XLA:CPU
# otherwise spends seconds optimising the many RNG and elementwise ops of an init to save
# milliseconds of its one run (configs/main.py:test's VAE and LDM state inits: 14-17 s of
# compiling at optimisation level 1, 11.6 s at 0; 2 cores, 2026-12-07).
RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}


def jit_once(fn: Callable[..., Any], **jit_kwargs) -> Callable[..., Any]:
  """`jax.jit(fn, **jit_kwargs)` compiled with RUN_ONCE_OPTIONS: for inits and other programs
  that run once, whose compile time is all that matters."""
  return jax.jit(fn, compiler_options=RUN_ONCE_OPTIONS, **jit_kwargs)


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                 rules: Sequence[Rule] | None = None, *,
                 fsdp_min_size: int = FSDP_MIN_SIZE) -> Any:
  """Runs `init_fn(rng)` so that its outputs are created already sharded.

  `jax.eval_shape` gives the shapes, the rules give the shardings, and one jit with those
  `out_shardings` materialises each shard on its device: no full copy of a large model ever
  lives on one device or host. It runs once, so it is compiled by `jit_once`.

  Args:
    init_fn: rng -> state (or params), a pure function of the key.
    rng: the PRNG key, the same on every process.
    mesh: the device mesh.
    rules: see `spec_for`; None means DEFAULT_RULES.
    fsdp_min_size: size threshold of the fsdp tactic.

  Returns:
    The initialised pytree; each leaf's `.sharding` is the one the rules chose.
  """
  shardings = jax.tree.map(lambda x: x.sharding,
                           abstract_sharded(init_fn, rng, mesh, rules,
                                            fsdp_min_size=fsdp_min_size))
  return jit_once(init_fn, in_shardings=replicated(mesh), out_shardings=shardings)(rng)


def jit_step(step_fn: Callable[..., tuple[Any, Any]], state_shardings: Any,
             batch_sharding: Any, *, extra_shardings: Sequence[Any] = (),
             donate_state: bool = True) -> Callable[..., tuple[Any, Any]]:
  """Compiles a train step once, with explicit shardings and the state donated.

  The step is written as single-device math: `step_fn(state, batch, rng, *extra) ->
  (state, metrics)`. `rng` is the run's step key, replicated; the step derives its randomness
  as `fold_in(rng, state.step)` and does not return a key, so a resumed run replays the same
  randomness. `extra` are read-only inputs such as frozen networks' params (VAE, text
  encoder). Metrics come back replicated.

  Args:
    step_fn: the pure step function.
    state_shardings: pytree of NamedShardings for the state (`state_shardings(...)`).
    batch_sharding: a NamedSharding (applied to every batch leaf) or a pytree of them.
    extra_shardings: one sharding (pytree) per extra argument.
    donate_state: donate the input state's buffers to the output (halves state memory); the
      state passed in must not be used after the call.

  Returns:
    The jitted step; call `.lower(...)` on abstract inputs to compile ahead of time.
  """
  mesh = jax.tree.leaves(batch_sharding)[0].mesh
  return jax.jit(
      step_fn,
      in_shardings=(state_shardings, batch_sharding, replicated(mesh), *extra_shardings),
      out_shardings=(state_shardings, replicated(mesh)),
      donate_argnums=(0,) if donate_state else ())

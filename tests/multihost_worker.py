"""Worker process for test_multihost.py: trains the toy model on a global mesh, writes JSON.

Run as `python multihost_worker.py OUT_JSON`. The environment chooses the topology: XLA_FLAGS
sets the local CPU device count, and JAX_COORDINATOR_ADDRESS, JAX_COORDINATOR_BIND_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (read by `parallel.maybe_initialize_distributed`, as in a
real launch) make it one process of several. Each process feeds only its own rows of every
global batch through `host_local_to_global`.
"""

import json
import sys

import jax
import numpy as np

# CPU collectives across processes need gloo (the default today; set so a change shows here).
jax.config.update("jax_cpu_collectives_implementation", "gloo")

from fundax import parallel  # pylint: disable=g-import-not-at-top

MESHES = {"dp": {"data": -1}, "fsdp": {"data": 2, "fsdp": -1}}
STEPS = 3


def train(mesh_config):
  mesh = parallel.make_mesh(mesh_config)
  _, init, step = toy_model.make_trainer(mesh)
  state = init()
  rng = jax.random.key(1)
  count, index = jax.process_count(), jax.process_index()
  losses = []
  for b in range(STEPS):
    batch = toy_model.global_batch(b)
    rows = len(batch["x"]) // count
    local = {k: v[index * rows:(index + 1) * rows] for k, v in batch.items()}
    state, metrics = step(state, parallel.host_local_to_global(local, mesh), rng)
    losses.append(float(metrics["loss"].addressable_data(0)))  # replicated: any shard
  kernel = state.params["Dense_1"]["kernel"]
  return {"losses": losses, "kernel_spec": list(kernel.sharding.spec),
          "kernel_shards": len(kernel.addressable_shards),
          "kernel_shard0_sum": float(np.asarray(kernel.addressable_data(0)).sum())}


def main(out_path):
  distributed = parallel.maybe_initialize_distributed()
  result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count()}
  result.update({name: train(config) for name, config in MESHES.items()})
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(result, f)
  if distributed:
    jax.distributed.shutdown()


if __name__ == "__main__":
  # Imported here, not at the top: nothing may touch jax devices before distributed init.
  import toy_model  # pylint: disable=g-import-not-at-top
  main(sys.argv[1])

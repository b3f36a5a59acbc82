"""The one home of device parallelism: pmap, pmean, replicate/unreplicate, batch sharding.

Everything else in the library is written for a single device; moving to
`jit` + `shard_map` later should touch only this file.

Which values carry a leading device axis:
  * replicated TrainState and per-device rngs: `[local_devices, ...]`;
  * sharded batches: `[local_devices, per_device_batch, ...]`;
  * metrics returned by the pmapped steps: `[local_devices]` (identical after pmean).
"""

from typing import Any, Callable

import flax.jax_utils
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from progression.errors import ProgressionError

AXIS_NAME = 'batch'
PyTree = Any


def local_device_count() -> int:
  return jax.local_device_count()


def replicate(tree: PyTree) -> PyTree:
  """Copies a tree to every local device. The axis name matches pmap's (else it recompiles)."""
  return flax.jax_utils.replicate(tree, axis_name=AXIS_NAME)


def unreplicate(tree: PyTree) -> PyTree:
  """Takes device 0's copy of a replicated tree and brings it to the host (numpy)."""
  return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], tree))


def shard_batch(batch: dict[str, np.ndarray], num_devices: int | None = None
                ) -> dict[str, np.ndarray]:
  """Reshapes `[local_batch, ...]` host arrays into `[devices, local_batch // devices, ...]`."""
  num_devices = num_devices or local_device_count()

  def _shard(x):
    if x.shape[0] % num_devices:
      raise ValueError(f'local batch {x.shape[0]} is not divisible by {num_devices} devices')
    return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])

  return jax.tree_util.tree_map(_shard, batch)


def cross_replica_mean(tree: PyTree) -> PyTree:
  """Mean over the devices of the pmapped axis (use only inside `pmap_step`)."""
  return jax.lax.pmean(tree, axis_name=AXIS_NAME)


def device_rng(rng: jax.Array, step: jax.Array, process_index: int) -> jax.Array:
  """An rng unique to (step, process, device); call inside a pmapped function."""
  rng = jax.random.fold_in(rng, step)
  rng = jax.random.fold_in(rng, process_index)
  return jax.random.fold_in(rng, jax.lax.axis_index(AXIS_NAME))


def pmap_train_step(train_step: Callable[..., Any]) -> Callable[..., Any]:
  """pmaps `train_step(state, batch, rng, reduce_fn)`; state donated; grads/metrics pmean'ed.

  The returned function takes `(replicated_state, sharded_batch, replicated_rng)`; the
  rng is folded with the step, the process and the device before `train_step` sees it.
  """
  process_index = jax.process_index()

  def step(state, batch, rng):
    rng = device_rng(rng, state.step, process_index)
    return train_step(state, batch, rng, reduce_fn=cross_replica_mean)

  return jax.pmap(step, axis_name=AXIS_NAME, donate_argnums=(0,))


def pmap_eval_step(eval_step: Callable[..., Any]) -> Callable[..., Any]:
  """pmaps `eval_step(state, batch) -> per-example metrics incl. 'valid'` into global sums.

  Returns, replicated, `{metric: sum over real examples of all devices and processes,
  'count': number of real examples}`; divide on the host for means.
  """

  def step(state, batch):
    per_example = dict(eval_step(state, batch))
    valid = per_example.pop('valid')
    sums = {k: jnp.sum(v * valid) for k, v in per_example.items()}
    sums['count'] = jnp.sum(valid)
    return jax.lax.psum(sums, axis_name=AXIS_NAME)

  return jax.pmap(step, axis_name=AXIS_NAME)


def initialize_distributed(coordinator_address: str | None, num_processes: int,
                           process_id: int) -> None:
  """Joins a multi-process job (CPU: gloo collectives; GPU: NCCL). No-op for one process."""
  if num_processes > 1:
    if not coordinator_address:
      raise ProgressionError('--coordinator_address=HOST:PORT is required with --num_processes > 1')
    if not 0 <= process_id < num_processes:
      raise ProgressionError(f'--process_id={process_id} must be in [0, {num_processes})')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    # First collective now, while all processes stand at the same point: on CPU it builds
    # the gloo context, whose set-up times out (~30 s) when processes arrive far apart,
    # as they would later (e.g. at the checkpoint manager's first barrier).
    multihost_utils.sync_global_devices('progression:initialize_distributed')

"""Pure training and evaluation steps for one device (no pmap here: see parallel.py).

A batch is a dict of arrays with a leading per-device batch axis:
  baseline, followup: `[B, x, y, z, 1]` normalised intensities on the experiment grid;
  years: `[B]` interval baseline -> follow-up in years;
  covariates: `[B, covariates.ENCODED_DIM]` encoded baseline covariates;
  baseline_labels, followup_labels: `[B, x, y, z]` uint8 class indices into
    `labels.CLASS_IDS` (optional; for the Dice and volume losses and the prior);
  prior_log_rates: `[B, K]` the regional model's predicted annual log change per rate
    region of the prior (optional; with a generator anchored on the prior);
  prior_classes: `[B, x, y, z]` uint8 tissue classes of the baseline, for a prior on the
    tissue model (cohorts without label maps; else the prior uses baseline_labels);
  valid: `[B]` 1.0 for real examples, 0.0 for padding (evaluation only).
"""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax.training import train_state

from progression import losses

Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
  """flax TrainState; `step` is stored as an array so orbax restores it as one."""


def _identity(tree):
  return tree


def _forward(apply_fn, params, batch: Mapping[str, jax.Array], train: bool) -> dict:
  prior = {}
  if 'prior_log_rates' in batch:
    prior = {'prior_classes': batch.get('prior_classes', batch.get('baseline_labels')),
             'prior_log_rates': batch['prior_log_rates']}
  return apply_fn({'params': params}, batch['baseline'], batch['years'], batch['covariates'],
                  train=train, **prior)


def _loss_terms(apply_fn, params, batch, loss_weights, train: bool):
  outputs = _forward(apply_fn, params, batch, train=train)
  return losses.total_loss(outputs, batch, loss_weights)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               loss_weights: Mapping[str, float],
               reduce_fn: Callable[[Any], Any] = _identity) -> tuple[TrainState, Metrics]:
  """One optimiser update on a batch; returns the new state and batch-mean metrics.

  `reduce_fn` averages gradients and metrics across data-parallel replicas (identity on
  one device, `lax.pmean` under pmap); because each replica averages over an equal
  number of examples, the result equals the update on the whole global batch.
  `rng` is reserved for stochastic models (the later CVAE latent) and unused today.
  """
  del rng

  def loss_fn(params):
    per_example, metrics = _loss_terms(state.apply_fn, params, batch, loss_weights, train=True)
    return per_example.mean(), {k: v.mean() for k, v in metrics.items()}

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = reduce_fn(grads)
  metrics = reduce_fn({**metrics, 'loss': loss})
  metrics['grad_norm'] = _global_norm(grads)
  return state.apply_gradients(grads=grads), metrics


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *,
              loss_weights: Mapping[str, float]) -> Metrics:
  """Per-example metrics `[B]` (no reduction: padding is masked out by the caller)."""
  per_example, metrics = _loss_terms(state.apply_fn, state.params, batch, loss_weights,
                                     train=False)
  return {**metrics, 'loss': per_example, 'valid': batch['valid']}


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))

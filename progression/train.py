"""Training recipe: cohort -> datasets -> model -> optimiser -> pmapped steps -> loop.

`train_and_evaluate(config, workdir)` is the one entry point (launchers, notebooks and
tests call it). Resuming is the default: when `workdir` holds a finished checkpoint the
run continues from it, with the data order replayed exactly (see input_pipeline).
"""

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pandas as pd
from absl import logging

from progression import (checkpoints, cohort, cohort_spec, covariates, input_pipeline, io,
                         metric_writers, parallel, preprocess, regional_intervals, regional_model,
                         steps)
from progression.evaluation import baselines, visit_volumes
from progression.errors import ProgressionError
from progression.progress import ProgressBar
from progression.models import generator
from progression.models import prior as prior_lib


@dataclasses.dataclass(frozen=True)
class ExperimentData:
  """The pairs of each split and the covariate normaliser fitted on the training split."""
  train: pd.DataFrame
  val: pd.DataFrame
  test: pd.DataFrame
  normalizer: covariates.CovariateNormalizer
  grid: preprocess.Grid
  registration: cohort_spec.RegistrationSpec | None = None  # The spec's `[registration]`.


def grid_from_config(config: ml_collections.ConfigDict) -> preprocess.Grid:
  return preprocess.Grid(shape=tuple(int(s) for s in config.grid.shape),
                         voxel_size_mm=tuple(float(v) for v in config.grid.voxel_size_mm))


def load_experiment_data(config: ml_collections.ConfigDict) -> ExperimentData:
  """Reads the cohort named by the config, splits it by subject and fits the normaliser."""
  if not config.cohort.root:
    raise ProgressionError('config.cohort.root: set the folder of the cohort '
                           '(e.g. --config.cohort.root=/data/cohort)')
  spec = cohort.load_spec(config.cohort.spec)
  pairs = cohort.make_pairs(cohort.read_visits(spec, config.cohort.root))
  split_of = cohort.split_subjects(sorted(pairs['subject'].unique()),
                                   tuple(config.cohort.split_fractions),
                                   seed=config.cohort.split_seed)
  by_split = {name: pairs[pairs['subject'].map(split_of) == name].reset_index(drop=True)
              for name in ('train', 'val', 'test')}
  if len(by_split['train']) == 0:
    raise ProgressionError(f'{config.cohort.root}: the training split has no pairs')
  normalizer = covariates.fit_normalizer(
      [cohort.covariates_of(row) for _, row in by_split['train'].iterrows()])
  return ExperimentData(**by_split, normalizer=normalizer, grid=grid_from_config(config),
                        registration=spec.registration)


def create_model(config: ml_collections.ConfigDict) -> generator.ProgressionGenerator:
  """The generator described by `config.model` (also used by the Forecaster)."""
  m = config.model
  return generator.ProgressionGenerator(
      features=tuple(m.features), cond_dim=covariates.ENCODED_DIM,
      downsize=m.velocity_downsize, num_squarings=m.num_squarings,
      max_velocity_voxels_per_year=m.max_velocity_voxels_per_year,
      intensity_residual=m.intensity_residual, conv_impl=m.conv_impl,
      dtype=jnp.dtype(m.dtype),
      prior_regions=prior_lib.prior_regions(prior_source(config)) if m.prior else None,
      residual_scale=m.residual_scale)


def prior_source(config: ml_collections.ConfigDict) -> str:
  """What the prior's class maps come from: 'labels' or 'tissue' (set by training)."""
  return str(config.model.get('prior_source', 'labels'))  # Older checkpoints: labels.


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `optim.learning_rate`, then cosine decay to 0 at `num_steps`.

  The warmup starts at lr/warmup_steps, not 0, so the very first update moves the weights.
  """
  warmup = max(1, min(config.optim.warmup_steps, config.num_steps - 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=config.optim.learning_rate / warmup, peak_value=config.optim.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.num_steps, warmup + 1))


def create_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(config.optim.grad_clip_norm),
      optax.adamw(learning_rate_schedule(config), weight_decay=config.optim.weight_decay))


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array) -> steps.TrainState:
  """Initialises parameters on a dummy batch of the experiment grid (host, unreplicated)."""
  model = create_model(config)
  shape = (1, *config.grid.shape, 1)
  prior_inputs = {}
  if config.model.prior:
    num_rates = len(prior_lib.prior_regions(prior_source(config)).rate_regions)
    prior_inputs = {'prior_classes': jnp.zeros(shape[:-1], jnp.uint8),
                    'prior_log_rates': jnp.zeros((1, num_rates), jnp.float32)}
  init = lambda rng, *args: model.init(rng, *args, **prior_inputs)
  params = jax.jit(init)(rng, jnp.zeros(shape, jnp.float32), jnp.ones((1,), jnp.float32),
                         jnp.zeros((1, covariates.ENCODED_DIM), jnp.float32))['params']
  return steps.TrainState.create(apply_fn=model.apply, params=params,
                                 tx=create_optimizer(config))


def loss_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  return {k: float(v) for k, v in config.loss.items()}


def fit_regional_model(config: ml_collections.ConfigDict, data: ExperimentData,
                       known: visit_volumes.VisitVolumes | None = None
                       ) -> regional_model.RegionalModel:
  """The regional progression model of the experiment: fitted on train, calibrated on val
  (visits in `known` are not measured again; new measurements are added to it)."""
  volume_method = baselines.volume_method_of(pd.concat([data.train, data.val]))
  return regional_intervals.fit_on_pairs(data.train, data.val, volume_method, seed=config.seed,
                                         progress=ProgressBar('regional model: visits measured'),
                                         known=known)


def fit_tissue_fallback(config: ml_collections.ConfigDict, data: ExperimentData,
                        saved: Mapping[str, Any] | None = None,
                        known: visit_volumes.VisitVolumes | None = None
                        ) -> regional_model.RegionalModel | None:
  """A label-anchored experiment's regional model of tissue-model volumes (brain, GM, WM, CSF).

  It anchors forecasts of baselines given without a label map (`forecast_anchor`). None
  unless `config.tissue_fallback` and the prior acts on label maps; taken from the
  checkpoint's metadata `saved` when resuming (the tissue model measures ~1 visit/s at 2 mm).
  """
  if not (config.model.prior and prior_source(config) == 'labels'
          and config.get('tissue_fallback', False)):
    return None
  if saved and saved.get('tissue_regional_model'):
    return regional_model.RegionalModel.from_dict(saved['tissue_regional_model'])
  return regional_intervals.fit_on_pairs(
      data.train, data.val, 'tissue', seed=config.seed,
      progress=ProgressBar('tissue-model fallback: visits measured'), known=known)


def experiment_metadata(config: ml_collections.ConfigDict, data: ExperimentData,
                        regional: regional_model.RegionalModel | None = None,
                        tissue_regional: regional_model.RegionalModel | None = None) -> dict:
  """What a checkpoint must carry to resume or forecast without the training code's state."""
  return {
      'regional_model': None if regional is None else regional.to_dict(),
      'tissue_regional_model': None if tissue_regional is None else tissue_regional.to_dict(),
      'config': json.loads(config.to_json()),
      'cohort': {'spec': config.cohort.spec, 'root': str(config.cohort.root)},
      'grid': {'shape': list(data.grid.shape), 'voxel_size_mm': list(data.grid.voxel_size_mm)},
      'normalizer': data.normalizer.to_dict(),
      'num_pairs': {'train': len(data.train), 'val': len(data.val), 'test': len(data.test)},
      'training_missing': missing_shares(data.train),
  }


def missing_shares(pairs: pd.DataFrame) -> dict[str, float]:
  """Share of the pairs (0-1) whose baseline lacks each covariate field (`covariates.FIELDS`)."""
  covs = [cohort.covariates_of(row) for row in pairs.to_dict('records')]
  return {f: float(np.mean([getattr(c, f) is None for c in covs])) if covs else 0.0
          for f in covariates.FIELDS}


def check_resumable(saved: dict, config: ml_collections.ConfigDict, where: Path) -> None:
  """Refuses to resume a checkpoint whose grid or model differ from `config`."""
  current = json.loads(config.to_json())
  for section in ('grid', 'model'):
    if saved['config'][section] != current[section]:
      raise ProgressionError(
          f'{where}: checkpoint was trained with {section}={saved["config"][section]}, '
          f'config has {current[section]}; use another --workdir')


def evaluate(p_eval_step, rstate, dataset: input_pipeline.PairDataset, local_batch: int) -> dict:
  """Mean of each metric over all pairs of `dataset` (padding masked out)."""
  sums: dict[str, float] = {}
  for batch in input_pipeline.eval_batches(dataset, local_batch, jax.process_index(),
                                           jax.process_count()):
    totals = parallel.unreplicate(p_eval_step(rstate, parallel.shard_batch(batch)))
    for k, v in totals.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  count = sums.pop('count')
  return {k: v / count for k, v in sums.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path
                       ) -> steps.TrainState:
  """Trains (or resumes) the generator described by `config`, writing into `workdir`.

  Returns the final state on the host. Raises ProgressionError on bad inputs and when
  the loss becomes non-finite (the last good checkpoint is kept).
  """
  workdir = Path(workdir).absolute()
  io.make_folder(workdir, 'workdir')
  data = load_experiment_data(config)
  local_batch = config.per_device_batch_size * jax.local_device_count()
  global_batch = local_batch * jax.process_count()
  cache_dir = workdir / 'cache' / 'x'.join(map(str, data.grid.shape))
  has_labels = baselines.volume_method_of(pd.concat([data.train, data.val])) == 'labels'
  if not has_labels and (config.loss.dice > 0 or config.loss.volume > 0 or config.model.prior):
    logging.warning('no label maps in the cohort: the Dice and volume loss terms are off%s',
                    '; the regional prior acts on the tissue model\'s brain, GM, WM and CSF'
                    if config.model.prior else '')
    config = _updated(config, 'loss', dice=0.0, volume=0.0)
  if config.model.prior:
    config = _updated(config, 'model', prior_source='labels' if has_labels else 'tissue')
  # Volumes measured for the regional models, kept for the evaluation (`visit_volumes`).
  known = visit_volumes.VisitVolumes(visit_volumes.file_in(workdir))
  regional = fit_regional_model(config, data, known) if config.model.prior else None
  checkpointer = checkpoints.Checkpointer(checkpoints.checkpoint_dir(workdir),
                                          keep=config.keep_checkpoints)
  resuming = checkpointer.latest_step() is not None
  saved = checkpointer.restore_metadata() if resuming else None
  if resuming:
    check_resumable(saved, config, checkpointer.directory)
  tissue_regional = fit_tissue_fallback(config, data, saved, known)
  make_dataset = lambda pairs: input_pipeline.PairDataset(
      pairs, data.grid, cache_dir, data.normalizer, regional,
      registration_spec=data.registration)
  train_set = make_dataset(data.train)
  val_set = make_dataset(data.val) if len(data.val) else None
  for name, dataset in (('training', train_set), ('validation', val_set)):
    if dataset is not None:
      dataset.warm_cache(progress=ProgressBar(f'{name} subjects preprocessed'))

  rng = jax.random.PRNGKey(config.seed)
  state = create_train_state(config, rng)
  metadata = experiment_metadata(config, data, regional, tissue_regional)
  if resuming:
    state, _ = checkpointer.restore(state)
    logging.info('resumed from %s at step %d', checkpointer.directory, int(state.step))
  start_step = int(state.step)

  weights = loss_weights(config)
  p_train_step = parallel.pmap_train_step(functools.partial(steps.train_step,
                                                            loss_weights=weights))
  p_eval_step = parallel.pmap_eval_step(functools.partial(steps.eval_step,
                                                          loss_weights=weights))
  rstate = parallel.replicate(state)
  rrng = parallel.replicate(jax.random.fold_in(rng, 1))
  writer = metric_writers.MetricWriter(workdir)
  batches = input_pipeline.prefetch(
      (input_pipeline.train_batch(
          train_set, step, global_batch=global_batch, seed=config.seed,
          process_index=jax.process_index(), process_count=jax.process_count(),
          intensity_jitter=config.augment.intensity_jitter,
          flip_lr_prob=config.augment.flip_lr_prob,
          covariate_dropout=config.augment.covariate_dropout)
       for step in range(start_step, config.num_steps)), config.prefetch_batches)

  progress = _Progress(start_step, config.num_steps)
  prior_only = None  # Validation metrics of the prior alone (the same at every step).
  try:
    for step in range(start_step + 1, config.num_steps + 1):
      rstate, metrics = p_train_step(rstate, parallel.shard_batch(next(batches)), rrng)
      metrics = parallel.unreplicate(metrics)
      if not np.isfinite(metrics['loss']):
        checkpointer.wait()
        raise ProgressionError(
            f'non-finite loss ({metrics["loss"]}) at step {step} (steps {step - 1}->{step}); '
            f'last good checkpoint: step {checkpointer.latest_step()} in '
            f'{checkpointer.directory}. Lower config.optim.learning_rate or check the inputs.')
      if step % config.log_every_steps == 0 or step == config.num_steps:
        writer.write(step, 'train', {**metrics, 'learning_rate':
                                     learning_rate_schedule(config)(step - 1)})
        logging.info('%s loss %.5f', progress.line(step), metrics['loss'])
      if val_set is not None and (step % config.eval_every_steps == 0
                                  or step == config.num_steps):
        val_metrics = evaluate(p_eval_step, rstate, val_set, local_batch)
        writer.write(step, 'val', val_metrics)
        logging.info('step %d validation loss %.5f', step, val_metrics['loss'])
        if config.model.prior:
          prior_only = prior_only or evaluate(p_eval_step, zero_residual(rstate), val_set,
                                              local_batch)
          metadata = {**metadata, 'residual': residual_gate(step, val_metrics, prior_only)}
          writer.write(step, 'val_prior_only', prior_only)
          logging.info('step %d residual %s on validation (volume error %.3g vs prior %.3g)',
                       step, 'kept' if metadata['residual']['enabled'] else 'switched off',
                       metadata['residual']['with_residual'],
                       metadata['residual']['prior_only'])
      if step % config.checkpoint_every_steps == 0 or step == config.num_steps:
        checkpointer.save(step, parallel.unreplicate(rstate), metadata)
  finally:
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  return parallel.unreplicate(rstate)


RESIDUAL_HEAD = 'velocity_head'  # The anchored generator's residual: zero = the prior alone.


def zero_residual(state):
  """`state` (or its params) with the residual head zeroed: the anchored generator's prior."""
  params = state.params if hasattr(state, 'params') else state
  params = {**params, RESIDUAL_HEAD: jax.tree_util.tree_map(jnp.zeros_like,
                                                             params[RESIDUAL_HEAD])}
  return state.replace(params=params) if hasattr(state, 'params') else params


RESIDUAL_MIN_GAIN = 0.05  # Relative drop of the validation volume error the residual must give.


def residual_gate(step: int, with_residual: dict, prior_only: dict) -> dict:
  """Keeps the learned residual only if it clearly improves the headline regions' volumes.

  The anchored generator must never be worse than its prior (DESIGN.md): the checkpoint
  records this decision and `Forecaster` drops a residual that did not help. Kept when the
  validation `headline_volume` error (squared log volume ratio, `losses.headline_volume_error`)
  falls by at least `RESIDUAL_MIN_GAIN` and no headline region's own error rises; with the
  volume term off, when the loss falls by that much.
  """
  key = 'headline_volume' if 'headline_volume' in with_residual else 'loss'
  ours, prior = float(with_residual[key]), float(prior_only[key])
  regions = [k for k in with_residual if k.startswith('headline_volume_')]
  worse = [k[len('headline_volume_'):] for k in regions
           if float(with_residual[k]) > float(prior_only[k])]
  return {'enabled': ours < (1.0 - RESIDUAL_MIN_GAIN) * prior and not worse, 'metric': key,
          'with_residual': ours, 'prior_only': prior, 'regions_worse': worse, 'step': int(step)}


def _updated(config: ml_collections.ConfigDict, section: str, **changes
             ) -> ml_collections.ConfigDict:
  """A copy of `config` with `changes` in `config[section]` (the caller's stays as it was)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config[section].update(changes)
  return config


class _Progress:
  """Formats 'step s/n, x steps/s, ETA' lines from wall-clock time since the first step."""

  def __init__(self, start_step: int, num_steps: int):
    self._start_step, self._num_steps = start_step, num_steps
    self._start_time = time.perf_counter()

  def line(self, step: int) -> str:
    elapsed = time.perf_counter() - self._start_time
    rate = (step - self._start_step) / max(elapsed, 1e-9)
    eta = (self._num_steps - step) / max(rate, 1e-9)
    return f'step {step}/{self._num_steps} ({rate:.2f} steps/s, ETA {eta:.0f} s)'

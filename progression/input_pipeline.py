"""Pairs table -> preprocessed arrays on the experiment grid -> sharded, prefetched batches.

Data-order determinism (what makes resume-after-kill bit-identical):
  The training stream is the concatenation of per-epoch permutations of the training
  pairs, epoch `e` permuted by `numpy.random.default_rng([seed, e])`. The global batch of
  step `s` is stream positions `[s*G, (s+1)*G)` (G = global batch size) and process `p`
  takes the contiguous slice `[s*G + p*L, s*G + (p+1)*L)` (L = local batch). The
  augmentation of position `q` is drawn from `default_rng([seed, 1, q])`. So a batch is a
  pure function of (seed, step, process layout): restarting at step s replays exactly the
  batches an uninterrupted run would have seen, and one process with G examples sees the
  same global batch as two processes with G/2 each.

Both images of a pair are resampled around the brain centre of the *baseline*, so the
pair stays aligned. With the cohort spec's `[registration]` enabled (`registration_spec`),
each follow-up is first rigidly registered to its baseline (`progression.registration`,
cached under `<cache_dir>/registration`) and re-expressed in the baseline's world (its
affine composed with the transform, no extra interpolation), so head repositioning between
sessions is not learned as atrophy; pairs whose alignment fails the check are refused or
left out, as the spec says. Without it, visits are assumed to share a world space (e.g.
rigidly registered to the baseline or to MNI). Preprocessed visits are cached as .npz files
per grid; `PairDataset.warm_cache` fills the cache up front, in parallel processes, so training
reads only cached arrays (a 120x144x120 NIfTI pair takes ~0.2 s to decode and resample).
"""

import dataclasses
import functools
import hashlib
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from progression import (cohort, cohort_spec, covariates, io, labels, preprocess, regional_model,
                         registration, workers)
from progression.errors import ProgressionError
from progression.evaluation import baselines, tissue, volumes
from progression.models import prior as prior_lib
from progression.progress import ProgressBar

Batch = dict[str, np.ndarray]


class PairDataset:
  """Random access to preprocessed (baseline, follow-up) pairs on one experiment grid."""

  def __init__(self, pairs: pd.DataFrame, grid: preprocess.Grid, cache_dir: str | Path,
               normalizer: covariates.CovariateNormalizer,
               regional: regional_model.RegionalModel | None = None,
               registration_spec: cohort_spec.RegistrationSpec | None = None):
    """`registration_spec`: the cohort spec's `[registration]`; None or disabled: none.

    Raises:
      ProgressionError: empty `pairs`; with registration and on_failure "error", any pair
        whose alignment fails its check (naming the files).
    """
    if len(pairs) == 0:
      raise ProgressionError('no pairs to load: the split is empty')
    self.cache_dir = Path(cache_dir)
    self._transforms: list[registration.RigidTransform] | None = None
    if registration_spec is not None and registration_spec.enabled:
      pairs, registrations = registration.register_pairs(
          pairs, self.cache_dir / 'registration', registration_spec.on_failure,
          ProgressBar('pairs registered (follow-up to baseline)'))
      if len(pairs) == 0:
        raise ProgressionError('no pairs to load: every pair failed registration')
      self._transforms = [r.transform for r in registrations]
    self.pairs = pairs.reset_index(drop=True)
    self.grid = grid
    self.has_labels = bool(self.pairs['baseline_labels'].notna().all()
                           and self.pairs['followup_labels'].notna().all())
    self.normalizer = normalizer
    # The prior's classes and rates: label maps, or the tissue model of a cohort without them.
    usable = regional is not None and (self.has_labels or regional.volume_method == 'tissue')
    self.regional = regional if usable else None
    self.prior_source = None if self.regional is None else self.regional.volume_method
    self._rate_regions = (() if self.regional is None
                          else prior_lib.prior_regions(self.prior_source).rate_regions)
    self._raw_covariates = [cohort.covariates_of(row) for _, row in self.pairs.iterrows()]
    self._covariates = covariates.encode_many(self._raw_covariates, normalizer)
    self._baseline_ml: dict[int, dict[str, float]] = {}

  def __len__(self) -> int:
    return len(self.pairs)

  def prior_log_rates(self, index: int, cov: covariates.Covariates,
                      baseline: Batch) -> np.ndarray:
    """The regional model's annual log change `[K]` (the prior's `rate_regions`) for pair
    `index`; `baseline`: its baseline visit's arrays (`_visit`)."""
    if self.prior_source == 'tissue':  # Measured at full resolution when preprocessed.
      baseline_ml = dict(zip(baselines.TISSUE_REGIONS, baseline['tissue_ml'].tolist()))
    else:
      if index not in self._baseline_ml:  # Measured once per pair, on the full-res labels.
        labels_path = self.pairs.iloc[index]['baseline_labels']
        self._baseline_ml[index] = baselines.measure_volumes_ml(None, _load_labels(labels_path),
                                                                'labels')
      baseline_ml = self._baseline_ml[index]
    rates = self.regional.log_rates(cov, baseline_ml)
    return np.asarray([rates.get(r, np.nan) for r in self._rate_regions], np.float32)

  def example(self, index: int, rng: np.random.Generator | None = None,
              covariate_dropout: float = 0.0) -> Batch:
    """Arrays of pair `index` (no batch axis): images `[x, y, z, 1]`, labels `[x, y, z]`.

    With `covariate_dropout` > 0 each covariate field is marked missing with that
    probability (drawn from `rng`), in the encoded covariates and the prior's rates alike.
    """
    row = self.pairs.iloc[index]
    baseline = self._visit(row['baseline_image'], row['baseline_labels'], None,
                           with_tissue=self.prior_source == 'tissue')
    center = baseline['center_mm']
    transform = None if self._transforms is None else self._transforms[index]
    followup = self._visit(row['followup_image'], row['followup_labels'], center, transform)
    if baseline['image'].shape != followup['image'].shape:
      raise ProgressionError(f'{row["followup_image"]}: grid differs from its baseline')
    example = {
        'baseline': baseline['image'][..., None],
        'followup': followup['image'][..., None],
        'years': np.float32(row['interval_years']),
        'covariates': self._covariates[index],
    }
    cov = self._raw_covariates[index]
    if covariate_dropout > 0:
      dropped = {f: None for f in covariates.FIELDS if rng.random() < covariate_dropout}
      if dropped:
        cov = dataclasses.replace(cov, **dropped)
        example['covariates'] = covariates.encode(cov, self.normalizer)
    if self.has_labels:
      example['baseline_labels'] = baseline['classes']
      example['followup_labels'] = followup['classes']
    if self.regional is not None:
      example['prior_log_rates'] = self.prior_log_rates(index, cov, baseline)
    if self.prior_source == 'tissue':
      example['prior_classes'] = baseline['tissue_classes']
    return example

  def warm_cache(self, num_workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
    """Preprocesses every pair not in the cache yet (the first epoch's work, done up front).

    Pairs are grouped by subject (a follow-up is resampled around its baseline's brain
    centre, so a subject's pairs share work) and the groups run in `num_workers` processes
    (None: serially when the first group suggests under ~10 s in all, else one per CPU).

    Args:
      progress: called with (subjects done, subjects) after each subject.
    """
    groups = [list(g) for g in self.pairs.groupby('subject', sort=False).indices.values()]
    report = progress or (lambda done, total: None)
    first = 0
    if num_workers is None:  # Time the first subject here to decide.
      start = time.perf_counter()
      _warm(self, groups[0])
      estimate_s = (time.perf_counter() - start) * (len(groups) - 1)
      num_workers = workers.available_cpus() if estimate_s > 10.0 else 1
      first = 1
      report(1, len(groups))
    jobs = [(self, g) for g in groups[first:]]
    for done, _ in enumerate(workers.map_unordered(_warm_job, jobs, num_workers), first + 1):
      report(done, len(groups))

  def _visit(self, image_path: str, labels_path, center_mm,
             transform: registration.RigidTransform | None = None,
             with_tissue: bool = False) -> dict[str, np.ndarray]:
    """A visit's arrays on the grid around `center_mm` (None: its own brain centre), first
    moved into the baseline's world by `transform` (a registered follow-up) if given;
    `with_tissue`: also its tissue classes on the grid and tissue volumes (mL)."""
    use_labels = self.has_labels and isinstance(labels_path, str)
    key = f'{image_path}|{labels_path if use_labels else ""}|{self.grid}|{center_mm}'
    if transform is not None:
      key += f'|{np.round(transform.fixed_to_moving, 6).tolist()}'
    if with_tissue:
      key += '|tissue'
    cache = self.cache_dir / (hashlib.sha1(key.encode()).hexdigest()[:20] + '.npz')
    if cache.is_file():
      with np.load(cache) as f:
        return dict(f)
    arrays = self._preprocess(image_path, labels_path if use_labels else None, center_mm,
                              transform, with_tissue)
    self.cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f'.tmp{os.getpid()}-{threading.get_ident()}.npz')
    np.savez(tmp, **arrays)
    tmp.replace(cache)
    return arrays

  def _preprocess(self, image_path: str, labels_path: str | None, center_mm,
                  transform: registration.RigidTransform | None = None,
                  with_tissue: bool = False):
    image = _load_image(image_path)
    label_map = _load_labels(labels_path) if labels_path else None
    if transform is not None:  # Registered follow-up: into the baseline's world.
      image = registration.in_fixed_space(image, transform)
      label_map = None if label_map is None else registration.in_fixed_space(label_map,
                                                                              transform)
    is_baseline = center_mm is None
    if is_baseline:
      center_mm = preprocess.brain_center_mm(image)
    gridded = preprocess.to_grid(image, self.grid, labels=label_map, center_mm=center_mm)
    if is_baseline and label_map is not None:  # Once per baseline file (then it is cached).
      brain = (label_map.data != labels.BACKGROUND) & (label_map.data != labels.CSF)
      preprocess.warn_if_brain_outside_grid(brain, image, self.grid, gridded.affine,
                                            'brain (label map)')
    arrays = {'image': gridded.image.astype(np.float32),
              'center_mm': np.asarray(center_mm, np.float64)}
    if label_map is not None:
      arrays['classes'] = labels.ids_to_classes(gridded.labels)
    if with_tissue:
      seg = tissue.segment_tissue(image.data)
      arrays['tissue_classes'] = preprocess.resample(
          seg, image.affine, self.grid.shape, gridded.affine, order=preprocess.NEAREST
      ).astype(np.uint8)
      measured = volumes.regional_volumes_ml(seg, image.voxel_volume_ml,
                                             regions=baselines.TISSUE_REGIONS)
      arrays['tissue_ml'] = np.asarray([measured[r] for r in baselines.TISSUE_REGIONS])
    return arrays


# A follow-up is preprocessed once per baseline centre it is paired with: keep the last
# few decoded files (a subject's visits, when its pairs are warmed together).
_load_image = functools.lru_cache(maxsize=4)(io.load_image)
_load_labels = functools.lru_cache(maxsize=4)(io.load_labels)


def _warm(dataset: PairDataset, indices: list[int]) -> None:
  for index in indices:
    dataset.example(int(index))


def _warm_job(job: tuple[PairDataset, list[int]]) -> None:
  _warm(*job)


def augment(example: Batch, rng: np.random.Generator, intensity_jitter: float,
            flip_lr_prob: float) -> Batch:
  """Same random gain/offset on both images; left-right flip with label classes swapped.

  The x axis is R in RAS+, so a flip mirrors left and right: label classes are
  permuted so a left hippocampus becomes a right one.
  """
  out = dict(example)
  gain = 1.0 + intensity_jitter * rng.standard_normal()
  offset = intensity_jitter * rng.standard_normal()
  for key in ('baseline', 'followup'):
    out[key] = (example[key] * gain + offset).astype(np.float32)
  if rng.random() < flip_lr_prob:
    permutation = labels.left_right_class_permutation()
    for key in ('baseline', 'followup'):
      out[key] = np.ascontiguousarray(out[key][::-1])
    for key in ('baseline_labels', 'followup_labels'):
      if key in out:
        out[key] = np.ascontiguousarray(permutation[out[key][::-1]])
    if 'prior_classes' in out:  # Tissue classes: no left or right.
      out['prior_classes'] = np.ascontiguousarray(out['prior_classes'][::-1])
  return out


def stream_indices(positions: np.ndarray, num_examples: int, seed: int) -> np.ndarray:
  """Dataset index at each stream position (per-epoch seeded permutations, see module doc)."""
  epochs = positions // num_examples
  out = np.empty_like(positions)
  for epoch in np.unique(epochs):
    permutation = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    chosen = epochs == epoch
    out[chosen] = permutation[positions[chosen] % num_examples]
  return out


def local_positions(step: int, global_batch: int, process_index: int,
                    process_count: int) -> np.ndarray:
  """Stream positions this process loads at `step`."""
  local = global_batch // process_count
  start = step * global_batch + process_index * local
  return np.arange(start, start + local)


def train_batch(dataset: PairDataset, step: int, *, global_batch: int, seed: int,
                process_index: int = 0, process_count: int = 1,
                intensity_jitter: float = 0.0, flip_lr_prob: float = 0.0,
                covariate_dropout: float = 0.0) -> Batch:
  """The host-local batch `[local_batch, ...]` of training step `step` (deterministic)."""
  positions = local_positions(step, global_batch, process_index, process_count)
  indices = stream_indices(positions, len(dataset), seed)
  examples = []
  for i, q in zip(indices, positions):
    dropout_rng = np.random.default_rng([seed, 2, int(q)])
    examples.append(augment(dataset.example(int(i), dropout_rng, covariate_dropout),
                            np.random.default_rng([seed, 1, int(q)]), intensity_jitter,
                            flip_lr_prob))
  return stack(examples)


def eval_batches(dataset: PairDataset, local_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """All pairs once, this process's share, padded to full batches with `valid` = 0."""
  global_batch = local_batch * process_count
  num_steps = -(-len(dataset) // global_batch)
  for step in range(num_steps):
    positions = local_positions(step, global_batch, process_index, process_count)
    examples = []
    for q in positions:
      example = dataset.example(int(min(q, len(dataset) - 1)))
      examples.append({**example, 'valid': np.float32(q < len(dataset))})
    yield stack(examples)


def stack(examples: list[Batch]) -> Batch:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def prefetch(iterator: Iterator[Batch], size: int) -> Iterator[Batch]:
  """Runs `iterator` in a background thread, `size` items ahead; re-raises its errors."""
  if size <= 0:
    yield from iterator
    return
  items: queue.Queue = queue.Queue(maxsize=size)
  done = object()
  stop = threading.Event()

  def produce():
    try:
      for item in iterator:
        while not stop.is_set():
          try:
            items.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      items.put(done)
    except BaseException as e:  # Handed to the consumer, which re-raises it.
      items.put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = items.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()

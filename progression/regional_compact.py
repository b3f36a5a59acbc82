"""The regional model's compact companion: a small ridge its rates are averaged with.

With a few dozen training subjects the full regional model (`regional_model`: indicators,
interactions, subject weights, cross-validated penalties) is noisier than what the data can
support, and a plain ridge on nine baseline features predicts about as well with different
errors. The regional model's annual log rate is therefore

    y = (1 - w) y_full + w y_compact,   w = COMPACT_SUBJECTS / (COMPACT_SUBJECTS + n),

n the training subjects: equal weight at 25 subjects, a third at 50, a tenth at 225. The
compact ridge has the diagnosis indicators (MCI, AD), age, sex, APOE4, MMSE and CDR-SB and
the baseline fractions of the head of the anatomy markers (hippocampus and lateral
ventricles with label maps, every tissue class without); a missing field takes its training
mean; every pair weighs the same; the penalty is `PENALTY` on standardised features.
Measured on cached volume tables (MAE relative to the population rate, mean of hippocampus,
lateral ventricles and whole brain over 5-10 subject splits; full -> blended): a fresh
90-subject 3 mm cohort (54 training subjects, not used to design the model) 0.832 -> 0.822
(the compact ridge alone 0.814), the e2e cohorts (36) 0.824 -> 0.812 and 0.840 -> 0.831, the
4 mm demo cohort 0.973 -> 0.954, cohort400 at 30 0.797 -> 0.790; level (within 0.2 %) with
54-240 subjects of cohort400 and on cohort200, where the full model has the data it needs.
COMPACT_SUBJECTS = 50 gained 0.1-0.4 % more below 55 subjects and lost as much above; on the
standard experiment's split (cohort200, 120 training subjects) it cost 1.5-2.6 % on the
headline regions against 1-1.4 % at 25.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from progression import regional_ridge

COMPACT_SUBJECTS = 25.0  # Training subjects at which both models weigh the same.
PENALTY = 10.0  # Ridge penalty on the standardised features (per pair, unweighted).


def blend_weight(num_subjects: int) -> float:
  """The compact model's share w of the blended annual log rate (see the module docstring)."""
  return COMPACT_SUBJECTS / (COMPACT_SUBJECTS + max(int(num_subjects), 0))


@dataclasses.dataclass(frozen=True)
class CompactRidge:
  """A fitted compact ridge over raw feature vectors (NaN: missing), JSON-able.

  Attributes:
    anatomy_regions: the regions whose fraction of the head ends each feature vector.
    fill: per feature, the training mean a missing (NaN) value takes.
    mean, scale: standardisation of each feature (training pairs, after filling).
    coefficients: region -> [intercept, *per standardised feature] (log change per year).
  """
  anatomy_regions: tuple[str, ...]
  fill: tuple[float, ...]
  mean: tuple[float, ...]
  scale: tuple[float, ...]
  coefficients: dict[str, tuple[float, ...]]

  def log_rates(self, features: np.ndarray) -> dict[str, float]:
    """Annual log change (1/year) per region for one raw feature vector."""
    x = np.where(np.isnan(features), self.fill, features)
    design = np.concatenate([[1.0], (x - np.asarray(self.mean)) / np.asarray(self.scale)])
    return {r: float(design @ np.asarray(c)) for r, c in self.coefficients.items()}

  def to_dict(self) -> dict[str, Any]:
    return {'anatomy_regions': list(self.anatomy_regions), 'fill': list(self.fill),
            'mean': list(self.mean), 'scale': list(self.scale),
            'coefficients': {r: list(c) for r, c in self.coefficients.items()}}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> 'CompactRidge':
    floats = lambda values: tuple(float(v) for v in values)
    return cls(anatomy_regions=tuple(data['anatomy_regions']), fill=floats(data['fill']),
               mean=floats(data['mean']), scale=floats(data['scale']),
               coefficients={r: floats(c) for r, c in data['coefficients'].items()})


def fit(features: np.ndarray, targets: Mapping[str, Sequence[float]],
        anatomy_regions: Sequence[str]) -> CompactRidge:
  """Fits one ridge per region: `features` `[pairs, p]` (NaN: missing; the last ones the
  fractions of `anatomy_regions`), `targets` region -> `[pairs]` annual log changes (1/year).
  """
  fill = np.nanmean(np.where(np.isnan(features).all(axis=0), 0.0, features), axis=0)
  design, mean, scale = regional_ridge.standardized_design(
      np.where(np.isnan(features), fill, features))
  penalties = regional_ridge.penalty_vector(PENALTY, 1.0, np.zeros(design.shape[1], bool))
  weights = np.ones(len(design))
  coefficients = {r: tuple(float(b) for b in regional_ridge.ridge(design, np.asarray(y),
                                                                   weights, penalties))
                  for r, y in targets.items()}
  return CompactRidge(anatomy_regions=tuple(anatomy_regions),
                      fill=tuple(float(v) for v in fill), mean=tuple(float(v) for v in mean),
                      scale=tuple(float(v) for v in scale), coefficients=coefficients)

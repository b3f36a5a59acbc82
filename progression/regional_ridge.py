"""The regional model's solver: weighted ridge fits and their cross-validated settings.

`regional_model.fit` builds one design matrix (`standardized_design`: intercept, standardised
features; covariate-dropout copies after the original rows) and, per region, an annual log
rate `y`; these functions choose the ridge settings by subject-grouped cross-validation, fit
the coefficients and estimate the two variance components of the residuals (rate and
one-visit measurement). `regional_compact` fits its plain ridge with the same pieces.
"""

from collections.abc import Sequence

import numpy as np


def standardized_design(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Design matrix [1, (x - mean) / scale] of raw features `x` [rows, p], with the mean and
  scale (the sd; 1 for a constant column) that a prediction must apply the same way."""
  mean, sd = x.mean(axis=0), x.std(axis=0)
  scale = np.where(sd > 1e-9, sd, 1.0)
  return np.concatenate([np.ones((len(x), 1)), (x - mean) / scale], axis=1), mean, scale


def penalty_vector(penalty: float, factor: float, interacting: np.ndarray) -> np.ndarray:
  """Per design column: 0 for the intercept, `penalty` x (`factor` for interactions, else 1)."""
  penalties = penalty * np.where(interacting, factor, 1.0)
  penalties[0] = 0.0
  return penalties


def ridge(design: np.ndarray, y: np.ndarray, weights: np.ndarray, penalties: np.ndarray
          ) -> np.ndarray:
  """Weighted ridge solution with a penalty per column; weights normalised to mean 1."""
  w = weights / weights.mean()
  gram = design.T @ (design * w[:, None])
  return np.linalg.solve(gram + np.diag(penalties), design.T @ (w * y))


def two_step_ridge(design: np.ndarray, y: np.ndarray, share: np.ndarray, years: np.ndarray,
                   penalties: np.ndarray, num_original: int
                   ) -> tuple[np.ndarray, float, float]:
  """Coefficients, rate variance and measurement variance of one region's weighted fit.

  First weighted by share x t^2 (a rate over t years is t times as precise), then by share /
  (sigma_rate^2 + 2 sigma_meas^2 / t^2) with the variance components of the first fit's
  residuals on the original rows (the first `num_original`), which are then re-estimated.
  """
  beta = ridge(design, y, share * years ** 2, penalties)
  original_years = years[:num_original]
  rate_var, meas_var = variance_components((y - design @ beta)[:num_original], original_years)
  beta = ridge(design, y, share / (rate_var + 2.0 * meas_var / years ** 2), penalties)
  rate_var, meas_var = variance_components((y - design @ beta)[:num_original], original_years)
  return beta, rate_var, meas_var


def cross_validated_options(design: np.ndarray, y: np.ndarray, weights: np.ndarray,
                            fold: np.ndarray, num_original: int, interacting: np.ndarray,
                            grid: Sequence[tuple[float, float, bool]]
                            ) -> dict[bool, tuple[float, float, float]]:
  """Per augmentation option in `grid`, its best (penalty, interaction factor, CV error).

  `grid` holds (penalty, interaction factor, with the augmented copies: the rows after the
  first `num_original`). Folds hold whole subjects (`fold`, one id per row, augmented copies
  with their subject), so no subject informs its own prediction; errors are weighted squared
  errors of the held-out original (unmasked) rows. A fold's penalty is scaled by its share
  of the rows, so it weighs against the data as the full fit's does.
  """
  original = np.arange(len(y)) < num_original
  errors = np.zeros(len(grid))
  for k in np.unique(fold):
    held = (fold == k) & original
    if not held.any():
      continue
    for i, (penalty, factor, augment) in enumerate(grid):
      train = (fold != k) & (original | augment)
      if not train.any():
        continue
      used = len(y) if augment else num_original
      penalties = penalty_vector(penalty * train.sum() / used, factor, interacting)
      beta = ridge(design[train], y[train], weights[train], penalties)
      errors[i] += np.sum(weights[held] * (y[held] - design[held] @ beta) ** 2)
  best = {}
  for (penalty, factor, augment), error in zip(grid, errors):
    if augment not in best or error < best[augment][2]:
      best[augment] = (penalty, factor, float(error))
  return best


def variance_components(residual: np.ndarray, years: np.ndarray) -> tuple[float, float]:
  """(rate variance 1/year^2, one-visit log-volume variance) from annual-rate residuals.

  E[residual^2] = sigma_rate^2 + 2 sigma_meas^2 / t^2: least squares on [1, 2/t^2], each
  component floored at a small positive value.
  """
  basis = np.stack([np.ones_like(years), 2.0 / years ** 2], axis=1)
  if len(np.unique(np.round(years, 6))) > 1:
    solution = np.linalg.lstsq(basis, residual ** 2, rcond=None)[0]
  else:
    solution = np.array([np.mean(residual ** 2), 0.0])
  floor = 1e-10 + 1e-3 * float(np.mean(residual ** 2))
  return float(max(solution[0], floor)), float(max(solution[1], 1e-12))

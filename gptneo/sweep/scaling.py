"""A power law of validation loss against model size, when a sweep varies the size.

Each size counts with its best point (the lowest final validation loss over the other axes,
e.g. the best learning rate of each width), and sizes are non-embedding parameters (Kaplan et
al. 2020). Four or more sizes: L(N) = a * N^-alpha + c, c (the irreducible loss) by a search
over [0, min L), a and alpha by least squares in log space for each c. Three sizes can't pin
c: L(N) = a * N^-alpha, a line in log-log. Two sizes: no fit (a line through two points fits
anything and tests nothing); the report still shows each size's best point.
"""
import dataclasses
import math

import numpy as np

_C_STEPS = 400
MIN_SIZES = 3  # the fewest model sizes a power law is fitted through


@dataclasses.dataclass(frozen=True)
class Fit:
  """L(N) = a * N^-alpha + c through `sizes` (non-embedding parameters) and `losses`; with
  fewer than MIN_SIZES sizes a, alpha and c are None: the sizes and losses, no fit."""
  a: float | None
  alpha: float | None
  c: float | None
  sizes: tuple
  losses: tuple
  all_points: tuple  # (size, loss, name) of every point with a validation loss

  @property
  def fitted(self) -> bool:
    return self.a is not None

  @property
  def degrees_of_freedom(self) -> int:
    """Sizes beyond the fitted parameters: what is left to test the form with."""
    return len(self.sizes) - (3 if self.c else 2)

  def __call__(self, n):
    return self.a * np.power(n, -self.alpha) + self.c

  def formula(self) -> str:
    form = f"{self.a:.4g} * N^-{self.alpha:.4f}" + (f" + {self.c:.4f}" if self.c else "")
    return f"L(N) = {form}"

  def describe(self) -> str:
    if not self.fitted:
      return (f"no fit: {len(self.sizes)} model sizes (a power law is fitted through "
              f"{MIN_SIZES} or more)")
    rms = math.sqrt(np.mean((self(np.array(self.sizes)) - np.array(self.losses)) ** 2))
    return (f"{self.formula()} (N: non-embedding parameters; {len(self.sizes)} sizes, "
            f"{self.degrees_of_freedom} degrees of freedom left, rms error {rms:.4f})")


def _line(log_n, log_l):
  slope, intercept = np.polyfit(log_n, log_l, 1)
  return math.exp(intercept), -slope


def fit(sizes, losses):
  """(a, alpha, c) of the simplest honest form for these (size, best loss) pairs, or None
  below MIN_SIZES sizes."""
  n, loss = np.array(sizes, float), np.array(losses, float)
  if len(n) < MIN_SIZES:
    return None
  if len(n) < 4:
    a, alpha = _line(np.log(n), np.log(loss))
    return a, alpha, 0.0
  best = None
  for c in np.linspace(0.0, loss.min(), _C_STEPS, endpoint=False):
    a, alpha = _line(np.log(n), np.log(loss - c))
    error = float(np.sum((a * n ** -alpha + c - loss) ** 2))
    if best is None or error < best[0]:
      best = (error, a, alpha, float(c))
  return best[1:]


def fit_table(table, facts_by_name):
  """The Fit over the report's done points if they hold two model sizes or more (below
  MIN_SIZES: a Fit without parameters, the sizes' best points only), else None."""
  found = [(facts_by_name[r["point"]].parameters - facts_by_name[r["point"]].embedding_parameters,
            r["val_loss_final"], r["point"]) for r in table if r["status"] == "done"
           and isinstance(r["val_loss_final"], float) and math.isfinite(r["val_loss_final"])]
  best = {}
  for size, loss, _ in found:
    best[size] = min(loss, best.get(size, math.inf))
  sizes = sorted(best)
  if len(sizes) < 2:
    return None
  params = fit(sizes, [best[s] for s in sizes]) or (None, None, None)
  return Fit(*params, tuple(sizes), tuple(best[s] for s in sizes), tuple(found))

"""A power law of validation loss against model size, when a sweep varies the size.

Each size counts with its best point (the lowest final validation loss over the other axes,
e.g. the best learning rate of each width), and sizes are non-embedding parameters (Kaplan et
al. 2020). Four or more sizes: L(N) = a * N^-alpha + c, c (the irreducible loss) by a search
over [0, min L), a and alpha by least squares in log space for each c. Two or three sizes
can't pin c: L(N) = a * N^-alpha, a line in log-log. One size: no fit.
"""
import dataclasses
import math

import numpy as np

_C_STEPS = 400


@dataclasses.dataclass(frozen=True)
class Fit:
  """L(N) = a * N^-alpha + c through `sizes` (non-embedding parameters) and `losses`."""
  a: float
  alpha: float
  c: float
  sizes: tuple
  losses: tuple
  all_points: tuple  # (size, loss, name) of every point with a validation loss

  def __call__(self, n):
    return self.a * np.power(n, -self.alpha) + self.c

  def describe(self):
    form = f"{self.a:.4g} * N^-{self.alpha:.4f}" + (f" + {self.c:.4f}" if self.c else "")
    rms = math.sqrt(np.mean((self(np.array(self.sizes)) - np.array(self.losses)) ** 2))
    return (f"L(N) = {form} (N: non-embedding parameters; {len(self.sizes)} sizes, "
            f"{len(self.sizes) - (3 if self.c else 2)} degrees of freedom left, rms error "
            f"{rms:.4f})")


def _line(log_n, log_l):
  slope, intercept = np.polyfit(log_n, log_l, 1)
  return math.exp(intercept), -slope


def fit(sizes, losses):
  """The Fit of the simplest honest form for these (size, best loss) pairs, or None."""
  n, loss = np.array(sizes, float), np.array(losses, float)
  if len(n) < 2:
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
  """The Fit over the report's done points, if they hold two model sizes or more."""
  found = [(facts_by_name[r["point"]].parameters - facts_by_name[r["point"]].embedding_parameters,
            r["val_loss_final"], r["point"]) for r in table if r["status"] == "done"
           and isinstance(r["val_loss_final"], float) and math.isfinite(r["val_loss_final"])]
  best = {}
  for size, loss, _ in found:
    best[size] = min(loss, best.get(size, math.inf))
  sizes = sorted(best)
  params = fit(sizes, [best[s] for s in sizes])
  if params is None:
    return None
  return Fit(*params, tuple(sizes), tuple(best[s] for s in sizes), tuple(found))

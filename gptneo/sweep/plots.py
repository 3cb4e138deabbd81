"""loss.png (every point's training and validation curves) and scaling.png (the size fit)."""
import math

import matplotlib
from matplotlib import pyplot as plt
import numpy as np

from gptneo.sweep import metrics

matplotlib.use("Agg")  # headless: a training machine has no display (pyplot draws on demand)

LOSS_PNG, SCALING_PNG = "loss.png", "scaling.png"


def _finite_curve(records):
  pairs = [(r["step"], r["loss"]) for r in records
           if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def _upper_limit(curves):
  """The top of the loss axis: a little over the highest first loss (about ln(vocab size)),
  so a point whose loss climbs (a learning rate too high) does not squash the others."""
  first = [c[1][0] for _, c in curves if c[1]]
  return max(first) * 1.05 if first else None


def loss_curves(root, points, table, path):
  """Training (left) and validation (right) loss against step, a color and label per point."""
  status = {r["point"]: r["status"] for r in table}
  order = [r["point"] for r in table]  # the legend lists the best first, like the table
  best = next((r["point"] for r in table if r["best"]), None)
  by_name = {p.name: p for p in points}
  colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(order), 1)))
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
  diverged = {n for n, s in status.items() if s == "diverged"}
  curves = {"train": [], "val": []}
  for color, name in zip(colors, order, strict=True):
    sources = root.log_sources(by_name[name])
    style = "--" if name in diverged else "-"
    label = name + (f" ({status[name]})" if status[name] != "done" else "")
    label += " (best)" if name == best else ""
    for key, axes, records in (("train", left, metrics.train(*sources)),
                               ("val", right, metrics.validation(*sources))):
      curve = _finite_curve(records)
      curves[key].append((name, curve))
      axes.plot(*curve, style, color=color, label=label, marker="." if key == "val" else None)
  top = _upper_limit(curves["train"])
  for axes, title in ((left, "training loss"), (right, "validation loss")):
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    if top:
      axes.set_ylim(top=top)
  left.set_ylabel("loss (nats/token)")
  right.legend(fontsize=8, loc="upper right")
  fig.suptitle(f"sweep {root.name}: {len(order)} points, best first in the legend")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def scaling(fit, path):
  """Validation loss against non-embedding parameters: every point, each size's best, the fit."""
  fig, axes = plt.subplots(figsize=(7, 5))
  sizes, losses, _ = zip(*fit.all_points, strict=True)
  axes.scatter(sizes, losses, color="0.7", label="every point")
  axes.scatter(fit.sizes, fit.losses, color="C0", zorder=3, label="best of each size")
  n = np.geomspace(min(fit.sizes) / 1.5, max(fit.sizes) * 1.5, 100)
  axes.plot(n, fit(n), color="C1", label=fit.describe().split(" (")[0])
  axes.set_xscale("log")
  axes.set_xlabel("non-embedding parameters N")
  axes.set_ylabel("final validation loss")
  axes.grid(alpha=0.3, which="both")
  axes.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)

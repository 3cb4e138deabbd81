"""loss.png (every point's training and validation curves, and the final validation loss
against a numeric axis) and scaling.png (validation loss against model size).

A point's colour says its axis values: the numeric axis of the most values (the first of a
tie: the learning rate, say) is the x of the third panel and the shade of a colour, the other
axes' values (the width) pick the colour family, so a line per width shows how the best
learning rate moves with it. A sweep
whose points don't split that way (no numeric axis, more groups than families) gets one
qualitative colour per point. One legend, beside the panels, names every point.
"""
import dataclasses
import math

import matplotlib
from matplotlib import pyplot as plt
import numpy as np

from gptneo.sweep import metrics

matplotlib.use("Agg")  # headless: a training machine has no display (pyplot draws on demand)

LOSS_PNG, SCALING_PNG = "loss.png", "scaling.png"
_FAMILIES = ("Blues", "Oranges", "Greens", "Purples", "Reds", "Greys", "YlOrBr", "RdPu")


@dataclasses.dataclass(frozen=True)
class Styles:
  """How loss.png tells the points apart.

  Attributes:
    colors: {point name: RGBA}.
    x_key: the axis the third panel puts on x (None: no such panel).
    groups: {group label (the other axes' values): [point names, in order of x]}.
  """
  colors: dict
  x_key: str | None
  groups: dict


def _number(text):
  try:
    value = float(text)
  except ValueError:
    return None
  return value if math.isfinite(value) else None


def point_styles(points) -> Styles:
  """The colours of `points` (spec.Point) and their grouping by the x axis.

  Args:
    points: the sweep's points.
  """
  keys = list(points[0].labels) if points else []
  distinct = {k: len({_number(p.labels[k]) for p in points}) for k in keys
              if all(_number(p.labels[k]) is not None for p in points)}
  # The numeric axis of the most values (the first of a tie): the learning rate of a grid.
  x_key = max((k for k in distinct if distinct[k] > 1), key=distinct.get, default=None)
  groups = {}
  for point in points:
    label = ",".join(f"{k}={v}" for k, v in point.labels.items() if k != x_key) or x_key
    groups.setdefault(label, []).append(point)
  if x_key is None or len(groups) > len(_FAMILIES):
    palette = plt.cm.tab10 if len(points) <= 10 else plt.cm.tab20
    colors = {p.name: palette(i % palette.N) for i, p in enumerate(points)}
    return Styles(colors, None, {})
  colors, ordered = {}, {}
  for family, (label, members) in zip(_FAMILIES, groups.items(), strict=False):  # fewer groups
    xs = sorted({_number(p.labels[x_key]) for p in members})
    for point in members:
      rank = xs.index(_number(point.labels[x_key]))  # darker = larger x
      colors[point.name] = plt.get_cmap(family)(0.4 + 0.55 * rank / max(len(xs) - 1, 1))
    ordered[label] = [p.name for p in sorted(members, key=lambda p: _number(p.labels[x_key]))]
  return Styles(colors, x_key, ordered)


def _finite_curve(records):
  pairs = [(r["step"], r["loss"]) for r in records
           if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def _upper_limit(curves):
  """The top of the loss axis: a little over the highest first loss (about ln(vocab size)),
  so a point whose loss climbs (a learning rate too high) does not squash the others."""
  first = [c[1][0] for c in curves if c[1]]
  return max(first) * 1.05 if first else None


def loss_figure(root, points, table):
  """The figure of loss.png (see the module's docstring); the caller saves and closes it.

  Args:
    root: the sweep's root_lib.Root (where each point's logs are read).
    points: the sweep's points.
    table: report.rows(root), best first.
  """
  by_name = {r["point"]: r for r in table}
  styles = point_styles(points)
  panels = 3 if styles.x_key else 2
  fig, axes = plt.subplots(1, panels, figsize=(6 * panels + 3, 5))
  train_axes, val_axes = axes[0], axes[1]
  curves = []
  for name in (r["point"] for r in table):  # best first, as the legend lists them
    row, point = by_name[name], next(p for p in points if p.name == name)
    sources = root.log_sources(point)
    label = name + (f" ({row['status']})" if row["status"] != "done" else "")
    label += " (best)" if row["best"] else ""
    style = "--" if row["status"] == "diverged" else "-"
    train = _finite_curve(metrics.train(*sources))
    curves.append(train)
    train_axes.plot(*train, style, color=styles.colors[name], label=label)
    val_axes.plot(*_finite_curve(metrics.validation(*sources)), style, marker=".",
                  color=styles.colors[name])
  top = _upper_limit(curves)
  for panel, title in ((train_axes, "training loss"), (val_axes, "validation loss")):
    panel.set_title(title)
    panel.set_xlabel("step")
    panel.set_ylabel("loss (nats/token)")
    panel.grid(alpha=0.3)
    if top:
      panel.set_ylim(top=top)
  if styles.x_key:
    _final_against_x(axes[2], styles, by_name, points)
  fig.legend(*train_axes.get_legend_handles_labels(), loc="center right", fontsize=8,
             title="point (best first)")
  fig.suptitle(f"sweep {root.name}: {len(table)} points")
  fig.tight_layout(rect=(0, 0, 1 - 2.8 / fig.get_figwidth(), 1))
  return fig


def _final_against_x(panel, styles, by_name, points):
  """Final validation loss against the x axis: a line per group of the other axes' values."""
  x_of = {p.name: _number(p.labels[styles.x_key]) for p in points}
  xs = [x_of[name] for members in styles.groups.values() for name in members]
  for label, members in styles.groups.items():
    found = [(x_of[n], by_name[n]["val_loss_final"]) for n in members
             if isinstance(by_name[n]["val_loss_final"], float)
             and math.isfinite(by_name[n]["val_loss_final"])]
    if found:
      color = styles.colors[members[len(members) // 2]]
      panel.plot(*zip(*found, strict=True), "-o", color=color, label=label)
  if min(xs) > 0 and max(xs) / min(xs) >= 10:
    panel.set_xscale("log")
  panel.set_title(f"final validation loss against {styles.x_key}")
  panel.set_xlabel(styles.x_key)
  panel.set_ylabel("loss (nats/token)")
  panel.grid(alpha=0.3, which="both")
  panel.legend(fontsize=8)


def loss_curves(root, points, table, path):
  """Writes loss.png (loss_figure) to `path`."""
  fig = loss_figure(root, points, table)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def scaling_figure(fit):
  """Validation loss against non-embedding parameters: every point, each size's best and the
  fit; with too few sizes for one (fit.fitted is False) the plot's title says so, and a fit
  with one degree of freedom or none left says it is rough.

  Args:
    fit: scaling.Fit of the report.
  """
  fig, axes = plt.subplots(figsize=(7, 5))
  sizes, losses, _ = zip(*fit.all_points, strict=True)
  axes.scatter(sizes, losses, color="0.7", label="every point")
  axes.scatter(fit.sizes, fit.losses, color="C0", zorder=3, label="best of each size")
  if fit.fitted:
    n = np.geomspace(min(fit.sizes) / 1.5, max(fit.sizes) * 1.5, 100)
    axes.plot(n, fit(n), color="C1", label=fit.formula())
  warning = (fit.describe() if not fit.fitted else
             f"rough: {len(fit.sizes)} sizes, {fit.degrees_of_freedom} degree(s) of freedom "
             f"left to test the form" if fit.degrees_of_freedom <= 1 else None)
  if warning:  # the title: seen first, hiding no point
    axes.set_title(warning, color="C3", fontsize=10, wrap=True)
  axes.set_xscale("log")
  axes.set_xlabel("non-embedding parameters N")
  axes.set_ylabel("final validation loss")
  axes.grid(alpha=0.3, which="both")
  axes.legend(fontsize=8)
  fig.tight_layout()
  return fig


def scaling(fit, path):
  """Writes scaling.png (scaling_figure) to `path`."""
  fig = scaling_figure(fit)
  fig.savefig(path, dpi=110)
  plt.close(fig)

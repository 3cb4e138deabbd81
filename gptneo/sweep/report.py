"""The sweep's report: one row per point in results.csv and results.md, the plots, HParams.

Every number comes from the point's own files: train_metrics.jsonl (steps, training loss,
tokens/s), eval.jsonl (validation loss, bits per byte) and sweep_state.json (attempts, wall
time). A point whose runs another launcher started (--print_commands, slurm) has no state:
its status is read from its logs.
"""
import csv
import io
import math
import statistics
import time

from gptneo.sweep import hparams
from gptneo.sweep import metrics
from gptneo.sweep import plots
from gptneo.sweep import root as root_lib
from gptneo.sweep import scaling
from gptneo.sweep import spec as spec_lib

RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"
COLUMNS = ("status", "steps", "train_loss", "val_loss_best", "val_loss_final",
           "bits_per_byte", "tokens_per_s", "wall_time_s", "parameters")


def open_root(path):
  root = root_lib.Root(path)
  root.points()  # refuses a folder without a sweep
  return root


def _status(state, records, train_steps, driver_running):
  if state["status"] == "running":
    return "running" if driver_running else "interrupted"
  if state["status"] != "pending" or state["attempts"]:
    return state["status"]
  if metrics.first_non_finite(records) is not None:  # run by another launcher
    return "diverged"
  if records and records[-1]["step"] >= train_steps:
    return "done"
  return "unfinished" if records else "pending"


def _wall_time(state):
  spans = [a["end"] - a["start"] for a in state["attempts"] if "end" in a]
  return sum(spans) if spans else None


def _finite(values):
  return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def row(root, point, facts, driver_running=False):
  """The point's results as a dict: its axis values, then COLUMNS."""
  sources = root.log_sources(point)
  records, evals = metrics.train(*sources), metrics.validation(*sources)
  state = root.state(point)
  status = _status(state, records, facts.train_steps, driver_running)
  nan_step = metrics.first_non_finite(records)
  speeds = _finite(r.get("tokens_per_sec") for r in records)
  val = _finite(e.get("loss") for e in evals)
  return {"point": point.name, **point.labels, "status": status,
          "steps": nan_step if nan_step is not None else (records[-1]["step"] if records else 0),
          "train_loss": records[-1]["loss"] if records else None,
          "val_loss_best": min(val) if val else None,
          "val_loss_final": evals[-1].get("loss") if evals else None,
          "bits_per_byte": evals[-1].get("bits_per_byte") if evals else None,
          "tokens_per_s": statistics.median(speeds) if speeds else None,
          "wall_time_s": _wall_time(state), "parameters": facts.parameters,
          "train_steps": facts.train_steps, "index": point.index,
          **({"trials": ",".join(map(str, state["trials"]))} if "trials" in state else {}),
          **({"pruned_step": state["pruned_step"]} if status == "pruned" else {})}


def _sort_key(r):
  """Points done first; then by final validation loss, then training loss."""
  val, loss = _finite([r["val_loss_final"]]), _finite([r["train_loss"]])
  return (r["status"] != "done", not val, val[0] if val else 0.0, not loss,
          loss[0] if loss else 0.0, r["index"])


def rows(root):
  """Every point's row, best first: by final validation loss, then training loss."""
  points, facts = root.points()
  running = root.driver_running()
  table = [row(root, p, f, running) for p, f in zip(points, facts, strict=True)]
  table.sort(key=_sort_key)
  for r in table:
    r["best"] = False
  if table and table[0]["status"] == "done":
    table[0]["best"] = True
  return table


def axis_keys(table):
  fixed = {"point", "best", "train_steps", "index", "trials", "pruned_step", *COLUMNS}
  return [k for k in table[0] if k not in fixed] if table else []


def to_csv(table):
  out = io.StringIO()
  fields = ["point", *_trials(table), *axis_keys(table), *COLUMNS,
            *(["pruned_step"] if _trials(table) else []), "best"]
  writer = csv.DictWriter(out, fields, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for r in table:
    writer.writerow({k: "" if r.get(k) is None else r[k] for k in fields})  # floats: repr
  return out.getvalue()


def _trials(table):
  """["trials"] for a search's table (its points' trial numbers), else []."""
  return ["trials"] if any("trials" in r for r in table) else []


def _status_cell(r):
  """The status; a pruned point's with the step its pruner stopped it at."""
  return f"pruned at {r['pruned_step']}" if "pruned_step" in r else r["status"]


def _cell(value, digits=4):
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
  return str(value)


def to_markdown(table, fit=None):
  """The table as GitHub markdown, best point in bold; the scaling fit below it, if any."""
  keys = axis_keys(table)
  head = ["point", *_trials(table), *keys, "status", "steps", "train loss", "val loss (best)", "val loss",
          "bits/byte", "tokens/s", "wall time", "params"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in table:
    name = f"**{r['point']}** (best)" if r["best"] else r["point"]
    cells = [name, *[r.get("trials", "") for _ in _trials(table)], *[_cell(r[k]) for k in keys],
             _status_cell(r), f"{r['steps']}/{r['train_steps']}",
             *[_cell(r[k]) for k in ("train_loss", "val_loss_best", "val_loss_final",
                                     "bits_per_byte")],
             _cell(r["tokens_per_s"], 0), _clock(r["wall_time_s"]), f"{r['parameters']:,}"]
    lines.append("| " + " | ".join(cells) + " |")
  lines += _over_seeds(table, keys)
  if fit:
    lines += ["", f"Scaling fit (best validation loss per model size): {fit.describe()}"]
  return "\n".join(lines) + "\n"


def _over_seeds(table, keys):
  """With a seed axis: the final validation loss of each point's seeds, mean and spread."""
  if spec_lib.SEED_KEY not in keys:
    return []
  others = [k for k in keys if k != spec_lib.SEED_KEY]
  groups = {}
  for r in table:
    if r["status"] == "done" and _finite([r["val_loss_final"]]):
      groups.setdefault(tuple(r[k] for k in others), []).append(r["val_loss_final"])
  lines = ["", "Over seeds (final validation loss of the points done):", "",
           "| " + " | ".join([*others, "seeds", "mean", "std"]) + " |",
           "|" + "---|" * (len(others) + 3)]
  for values, losses in sorted(groups.items(), key=lambda g: statistics.mean(g[1])):
    spread = statistics.stdev(losses) if len(losses) > 1 else math.nan
    lines.append("| " + " | ".join([*values, str(len(losses)), _cell(statistics.mean(losses)),
                                    _cell(spread)]) + " |")
  return lines


def _clock(seconds):
  if seconds is None:
    return ""
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f"{minutes // 60:d}:{minutes % 60:02d}:{seconds:02d}"


def write(root):
  """Writes results.csv, results.md, loss.png, scaling.png (sizes swept) and the HParams
  summary into the root (a search: also Optuna's optimization history and parameter
  importances); returns the markdown table (with the scaling fit)."""
  points, facts = root.points()
  table = rows(root)
  fit = scaling.fit_table(table, {p.name: f for p, f in zip(points, facts, strict=True)})
  markdown = to_markdown(table, fit)
  (root.path / RESULTS_CSV).write_text(to_csv(table))
  (root.path / RESULTS_MD).write_text(markdown)
  plots.loss_curves(root, points, table, root.path / plots.LOSS_PNG)
  if fit:
    plots.scaling(fit, root.path / plots.SCALING_PNG)
  hparams.write(root, points, table)
  record = root.read()
  if record["spec"].get("search"):
    from gptneo.sweep import search  # pylint: disable=g-import-not-at-top  (optuna: slow)
    search.plots(root, record)
  root.sync()
  return markdown


def status(path):
  """Progress of the sweep in `path`: counts, an ETA, and a line per point."""
  root = open_root(path)
  table = sorted(rows(root), key=lambda r: r["index"])
  counts = {s: sum(r["status"] == s for r in table) for s in
            ("done", "running", "pruned", "failed", "diverged", "pending", "unfinished",
             "interrupted")}
  summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s in ("done", "diverged"))
  lines = [f"{root.display}: {len(table)} points: {summary}; ETA {_eta(table)}"]
  width = max(len(r["point"]) for r in table)
  lines += [f"  {r['point']:<{width}}  {_status_cell(r):<11} {r['steps']}/{r['train_steps']}"
            + (f"  trial {r['trials']}" if r.get("trials") else "") for r in table]
  return "\n".join(lines)


def _eta(table):
  """Steps left times the seconds a step took in the points done, over those running."""
  done = [r for r in table if r["status"] == "done" and r["wall_time_s"]]
  left = sum(r["train_steps"] - r["steps"] for r in table if r["status"] not in root_lib.FINAL
             and r["status"] != "failed")
  if not left:
    return "0:00:00"
  if not done:
    return "unknown (no point done yet)"
  per_step = sum(r["wall_time_s"] for r in done) / sum(r["train_steps"] for r in done)
  running = max(1, sum(r["status"] == "running" for r in table))
  seconds = left * per_step / running
  finish = time.strftime("%H:%M", time.localtime(time.time() + seconds))
  return f"{_clock(seconds)} (done about {finish})"

"""What a point's run wrote: train_metrics.jsonl and eval.jsonl, read as bin/train means them.

A resumed run logs again the steps after its last checkpoint (with the same losses: resume is
exact), so the last line of a step wins. A line cut short by a kill is skipped.
A run is read from one or more places (a gs:// run: the bucket, then this machine's mirror),
which the last line of a step merges the same way.
"""
import json
import math
import pathlib

from gptneo import storage

TRAIN_METRICS = "train_metrics.jsonl"
EVAL_JSONL = "eval.jsonl"


def _text(run_dir, name):
  """A log's text, from a local run dir or a gs:// one ('' if it has none yet)."""
  if storage.is_remote(run_dir):
    return storage.read_text(f"{str(run_dir).rstrip('/')}/{name}") or ""
  try:
    return (pathlib.Path(run_dir) / name).read_text()
  except FileNotFoundError:
    return ""


def _records(run_dirs, name):
  text = "\n".join(_text(run_dir, name) for run_dir in run_dirs)
  records = []
  for line in text.splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue  # the run was killed mid-line
  return records


def _by_step(records):
  last = {}
  for record in records:
    if isinstance(record, dict) and "step" in record:
      last[record["step"]] = record
  return [last[step] for step in sorted(last)]


def train(*run_dirs):
  """The training log lines, one per step, in step order; a later run dir wins a step."""
  return _by_step(_records(run_dirs, TRAIN_METRICS))


def validation(*run_dirs):
  """The periodic evaluations on the validation split, one per step, in step order."""
  records = [r for r in _records(run_dirs, EVAL_JSONL)
             if r.get("task", "lm") == "lm" and r.get("split", "validation") == "validation"]
  return _by_step(records)


def first_non_finite(records, key="loss"):
  """The first step whose `key` is NaN or infinite, or None."""
  for record in records:
    value = record.get(key)
    if isinstance(value, (int, float)) and not math.isfinite(value):
      return record["step"]
  return None

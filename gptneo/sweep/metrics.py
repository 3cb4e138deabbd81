"""What a point's run wrote: train_metrics.jsonl and eval.jsonl, read as bin/train means them.

A resumed run logs again the steps after its last checkpoint (with the same losses: resume is
exact), so the last line of a step wins. A line cut short by a kill is skipped.
"""
import json
import math
import pathlib

TRAIN_METRICS = "train_metrics.jsonl"
EVAL_JSONL = "eval.jsonl"


def _records(path):
  try:
    text = pathlib.Path(path).read_text()
  except FileNotFoundError:
    return []
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


def train(run_dir):
  """The training log lines, one per step, in step order."""
  return _by_step(_records(pathlib.Path(run_dir) / TRAIN_METRICS))


def validation(run_dir):
  """The periodic evaluations on the validation split, one per step, in step order."""
  records = [r for r in _records(pathlib.Path(run_dir) / EVAL_JSONL)
             if r.get("task", "lm") == "lm" and r.get("split", "validation") == "validation"]
  return _by_step(records)


def first_non_finite(records, key="loss"):
  """The first step whose `key` is NaN or infinite, or None."""
  for record in records:
    value = record.get(key)
    if isinstance(value, (int, float)) and not math.isfinite(value):
      return record["step"]
  return None

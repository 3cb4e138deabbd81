"""What a training run reports as it goes: the log line, TensorBoard summaries, the loggers
(train.loggers) and train_metrics.jsonl, kept to one line per step across resumes."""
import json
import os
import time

from absl import logging

from gptneo import flops
from gptneo import model_dir as model_dir_lib
from gptneo.compat import tf


def drop_rerun_steps(model_dir, start):
  """Takes out of the run's logs the lines of steps after `start`, which it is to take again.

  A run resumed from the checkpoint of step `start` (after a crash, a kill, a fall-back to an
  older checkpoint) logs the steps after it anew; the old lines would show a reader, the sweep
  report and its plots, each of those steps twice. train_metrics.jsonl is all ours; of
  eval.jsonl only training's periodic records (bin/eval's own carry "seconds").
  """
  _drop_lines_after(os.path.join(model_dir, "train_metrics.jsonl"), start, lambda record: True)
  _drop_lines_after(os.path.join(model_dir, "eval.jsonl"), start,
                    lambda record: record.get("task") == "lm" and "seconds" not in record)


def _drop_lines_after(path, start, ours):
  """Rewrites a JSONL file without `ours` lines of step > start, nor a line cut short by a
  crash; atomically (a temporary file, os.replace), so a kill leaves the old or the new."""
  temporary = f"{path}.tmp"
  if os.path.exists(temporary):  # a kill in the middle of an earlier rewrite
    os.remove(temporary)
  if not os.path.exists(path):
    return
  with model_dir_lib.open_file(path) as f:
    lines = f.readlines()
  kept = [line.rstrip("\n") + "\n" for line in lines if _kept(line, start, ours)]
  if kept != lines:
    with model_dir_lib.open_file(temporary, "w") as f:
      f.writelines(kept)
    os.replace(temporary, path)


def _kept(line, start, ours):
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return False
  return not (isinstance(record, dict) and ours(record) and record.get("step", 0) > start)


class Progress:
  """Logs step, loss, learning rate, tokens/s, MFU, elapsed and ETA; writes TensorBoard
  summaries."""

  def __init__(self, model_dir, train_steps, tokens_per_step, first_step, flops_per_token,
               peak_flops, loggers=()):
    self._writer = tf.summary.FileWriter(model_dir)
    self._loggers = loggers  # train.loggers' (gptneo/loggers.py)
    self._metrics = model_dir_lib.open_file(os.path.join(model_dir, "train_metrics.jsonl"), "a")
    self._train_steps, self._tokens_per_step = train_steps, tokens_per_step
    self._flops_per_token, self._peak_flops = flops_per_token, peak_flops
    self._start, self._first_step = time.time(), first_step
    self._last_time, self._last_step = self._start, first_step

  def log(self, step, loss, learning_rate, grad_norm, aux_losses=None):
    now = time.time()
    tokens_per_sec = (step - self._last_step) * self._tokens_per_step / max(now - self._last_time,
                                                                            1e-9)
    done = step - self._first_step
    eta = (now - self._start) / max(done, 1) * (self._train_steps - step)
    use = flops.utilization(tokens_per_sec, self._flops_per_token, self._peak_flops)
    mfu = f"MFU {use['mfu']:.1%} ({use['tflops']:.3g} TFLOP/s)" if "mfu" in use else (
        f"{use['tflops']:.3g} TFLOP/s")
    logging.info("step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s  %s  elapsed %s  ETA %s", step,
                 self._train_steps, loss, learning_rate, tokens_per_sec, mfu,
                 _clock(now - self._start), _clock(eta))
    values = {"loss": float(loss), "learning_rate": float(learning_rate),
              "tokens_per_sec": tokens_per_sec, **use, "grad_norm": float(grad_norm),
              **{name: float(value) for name, value in (aux_losses or {}).items()}}
    self.scalars(step, values)
    self._metrics.write(json.dumps({"step": int(step), **values}) + "\n")
    self._metrics.flush()
    self._last_time, self._last_step = now, step

  def scalars(self, step, values):
    summary = tf.Summary(value=[tf.Summary.Value(tag=k, simple_value=float(v))
                                for k, v in values.items()])
    self._writer.add_summary(summary, step)
    self._writer.flush()
    for logger in self._loggers:
      logger.scalars(step, values)

  def close(self):
    for logger in self._loggers:
      logger.close()


def _clock(seconds):
  minutes, seconds = divmod(int(seconds), 60)
  return f"{minutes // 60:d}:{minutes % 60:02d}:{seconds:02d}"

"""The training loop over a built graph: steps, logs, checkpoints, evaluations, and what
stops it early (a signal: `Preemption`; a non-finite loss: `NonFinite`)."""
import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time

from absl import logging
import numpy as np

from gptneo import evaluate as evaluate_lib
from gptneo import flops
from gptneo import loggers as loggers_lib
from gptneo import model_dir as model_dir_lib
from gptneo import progress as progress_lib
from gptneo import train_checks
from gptneo.compat import tf
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.errors import Diverged, UserError
from gptneo.harness import run as harness_run


class Preemption:
  """While training: SIGTERM or SIGINT asks the loop to stop at its next step boundary; a
  second one ends the process at once.

  Clusters and TPU VMs preempt with SIGTERM and a grace period; Ctrl-C is SIGINT. Python runs
  its handlers only between bytecodes of the main thread, which may sit for long in one
  session.run (a step, a checkpoint's write): two signals then would reach a handler as one.
  So the handlers do nothing, and a thread counts the signals as they arrive, through the
  byte per signal Python's C-level handler writes to its wakeup fd: the first sets `signal`
  (the loop then saves a checkpoint and returns); a second exits at once with code 128 + its
  number (143 for SIGTERM, 130 for SIGINT, as a shell reports a process a signal killed),
  without a checkpoint: one being written, if any, never gets its manifest and is never read
  (gptneo/checkpoints.py), so a rerun resumes from the newest complete one. The previous handlers and wakeup fd come back when the block ends.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, enabled=True):
    self.signal, self._enabled, self._previous = None, enabled, {}
    self.signalled = threading.Event()  # set with `signal`: tests wait on it, never sleep
    self._pipe, self._previous_wakeup, self._watcher = None, None, None

  def __enter__(self):
    # Python lets only the main thread handle signals; elsewhere they keep their default.
    if self._enabled and threading.current_thread() is threading.main_thread():
      read_end, write_end = os.pipe()
      os.set_blocking(write_end, False)  # Python's C handler must never block on it
      self._pipe = (read_end, write_end)
      self._previous = {signum: signal.signal(signum, _ignore_here) for signum in self.SIGNALS}
      self._previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
      self._watcher = threading.Thread(target=self._watch, name="preemption", daemon=True)
      self._watcher.start()
    return self

  def __exit__(self, *exc_info):
    if self._pipe:
      signal.set_wakeup_fd(self._previous_wakeup)
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    if self._pipe:
      os.close(self._pipe[1])  # the watcher reads the end of the pipe and returns
      self._watcher.join()
      os.close(self._pipe[0])
      self._pipe = None

  def _watch(self):
    while data := os.read(self._pipe[0], 64):
      for signum in data:  # one byte per signal delivered, its number
        if signum in self.SIGNALS:
          self._received(signal.Signals(signum))

  def _received(self, signum):
    if self.signal is None:
      self.signal = signum
      self.signalled.set()
      logging.warning("train: %s: stopping after this step with a checkpoint; a second signal "
                      "stops at once, without one", signum.name)
      return
    logging.warning("train: a second signal (%s): exiting at once with code %d, without a "
                    "checkpoint; the newest complete one is kept and a rerun resumes from it",
                    signum.name, 128 + signum)
    sys.stderr.flush()
    os._exit(128 + signum)  # pylint: disable=protected-access


def _ignore_here(signum, frame):
  """The Python-level handler of Preemption's signals: Preemption's thread acts on them."""
  del signum, frame


class Loop:
  """Steps from `start` to train_steps: logs, checkpoints and evaluations on their cadence.

  Between session.runs it looks at `preemption`: once signalled, it saves a checkpoint and
  stops (`preempted` then holds the signal, the step and the checkpoint).
  """

  def __init__(self, session, graph, settings, model_dir, after_checkpoint, preemption=None,
               harness=None):
    self.session, self.graph, self.settings, self.model_dir = session, graph, settings, model_dir
    self.after_checkpoint = after_checkpoint
    self.preemption = preemption or Preemption(enabled=False)
    self.harness = harness  # harness_run.Scorer of train.harness_tasks, or None
    self.nonfinite = NonFinite(settings.on_nonfinite, settings.max_nonfinite_steps)
    self.progress, self.preempted, self.step, self.loss = None, None, None, None

  def run(self, start):
    """Returns (the last logged loss, the last evaluation's metrics or None)."""
    s = self.settings
    progress_lib.drop_rerun_steps(self.model_dir, start)
    self.progress = progress_lib.Progress(self.model_dir, s.train_steps, s.tokens_per_step, start,
                             flops.training_flops_per_token(s.model),
                             flops.peak_flops(s.mesh, s.peak_flops,
                                             precision=s.precision),
                             loggers_lib.make(s.loggers, self.model_dir, _plain_knobs(s)))
    self.step, self._start, self._since_log = int(start), int(start), []
    self._saved = (self.step, time.monotonic())  # step and time of the last checkpoint
    evaluation = None
    while self.step < s.train_steps and not self.preemption.signal:
      self.reading_data(self.take_steps)
      if self.checkpoint_due():
        self.save()
      if s.periodic_eval_at(self.step) and self.graph.eval_fetches:
        evaluation = self.reading_data(self.periodic_eval, self.step)
      if self.harness and harness_run.due(s, self.step):
        self.harness_eval()
    if self.preemption.signal:
      self.preempted = (self.preemption.signal, self.step, self.stop_checkpoint())
      return self.loss, None
    return self.loss, self.reading_data(self.final_eval, self.step, evaluation)

  def reading_data(self, function, *args):
    """function(*args); a corrupt shard it meets (one the start-up check did not read) ends
    the run in one line naming it; nothing of the failed step is saved."""
    try:
      return function(*args)
    except tf.errors.DataLossError as error:
      raise self.data_loss(error) from None

  def data_loss(self, error):
    """The UserError of a DataLossError (which names no file): the shard found corrupt, and
    the last checkpoint, intact."""
    shard = train_checks.corrupt_shard(self.settings.dataset_dir, ["train", "validation"])
    latest = self.graph.checkpoints.latest() or "none yet"
    return UserError(f"dataset shard {shard or 'of ' + repr(self.settings.dataset_dir)} is "
                     f"corrupt ({train_checks.record_error(error)}) at step {self.step}; the last checkpoint "
                     f"({latest}) is intact: prepare the dataset again (gptneo-prepare-data "
                     f"--overwrite) and run the same command to resume")

  def take_steps(self):
    """One session.run: a step, or a device loop's steps up to the next log or checkpoint."""
    s = self.settings
    steps = steps_this_run(self.step, self._start, s.train_steps, self.graph.steps_per_run,
                           (s.log_every_n_steps, s.steps_per_checkpoint, s.eval_every_n_steps))
    step_loss, *self._last_scalars = self.graph.run(self.session, steps)
    self.step += steps
    # Before anything of this step is logged or saved: a non-finite step stops or is skipped.
    if self.nonfinite.check(self.step, steps, step_loss, self._last_scalars[1],
                            self.graph.checkpoints):
      self._since_log.extend([step_loss] * steps)  # a device loop reports its steps' mean loss
    if self.step % s.log_every_n_steps == 0 or self.step in (self._start + 1, s.train_steps):
      self.log()

  def log(self):
    # One batch's loss is noisy; the mean since the last log shows the trend.
    self.loss = float(np.mean(self._since_log)) if self._since_log else float("nan")
    learning_rate, norm, aux_losses = self._last_scalars
    if self.settings.on_nonfinite == "skip":
      aux_losses = {**aux_losses, "skipped_steps": self.nonfinite.skipped}
    self.progress.log(self.step, self.loss, learning_rate, norm, aux_losses)
    self._since_log = []

  def checkpoint_due(self):
    s, (_, saved_time) = self.settings, self._saved
    return (self.step % s.steps_per_checkpoint == 0 or self.step == s.train_steps or
            (bool(s.checkpoint_every_secs) and
             time.monotonic() - saved_time >= s.checkpoint_every_secs))

  def save(self):
    path = self.graph.checkpoints.save(self.session, self.step)
    logging.info("saved checkpoint %s", path)
    self.after_checkpoint()
    self._saved = (self.step, time.monotonic())
    return path

  def stop_checkpoint(self):
    """Preempted: the steps since the last log are logged and saved; returns the checkpoint."""
    if self._since_log:
      self.log()
    if self.step != self._saved[0]:
      return self.save()
    return self.graph.checkpoints.latest()  # no step since: the restored one, or None

  def periodic_eval(self, step):
    """Validation metrics to TensorBoard (eval/...) and to model_dir/eval.jsonl."""
    metrics = self.evaluate(self.settings.eval_steps)
    self.progress.scalars(step, {f"eval/{name}": metrics[name]
                                 for name in ("loss", "perplexity", "bits_per_byte", "accuracy")})
    record = {"step": int(step), "task": "lm", "split": "validation", **metrics,
              "batches": self.settings.eval_steps}
    evaluate_lib.append_result(self.model_dir, record)
    logging.info("step %d  validation loss %.4f  bits/byte %.4f  accuracy %.4f", step,
                 metrics["loss"], metrics["bits_per_byte"], metrics["accuracy"])
    return record

  def harness_eval(self):
    """train.harness_tasks on this step's checkpoint (saved now if it wasn't), to eval.jsonl and
    TensorBoard (harness/<task>/<metric>)."""
    if self._saved[0] != self.step:
      self.save()
    records = self.harness()
    harness_run.append(self.model_dir, records)
    self.progress.scalars(self.step, harness_run.scalars(records))

  def final_eval(self, step, last_periodic):
    """The last periodic evaluation if it was at this step and scored the same batches, else
    train.eval_batches' (as many as eval_steps unless set)."""
    batches = self.settings.final_eval_batches
    if not self.graph.eval_fetches or batches is None:
      return None
    if last_periodic is None and step == self._start:  # a finished run resumed: no new weights
      recorded = self.recorded_validation(step)
      if recorded is None or recorded["batches"] != batches:
        logging.info("step %d was reached before: not evaluated again (gptneo-eval scores the "
                     "checkpoint)", step)
        return None
      return recorded
    if last_periodic and last_periodic["step"] == step and batches == self.settings.eval_steps:
      return last_periodic
    return {"step": int(step), **self.evaluate(batches)}

  def recorded_validation(self, step):
    """The periodic evaluation eval.jsonl holds of `step` (the newest), or None."""
    found = None
    try:
      with model_dir_lib.open_file(os.path.join(self.model_dir, "eval.jsonl"), "r") as f:
        for line in f:
          try:
            record = json.loads(line)
          except ValueError:  # a line cut short by a crash: not this record
            continue
          if (isinstance(record, dict) and record.get("step") == step and record.get("task") == "lm" and
              record.get("split") == "validation" and "batches" in record):
            found = record
    except FileNotFoundError:
      return None
    return found

  def evaluate(self, batches):
    """lm metrics over the validation split's first `batches` batches (0: all of it), each
    window once: the same every time, so evaluations compare across steps, a resumed run
    evaluates as an uninterrupted one, and bin/eval on the checkpoint agrees."""
    self.session.run(self.graph.eval_reset, {self.graph.eval_limit: batches})
    return evaluate_lib.metrics_of_batches(self.session, self.graph.eval_fetches,
                                           self._byte_lengths, self.graph.eval_batches(batches))

  @functools.cached_property
  def _byte_lengths(self):
    """Bytes per token id, read once from the run's tokenizer (not at every evaluation)."""
    return evaluate_lib.token_byte_lengths(
        tokenizer_lib.load_tokenizer(os.path.join(self.model_dir, "tokenizer.json")))


class NonFinite:
  """What the loop does about a step whose loss or gradient norm is NaN or infinite.

  "stop": raise Diverged before anything of that step is logged or saved. "skip": the graph
  kept weights and optimizer state (train_graph.skip_unless_finite); count the step, and raise
  once `most_in_a_row` steps in a row were skipped. A device loop (TPU) reports its steps' mean
  loss: one non-finite step marks all of its steps.
  """

  def __init__(self, policy, most_in_a_row):
    self.policy, self.most_in_a_row = policy, most_in_a_row
    self.skipped, self.in_a_row = 0, 0  # since this run (re)started

  def check(self, step, steps, loss, grad_norm, checkpoints):
    """True if the `steps` up to `step` were finite; False if skipped; raises Diverged."""
    if np.isfinite(loss) and np.isfinite(grad_norm):
      self.in_a_row = 0
      return True
    what, fix = f"loss {loss}, gradient norm {grad_norm}", " (or set train.on_nonfinite = 'skip')"
    if self.policy == "skip":
      self.skipped, self.in_a_row = self.skipped + steps, self.in_a_row + steps
      if self.in_a_row < self.most_in_a_row:
        logging.warning("step %d: %s: update skipped (%d in a row, %d in all)", step, what,
                        self.in_a_row, self.skipped)
        return False
      what += f"; {self.in_a_row} in a row, train.max_nonfinite_steps = {self.most_in_a_row}"
      fix = ""
    latest = checkpoints.latest() or "none: nothing was saved yet"
    raise Diverged(f"the loss went non-finite at step {step} ({what}); the last good "
                   f"checkpoint is {latest}; lower learning_rate_schedule.learning_rate{fix} "
                   f"and run again to resume from it")


def steps_this_run(step, start, train_steps, steps_per_run, every):
  """Up to `steps_per_run` steps, stopping at the next log, checkpoint or eval step."""
  stops = [train_steps, start + 1] + [(step // n + 1) * n for n in every if n]
  return max(1, min([steps_per_run] + [stop - step for stop in stops if stop > step]))


def _plain_knobs(s):
  """The train.* knobs that are plain values, and the model's size: a logger's run config."""
  knobs = {field.name: getattr(s, field.name) for field in dataclasses.fields(s)
           if field.metadata.get("knob", True)}
  knobs = {name: value for name, value in knobs.items()
           if isinstance(value, (bool, int, float, str)) or value is None}
  return {**knobs, "parameters": s.model.num_parameters(), "n_ctx": s.model.n_ctx}

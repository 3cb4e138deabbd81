"""Harness tasks on a model dir's latest checkpoint: bin/lm_eval, and train.harness_tasks
(loop.Loop scores them at checkpoints, in its own process and on its own mesh).

Each task's metrics become one line of model_dir/eval.jsonl ({"step", "task", "harness":
true, metric: value, ...}) and TensorBoard scalars harness/<task>/<metric>.
"""
import logging
import os
import time

import gin

from gptneo import evaluate as evaluate_lib
from gptneo import harness
from gptneo import inference
from gptneo import mesh as mesh_lib
from gptneo import runtime
from gptneo.errors import UserError
from gptneo.harness import specs as specs_lib


def check_tasks(tasks, task_dirs=()):
  """The lm-eval specs of task names (see specs.find); an empty list is an error."""
  if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) and t for t in tasks):
    raise UserError(f"harness tasks {tasks!r}: name one or more, e.g. "
                    f"--tasks=gptneo_lambada,gptneo_hellaswag")
  return specs_lib.find(list(tasks), task_dirs)


class Scorer:
  """Scores the newest checkpoint of `model_dir` on the task specs, on runtime `rt`'s mesh;
  the graph is built at the first call and restored at every call (training calls it at
  each checkpoint it scores). Short requests run on up to `length_buckets` graphs of shorter
  windows (lm.bucket_lengths), each built at its first use with its own copy of the weights."""

  def __init__(self, model, rt, model_dir, specs, batch_size=8, precision="float32",
               limit=None, max_gen_toks=256, bootstrap_iters=0, length_buckets=3):
    self.model, self.rt, self.model_dir, self.specs = model, rt, model_dir, specs
    self.batch_size, self.precision, self.limit = batch_size, precision, limit
    self.max_gen_toks, self.bootstrap_iters = max_gen_toks, bootstrap_iters
    self.length_buckets, self.windows = length_buckets, None

  def __call__(self):
    """One record per task, with the step of the checkpoint scored."""
    if self.windows is None:
      self.windows = self._windows()
    step = evaluate_lib._step_of(self.windows.restore())  # pylint: disable=protected-access
    start = time.time()
    results = self._simple_evaluate()
    seconds = round(time.time() - start, 3)
    return [{"step": step, "task": name, "harness": True, **metrics,
             "examples": results["n-samples"][name]["effective"], "limit": self.limit,
             "seconds": seconds} for name, metrics in _metrics(results).items()]

  def _windows(self):
    from gptneo.harness import lm as lm_lib  # pylint: disable=g-import-not-at-top
    def restored(length=None, decode=False):
      return inference.RestoredModel(self.model, self.rt, self.model_dir, self.batch_size,
                                     self.precision, decode=decode, sequence_length=length)
    return lm_lib.Windows(restored(decode=True), restored,
                          lm_lib.bucket_lengths(self.model, self.length_buckets))

  def _simple_evaluate(self):
    evaluator = harness.import_lm_eval("lm_eval.evaluator")
    from gptneo.harness import lm as lm_lib  # pylint: disable=g-import-not-at-top
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = harness.import_lm_eval("lm_eval.tasks").TaskManager(
        include_defaults=not all(isinstance(s, dict) for s in self.specs))
    model = lm_lib.GptNeoLM(self.windows.full, inference.load_tokenizer(self.model_dir),
                            self.max_gen_toks, self.windows)
    return evaluator.simple_evaluate(model=model, tasks=self.specs, limit=self.limit,
                                     task_manager=manager, log_samples=False,
                                     bootstrap_iters=self.bootstrap_iters, verbosity="WARNING")


def _metrics(results):
  """{task: {metric: value}} of lm-eval's results, the "none" filter's names bare."""
  table = {}
  for name, values in results["results"].items():
    metrics = {}
    for key, value in values.items():
      metric, _, filter_name = key.partition(",")
      if filter_name and isinstance(value, (int, float)):
        metrics[metric if filter_name == "none" else key] = float(value)
    table[name] = metrics
  return table


def scalars(records, prefix="harness"):
  """TensorBoard tags <prefix>/<task>/<metric> of the records' metrics (no stderr)."""
  skip = {"step", "examples", "limit", "seconds"}
  return {f"{prefix}/{r['task']}/{k}": v for r in records for k, v in r.items()
          if k not in skip and isinstance(v, float) and not k.endswith("_stderr")}


def append(model_dir, records):
  for record in records:
    evaluate_lib.append_result(model_dir, record)


def write(model_dir, records, logdir):
  """Appends the records to model_dir/eval.jsonl and their scalars to TensorBoard in logdir:
  harness/<task>/<metric>, or harness_limit<N>/... for a run of each task's first N examples
  (so it never replaces a full run's point at the same step)."""
  append(model_dir, records)
  for record in records:
    prefix = "harness" if record["limit"] is None else f"harness_limit{record['limit']}"
    evaluate_lib.write_scalars(logdir, record["step"], scalars([record], prefix))


# --- During training: train.harness_tasks, train.harness_every_n_steps, train.harness_limit.

def check_training(s):
  """The train.harness_* knobs of Settings `s`, before anything is built."""
  every, limit = s.harness_every_n_steps, s.harness_limit
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise UserError(f"train.harness_every_n_steps = {every!r}; use 0 (only the last step) or "
                    f"a positive integer")
  if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
    raise UserError(f"train.harness_limit = {limit!r}; use None (every example) or a positive "
                    f"integer")
  if s.harness_tasks:
    check_tasks(s.harness_tasks)


def training_scorer(s, rt, model_dir):
  """The Scorer of train.harness_tasks on the run's mesh (None without tasks): the graph of
  one microbatch of rows, restored from each checkpoint the loop scores. A TPU run's is on
  its host's CPU, between device loops (slow for a large model: train.harness_limit)."""
  if not s.harness_tasks:
    return None
  if rt.spec.implementation == "simd":
    rt = runtime.Runtime(mesh_lib.host_cpu())
  return Scorer(s.model, rt, model_dir, check_tasks(s.harness_tasks),
                s.batch_size // s.microbatches_per_batch, s.precision, s.harness_limit)


def due(s, step):
  """Whether training scores the harness tasks after `step`."""
  every = s.harness_every_n_steps
  return bool(s.harness_tasks) and (step == s.train_steps or bool(every) and step % every == 0)


@gin.configurable("lm_eval", denylist=["model_dir", "tasks", "limit", "task_dirs"])
def lm_eval(model_dir, tasks, limit=None, task_dirs=(), model=gin.REQUIRED,
            mesh=gin.REQUIRED, batch_size=8, precision="float32", max_gen_toks=256,
            bootstrap_iters=0, length_buckets=3):
  """Scores the latest checkpoint in `model_dir` on lm-evaluation-harness tasks.

  Args:
    model_dir: a trained model's folder (a flag).
    tasks: task names: ours (gptneo_lambada, gptneo_hellaswag, gptneo_wikitext), a task:
      of a YAML in task_dirs, or lm-eval's own (which need the hub or its cache) (a flag).
    limit: score only the first this many examples of each task (None: all) (a flag).
    task_dirs: folders of the user's task YAML files, looked in after ours (a flag).
    model: the model, as trained (read from the operative config).
    mesh: the mesh to evaluate on.
    batch_size: requests (windows of n_ctx tokens) per run of the graph.
    precision: "float32" or "bfloat16" activations.
    max_gen_toks: generate_until's default limit of new tokens (a task may set its own).
    bootstrap_iters: lm-eval's bootstrap_iters: > 0 adds each metric's stderr (exact for
      means, resampled this many times for perplexities); 0: no stderr.
    length_buckets: how many shorter window lengths (n_ctx / 2, n_ctx / 4, ..., at least 16
      and whole local-attention blocks) a batch of short requests may run on instead of
      n_ctx, as HF pads a batch only to its longest request: results are the same, short
      tasks (LAMBADA, HellaSwag) several times faster. Each length is a graph built at its
      first use holding its own copy of the weights (so up to 1 + length_buckets copies:
      for a 1.3B model in float32, 5.2 GB each); 0 runs every batch at n_ctx.

  Returns:
    one record per task, also appended to model_dir/eval.jsonl and written to TensorBoard
    in model_dir/eval (harness/<task>/<metric>).
  """
  for name, value, least in (("batch_size", batch_size, 1), ("max_gen_toks", max_gen_toks, 1),
                             ("length_buckets", length_buckets, 0)):
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise UserError(f"lm_eval.{name} = {value!r}; it must be an integer >= {least}")
  specs = check_tasks(tasks, task_dirs)
  inference.check_model_dir(model_dir)
  with runtime.started(mesh) as rt:
    records = Scorer(model, rt, model_dir, specs, batch_size, precision, limit, max_gen_toks,
                     bootstrap_iters, length_buckets)()
  write(model_dir, records, os.path.join(model_dir, evaluate_lib.EVAL_LOGDIR))
  return records

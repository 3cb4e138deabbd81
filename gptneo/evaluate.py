"""Evaluation of a trained model: language-model metrics on a dataset split, and last-word
prediction (LAMBADA's task) on a JSONL file of texts.

Results are returned and appended as one JSON line to model_dir/eval.jsonl.
"""
import json
import math
import os
import time

from absl import logging
import gin
import numpy as np

from gptneo import inference
from gptneo import model_dir as model_dir_lib
from gptneo import runtime
from gptneo.compat import mtf, tf
from gptneo.data import jsonl
from gptneo.data import inputs
from gptneo.errors import UserError
from gptneo.model import ops

TASKS = ("lm", "lambada")


def token_byte_lengths(tokenizer):
  """UTF-8 bytes each id decodes to: byte-level BPE maps every character of a token to one
  byte, and special tokens (EOS) decode to nothing, so sums are exact even mid-character."""
  lengths = np.zeros([tokenizer.get_vocab_size(with_added_tokens=True)], np.int64)
  special = {token.content for token in tokenizer.get_added_tokens_decoder().values()
             if token.special}
  for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
    lengths[index] = 0 if token in special else len(token)
  return lengths


def lm_metrics(total_nll, tokens, correct, num_bytes):
  """Mean loss (nats/token), perplexity, bits per byte and next-token accuracy."""
  loss = total_nll / tokens
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
          "bits_per_byte": total_nll / math.log(2) / max(num_bytes, 1),
          "accuracy": correct / tokens, "tokens": int(tokens), "bytes": int(num_bytes)}


class LmTotals:
  """Sums over the real tokens of evaluation batches, for `lm_metrics`: the one way bin/eval
  and training's evaluations count. Targets of weight 0 (a last batch's padding rows, a
  partial window's padding) count nothing."""

  def __init__(self, byte_lengths):
    self.byte_lengths = byte_lengths
    self.nll, self.tokens, self.correct, self.bytes = 0.0, 0, 0, 0

  def add(self, token_nll, argmax, targets, weights):
    """One batch: [batch, n_ctx] NLLs, greedy ids, targets and weights (0 or 1)."""
    real = np.asarray(weights) > 0
    targets = targets[real]
    self.nll += float(token_nll[real].astype(np.float64).sum())
    self.tokens += targets.size
    self.correct += int((argmax[real] == targets).sum())
    self.bytes += int(self.byte_lengths[targets].sum())

  def metrics(self):
    return lm_metrics(self.nll, self.tokens, self.correct, self.bytes)


def _windows(dataset_dir, split, batch_size, max_batches):
  """(windows [batch, n_ctx + 1], weights [batch, n_ctx]) of inputs.evaluation_batches, one
  pass."""
  graph = tf.Graph()
  with graph.as_default():
    batches = inputs.evaluation_batches(dataset_dir, split, batch_size, max_batches)
    next_batch = tf.data.make_one_shot_iterator(batches).get_next()
  with tf.Session(graph=graph) as session:
    while True:
      try:
        yield session.run(next_batch)
      except tf.errors.OutOfRangeError:
        return


def evaluate_split(restored, dataset_dir, split, max_batches, byte_lengths):
  """Language-model metrics of `restored` over a dataset split (its first max_batches
  batches; 0: all of it), every window once, the last partial batch included."""
  info = inputs.read_dataset_info(dataset_dir)
  if info["n_ctx"] != restored.model.n_ctx:
    raise UserError(f"dataset {dataset_dir!r} has n_ctx {info['n_ctx']} but the model's "
                    f"GPT.n_ctx = {restored.model.n_ctx}; prepare it with "
                    f"--n_ctx={restored.model.n_ctx}")
  totals = LmTotals(byte_lengths)
  for windows, weights in _windows(dataset_dir, split, restored.batch_size, max_batches):
    out = restored.score(windows[:, :-1], windows[:, 1:])
    totals.add(out.token_nll, out.argmax, windows[:, 1:], weights)
  if not totals.tokens:
    raise UserError(f"split {split!r} of {dataset_dir!r} has no windows; prepare the dataset "
                    f"with a validation split or pass another --dataset_dir")
  return totals.metrics()


def read_last_word_examples(path, tokenizer, n_ctx):
  """(ids, word_length) per line of a JSONL of {"text": ...}: the word is the text's last.

  As in LAMBADA, the context is everything before the last space and the target is the
  space plus the last word; contexts longer than the model's window keep their end.
  """
  examples = []
  for number, line in enumerate(jsonl.read_lines(path, "--task_file"), start=1):
    if line.strip():
      context, word = _split_last_word(line, path, number)
      word_ids = tokenizer.encode(" " + word).ids
      if len(word_ids) > n_ctx:
        raise UserError(f"{path} line {number}: the last word is {len(word_ids)} tokens, "
                        f"more than GPT.n_ctx = {n_ctx}")
      examples.append(((tokenizer.encode(context).ids + word_ids)[-(n_ctx + 1):],
                       len(word_ids)))
  if not examples:
    raise UserError(f"task file {path} has no examples; write one JSON object per line")
  return examples


def _split_last_word(line, path, number):
  text = jsonl.string_field(line, path, number, "text")
  context, _, word = text.strip().rpartition(" ")
  if not context or not word:
    raise UserError(f"{path} line {number}: the text needs a context and a last word "
                    f"separated by a space")
  return context, word


def evaluate_last_word(restored, examples):
  """Accuracy (every token of the last word greedy-correct) and the word's perplexity.

  Perplexity is exp of the mean over examples of the word's summed NLL (lm-eval-harness's
  LAMBADA definition), i.e. per word, not per token.
  """
  correct, word_nll = 0, []
  for start in range(0, len(examples), restored.batch_size):
    chunk = examples[start:start + restored.batch_size]
    tokens = restored.pad([ids[:-1] for ids, _ in chunk])
    targets = restored.pad([ids[1:] for ids, _ in chunk])
    out = restored.score(tokens, targets)
    for row, (ids, word_length) in enumerate(chunk):
      span = slice(len(ids) - 1 - word_length, len(ids) - 1)
      correct += bool((out.argmax[row, span] == targets[row, span]).all())
      word_nll.append(float(out.token_nll[row, span].astype(np.float64).sum()))
  return {"accuracy": correct / len(examples),
          "perplexity": math.exp(min(float(np.mean(word_nll)), 700.0)),
          "examples": len(examples)}


def _check_batches(batch_size, max_batches):
  if not isinstance(batch_size, int) or batch_size < 1:
    raise UserError(f"evaluate.batch_size = {batch_size!r}; it must be a positive integer")
  if not isinstance(max_batches, int) or max_batches < 0:
    raise UserError(f"evaluate.max_batches = {max_batches!r}; it must be an integer >= 0 "
                    f"(0: the whole split)")


def _step_of(checkpoint_path):
  return int(checkpoint_path.rsplit("-", 1)[1])


def append_result(model_dir, record):
  """Appends record to model_dir/eval.jsonl (a local folder; never through a link)."""
  with model_dir_lib.open_file(os.path.join(model_dir, "eval.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")


EVAL_LOGDIR = "eval"  # under the model dir: TensorBoard's run of bin/eval and bin/lm_eval


def write_scalars(logdir: str, step: int, values: dict):
  """values {tag: number} at `step` to a new TensorBoard events file in logdir."""
  writer = tf.summary.FileWriter(logdir)
  writer.add_summary(tf.Summary(value=[tf.Summary.Value(tag=tag, simple_value=value)
                                       for tag, value in values.items()]), step)
  writer.close()


def scalars(record: dict, max_batches: int = 0) -> dict:
  """bin/eval's TensorBoard tags of a record: evaluate/<task>/<what>/<metric>, `what` the
  dataset and split (and "first<N>" batches when not the whole split) or the task file, so
  a different or partial evaluation never lands on another's curve.

  Args:
    record: evaluate()'s result.
    max_batches: evaluate.max_batches of the run (0: the whole split).
  """
  if record["task"] == "lm":
    what = f"{os.path.basename(str(record['dataset_dir']).rstrip('/'))}_{record['split']}"
    what += f"_first{max_batches}" if max_batches else ""
  else:
    what = os.path.splitext(os.path.basename(record["task_file"]))[0]
  return {f"evaluate/{record['task']}/{what}/{name}": value for name, value in record.items()
          if isinstance(value, float) and name != "seconds"}


@gin.configurable(denylist=["model_dir", "task", "task_file"])
def evaluate(model_dir, task="lm", task_file=None, model=gin.REQUIRED, mesh=gin.REQUIRED,
             dataset_dir=None, split="validation", batch_size=8, max_batches=0,
             precision="float32"):
  """Evaluates the latest checkpoint in `model_dir`; appends the result to eval.jsonl.

  Args:
    model_dir: a trained model's folder (a flag).
    task: "lm" (loss, perplexity, bits per byte, accuracy on a dataset split) or "lambada"
      (last-word accuracy and perplexity on `task_file`) (a flag).
    task_file: for "lambada", a JSONL file of {"text": ...} lines (a flag).
    model: the model, as trained (read from the operative config).
    mesh: the mesh to evaluate on.
    dataset_dir: for "lm", a folder written by bin/prepare_data, a gs:// URI of one, or a
      mixture {folder or URI: weight} whose parts are read one after another; defaults to
      the training dataset (DATASET_DIR of the operative config).
    split: for "lm", the dataset split to evaluate.
    batch_size: windows per batch.
    max_batches: for "lm", only the split's first max_batches * batch_size windows (0: the
      whole split). Every window counts once, the last partial batch included: with the
      same windows, training's evaluations (train.eval_steps) report the same numbers.
    precision: "float32" or "bfloat16" activations.

  Returns:
    the metrics dict, with "step", "task" and what was evaluated.
  """
  if task not in TASKS:
    raise UserError(f"task {task!r} is unknown; use one of {list(TASKS)}")
  if task == "lambada" and not task_file:
    raise UserError("task 'lambada' needs --task_file, a JSONL file of {\"text\": ...} lines")
  if task == "lm" and not dataset_dir:
    raise UserError("task 'lm' needs a dataset: set --dataset_dir")
  _check_batches(batch_size, max_batches)
  inference.check_model_dir(model_dir)
  tokenizer = inference.load_tokenizer(model_dir)
  if task == "lm":
    inputs.check_model_tokenizer(dataset_dir, model_dir)
  examples = (read_last_word_examples(task_file, tokenizer, model.n_ctx)
              if task == "lambada" else None)
  what = (task_file if task == "lambada" else
          f"{dataset_dir} {split} ({f'first {max_batches} batches' if max_batches else 'whole'}"
          f" split, batches of {batch_size})")
  logging.info("evaluating %s (%s) on %s ...", model_dir, task, what)
  with runtime.started(mesh) as rt:
    restored = inference.RestoredModel(model, rt, model_dir, batch_size, precision)
    checkpoint = restored.restore()
    start = time.time()
    if task == "lambada":
      metrics = {"task_file": task_file, **evaluate_last_word(restored, examples)}
    else:
      metrics = {"dataset_dir": dataset_dir, "split": split,
                 **evaluate_split(restored, dataset_dir, split, max_batches,
                                  token_byte_lengths(tokenizer))}
  record = {"step": _step_of(checkpoint), "task": task, **metrics,
            "seconds": round(time.time() - start, 3)}
  append_result(model_dir, record)
  write_scalars(os.path.join(model_dir, EVAL_LOGDIR), record["step"],
                scalars(record, max_batches))
  return record


# --- Periodic evaluation inside the training graph (train.eval_every_n_steps).

def batch_outputs(logits, targets, vocab_dim):
  """mtf tensors of one validation batch for the trainer: per-token NLL and greedy ids."""
  return {"token_nll": ops.softmax_cross_entropy(logits, targets, vocab_dim),
          "argmax": mtf.argmax(logits, vocab_dim)}


def metrics_of_batches(session, fetches, byte_lengths, batches):
  """lm_metrics over `batches` runs of fetches {"token_nll", "argmax", "targets", "weights"}
  (tf tensors over an evaluation_batches iterator; other fetches run along)."""
  totals = LmTotals(byte_lengths)
  for _ in range(batches):
    batch = session.run(fetches)
    totals.add(batch["token_nll"], batch["argmax"], batch["targets"], batch["weights"])
  return totals.metrics()

"""muP transfer: does the best learning rate stay put as the model widens?

  .venv/bin/python bench/mup_transfer.py [--widths=64,128,256,512] [--lrs=...]
      [--parametrizations=standard,mup] [--plot=F]

The grid is gin/sweeps/mup_transfer.gin's (parametrization x width x learning rate, powers of
2); that sweep runs it through gptneo-sweep with tiny.gin's model. Here it runs in this process
on a smaller model so the whole grid fits in ~25 minutes on 2 shared cores: N_LAYER blocks,
N_CTX tokens, BATCH windows, STEPS AdamW steps (the project's AdamW: betas 0.9/0.95, weight
decay 0.1, clip 1.0; warmup then cosine to 10%), every run on the same training batches
(the stdlib corpus prepared with a VOCAB-token BPE) from the same init per width, scored on
the same EVAL_BATCHES of the validation split. One graph per (parametrization, width); each
learning rate is a fresh session of it (the same initial weights).

Prints the CPU, a markdown table (validation loss per width and learning rate, the best
marked) and the best learning rate per width; --plot writes the figure (one panel per
parametrization, one curve per width).
"""
import argparse
import ast
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

from timing import cpu_line  # noqa: E402  (bench/ is sys.path[0])

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

N_LAYER, N_HEAD, N_CTX, VOCAB = 2, 4, 64, 1024
BATCH, STEPS, WARMUP, EVAL_BATCHES = 8, 200, 20, 16
SWEEP = "mup_transfer.gin"


def sweep_grid():
  """{axis name: [values]} of the shipped sweep file, and its fixed bindings as text."""
  from gptneo import configurables  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from gptneo.sweep import sweep_file  # pylint: disable=g-import-not-at-top
  spec = sweep_file.spec_from(sweep_file=sweep_file.find(SWEEP))
  grid = {}
  for axis in spec.axes:
    for i, name in enumerate(axis.names):
      grid[name] = [ast.literal_eval(values[i]) for values in axis.values]
  return grid, spec.gin_params


def bound(gin_params, name):
  """The value the sweep file binds `name` (e.g. GPT.mup_base_width) to."""
  binding = next(p for p in gin_params if p.replace(" ", "").startswith(name + "="))
  return ast.literal_eval(binding.split("=", 1)[1].split("#")[0].strip())


def batches(data_dir):
  """(STEPS training batches, EVAL_BATCHES validation batches, their weights) as numpy."""
  from gptneo.compat import tf  # pylint: disable=g-import-not-at-top
  from gptneo.data import inputs  # pylint: disable=g-import-not-at-top
  with tf.Graph().as_default():
    train = tf.data.make_one_shot_iterator(
        inputs.make_dataset(data_dir, "train", BATCH, seed=0)).get_next()
    evaluation = tf.data.make_one_shot_iterator(
        inputs.evaluation_batches(data_dir, "validation", BATCH, EVAL_BATCHES)).get_next()
    with tf.Session() as session:
      train_batches = [session.run(train) for _ in range(STEPS)]
      eval_batches = []
      for _ in range(EVAL_BATCHES):
        try:
          eval_batches.append(session.run(evaluation))
        except tf.errors.OutOfRangeError:
          break
  return train_batches, eval_batches


def schedule(step, peak):
  """The project's learning_rate_schedule: linear warmup, cosine to 10% at STEPS."""
  warm = min(1.0, (step + 1) / WARMUP)
  progress = min(max((step - WARMUP) / (STEPS - WARMUP), 0.0), 1.0)
  return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Run:
  """The training and evaluation graph of one (parametrization, width)."""

  def __init__(self, parametrization, width, base, output_multiplier):
    from gptneo import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    from gptneo import runtime  # pylint: disable=g-import-not-at-top
    from gptneo import train_graph  # pylint: disable=g-import-not-at-top
    from gptneo.compat import mtf, tf  # pylint: disable=g-import-not-at-top
    from gptneo.model import gpt as gpt_lib  # pylint: disable=g-import-not-at-top
    from gptneo.model import ops  # pylint: disable=g-import-not-at-top
    from gptneo.optim import optimizers  # pylint: disable=g-import-not-at-top
    self.tf, self.graph = tf, tf.Graph()
    with self.graph.as_default():
      tf.set_random_seed(0)
      mtf_graph, mesh = runtime.new_mesh()
      model = gpt_lib.GPT(n_layer=N_LAYER, n_embd=width, n_head=N_HEAD, n_ctx=N_CTX,
                          n_vocab=VOCAB, parametrization=parametrization, mup_base_width=base,
                          mup_output_multiplier=output_multiplier)
      dims = model.dims(BATCH)
      self.windows = tf.placeholder(tf.int32, [BATCH, N_CTX + 1])
      self.weights = tf.placeholder(tf.float32, [BATCH])
      self.lr, self.step = tf.placeholder(tf.float32, []), tf.placeholder(tf.float32, [])
      tokens, targets = (mtf.import_tf_tensor(mesh, t, [dims.batch, dims.sequence])
                         for t in (self.windows[:, :-1], self.windows[:, 1:]))
      logits, _ = model(tokens, runtime.variable_dtype("float32"),
                        ops.Dropout(is_training=False, seed=0, step=0))
      per_token = ops.softmax_cross_entropy(logits, targets, dims.vocab)
      loss = mtf.reduce_mean(per_token)
      variables = mtf_graph.trainable_variables
      grads = mtf.gradients([loss], [v.outputs[0] for v in variables])
      norm = optimizers.global_norm(grads)
      updates = optimizers.Adam().apply_grads(
          optimizers.clip_by_global_norm(grads, norm, 1.0), variables,
          mtf.import_fully_replicated(mesh, self.lr, [], "lr"),
          mtf.import_fully_replicated(mesh, self.step, [], "step"))
      lowering = runtime.lower(mtf_graph, mesh, mesh_lib.mesh())
      lowered = train_graph.lower_step(lowering, train_graph.MtfStep(
          {"loss": loss}, norm, None, updates, grads))
      self.train_op, self.loss = lowered.updates, lowered.loss
      self.token_losses = lowering.export_to_tf_tensor(per_token)
      self.init = [tf.global_variables_initializer(), lowering.copy_masters_to_slices()]

  def train_and_evaluate(self, peak_lr, train_batches, eval_batches):
    """Validation loss (mean per token of the eval windows) after STEPS steps at `peak_lr`;
    inf if the training loss went non-finite."""
    with self.tf.Session(graph=self.graph) as session:  # a new session: the same init
      session.run(self.init)
      for step, windows in enumerate(train_batches):
        loss, _ = session.run([self.loss, self.train_op], {
            self.windows: windows, self.lr: schedule(step, peak_lr), self.step: step + 1.0})
        if not math.isfinite(loss):
          return math.inf
      total = weight = 0.0
      for windows, token_weights in eval_batches:  # weights 0: the padding
        losses = session.run(self.token_losses, {self.windows: windows})
        total += float((losses * token_weights).sum())
        weight += float(token_weights.sum())
      return total / weight


def table(results, lrs, widths):
  """Markdown: one row per (parametrization, width), validation loss per learning rate, the
  best of the row in bold."""
  lines = ["| parametrization | width | " + " | ".join(f"2^{round(math.log2(lr))}" for lr in lrs)
           + " | best lr |", "|---|---|" + "---|" * (len(lrs) + 1)]
  for parametrization in results:
    for width in widths:
      losses = [results[parametrization][width][lr] for lr in lrs]
      best = int(np.argmin(losses))
      cells = [f"**{v:.3f}**" if i == best else f"{v:.3f}" for i, v in enumerate(losses)]
      lines.append(f"| {parametrization} | {width} | " + " | ".join(cells)
                   + f" | 2^{round(math.log2(lrs[best]))} |")
  return "\n".join(lines)


def plot(results, lrs, widths, path):
  """Validation loss against learning rate: a panel per parametrization, a curve per width."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  figure, panels = pyplot.subplots(1, len(results), figsize=(5 * len(results), 4), sharey=True)
  for panel, parametrization in zip(np.atleast_1d(panels), results, strict=True):
    for width in widths:
      panel.plot(lrs, [results[parametrization][width][lr] for lr in lrs], marker="o",
                 label=f"width {width}")
    panel.set_xscale("log", base=2)
    panel.set(title=parametrization, xlabel="peak learning rate")
    panel.legend()
  np.atleast_1d(panels)[0].set_ylabel("validation loss")
  finite = [v for by_width in results.values() for by_lr in by_width.values()
            for v in by_lr.values() if math.isfinite(v)]
  pyplot.ylim(min(finite) - 0.05, min(max(finite), min(finite) + 2.0))
  figure.tight_layout()
  figure.savefig(path, dpi=100)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", default=None, help="comma-separated; default: the sweep's")
  parser.add_argument("--lrs", default=None, help="comma-separated; default: the sweep's")
  parser.add_argument("--parametrizations", default=None,
                      help="comma-separated; default: the sweep's (standard,mup)")
  parser.add_argument("--data_dir", default=None,
                      help=f"a dataset of n_ctx {N_CTX}, vocab {VOCAB} (default: stdlib "
                           f"prepared into a tmp dir)")
  parser.add_argument("--plot", default=None, help="write the figure here (.png)")
  parser.add_argument("--json", default=None, help="write the losses here")
  args = parser.parse_args()
  from gptneo import gin_utils  # pylint: disable=g-import-not-at-top
  gin_utils.graph_mode()
  grid, gin_params = sweep_grid()
  widths = [int(w) for w in args.widths.split(",")] if args.widths else grid["GPT.n_embd"]
  lrs = ([float(x) for x in args.lrs.split(",")] if args.lrs
         else grid["learning_rate_schedule.learning_rate"])
  parametrizations = (args.parametrizations.split(",") if args.parametrizations
                      else grid["GPT.parametrization"])
  base = bound(gin_params, "GPT.mup_base_width")
  output_multiplier = bound(gin_params, "GPT.mup_output_multiplier")
  print(cpu_line())
  print(f"cores: {len(os.sched_getaffinity(0))}, load average before: {os.getloadavg()}")
  print(f"model: {N_LAYER} layers, {N_HEAD} heads, n_ctx {N_CTX}, vocab {VOCAB}; {STEPS} "
        f"steps of {BATCH} windows; muP base width {base}, output multiplier "
        f"{output_multiplier}", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or os.path.join(tmp, "stdlib")
    if not args.data_dir:
      from gptneo.data import prepare  # pylint: disable=g-import-not-at-top
      prepare.prepare_dataset(["stdlib"], data_dir, n_ctx=N_CTX, vocab_size=VOCAB)
    train_batches, eval_batches = batches(data_dir)
  eval_batches = [(w, np.asarray(r, np.float64)) for w, r in eval_batches]
  results, start = {}, time.time()
  for parametrization in parametrizations:
    results[parametrization] = {}
    for width in widths:
      run = Run(parametrization, width, base, output_multiplier)
      results[parametrization][width] = {
          lr: run.train_and_evaluate(lr, train_batches, eval_batches) for lr in lrs}
      print(json.dumps({"parametrization": parametrization, "width": width,
                        "losses": results[parametrization][width],
                        "minutes": round((time.time() - start) / 60, 1)}), flush=True)
  print(f"load average after: {os.getloadavg()}")
  print(table(results, lrs, widths))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({p: {w: {str(lr): v for lr, v in by_lr.items()} for w, by_lr in by_w.items()}
                 for p, by_w in results.items()}, f, indent=1)
  if args.plot:
    plot(results, lrs, widths, args.plot)


if __name__ == "__main__":
  main()

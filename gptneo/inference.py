"""A trained model restored for inference: one graph, built once, run on batches of windows.

Evaluation, the last-word task, sampling and the HF import all read the model through this
class, so there is one way to turn a model dir into numbers.
"""
import dataclasses
import os

import numpy as np

from gptneo import runtime
from gptneo.compat import mtf, tf
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.model import ops

TOKENIZER_FILE = "tokenizer.json"
OPERATIVE_CONFIG = "operative_config.gin"


def check_model_dir(model_dir):
  """A model dir must hold an operative config and a checkpoint; returns the config path."""
  config = os.path.join(model_dir, OPERATIVE_CONFIG)
  if not tf.io.gfile.exists(config):
    raise ValueError(f"{config} not found; --model_dir must be a folder bin/train or "
                     f"bin/import_hf wrote")
  if not tf.train.latest_checkpoint(model_dir):
    raise ValueError(f"model dir {model_dir!r} has no checkpoint; train one with "
                     f"bin/train --model_dir={model_dir} first")
  return config


def load_tokenizer(model_dir):
  return tokenizer_lib.load_tokenizer(os.path.join(model_dir, TOKENIZER_FILE))


@dataclasses.dataclass
class Outputs:
  """What one run returns for a batch [batch, n_ctx] of windows."""
  token_nll: np.ndarray  # [batch, n_ctx] -log p(target) in nats, float32
  argmax: np.ndarray  # [batch, n_ctx] the greedy next token at each position


class RestoredModel:
  """The model's outputs for `batch_size` windows of n_ctx tokens, from the latest checkpoint.

  Windows shorter than n_ctx are right-padded: attention is causal, so padding never changes
  the outputs at real positions.
  """

  def __init__(self, model, spec, model_dir, batch_size, precision="float32"):
    self.model, self.batch_size = model, batch_size
    self.graph = tf.Graph()
    with self.graph.as_default():
      self.tokens = tf.placeholder(tf.int32, [batch_size, model.n_ctx], name="tokens")
      self.targets = tf.placeholder(tf.int32, [batch_size, model.n_ctx], name="targets")
      self.positions = tf.placeholder(tf.int32, [batch_size], name="positions")
      self._build(spec, precision)
      self.checkpoints = runtime.Checkpoints(self.lowering, model_dir)
      self.session = tf.Session(graph=self.graph, config=spec.session_config())

  def _build(self, spec, precision):
    mtf_graph, mtf_mesh = runtime.new_mesh()
    dims = self.model.dims(self.batch_size)
    shape = [dims.batch, dims.sequence]
    tokens = mtf.import_tf_tensor(mtf_mesh, self.tokens, shape)
    targets = mtf.import_tf_tensor(mtf_mesh, self.targets, shape)
    logits = self.model(tokens, runtime.variable_dtype(precision),
                        ops.Dropout(is_training=False, seed=0, step=0))
    nll = mtf.layers.softmax_cross_entropy_with_logits(logits, targets, dims.vocab)
    argmax = mtf.argmax(logits, dims.vocab)
    self.lowering = runtime.lower(mtf_graph, mtf_mesh, spec)
    self.token_nll = self.lowering.export_to_tf_tensor(nll)
    self.argmax = self.lowering.export_to_tf_tensor(argmax)
    self.logits = self.lowering.export_to_tf_tensor(logits)  # [batch, n_ctx, vocab]
    # Sampling fetches only the row it needs of each window, not [batch, n_ctx, vocab].
    self.last_logits = tf.gather(self.logits, self.positions, axis=1, batch_dims=1)

  def restore(self):
    """Loads the latest checkpoint; returns its path."""
    return self.checkpoints.restore(self.session)

  def pad(self, windows):
    """[len <= batch_size] lists of ids (each <= n_ctx) -> [batch_size, n_ctx] int32."""
    batch = np.zeros([self.batch_size, self.model.n_ctx], np.int32)
    for row, window in enumerate(windows):
      batch[row, :len(window)] = window
    return batch

  def score(self, tokens, targets):
    """Per-position NLL of `targets` and greedy predictions, for full [batch, n_ctx] arrays."""
    nll, argmax = self.session.run([self.token_nll, self.argmax],
                                   {self.tokens: tokens, self.targets: targets})
    return Outputs(token_nll=nll, argmax=argmax)

  def next_logits(self, windows):
    """float32 [len(windows), vocab]: logits after the last id of each window."""
    positions = np.zeros([self.batch_size], np.int32)
    positions[:len(windows)] = [len(w) - 1 for w in windows]
    logits = self.session.run(self.last_logits,
                              {self.tokens: self.pad(windows), self.positions: positions})
    return logits[:len(windows)]

  def all_logits(self, tokens):
    """float32 [batch, n_ctx, vocab] for a full [batch, n_ctx] array (tests, interop)."""
    return self.session.run(self.logits, {self.tokens: tokens})

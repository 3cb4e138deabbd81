"""A trained model restored for inference: one graph, built once, run on batches of windows.

Evaluation, the last-word task, sampling and the HF import all read the model through this
class, so there is one way to turn a model dir into numbers. With `decode=True` the graph also
holds a key/value cache (gptneo/model/cache.py): `start` fills it from whole windows and
`extend` then costs one position per new token; `xla=True` compiles the graph with XLA.
"""
import contextlib
import dataclasses
import os

import numpy as np

from gptneo import runtime
from gptneo.compat import mtf, tf
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.model import cache as cache_lib
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

  def __init__(self, model, spec, model_dir, batch_size, precision="float32", decode=False,
               xla=False):
    self.model, self.batch_size = model, batch_size
    self.graph = tf.Graph()
    with self.graph.as_default():
      self.tokens = tf.placeholder(tf.int32, [batch_size, model.n_ctx], name="tokens")
      self.targets = tf.placeholder(tf.int32, [batch_size, model.n_ctx], name="targets")
      self.positions = tf.placeholder(tf.int32, [batch_size], name="positions")
      self._build(spec, precision, decode, xla)
      self.checkpoints = runtime.Checkpoints(self.lowering, model_dir)
      self._init_cache = tf.local_variables_initializer()
      self.session = tf.Session(graph=self.graph, config=spec.session_config())

  def _build(self, spec, precision, decode, xla):
    mtf_graph, mtf_mesh = runtime.new_mesh()
    dims = self.model.dims(self.batch_size)
    shape = [dims.batch, dims.sequence]
    tokens = mtf.import_tf_tensor(mtf_mesh, self.tokens, shape)
    targets = mtf.import_tf_tensor(mtf_mesh, self.targets, shape)
    dtype = runtime.variable_dtype(precision)
    no_dropout = ops.Dropout(is_training=False, seed=0, step=0)
    prefill = None
    if decode:  # whole windows fill the cache; linear layers sum only each window's ids
      lengths = mtf.import_tf_tensor(mtf_mesh, self.positions + 1, [dims.batch])
      prefill = cache_lib.DecodeCache(lengths=lengths)
    logits = self.model(tokens, dtype, no_dropout, prefill)
    nll = ops.softmax_cross_entropy(logits, targets, dims.vocab)
    argmax = mtf.argmax(logits, dims.vocab)
    step, step_logits = self._step(mtf_mesh, dims, dtype, no_dropout) if decode else (None, None)
    # XLA fuses the hundreds of small ops of a one-token step, which dominate its time.
    with tf.xla.experimental.jit_scope() if xla else contextlib.nullcontext():
      self.lowering = runtime.lower(mtf_graph, mtf_mesh, spec)
    self.token_nll = self.lowering.export_to_tf_tensor(nll)
    self.argmax = self.lowering.export_to_tf_tensor(argmax)
    self.logits = self.lowering.export_to_tf_tensor(logits)  # [batch, n_ctx, vocab]
    # Sampling fetches only the row it needs of each window, not [batch, n_ctx, vocab].
    self.last_logits = tf.gather(self.logits, self.positions, axis=1, batch_dims=1)
    if decode:
      self.prefill_updates = [self.lowering.lowered_operation(op) for op in prefill.updates]
      self.step_updates = [self.lowering.lowered_operation(op) for op in step.updates]
      self.step_logits = self.lowering.export_to_tf_tensor(step_logits)[:, 0]

  def _step(self, mesh, dims, dtype, dropout):
    """The one-new-token-per-row graph against the cache: (its DecodeCache, logits)."""
    self.new_tokens = tf.placeholder(tf.int32, [self.batch_size, 1], name="new_tokens")
    self.new_positions = tf.placeholder(tf.int32, [self.batch_size, 1], name="new_positions")
    shape = [dims.batch, mtf.Dimension(dims.sequence.name, 1)]
    tokens = mtf.import_tf_tensor(mesh, self.new_tokens, shape)
    step = cache_lib.DecodeCache(positions=mtf.import_tf_tensor(mesh, self.new_positions, shape))
    return step, self.model(tokens, dtype, dropout, step)

  def restore(self):
    """Loads the latest checkpoint (and zeroes the cache); returns its path."""
    self.session.run(self._init_cache)
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
    """float32 [len(windows), vocab]: logits after the last id of each window (no cache)."""
    return self._run_windows(windows, [])

  def start(self, windows):
    """Like next_logits, and fills the cache with the windows (needs decode=True)."""
    return self._run_windows(windows, self.prefill_updates)

  def extend(self, windows):
    """Logits after each window, which must be the one `start` or `extend` saw last plus one
    id (and at most n_ctx ids); a row may also repeat its last window, its logits then being
    meaningless. Costs one position per row, through the cache."""
    tokens = np.zeros([self.batch_size, 1], np.int32)
    positions = np.zeros([self.batch_size, 1], np.int32)
    for row, window in enumerate(windows):
      tokens[row, 0], positions[row, 0] = window[-1], len(window) - 1
    logits, _ = self.session.run([self.step_logits, self.step_updates],
                                 {self.new_tokens: tokens, self.new_positions: positions})
    return logits[:len(windows)]

  def _run_windows(self, windows, updates):
    positions = np.zeros([self.batch_size], np.int32)
    positions[:len(windows)] = [len(w) - 1 for w in windows]
    logits, _ = self.session.run([self.last_logits, updates],
                                 {self.tokens: self.pad(windows), self.positions: positions})
    return logits[:len(windows)]

  def all_logits(self, tokens):
    """float32 [batch, n_ctx, vocab] for a full [batch, n_ctx] array (tests, interop)."""
    return self.session.run(self.logits, {self.tokens: tokens})

"""A trained model restored for inference: one graph, built once, run on batches of windows.

Evaluation, the last-word task, sampling and the HF import all read the model through this
class, so there is one way to turn a model dir into numbers. With `decode=True` the graph also
holds a key/value cache (gptneo/model/cache.py): `start` fills it with the prompts, a chunk
of positions at a time, and `extend` then costs one position per new token.
"""
import dataclasses
import os

from absl import logging
import numpy as np

from gptneo import checkpoints as checkpoints_lib
from gptneo import memory
from gptneo import runtime
from gptneo.compat import mtf, tf
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.errors import UserError
from gptneo.layout_search import cost_model
from gptneo.model import cache as cache_lib
from gptneo.model import ops

TOKENIZER_FILE = "tokenizer.json"
OPERATIVE_CONFIG = "operative_config.gin"


def check_model_dir(model_dir):
  """A model dir must hold an operative config and an intact checkpoint; returns the config
  path. Checkpoints are verified newest first: one line says which is used if a newer one
  is not intact."""
  config = os.path.join(model_dir, OPERATIVE_CONFIG)
  if not tf.io.gfile.exists(config):
    raise UserError(f"{config} not found; --model_dir must be a folder gptneo-train or "
                    f"gptneo-import-hf wrote")
  found = checkpoints_lib.require(model_dir)
  line = checkpoints_lib.describe(found, "loading")
  if (found.skipped or found.legacy) and line not in _told:
    logging.warning("%s", line)
    _told.add(line)
  return config


_told = set()  # a binary checks its model dir more than once, and says so once


def load_tokenizer(model_dir):
  return tokenizer_lib.load_tokenizer(os.path.join(model_dir, TOKENIZER_FILE))


INFERENCE_FIXES = ("keep GPT.n_ctx as the model was trained, lower the batch size "
                   "(sample.batch_size, evaluate.batch_size, lm_eval.batch_size), use precision "
                   "'bfloat16', or lay the model over more devices (a layout gin file)")


def check_memory(model, mesh, batch_size, precision="float32", decode=False, length=None):
  """What RestoredModel would hold (memory.decoding_memory_bytes) must fit the mesh's devices:
  checked analytically, before the graph is built."""
  length = length or model.n_ctx
  estimate = memory.per_device(
      memory.decoding_memory_bytes(model, batch_size, precision, decode, length),
      cost_model.Workload.of(model, batch_size, precision=precision), mesh)
  what = (f"running {model.num_parameters() / 1e6:.0f}M parameters on {batch_size} windows of "
          f"{length} tokens" + (" with a key/value cache" if decode else ""))
  memory.check(estimate, mesh, what, INFERENCE_FIXES)


@dataclasses.dataclass
class Outputs:
  """What one run returns for a batch [batch, n_ctx] of windows."""
  token_nll: np.ndarray  # [batch, n_ctx] -log p(target) in nats, float32
  argmax: np.ndarray  # [batch, n_ctx] the greedy next token at each position


class RestoredModel:
  """The model's outputs for `batch_size` windows of n_ctx tokens, from the latest checkpoint,
  on runtime `rt`'s mesh (runtime.started, or runtime.Runtime(spec) for this process's).

  Windows shorter than n_ctx are right-padded: attention is causal, so padding never changes
  the outputs at real positions. With decode=True, `start` and `extend` decode through the
  key/value cache: prompts run in chunks of `chunk` tokens, then one token per step.
  With sequence_length < n_ctx (one GPT.window_fits), the windows, arrays and outputs of
  `pad`, `score`, `next_logits` and `all_logits` are that long instead of n_ctx: the first
  positions of an n_ctx window, for less work (the weights are those of the checkpoint).
  """

  def __init__(self, model, rt, model_dir, batch_size, precision="float32", decode=False,
               chunk=64, sequence_length=None):
    self.model, self.batch_size = model, batch_size
    self.length = sequence_length or model.n_ctx
    check_memory(model, rt.spec, batch_size, precision, decode, self.length)
    self.graph = tf.Graph()
    with self.graph.as_default():
      self.tokens = tf.placeholder(tf.int32, [batch_size, self.length], name="tokens")
      self.targets = tf.placeholder(tf.int32, [batch_size, self.length], name="targets")
      self.positions = tf.placeholder(tf.int32, [batch_size], name="positions")
      self._build(rt, precision, decode, min(chunk, model.n_ctx))
      self.checkpoints = checkpoints_lib.Checkpoints(self.lowering, model_dir)
      self._init_cache = tf.local_variables_initializer()
      self.session = rt.new_session(self.graph)

  def _build(self, rt, precision, decode, chunk):
    mtf_graph, mtf_mesh = runtime.new_mesh(spec=rt.spec)
    dims = self.model.dims(self.batch_size, self.length)
    shape = [dims.batch, dims.sequence]
    tokens = mtf.import_tf_tensor(mtf_mesh, self.tokens, shape)
    targets = mtf.import_tf_tensor(mtf_mesh, self.targets, shape)
    dtype = runtime.variable_dtype(precision)
    no_dropout = ops.Dropout(is_training=False, seed=0, step=0)
    logits, _ = self.model(tokens, dtype, no_dropout)
    nll = ops.softmax_cross_entropy(logits, targets, dims.vocab)
    argmax = mtf.argmax(logits, dims.vocab)
    decoders = [_Decoder(self.model, mtf_mesh, self.batch_size, length, dtype, no_dropout)
                for length in ((chunk, 1) if decode else ())]
    self.lowering = rt.lower(mtf_graph, mtf_mesh)
    self.token_nll = self.lowering.export_to_tf_tensor(nll)
    self.argmax = self.lowering.export_to_tf_tensor(argmax)
    self.logits = self.lowering.export_to_tf_tensor(logits)  # [batch, n_ctx, vocab]
    # Sampling fetches only the row it needs of each window, not [batch, n_ctx, vocab].
    self.last_logits = tf.gather(self.logits, self.positions, axis=1, batch_dims=1)
    for decoder in decoders:
      decoder.lower(self.lowering)
    self._chunk, self._step = decoders or (None, None)

  @property
  def decodes(self):
    """True if built with decode=True: `start` and `extend` run through the cache."""
    return self._step is not None

  def restore(self):
    """Loads the newest intact checkpoint (and zeroes the cache); returns its path."""
    self.session.run(self._init_cache)
    return self.checkpoints.restore(self.session)

  def pad(self, windows):
    """[len <= batch_size] lists of ids (each <= length) -> [batch_size, length] int32."""
    batch = np.zeros([self.batch_size, self.length], np.int32)
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
    positions = np.zeros([self.batch_size], np.int32)
    positions[:len(windows)] = [len(w) - 1 for w in windows]
    return self.session.run(self.last_logits, {self.tokens: self.pad(windows),
                                               self.positions: positions})[:len(windows)]

  def start(self, windows):
    """Like next_logits, through the cache, which then holds the windows (needs decode=True).

    The windows run together in chunks; a row's logits come from the chunk holding its last id.
    """
    logits = np.zeros([len(windows), self.model.n_vocab], np.float32)
    length = self._chunk.length
    for begin in range(0, max(len(w) for w in windows), length):
      pieces = [w[begin:begin + length] for w in windows]
      chunk_logits = self._chunk.run(self.session, pieces, [begin] * len(windows),
                                     self.model.n_ctx)
      for row, window in enumerate(windows):
        if begin < len(window) <= begin + length:
          logits[row] = chunk_logits[row]
    return logits

  def extend(self, windows):
    """Logits after each window, which must be the one `start` or `extend` saw last plus one
    id (and at most n_ctx ids); a row may also repeat its last window, its logits then being
    meaningless. Costs one position per row, through the cache."""
    return self._step.run(self.session, [w[-1:] for w in windows],
                          [len(w) - 1 for w in windows], self.model.n_ctx)

  def all_logits(self, tokens):
    """float32 [batch, n_ctx, vocab] for a full [batch, n_ctx] array (tests, interop)."""
    return self.session.run(self.logits, {self.tokens: tokens})


class _Decoder:
  """The graph that runs `length` new tokens per row through the key/value cache."""

  def __init__(self, model, mtf_mesh, batch_size, length, dtype, dropout):
    self.length = length
    self.tokens = tf.placeholder(tf.int32, [batch_size, length], name=f"tokens_{length}")
    self.positions = tf.placeholder(tf.int32, [batch_size, length], name=f"positions_{length}")
    self.last = tf.placeholder(tf.int32, [batch_size], name=f"last_{length}")
    dims = model.dims(batch_size, length)
    shape = [dims.batch, dims.sequence]
    last = mtf.import_tf_tensor(mtf_mesh, self.last, [dims.batch]) if length > 1 else None
    self.cache = cache_lib.DecodeCache(mtf.import_tf_tensor(mtf_mesh, self.positions, shape),
                                       last)
    self._logits, _ = model(mtf.import_tf_tensor(mtf_mesh, self.tokens, shape), dtype, dropout,
                            self.cache)

  def lower(self, lowering):
    self.last_logits = lowering.export_to_tf_tensor(self._logits)[:, 0]  # [batch, vocab]
    self.updates = [lowering.lowered_operation(op) for op in self.cache.updates]

  def run(self, session, pieces, begins, n_ctx):
    """Logits after each row's last new id; pieces[row] sits at begins[row], begins[row] + 1,
    ...; other slots (and rows) are padding, at position n_ctx."""
    tokens = np.zeros(self.tokens.shape.as_list(), np.int32)
    positions = np.full(self.positions.shape.as_list(), n_ctx, np.int32)
    last = np.zeros(self.last.shape.as_list(), np.int32)
    for row, (piece, begin) in enumerate(zip(pieces, begins, strict=True)):
      tokens[row, :len(piece)] = piece
      positions[row, :len(piece)] = np.arange(begin, begin + len(piece))
      last[row] = max(len(piece) - 1, 0)
    logits, _ = session.run([self.last_logits, self.updates], {
        self.tokens: tokens, self.positions: positions, self.last: last})
    return logits[:len(pieces)]

"""An analytic estimate of one training step's peak memory, counted from the model object.

What one device holds at the step's fullest (a single-device placement mesh, as bin/train on
a CPU or one GPU runs), in bytes, term by term:

* weights: every trainable variable in float32 (the master; on one device mtf reads and
  updates it in place, `slice_is_master`, so there is no second slice copy).
* optimizer state: the slot variables the optimizer says it keeps (`slot_shapes`, as the
  layout search asks): Adam's m and v, two float32 copies of every weight; Adafactor its
  factored row and column means of matrices (a whole second moment of vectors), plus m if
  beta1. An optimizer without `slot_shapes` is assumed to be Adam.
* gradients: one per weight, at the activation dtype (mtf differentiates the weights' values,
  which are cast to the activation dtype); all of them exist at once at the end of the
  backward pass, since the global norm for clipping needs every one before any update runs.
* activations: the forward tensors the backward pass reads, at the activation dtype, counted
  op by op from how gpt.py computes them (see `activation_terms`); the residual stream itself
  is not among them (the residual adds, and LayerNorm's `x - mean(x)`, have gradients that do
  not read their inputs).
* bfloat16 weight copies (bfloat16 only): each weight's value cast to bfloat16, which the
  matmuls' backward reads, so all of them are kept.
* the loss gradient: a second [batch, sequence, vocab] float32 buffer when the backward
  starts (the cross-entropy's backward makes softmax * dy, then subtracts dy at the targets
  into a new buffer: TensorScatterSub is not in place; the softmax is freed by then). A traced
  step's allocator peak is at that op.

Activations are freed layer by layer as the backward pass goes, while gradients appear layer
by layer: both are linear in the layer reached, so their sum is largest at an end. The peak
is the persistent memory (weights, optimizer state) plus the larger of the start of the
backward pass (every kept activation, the loss gradient) and its end (every gradient, and
for a tied embedding the second of its two partial gradients, the lookup's, before they are
added).

"Kept" is what TF's executor really holds, checked against the live tensors of a traced
step (bench/memory.py, bench/RESULTS.md): a gradient op that reads only forward tensors
(square's 2x in a LayerNorm, pow's 3x^2 in gelu_tanh) runs as soon as they exist, during the
forward, and its output waits for the backward in their stead or beside them.

Not counted: the framework itself (TensorFlow's code and allocator, the graph's Python and
C++ objects), the input pipeline, and transients below these (a weight decay's new buffer,
one clipped gradient at a time). A recomputed block (GPT.recompute_grad) keeps only its input.
"""
import dataclasses
import math

from gptneo.model import attention
from gptneo.model import feedforward
from gptneo.model import positions as positions_lib

BYTES = {"float32": 4, "bfloat16": 2}
MASTER_BYTES = 4  # weights, optimizer state and the loss's softmax are float32 in either precision

# The [..., mlp] tensors an activation's backward keeps besides its output (which the next
# matmul keeps anyway), its input included if read, as TF 2.21's tf.gradients of the
# composite (mtf.cwise) reads them: gelu_tanh: 0.5x, tanh(...), 3x^2 (pow's gradient, made
# early: see above) and one product of mul_3's gradient, in a traced step (the input itself is
# then freed); gelu: 0.5x, x / sqrt(2) and erfc(...); relu: its input (mtf's gradient); silu:
# its input; selu: its output only.
ACTIVATION_KEPT = {"gelu_tanh": 4, "gelu": 3, "relu": 1, "silu": 1, "swish": 1, "selu": 0}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Itemized bytes of one training step; `peak` is what the device holds at its fullest.

  persistent: {name: bytes} held all the step (weights, optimizer state).
  backward_start: {name: bytes} alive when the backward pass starts (activations, ...).
  backward_end: {name: bytes} alive when it ends (gradients, ...).
  """
  persistent: dict
  backward_start: dict
  backward_end: dict

  @property
  def peak(self):
    return sum(self.persistent.values()) + max(sum(self.backward_start.values()),
                                               sum(self.backward_end.values()))

  def items(self):
    """(name, bytes) of every term that makes up `peak`, the larger phase's only."""
    start, end = sum(self.backward_start.values()), sum(self.backward_end.values())
    phase = self.backward_start if start >= end else self.backward_end
    return list(self.persistent.items()) + list(phase.items())


def weight_shapes(model):
  """(name, ((dim name, size), ...)) of every trainable variable, as gpt.py creates them.

  Axial position tables count as one [rows + columns, embd] table (the same size).
  """
  e, m, h, kv = model.n_embd, model.n_embd * model.mlp_ratio, model.n_head, model.n_embd // model.n_head
  emb, mlp = ("embd", e), ("mlp", m)
  shapes = [("wte", (("vocab", model.n_vocab), emb))]
  table = model.positions.num_parameters(model.n_ctx, e)
  if table:
    rows = model.n_ctx if isinstance(model.positions, positions_lib.LearnedPositions) else table // e
    shapes.append(("wpe", (("sequence", rows), emb)))
  moe_layers = set(model.moe.layers) if model.moe is not None else set()
  for layer in range(model.n_layer):
    p = f"h{layer}/"
    shapes += [(p + "ln_1/g", (emb,)), (p + "ln_1/b", (emb,)),
               (p + "attn/qkv/w", (emb, ("qkv", 3), ("heads", h), ("kv", kv))),
               (p + "attn/out/w", (("heads", h), ("kv", kv), emb)), (p + "attn/out/b", (emb,)),
               (p + "ln_2/g", (emb,)), (p + "ln_2/b", (emb,))]
    if layer in moe_layers:
      experts = ("experts", model.moe.num_experts)
      shapes += [(p + "moe/router/w", (emb, experts)), (p + "moe/wi", (experts, emb, mlp)),
                 (p + "moe/wo", (experts, mlp, emb))]
      continue
    inputs = ["fc"] if feedforward.INPUT_PROJECTIONS[model.feed_forward.__name__] == 1 else [
        "gate", "fc"]
    for name in inputs:
      shapes += [(p + f"mlp/{name}/w", (emb, mlp)), (p + f"mlp/{name}/b", (mlp,))]
    shapes += [(p + "mlp/proj/w", (mlp, emb)), (p + "mlp/proj/b", (emb,))]
  shapes += [("ln_f/g", (emb,)), ("ln_f/b", (emb,))]
  if not model.tie_embeddings:
    shapes.append(("lm_head/w", (emb, ("vocab", model.n_vocab))))
  return shapes


def _elements(shape):
  return math.prod(size for _, size in shape)


def optimizer_state_elements(model, optimizer=None):
  """Elements of every slot variable `optimizer` keeps (None, or no slot_shapes: Adam's m, v)."""
  slots = getattr(optimizer, "slot_shapes", None) or (lambda shape: [shape, shape])
  return sum(_elements(slot) for _, shape in weight_shapes(model) for slot in slots(shape))


def activation_terms(model, batch_size):
  """{name: elements} of the forward tensors the backward pass reads, summed over layers.

  Per block, T = batch * n_ctx tokens, E = n_embd, M = the MLP's width:
    layer norms: the centered input, 2 x centered (square's gradient, made early), the
      normalized input (the gain's product reads it) and the output (the next matmul's
      input): 4 T E each, ln_1 and ln_2;
    q, k, v (the score and value einsums' inputs): 3 T E for a global layer; a local one keeps
      q and keys and values with the previous block's, [batch, blocks, 2 * window, heads, kv]:
      5 T E; a linear one q, k, v, phi(q), phi(k), the normalizers and the numerator (7 T E)
      and the running sums [batch, sequence, heads, kv, kv];
    attention probabilities (the softmax's and p.v's backward read them): [batch, heads, seq,
      seq] global, [batch, heads, blocks, window, 2 * window] local, none for linear;
    the heads' output (the out projection's input): T E;
    the MLP: what the activation's backward keeps (ACTIVATION_KEPT, its input included if
      read) and the projection's input: (1 + kept) T M; a GLU the gate's internals, the
      gate's and fc's outputs and their product: (3 + kept) T M; a mixture of experts is counted as an MLP over
      the experts' token slots (capacity_factor T) plus the dispatch and combine tensors
      [batch, sequence, experts, capacity];
    dropout (rate > 0): the mask and the tensor it multiplies, per site.
  And the head: ln_f (4 T E) and the softmax over the vocabulary [T, vocab], kept by the
  cross-entropy's backward (float32 in either precision, so it is counted in bytes apart:
  `training_memory_bytes`). The logits themselves are not kept.
  """
  b, s, e = batch_size, model.n_ctx, model.n_embd
  t, m, h, kv = b * s, model.n_embd * model.mlp_ratio, model.n_head, model.n_embd // model.n_head
  terms = {"layer norms": 0, "q, k, v": 0, "attention probabilities": 0, "attention output": 0,
           "mlp": 0, "dropout": 0}
  moe_layers = set(model.moe.layers) if model.moe is not None else set()
  kept = ACTIVATION_KEPT.get(model.activation.__name__, 1)
  glu = feedforward.INPUT_PROJECTIONS[model.feed_forward.__name__] == 2
  dropout_sites = lambda rate, size: 2 * size if rate > 0 else 0  # noqa: E731
  terms["dropout"] += dropout_sites(model.embed_dropout, t * e)
  if model.recompute_grad:  # each block keeps its input; one block's own at a time (below)
    terms["block inputs (recompute_grad)"] = model.n_layer * t * e
  per_layer = []
  for layer, layer_type in enumerate(model.layer_types):
    kind = attention.lookup(layer_type)
    block = dict.fromkeys(terms, 0)
    block["layer norms"] = 2 * 4 * t * e
    if kind.decode == "linear":
      block["q, k, v"] = 7 * t * e + t * h * kv * kv
      scores = 0
    elif kind.windowed and model.window_size < s:
      block["q, k, v"] = 5 * t * e
      scores = b * h * s * 2 * model.window_size
    else:
      block["q, k, v"] = 3 * t * e
      scores = b * h * s * s
    block["attention probabilities"] = scores
    block["attention output"] = t * e
    if layer in moe_layers:
      per_row = model.moe.num_experts * model.moe._capacity(s)  # pylint: disable=protected-access
      slots = b * per_row  # token slots of all experts
      block["mlp"] = (1 + kept) * slots * m + 2 * slots * e + 2 * t * per_row
    else:
      block["mlp"] = (3 + kept if glu else 1 + kept) * t * m
    block["dropout"] = (dropout_sites(model.attn_dropout, scores)
                        + 2 * dropout_sites(model.res_dropout, t * e))
    per_layer.append(block)
  if model.recompute_grad:
    largest = max(per_layer, key=lambda block: sum(block.values()))
    per_layer = [largest]
  for block in per_layer:
    for name, value in block.items():
      terms[name] += value
  terms["ln_f"] = 4 * t * e
  return {name: value for name, value in terms.items() if value}


def training_memory_bytes(model, batch_size, precision="float32", optimizer=None):
  """The itemized analytic estimate of one training step's memory on one device.

  Args:
    model: a gpt.GPT (the object flops.py reads: its shape, attention types, feed-forward,
      activation, mixture of experts, dropout rates, tied embeddings, recompute_grad).
    batch_size: sequences per step (per microbatch, with gradient accumulation).
    precision: "float32", or "bfloat16" activations over float32 master weights (runtime.py).
    optimizer: an optimizer with `slot_shapes(shape)` (gptneo/optim's Adam, Adafactor), or
      None for Adam (m and v).

  Returns:
    a MemoryEstimate; its `peak` is the estimate, `items()` its terms (see the module's
    docstring for what each is and why).
  """
  if precision not in BYTES:
    raise ValueError(f"precision = {precision!r}; use one of {sorted(BYTES)}")
  a = BYTES[precision]
  params = sum(_elements(shape) for _, shape in weight_shapes(model))
  tokens, vocab_table = batch_size * model.n_ctx, model.n_vocab * model.n_embd
  persistent = {"weights (float32)": MASTER_BYTES * params,
                "optimizer state (float32)": MASTER_BYTES * optimizer_state_elements(
                    model, optimizer)}
  start = {f"activations: {name}": a * value
           for name, value in activation_terms(model, batch_size).items()}
  start["activations: softmax over vocab (float32)"] = MASTER_BYTES * tokens * model.n_vocab
  if a != MASTER_BYTES:
    start["bfloat16 weight copies"] = a * params
  start["loss gradient [batch, seq, vocab] (float32)"] = MASTER_BYTES * tokens * model.n_vocab
  end = {"gradients": a * params}
  if model.tie_embeddings:
    end["tied embedding's second partial gradient"] = a * vocab_table
  return MemoryEstimate(persistent, start, end)

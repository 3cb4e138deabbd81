"""Analytic estimates of a run's peak memory, counted from the model object, and the check
every program makes with them before it builds a graph (`check`, docs/memory.md).

Training (`training_memory_bytes`): what one device holds at the step's fullest (a
single-device placement mesh, as bin/train on a CPU or one GPU runs), in bytes, term by term:

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
import inspect
import math
import types

import gin

from gptneo.errors import UserError
from gptneo.layout_search import cost_model
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
    qkv = (("qkv", 3), ("heads", h), ("kv", kv))
    shapes += [(p + "ln_1/g", (emb,)), (p + "ln_1/b", (emb,)), (p + "attn/qkv/w", (emb, *qkv))]
    shapes += [(p + "attn/qkv/b", qkv)] if model.qkv_bias else []
    shapes += [(p + "attn/out/w", (("heads", h), ("kv", kv), emb)), (p + "attn/out/b", (emb,))]
    if not model.shared_layer_norm:
      shapes += [(p + "ln_2/g", (emb,)), (p + "ln_2/b", (emb,))]
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
    shapes += [("lm_head/b", (("vocab", model.n_vocab),))] if model.lm_head_bias else []
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
      input): 4 T E each, ln_1 and ln_2 (ln_1 alone with GPT.shared_layer_norm);
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
  t, e = batch_size * model.n_ctx, model.n_embd
  terms = {"layer norms": 0, "q, k, v": 0, "attention probabilities": 0, "attention output": 0,
           "mlp": 0, "dropout": 0}
  terms["dropout"] += _dropout_site(model.embed_dropout, t * e)
  if model.recompute_grad:  # each block keeps its input; one block's own at a time (below)
    terms["block inputs (recompute_grad)"] = model.n_layer * t * e
  per_layer = block_activations(model, batch_size)
  if model.recompute_grad:
    per_layer = [max(per_layer, key=lambda block: sum(block.values()))]
  for block in per_layer:
    for name, value in block.items():
      terms[name] += value
  terms["ln_f"] = 4 * t * e
  return {name: value for name, value in terms.items() if value}


def _dropout_site(rate, size):
  """A dropout site keeps its mask and the tensor it multiplies (none at rate 0)."""
  return 2 * size if rate > 0 else 0


def block_activations(model, batch_size, length=None):
  """[{name: elements}] of each block's activations (see `activation_terms`), in layer order.

  Args:
    model: a gpt.GPT.
    batch_size: sequences.
    length: positions per sequence (default: n_ctx).
  """
  b, s, e = batch_size, length or model.n_ctx, model.n_embd
  t, m, h, kv = b * s, model.n_embd * model.mlp_ratio, model.n_head, model.n_embd // model.n_head
  moe_layers = set(model.moe.layers) if model.moe is not None else set()
  kept = ACTIVATION_KEPT.get(model.activation.__name__, 1)
  glu = feedforward.INPUT_PROJECTIONS[model.feed_forward.__name__] == 2
  blocks = []
  for layer, layer_type in enumerate(model.layer_types):
    kind = attention.lookup(layer_type)
    block = {"layer norms": (1 if model.shared_layer_norm else 2) * 4 * t * e}
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
    block["dropout"] = (_dropout_site(model.attn_dropout, scores)
                        + 2 * _dropout_site(model.res_dropout, t * e))
    blocks.append(block)
  return blocks


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


def decoding_memory_bytes(model, batch_size, precision="float32", decode=False, length=None):
  """The analytic estimate of what inference.RestoredModel holds: sampling, evaluation, lm_eval.

  persistent: the float32 weights and, with decode, the key/value cache (keys and values of
  every softmax layer, [batch, heads, n_ctx + 1, kv]; a linear layer's running sums). The
  forward pass keeps nothing for a backward: its largest transient is one block's tensors
  (as `block_activations` counts them, bfloat16 weight copies beside them) and, at the head,
  the logits [batch, length, vocab] in float32 twice (they and their softmax).

  Args:
    model: a gpt.GPT.
    batch_size: windows per run.
    precision: "float32" or "bfloat16" activations.
    decode: the graph also decodes through the key/value cache.
    length: positions per window (default: n_ctx).

  Returns:
    a MemoryEstimate: `persistent`, and the forward's transients in `backward_start` (the
    one phase; `backward_end` is empty).
  """
  if precision not in BYTES:
    raise ValueError(f"precision = {precision!r}; use one of {sorted(BYTES)}")
  a, length = BYTES[precision], length or model.n_ctx
  params = sum(_elements(shape) for _, shape in weight_shapes(model))
  persistent = {"weights (float32)": MASTER_BYTES * params}
  if decode:
    kv = model.n_embd // model.n_head
    per_layer = [model.n_head * kv * kv if attention.lookup(kind).decode == "linear"
                 else 2 * (model.n_ctx + 1) * model.n_embd for kind in model.layer_types]
    persistent["key/value cache"] = a * batch_size * sum(per_layer)
  largest = max(sum(block.values()) for block in block_activations(model, batch_size, length))
  transient = {"activations: the largest block": a * largest,
               "logits and their softmax (float32)": (
                   2 * MASTER_BYTES * batch_size * length * model.n_vocab)}
  if a != MASTER_BYTES:
    transient["bfloat16 weight copies"] = a * params
  return MemoryEstimate(persistent, transient, {})


# What a run really holds over the estimate: TensorFlow itself, its allocator's slack, the
# session (bench/RESULTS.md, memory section: peak RSS 1.17x the estimate at the 125M shape,
# 1.24x at 20m, within issue 15's bound of 1.3x).
FRAMEWORK_FACTOR = 1.3
DISABLE = "memory_check.enabled = False"


def limits(enabled=True, available=None, device_memory=None):
  """What bin/train and the programs that load a model check memory against before using it.

  Training (memory.training_memory_bytes of the step, per device of the layout) and
  inference (decoding_memory_bytes: weights, key/value cache, logits) are estimated before
  any graph is built; an estimate above what there is stops the program in one line (exit
  code 2) with the figures and what to change.

  Args:
    enabled: False skips the check (the estimate can be pessimistic for a config it does
      not know; the run may then be killed for want of memory).
    available: bytes (or a size such as "8GiB") to compare a CPU mesh's total with, instead
      of this machine's MemAvailable (/proc/meminfo).
    device_memory: bytes (or a size such as "16GiB") of one GPU or TPU device; None: the
      accelerators' memory is not checked (their host's is not needed).

  Returns:
    (enabled, available bytes or None, device memory bytes or None).
  """
  if not isinstance(enabled, bool):
    raise UserError(f"memory_check.enabled = {enabled!r}; use True or False")
  return (enabled, _size(available, "memory_check.available"),
          _size(device_memory, "memory_check.device_memory"))


def _size(value, knob):
  return None if value is None else cost_model.parse_bytes(value, knob)


# Registered, never called through gin: its bindings are read (`_bound_limits`), so a run's
# operative config, which a model dir carries to whoever samples from it, records no
# machine's memory knobs.
gin.configurable("memory_check")(limits)


def _bound_limits():
  """`limits` of the memory_check.* bindings (the defaults where unbound)."""
  values = {}
  for name, parameter in inspect.signature(limits).parameters.items():
    try:
      values[name] = gin.query_parameter(f"memory_check.{name}")
    except ValueError:
      values[name] = parameter.default
  return limits(**values)


def host_available_bytes():
  """This machine's MemAvailable (bytes) from /proc/meminfo; None where there is none."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        name, _, value = line.partition(":")
        if name == "MemAvailable":
          return int(value.split()[0]) * 1024  # in kB
  except OSError:
    pass
  return None


def check(estimate, mesh, what, fixes):
  """Raises UserError if `estimate` (per device) can't fit the mesh's memory (see `limits`).

  A CPU mesh's devices share this machine's memory: their sum is compared with its
  MemAvailable (or memory_check.available); a GPU's or TPU's with
  memory_check.device_memory, if set.

  Args:
    estimate: a MemoryEstimate of one device.
    mesh: the mesh.MeshSpec it runs on.
    what: the run, for the message, e.g. "training gin/gpt3_xl.gin's step".
    fixes: what to change, for the message.
  """
  enabled, available, device_memory = _bound_limits()
  if not enabled:
    return
  needed = estimate.peak * FRAMEWORK_FACTOR
  if mesh.device_type == "cpu":
    needed *= mesh.size // mesh.num_tasks  # this process's devices, all in its memory
    have, where = available or host_available_bytes(), "available on this machine"
  else:
    have, where = device_memory, f"per {mesh.device_type} (memory_check.device_memory)"
  if have is None or needed <= have:
    return
  held = sum(estimate.persistent.values())
  fmt = cost_model.format_bytes
  raise UserError(
      f"{what} needs about {fmt(needed)} ({FRAMEWORK_FACTOR}x the estimate: {fmt(held)} of "
      f"{' and '.join(name.split(' (')[0] for name in estimate.persistent)}, {fmt(estimate.peak - held)}"
      f" more at its peak) but {fmt(have)} is {where}; {fixes}, or set {DISABLE} to try anyway")


# Which of the cost model's kinds (layout_search/cost_model.py) divides each term when the
# layout splits it: terms that scale with the batch and sequence are activations; gradients
# (and the tied embedding's second one) gradients; the optimizer's state its slots; the rest
# weights and their copies.
_KIND_OF = (("activations", "activations"), ("logits", "activations"),
            ("loss gradient", "activations"), ("key/value cache", "activations"),
            ("gradients", "gradients"), ("tied embedding", "gradients"),
            ("optimizer state", "slots"))
GATHERED = "weights gathered (fsdp) or cast to bfloat16"
_CAST = "bfloat16 weight copies"  # the cost model's gathered term holds them


def _kind(name):
  return next((kind for prefix, kind in _KIND_OF if name.startswith(prefix)), "weights")


def _adam_like_slots(shape):
  return [shape, shape]


def per_device(estimate, work, mesh, optimizer=None):
  """`estimate` (one device holding everything) as one device of `mesh`'s layout holds it.

  The layout search's cost model says which share of the weights, of the optimizer state, of
  the gradients and of the activations a device keeps under the layout (the ratio of its
  split to its unsplit figures: a `fsdp:x` rule divides the first three, `zero:x` the state
  and gradients); the itemized terms are scaled by those shares. The weights a fsdp layout
  gathers, and a bfloat16 run's weight copies, are the cost model's (one block's at a time
  for inference, which keeps nothing for a backward pass), alive through the whole pass.

  Args:
    estimate: a MemoryEstimate (training_memory_bytes or decoding_memory_bytes).
    work: the cost_model.Workload of the same model and batch.
    mesh: the mesh.MeshSpec; without a layout, `estimate` is returned as it is.
    optimizer: has slot_shapes (gptneo/optim), or None for Adam's.
  """
  if not mesh.layout:
    return estimate
  if callable(getattr(optimizer, "slot_shapes", None)):
    work = work.with_optimizer(optimizer)
  else:  # as optimizer_state_elements assumes
    work = work.with_optimizer(types.SimpleNamespace(slot_shapes=_adam_like_slots), "adam")
  if not estimate.backward_end:  # inference: one block's weights gathered at a time
    work = dataclasses.replace(work, recompute=True)
  whole = cost_model.totals(work, (), ())
  split = cost_model.totals(work, tuple(mesh.shape), tuple(mesh.layout))

  def scaled(terms, gathered=True):  # the gathered weights live through either phase
    result = {name: count * (split[_kind(name)] / whole[_kind(name)] if whole[_kind(name)]
                             else 1) for name, count in terms.items()
              if not (name == _CAST and split["gathered"])}
    return {**result, GATHERED: split["gathered"]} if gathered and split["gathered"] else result
  return MemoryEstimate(scaled(estimate.persistent, gathered=False),
                        scaled(estimate.backward_start),
                        scaled(estimate.backward_end) if estimate.backward_end else {})

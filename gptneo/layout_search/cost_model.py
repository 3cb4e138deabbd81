"""An analytic cost model of one GPT training step on a mesh: memory, FLOPs, communication.

Every quantity is a sum of `Term`s, each `coefficient / prod(split[d] for d in dims)`, where
`split[d]` is the size of the mesh dimension tensor dimension `d` is laid out on (1 if none).
The same terms feed the exact evaluation here and the CP-SAT model in `search.py`, so the
solver and the printed estimate can't disagree about what a layout costs.

Ring allreduce of N bytes over k devices moves 2N(k-1)/k per device; written as two terms,
2N/prod(D) - 2N/(prod(D)*k), it stays in the same form.

Optimizer state is what the configured optimizer says it keeps (`Workload.with_optimizer`
asks its `slot_shapes`): Adam two copies of every weight, Adafactor with factored second
moments a weight's row and column means, each a term with the dimensions its tensor keeps.

A mixture of experts (`num_experts` top-1 experts in `moe_layers` blocks) replaces those
blocks' MLP: expert weights divide by the `experts` split, each expert computes on its
capacity_factor share of the tokens, and combining the experts' outputs reduces over it.

Sharded forms (`Workload.sharding`, set from a layout's `fsdp:x` or `zero:x` rule): the pseudo
dimensions "fsdp" and "zero" are split like tensor dimensions, always on the mesh dimension of
`batch` when the search places them. Each weight is sharded along its shard dimension
(mesh.shard_dim, asked once per weight group in `with_optimizer`, as if the layout split
nothing else: the search never splits `embd` in a sharded form, so that stays true but for
the MLP's bias when `mlp` is split; a hand-written layout that splits embd is costed
approximately).
* fsdp (ZeRO-3): weights, gradients and the slots that keep the shard dimension divide by the
  fsdp split. Gathered weights are float32 (the masters, cast after the gather if at all): with
  recompute one layer's at a time, twice (the backward regathers while the forward's copy may
  still live), plus the embeddings' for the whole step; without recompute every gathered
  weight is kept for the backward pass, so fsdp pays only with recompute. Per microbatch: one
  all-gather of every weight in the forward, another in the backward with recompute, and a
  reduce-scatter of the gradients (mtf accumulates them in the stored, sharded shape).
* bfloat16 (train.precision): activations, and the allreduces that carry them, at 2 bytes
  (the softmax over the vocabulary stays float32), and a bfloat16 copy of each weight the
  matmuls' backward reads: all of them kept, or with fsdp and recompute one block's beside
  its float32 gather.
* zero (ZeRO-1/2): the slots and the gradients divide by the zero split; the gradients are
  reduce-scattered per microbatch instead of allreduced once per step, and the updated
  weights all-gathered once per step.
A ring all-gather or reduce-scatter of N bytes over k devices moves N(k-1)/k per device:
N/prod(D) - N/(prod(D)*k), in the same form as the allreduce.

`estimate` and the CP-SAT model (search.py) read the same terms, and `estimate` takes the form
from the layout itself, so the printed estimate is the solver's objective.
"""
import dataclasses
import math
import re

from gptneo.errors import UserError

# The tensor dimensions a layout may split, in tiers: the search tries the first alone and
# adds the next only when nothing fits (`experts` exists in mixture-of-experts models only). `kv` (contracted inside attention, so its split
# allreduces the scores) and `sequence` (its split all-gathers keys and values) come last.
# `embd` (every matmul contracting it reduces its output) comes with kv.
TIERS = (("batch", "heads", "mlp", "vocab", "experts"), ("kv", "embd"), ("sequence",))
SPLITTABLE = TIERS[0]
SHARDED_FORMS = ("fsdp", "zero")  # mesh.SHARDING_RULES (not imported: no TF here); pseudo dims
# What a sharded form's weights keep whole so that each weight's shard dimension stays the
# one `with_optimizer` asked mesh.shard_dim for (embd for all but the MLP's bias).
NOT_WITH_SHARDING = ("embd",)
BYTES = 4  # float32 slices, gradients, optimizer state, gathered weights (and activations)
FLOAT32 = 4
MEMORY_KINDS = ("weights", "gradients", "slots", "gathered", "activations")
UNITS = {"": 1, "b": 1, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
         "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}


def parse_bytes(text, flag="--device_memory"):
  """'16GiB', '512MiB', '1.5e9' (or a number) -> bytes; `flag` names it in the error."""
  match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
  unit = match and match.group(2).lower()
  if not match or unit not in UNITS:
    raise UserError(f"{flag}={text!r} is not a size; write e.g. {flag}=16GiB or 1.6e10")
  try:
    size = float(match.group(1)) * UNITS[unit]
  except ValueError:
    raise UserError(f"{flag}={text!r} is not a size; write e.g. {flag}=16GiB") from None
  if not math.isfinite(size):
    raise UserError(f"{flag}={text!r} is not a finite size; write e.g. {flag}=16GiB")
  return size


def format_bytes(count):
  return f"{count / 2 ** 30:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class Term:
  kind: str  # one of MEMORY_KINDS (bytes), "flops", or "comm" (bytes)
  coefficient: float
  dims: tuple  # tensor dimensions whose splits divide this term

  def value(self, split):
    return self.coefficient / math.prod(split.get(d, 1) for d in self.dims)


@dataclasses.dataclass(frozen=True)
class Workload:
  """The shape of one training step: the model's dimensions and the batch."""
  n_layer: int
  n_embd: int
  n_head: int
  n_ctx: int
  n_vocab: int
  mlp: int
  batch: int
  microbatches: int = 1
  optimizer: str = ""  # its name, for the report
  # ((weight dims, (slot dims, ...)), ...): the optimizer's state per weight; see with_optimizer.
  optimizer_state: tuple = ()
  recompute: bool = False
  tie_embeddings: bool = True
  num_experts: int = 0  # > 0: `moe_layers` blocks have a mixture of this many expert MLPs
  moe_layers: int = 0
  capacity_factor: float = 1.25  # tokens an expert takes, relative to an even share
  activation_bytes: int = BYTES  # 2 with train.precision = "bfloat16" (masters stay float32)
  sharding: str = ""  # "", or a SHARDED_FORMS: the layout has that rule (see `sharded_as`)
  # ((weight dims, shard dim or ""), ...): mesh.shard_dim of each weight group; with_optimizer.
  shard_dims: tuple = ()

  @classmethod
  def of(cls, model, batch, microbatches=1, precision="float32"):
    """The workload of training gpt.GPT `model` on `batch` sequences a step (no optimizer yet:
    with_optimizer), its activations at `precision` ("float32" or "bfloat16")."""
    moe = model.moe
    return cls(n_layer=model.n_layer, n_embd=model.n_embd, n_head=model.n_head,
               n_ctx=model.n_ctx, n_vocab=model.n_vocab, mlp=model.n_embd * model.mlp_ratio,
               batch=batch, microbatches=microbatches, recompute=model.recompute_grad,
               tie_embeddings=model.tie_embeddings, num_experts=moe.num_experts if moe else 0,
               moe_layers=len(moe.layers) if moe else 0,
               capacity_factor=moe.capacity_factor if moe else 1.25,
               activation_bytes=2 if precision == "bfloat16" else BYTES)

  def __post_init__(self):  # the search's child process gets the state back as JSON lists
    object.__setattr__(self, "optimizer_state", _tuples(self.optimizer_state))
    object.__setattr__(self, "shard_dims", _tuples(self.shard_dims))

  def with_optimizer(self, optimizer, name=None):
    """This workload trained with `optimizer`, which says what state it keeps per weight.

    Args:
      optimizer: has `slot_shapes(shape)`: for a weight of shape ((dim, size), ...), the
        shapes of the slot variables it keeps, in the same form (see gptneo/optim).
      name: for the report (default: the class name).
    """
    from gptneo import mesh  # pylint: disable=g-import-not-at-top  (it loads TensorFlow)
    sizes, state, shards = self.dim_sizes(), {}, {}
    for _, dims in self.parameters():
      shape = tuple((d, sizes[d]) for d in dims)
      slots = optimizer.slot_shapes(shape)
      state[dims] = tuple(tuple(d for d, _ in slot) for slot in slots)
      shards[dims] = mesh.shard_dim(shape, {}, 1) or ""
    return dataclasses.replace(self, optimizer=name or type(optimizer).__name__.lower(),
                               optimizer_state=tuple(state.items()),
                               shard_dims=tuple(shards.items()))

  def sharded_as(self, layout):
    """This workload with the sharded form a layout's rules name ("" if none).

    Args:
      layout: ((tensor dim, mesh dim), ...), possibly with a "fsdp" or "zero" rule.
    """
    forms = [d for d, _ in layout if d in SHARDED_FORMS]
    if len(set(forms)) > 1:
      raise UserError(f"layout has both {forms[0]}: and {forms[1]}: rules; they are exclusive "
                      f"(fsdp already shards the optimizer state): keep one")
    return dataclasses.replace(self, sharding=forms[0] if forms else "")

  def shard_of(self, dims):
    """The shard dimension of a weight group ("" if it stays whole); see mesh.shard_dim."""
    return _per_weight(self.shard_dims, dims, "shard dimension")

  def stored_dims(self, dims, kind, slot_dims=None):
    """The dims whose splits divide a weight group's `kind` term under the sharded form.

    Args:
      dims: the weight group's dims.
      kind: "weights", "gradients" or "slots".
      slot_dims: for "slots", the slot variable's own dims.
    """
    own = dims if slot_dims is None else slot_dims
    if not self.sharding or (self.sharding == "zero" and kind == "weights"):
      return own
    shard = self.shard_of(dims)
    return own + (self.sharding,) if shard and shard in own else own

  def layers_of(self, dims):
    """How many blocks a weight group is spread over (0: the embeddings, used by every block)."""
    if "vocab" in dims or "sequence" in dims:
      return 0
    if "experts" in dims:
      return self.moe_layers
    return self.dense_layers if "mlp" in dims else self.n_layer

  def slots(self, dims):
    """The dims of each slot variable the optimizer keeps for a weight with `dims`."""
    return _per_weight(self.optimizer_state, dims, "optimizer state")

  def dim_sizes(self):
    """{tensor dim: size}; a sharded form's pseudo dim has the size every shard dim has in
    common (what a split of it must divide)."""
    sizes = {"batch": self.batch // self.microbatches, "heads": self.n_head, "mlp": self.mlp,
             "vocab": self.n_vocab, "embd": self.n_embd, "kv": self.n_embd // self.n_head,
             "sequence": self.n_ctx}
    if self.moe_layers:
      sizes["experts"] = self.num_experts
    if self.sharding:
      sizes[self.sharding] = math.gcd(*(sizes[shard] for _, shard in self.shard_dims if shard))
    return sizes

  def compute_bound_seconds(self, devices, device_flops):
    """6 x parameters x tokens / (devices x device_flops): the step at full utilization."""
    return 6 * self.num_parameters() * self.batch * self.n_ctx / (devices * device_flops)

  @property
  def dense_layers(self):
    return self.n_layer - self.moe_layers

  def parameters(self):
    """(element count, dims) of each group of weights that is split alike."""
    e, m, layers, dense = self.n_embd, self.mlp, self.n_layer, self.dense_layers
    groups = [(layers * 4 * e * e, ("embd", "heads", "kv")),  # q, k, v, out
              (dense * 2 * e * m, ("embd", "mlp")),  # fc, proj
              (dense * m, ("mlp",)),  # fc bias
              (layers * 5 * e + dense * e + 2 * e, ("embd",)),  # biases, norms
              (self.n_ctx * e, ("sequence", "embd")),  # wpe
              (self.n_vocab * e, ("vocab", "embd"))]
    if self.moe_layers:  # each expert's fc and proj (no biases), and the router
      groups += [(self.moe_layers * self.num_experts * 2 * e * m, ("experts", "embd", "mlp")),
                 (self.moe_layers * self.num_experts * e, ("embd", "experts"))]
    if not self.tie_embeddings:
      groups.append((self.n_vocab * e, ("vocab", "embd")))
    return groups

  def num_parameters(self):
    return sum(count for count, _ in self.parameters())


def _per_weight(table, dims, what):
  """The entry of ((weight dims, value), ...) `table` for a weight group with `dims`."""
  for weight_dims, value in table:
    if weight_dims == dims:
      return value
  raise ValueError(f"the workload has no {what} for weights {dims}: build it "
                   f"with_optimizer(...)")


def terms(work):
  """Every term of the step's cost."""
  return (_parameter_terms(work) + _gathered_terms(work) + _activation_terms(work)
          + _flop_terms(work) + _communication_terms(work))


def _tuples(value):
  return tuple(map(_tuples, value)) if isinstance(value, (list, tuple)) else value


def _parameter_terms(work):
  """Weight slices and their gradients (float32), and the optimizer's state."""
  result = []
  for count, dims in work.parameters():
    result += [Term("weights", BYTES * count, work.stored_dims(dims, "weights")),
               Term("gradients", BYTES * count, work.stored_dims(dims, "gradients"))]
  return result + optimizer_terms(work)


def optimizer_terms(work):
  """Each slot variable of each weight: its share of the weight's elements, split by its dims."""
  sizes, result = work.dim_sizes(), []
  for count, dims in work.parameters():
    for slot_dims in work.slots(dims):
      share = math.prod(sizes[d] for d in slot_dims) / math.prod(sizes[d] for d in dims)
      result.append(Term("slots", BYTES * count * share,
                         work.stored_dims(dims, "slots", slot_dims)))
  return result


def _gathered_terms(work):
  """Weights gathered (fsdp, float32) or cast to bfloat16 (the matmuls' backward reads the
  cast copies): fsdp with recompute holds one block's at a time, twice, and the embeddings';
  otherwise every block's is kept for the backward pass. See the module doc."""
  result, cast = [], work.activation_bytes if work.activation_bytes < BYTES else 0
  for count, dims in work.parameters():
    layers = work.layers_of(dims)
    gathered = work.sharding == "fsdp" and work.shard_of(dims)
    size = (BYTES if gathered else 0) + cast  # the float32 gather, then its bfloat16 copy
    if not size or not count:
      continue
    if gathered and work.recompute and layers:  # one block's, regathered beside it
      result.append(Term("gathered", 2 * size * count / layers, dims))
    else:  # the embeddings serve the whole step; without recompute every block's is kept
      result.append(Term("gathered", size * count, dims))
  return result


def _activation_terms(work):
  """What the backward pass keeps per layer; with recompute, only each layer's input."""
  b, s, e, h, m = work.batch // work.microbatches, work.n_ctx, work.n_embd, work.n_head, work.mlp
  a = work.activation_bytes  # the softmax over the vocabulary stays float32
  attention = [Term("activations", a * 4 * b * s * e, ("batch", "sequence", "embd")),
               Term("activations", a * 4 * b * s * e, ("batch", "sequence", "heads", "kv")),
               Term("activations", a * 2 * b * h * s * s, ("batch", "sequence", "heads"))]
  dense = [Term("activations", a * 2 * b * s * m, ("batch", "sequence", "mlp"))]
  routed = b * s * work.capacity_factor  # token slots over all experts
  experts = [Term("activations", a * 2 * routed * m, ("batch", "experts", "mlp")),
             Term("activations", a * 2 * routed * e, ("batch", "experts", "embd")),
             Term("activations", a * 2 * routed * s, ("batch", "sequence", "experts"))]
  logits = [Term("activations", FLOAT32 * 2 * b * s * work.n_vocab,
                 ("batch", "sequence", "vocab"))]
  if work.recompute:  # every layer's input, and one layer's activations at a time
    kept = [Term("activations", a * b * s * e * work.n_layer, ("batch", "sequence", "embd"))]
    return kept + attention + (experts if work.moe_layers else dense) + logits
  return (_times(attention, work.n_layer) + _times(dense, work.dense_layers)
          + _times(experts, work.moe_layers) + logits)


def _times(terms_, count):
  return [dataclasses.replace(t, coefficient=t.coefficient * count) for t in terms_ if count]


def _flop_terms(work):
  """Forward + backward = 3 x 2 FLOPs per multiply-add, over every microbatch."""
  tokens, e, m, layers = work.batch * work.n_ctx, work.n_embd, work.mlp, work.n_layer
  factor = 6 * tokens * (4 / 3 if work.recompute else 1)
  per_token = ("batch", "sequence")
  moe, slots = work.moe_layers, work.capacity_factor  # an expert computes on its token slots
  result = [Term("flops", factor * layers * 4 * e * e, per_token + ("embd", "heads", "kv")),
            Term("flops", factor * layers * 2 * work.n_ctx * e, per_token + ("heads", "kv")),
            Term("flops", factor * work.dense_layers * 2 * e * m, per_token + ("embd", "mlp")),
            Term("flops", factor * e * work.n_vocab, per_token + ("embd", "vocab"))]
  if moe:  # experts' MLPs; dispatch and combine einsums; the router
    result += [Term("flops", factor * moe * slots * 2 * e * m, ("batch", "experts", "embd", "mlp")),
               Term("flops", factor * moe * slots * 2 * work.n_ctx * e,
                    per_token + ("experts", "embd")),
               Term("flops", factor * moe * e * work.num_experts, per_token + ("embd", "experts"))]
  return result


def _allreduce(total_bytes, dims, over):
  """Ring allreduce of `total_bytes / prod(dims)` over the devices the `over` dims split."""
  return [Term("comm", 2 * total_bytes, dims), Term("comm", -2 * total_bytes, dims + over)]


def _ring(total_bytes, dims, over):
  """Ring all-gather or reduce-scatter: N(k-1)/k of `total_bytes / prod(dims)`, k = the
  devices the `over` dims split."""
  return [Term("comm", total_bytes, dims), Term("comm", -total_bytes, dims + over)]


def _gradient_terms(work):
  """Reducing the gradients over `batch` and, in a sharded form, gathering the weights."""
  result = []
  for count, dims in work.parameters():
    size, form = BYTES * count, work.sharding
    if not form or not work.shard_of(dims):  # once per step, after accumulating microbatches
      over = ("batch",) if "sequence" in dims else ("batch", "sequence")
      result += _allreduce(size, dims, over)
      continue
    # Accumulated in the sharded shape: reduce-scattered per microbatch, over the mesh
    # dimension the search puts both batch and the form's pseudo dim on; a shard is then
    # allreduced over a sequence split too.
    result += _ring(size * work.microbatches, dims, (form,))
    if "sequence" not in dims:
      result += _allreduce(size * work.microbatches, dims + (form,), ("sequence",))
    if form == "fsdp":  # gathered per microbatch, again in the backward with recompute
      result += _ring(size * work.microbatches * (2 if work.recompute else 1), dims, (form,))
    else:  # zero: the updated shards all-gathered into the replicated weights, once
      result += _ring(size, dims, (form,))
  return result


def _communication_terms(work):
  """Gradients (and sharded weights); activation allreduces after each model-parallel split."""
  result = _gradient_terms(work)
  a = work.activation_bytes  # activations cross at their dtype
  tokens, e, m, layers = work.batch * work.n_ctx, work.n_embd, work.mlp, work.n_layer
  hidden = a * tokens * e  # one [batch, sequence, embd] activation, all microbatches
  per_token = ("batch", "sequence")
  # Forward and backward each reduce once per split matmul: attention out / qkv input grad.
  result += _allreduce(2 * layers * hidden, per_token + ("embd",), ("heads", "kv"))
  result += _allreduce(2 * work.dense_layers * hidden, per_token + ("embd",), ("mlp",))
  if work.moe_layers:  # combine (forward) and dispatch's gradient reduce over split experts;
    # each expert's output reduces over a split mlp.
    result += _allreduce(2 * work.moe_layers * hidden, per_token + ("embd",), ("experts",))
    result += _allreduce(2 * work.moe_layers * work.capacity_factor * hidden,
                         ("batch", "experts", "embd"), ("mlp",))
  result += _allreduce(2 * hidden, per_token + ("embd",), ("vocab",))  # gather; unembed grad
  # A kv split reduces the attention scores (forward) and their gradient (backward).
  scores = a * work.batch * work.n_head * work.n_ctx ** 2
  result += _allreduce(2 * layers * scores, per_token + ("heads",), ("kv",))
  # A sequence split gathers keys and values for every query (forward), scatters back (bwd).
  gathered = 4 * layers * hidden
  result += [Term("comm", gathered, ("batch", "heads", "kv")),
             Term("comm", -gathered, ("batch", "heads", "kv", "sequence"))]
  # Splitting embd makes every matmul that contracts it reduce its output.
  result += _allreduce(layers * 4 * hidden, per_token + ("heads", "kv"), ("embd",))
  result += _allreduce(layers * 2 * a * tokens * m, per_token + ("mlp",), ("embd",))
  result += _allreduce(2 * a * tokens * work.n_vocab, per_token + ("vocab",), ("embd",))
  return result


@dataclasses.dataclass(frozen=True)
class Hardware:
  device_memory: float  # bytes
  device_flops: float = 50e12  # sustained FLOP/s of one device
  link_bandwidth: float = 50e9  # bytes/s each device sends in a collective


@dataclasses.dataclass(frozen=True)
class Estimate:
  """The cost of one step under one layout, per device."""
  mesh_shape: tuple  # ((name, size), ...)
  layout: tuple  # ((tensor dim, mesh dim), ...), a "fsdp" or "zero" rule included
  microbatches: int
  param_bytes: float  # slices + optimizer slots + gradients
  activation_bytes: float
  flops: float
  comm_bytes: float
  step_seconds: float
  n_vocab: int = 0  # the vocabulary costed: padded if the search had to pad it
  recompute: bool = False  # costed with activations recomputed per layer (GPT.recompute_grad)
  gathered_bytes: float = 0.0  # fsdp: gathered weights alive at once
  compute_bound_seconds: float = 0.0  # the step at full utilization of every device
  optimizer: str = ""  # the optimizer costed (the search may weigh several)

  @property
  def memory_bytes(self):
    return self.param_bytes + self.activation_bytes + self.gathered_bytes

  @property
  def utilization(self):
    """The compute-bound step over the estimated one: the model FLOPs utilization it predicts."""
    return self.compute_bound_seconds / self.step_seconds if self.step_seconds else 0.0


VOCAB_PADDING = 128


def padded_vocab(work):
  """The workload with n_vocab rounded up to a multiple of 128, so `vocab` can be split.

  GPT-2's 50257 = 29 x 1733 splits over no power of two; the extra rows are never targets.
  """
  padded = -(-work.n_vocab // VOCAB_PADDING) * VOCAB_PADDING
  return dataclasses.replace(work, n_vocab=padded)


def splits(mesh_shape, layout):
  sizes = dict(mesh_shape)
  return {tensor_dim: sizes[mesh_dim] for tensor_dim, mesh_dim in layout}


def totals(work, mesh_shape, layout):
  """{kind: per-device total} of every term under a layout, in the layout's sharded form."""
  work, split = work.sharded_as(layout), splits(mesh_shape, layout)
  total = dict.fromkeys(MEMORY_KINDS + ("flops", "comm"), 0.0)
  for term in terms(work):
    total[term.kind] += term.value(split)
  return total


def estimate(work, hardware, mesh_shape, layout):
  """Evaluates every term of `work` under a layout ((tensor dim, mesh dim) pairs)."""
  total = totals(work, mesh_shape, layout)
  seconds = total["flops"] / hardware.device_flops + total["comm"] / hardware.link_bandwidth
  devices = math.prod(size for _, size in mesh_shape)
  return Estimate(tuple(mesh_shape), tuple(layout), work.microbatches,
                  total["weights"] + total["gradients"] + total["slots"], total["activations"],
                  total["flops"], total["comm"], seconds, work.n_vocab, work.recompute,
                  total["gathered"], work.compute_bound_seconds(devices, hardware.device_flops),
                  work.optimizer)


def conflicts(work):
  """Pairs of tensor dimensions some tensor has both of: they can't share a mesh dimension."""
  pairs = set()
  for term in terms(work):
    for i, a in enumerate(term.dims):
      pairs.update((min(a, b), max(a, b)) for b in term.dims[i + 1:])
  return sorted(pairs)

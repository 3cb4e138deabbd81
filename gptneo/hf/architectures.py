"""The HF architectures we export to and import from: GPT-Neo, GPT-2, GPT-NeoX and GPT-J.

Each is one `Architecture`: a table of (our weight, HF weight(s), conversion) rows, what it
cannot express (in our knobs' names), its config.json from our model and our bindings from
its config.json. The conversions are shared: CONVERSIONS maps a kind to (ours -> HF arrays,
HF arrays -> ours). A row's "our weight" may be a tuple of our weights whose sum is the HF
one (GPT-J's fc_out bias: its attention output has no bias, and with a parallel residual
ours adds to the residual as the feed-forward's does); imported, the first gets it all.

Ours: qkv w [embd, 3, heads, kv] and b [3, heads, kv] (GPT.qkv_bias), out w [heads, kv,
embd], dense w [in, out]. HF nn.Linear weights are [out, in]; GPT-2's Conv1D weights are
[in, out], as ours.
"""
import dataclasses
from collections.abc import Callable

import numpy as np

from gptneo import memory
from gptneo.errors import UserError
from gptneo.hf import fields
from gptneo.hf.fields import Reference
from gptneo.model import attention
from gptneo.model import positions as positions_lib

# Our activation (by function name) <-> HF's activation names (ACT2FN keys).
ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
HF_ACTIVATIONS = {**{hf: ours for ours, hf in ACTIVATIONS.items()}, "swish": "silu"}
LEARNED, ROTARY = positions_lib.LearnedPositions, positions_lib.RotaryPositions


# --- Conversions: kind -> (to_hf(array) -> [HF arrays], from_hf([HF arrays], n_head, names)).

def _zero_bias(bias, name):
  """Our query/key/value projection has no bias: an HF one must be zero to import exactly."""
  if np.any(bias):
    raise UserError(f"{name} is not zero, and our query/key/value projection has no bias; "
                    f"this model cannot be imported exactly")


def _split_from(arrays, n_head, names):
  return np.stack([a.T.reshape(a.shape[1], n_head, -1) for a in arrays], axis=1)


def _conv1d_from(arrays, n_head, names):
  weight, bias = arrays
  _zero_bias(bias, names[1])
  return weight.reshape(weight.shape[0], 3, n_head, -1)


def _fused_from(arrays, n_head, names):  # GPT-NeoX: [heads, (q, k, v), kv] rows
  weight, bias = arrays
  _zero_bias(bias, names[1])
  return _fused_weight_from([weight], n_head, names)


def _fused_weight_from(arrays, n_head, names):
  return np.moveaxis(arrays[0].T.reshape(arrays[0].shape[1], n_head, 3, -1), 2, 1)


CONVERSIONS = {
    "copy": (lambda a: [a], lambda arrays, n_head, names: arrays[0]),
    "linear": (lambda a: [a.T], lambda arrays, n_head, names: arrays[0].T),
    # [embd, 3, heads, kv] -> 3 Linear [heads * kv, embd] (GPT-Neo's q_proj, k_proj, v_proj)
    "qkv": (lambda a: [part.reshape(a.shape[0], -1).T for part in np.moveaxis(a, 1, 0)],
            _split_from),
    # -> Conv1D [embd, 3 * heads * kv] and a zero bias (GPT-2's c_attn)
    "qkv_conv1d": (lambda a: [a.reshape(a.shape[0], -1), np.zeros(a[0].size, a.dtype)],
                   _conv1d_from),
    # -> Linear [heads * 3 * kv, embd], per head q, k, v, and a zero bias (GPT-NeoX)
    "qkv_fused": (lambda a: [np.moveaxis(a, 1, 2).reshape(a.shape[0], -1).T,
                             np.zeros(a[0].size, a.dtype)], _fused_from),
    # With GPT.qkv_bias: the weight alone, and the bias [3, heads, kv] in the same order.
    "qkv_conv1d_weight": (lambda a: [a.reshape(a.shape[0], -1)],
                          lambda arrays, n_head, names: arrays[0].reshape(
                              arrays[0].shape[0], 3, n_head, -1)),
    "qkv_conv1d_bias": (lambda a: [a.reshape(-1)],
                        lambda arrays, n_head, names: arrays[0].reshape(3, n_head, -1)),
    "qkv_fused_weight": (lambda a: [np.moveaxis(a, 1, 2).reshape(a.shape[0], -1).T],
                         _fused_weight_from),
    "qkv_fused_bias": (lambda a: [np.moveaxis(a, 0, 1).reshape(-1)],
                       lambda arrays, n_head, names: np.moveaxis(
                           arrays[0].reshape(n_head, 3, -1), 1, 0)),
    # [heads, kv, embd] -> Linear [embd, heads * kv]
    "out": (lambda a: [a.reshape(-1, a.shape[-1]).T],
            lambda arrays, n_head, names: arrays[0].T.reshape(n_head, -1, arrays[0].shape[0])),
    # -> Conv1D [heads * kv, embd]
    "out_conv1d": (lambda a: [a.reshape(-1, a.shape[-1])],
                   lambda arrays, n_head, names: arrays[0].reshape(n_head, -1,
                                                                   arrays[0].shape[1])),
}


def to_hf(kind: str, array):
  """Our array -> the list of HF arrays it holds (CONVERSIONS[kind]'s first way).

  Args:
    kind: a CONVERSIONS key, as a weight table names it.
    array: our weight.
  """
  return CONVERSIONS[kind][0](array)


def _norm(ours, hf):
  return [(f"{ours}/g", (f"{hf}.weight",), "copy"), (f"{ours}/b", (f"{hf}.bias",), "copy")]


def _dense(ours, hf, kind):
  return [(f"{ours}/w", (f"{hf}.weight",), kind), (f"{ours}/b", (f"{hf}.bias",), "copy")]


GPT_NEO_LAYER = [
    *_norm("ln_1", "ln_1"),
    ("attn/qkv/w", tuple(f"attn.attention.{n}_proj.weight" for n in "qkv"), "qkv"),
    *_dense("attn/out", "attn.attention.out_proj", "out"),
    *_norm("ln_2", "ln_2"),
    *_dense("mlp/fc", "mlp.c_fc", "linear"), *_dense("mlp/proj", "mlp.c_proj", "linear")]
GPT2_LAYER = [
    *_norm("ln_1", "ln_1"),
    ("attn/qkv/w", ("attn.c_attn.weight", "attn.c_attn.bias"), "qkv_conv1d"),
    *_dense("attn/out", "attn.c_proj", "out_conv1d"),
    *_norm("ln_2", "ln_2"),
    *_dense("mlp/fc", "mlp.c_fc", "copy"), *_dense("mlp/proj", "mlp.c_proj", "copy")]
GPT_NEOX_LAYER = [
    *_norm("ln_1", "input_layernorm"),
    ("attn/qkv/w", ("attention.query_key_value.weight", "attention.query_key_value.bias"),
     "qkv_fused"),
    *_dense("attn/out", "attention.dense", "out"),
    *_norm("ln_2", "post_attention_layernorm"),
    *_dense("mlp/fc", "mlp.dense_h_to_4h", "linear"),
    *_dense("mlp/proj", "mlp.dense_4h_to_h", "linear")]
TRANSFORMER_TOP = [  # GPT-Neo's and GPT-2's
    ("gpt/wte", ("transformer.wte.weight",), "copy"),
    ("gpt/wpe", ("transformer.wpe.weight",), "copy"), *_norm("gpt/ln_f", "transformer.ln_f")]
GPT_NEOX_TOP = [("gpt/wte", ("gpt_neox.embed_in.weight",), "copy"),
                *_norm("gpt/ln_f", "gpt_neox.final_layer_norm")]
GPT2_QKV_BIAS = [("attn/qkv/w", ("attn.c_attn.weight",), "qkv_conv1d_weight"),
                 ("attn/qkv/b", ("attn.c_attn.bias",), "qkv_conv1d_bias")]
GPT_NEOX_QKV_BIAS = [
    ("attn/qkv/w", ("attention.query_key_value.weight",), "qkv_fused_weight"),
    ("attn/qkv/b", ("attention.query_key_value.bias",), "qkv_fused_bias")]
GPTJ_LAYER = [  # one LayerNorm (GPT.shared_layer_norm), no attention biases
    *_norm("ln_1", "ln_1"),
    ("attn/qkv/w", tuple(f"attn.{n}_proj.weight" for n in "qkv"), "qkv"),
    ("attn/out/w", ("attn.out_proj.weight",), "out"),
    *_dense("mlp/fc", "mlp.fc_in", "linear"),
    ("mlp/proj/w", ("mlp.fc_out.weight",), "linear"),
    (("mlp/proj/b", "attn/out/b"), ("mlp.fc_out.bias",), "copy")]
GPTJ_TOP = [("gpt/wte", ("transformer.wte.weight",), "copy"),
            *_norm("gpt/ln_f", "transformer.ln_f")]


@dataclasses.dataclass(frozen=True)
class Architecture:
  """One HF architecture and how our model maps onto it.

  Args:
    name: its model_type and --architecture value.
    title: how messages call it ("HF GPT-Neo").
    hf_class: its transformers class (config.json's architectures).
    top, layer: (our weight, HF weights, CONVERSIONS kind) rows, outside the blocks and
      per block (names relative to gpt/h{i} and layer_prefix).
    layer_prefix: the HF name prefix of block i, with {i}.
    head: the HF name of an untied output projection (ours: gpt/lm_head/w).
    qkv_bias_layer: the rows replacing `layer`'s attn/qkv/w row for a model with
      GPT.qkv_bias (None: the architecture has no such bias).
    head_bias: the HF name of the output projection's bias (ours: gpt/lm_head/b), if any.
    problems: function(model) -> what it cannot express, one phrase per knob.
    config: function(model) -> its config.json fields for `model` (shape and knobs).
    values: function(config, path) -> {our binding: value} for an HF config.json.
    hf_scale: function(model) -> the q·k scale HF applies to the exported model.
    aliases: {other HF name: ours in `top`/`layer`} of weights other versions save.
  """
  name: str
  title: str
  hf_class: str
  top: list
  layer: list
  layer_prefix: str
  head: str
  problems: Callable
  config: Callable
  values: Callable
  hf_scale: Callable
  aliases: dict = dataclasses.field(default_factory=dict)
  qkv_bias_layer: list = None
  head_bias: str = None

  def weight_pairs(self, n_layer, tied=True, qkv_bias=False, head_bias=False):
    """(our name or names, HF names, kind) of every weight of an n_layer model (with the
    q/k/v and output biases if asked)."""
    pairs = list(self.top)
    if not tied:
      pairs.append(("gpt/lm_head/w", (self.head,), "linear"))
    if head_bias:
      pairs.append(("gpt/lm_head/b", (self.head_bias,), "copy"))
    layer = self.layer
    if qkv_bias:
      layer = [row for row in layer if row[0] != "attn/qkv/w"] + self.qkv_bias_layer
    for i in range(n_layer):
      prefix = self.layer_prefix.format(i=i)
      pairs += [(_prefixed(f"gpt/h{i}/", ours), tuple(f"{prefix}.{n}" for n in names), kind)
                for ours, names, kind in layer]
    return pairs

  def model_weight_pairs(self, model):
    """weight_pairs of the weights `model` holds."""
    return self.weight_pairs(model.n_layer, model.tie_embeddings, model.qkv_bias,
                             model.lm_head_bias)


def our_names(ours):
  """A row's our weights as a tuple (one name, or the names summed into one HF weight)."""
  return ours if isinstance(ours, tuple) else (ours,)


def their_shapes(model, pairs, to_theirs) -> dict:
  """{their name: shape} of every weight `pairs` maps, found by converting a stand-in of each
  of `model`'s weights (an array of its shape, without its memory).

  Args:
    model: our GPT.
    pairs: (our name or names, their names, kind) rows of the model's weights, full names
      (Architecture.model_weight_pairs, or GPT-Neo's checkpoint table).
    to_theirs: (kind, our array) -> the list of their arrays, in the order of their names.
  """
  ours = {"gpt/" + name: tuple(size for _, size in shape)
          for name, shape in memory.weight_shapes(model)}
  shapes = {}
  for name, names, kind in pairs:
    stand_in = np.broadcast_to(np.float32(0), ours[our_names(name)[0]])  # summed: one shape
    shapes.update({theirs: array.shape
                   for theirs, array in zip(names, to_theirs(kind, stand_in), strict=True)})
  return shapes


def _prefixed(prefix, ours):
  names = tuple(prefix + name for name in our_names(ours))
  return names if isinstance(ours, tuple) else names[0]


# --- What each architecture cannot express, in our knobs' names.

def _name(function):
  return getattr(function, "__name__", function)


def _common_problems(model, title):
  problems = []
  if _name(model.activation) not in ACTIVATIONS:
    problems.append(f"GPT.activation = {_name(model.activation)} ({title}: "
                    f"{sorted(ACTIVATIONS)})")
  if _name(model.feed_forward) != "mlp":  # by name: gin's @mlp is a wrapper of it
    problems.append(f"GPT.feed_forward = @{_name(model.feed_forward)} ({title}: @mlp)")
  if model.moe is not None:
    problems.append("GPT.moe is set (no HF architecture here has experts)")
  return problems


def _positions_problem(model, wanted, title="", interleaved=False):
  """What `model`'s positions differ in from `wanted` (rotary: and its pairing)."""
  if type(model.positions) is not wanted:
    return [f"GPT.positions = @{type(model.positions).__name__}() (HF GPT-Neo and GPT-2: "
            f"@LearnedPositions(), HF GPT-NeoX and GPT-J: @RotaryPositions())"]
  if wanted is ROTARY and model.positions.interleaved != interleaved:
    return [f"RotaryPositions.interleaved = {model.positions.interleaved} ({title}: "
            f"{interleaved})"]
  return []


def _knob_problems(model, title, allowed):
  """The GPT knobs whose value `title` cannot compute: allowed is {knob: [values]}."""
  return [f"GPT.{knob} = {getattr(model, knob)} ({title}: "
          f"{' or '.join(map(str, values))})"
          for knob, values in allowed.items() if getattr(model, knob) not in values]


# The features of the families beyond GPT-2's (GPT.<knob>: values without them).
SEQUENTIAL = {"parallel_residual": [False], "shared_layer_norm": [False],
              "lm_head_bias": [False]}


def _attention_problem(model, title, names):
  """The layer types whose HF GPT-Neo name is not among `names`."""
  bad = sorted({kind for kind in model.layer_types
                if attention.lookup(kind).hf_name not in names})
  return [f"GPT.attention_layers uses {bad} ({title}: {sorted(names)})"] if bad else []


def hf_attention_names():
  """HF GPT-Neo's attention type name -> ours, for the types it computes as we do."""
  return {kind.hf_name: kind.name for kind in attention.ATTENTION_TYPES.values()
          if kind.hf_name is not None}


def _gpt_neo_problems(model):
  title = "HF GPT-Neo"
  return (_common_problems(model, title) + _positions_problem(model, LEARNED)
          + _attention_problem(model, title, set(hf_attention_names()))
          + _knob_problems(model, title, {**SEQUENTIAL, "qkv_bias": [False]}))


def _gpt2_problems(model):
  title = "HF GPT-2"
  return (_common_problems(model, title) + _positions_problem(model, LEARNED)
          + _attention_problem(model, title, {"global"})
          + _knob_problems(model, title, SEQUENTIAL))


def _gpt_neox_problems(model):
  title = "HF GPT-NeoX"
  return (_common_problems(model, title) + _positions_problem(model, ROTARY, title)
          + _attention_problem(model, title, {"global"})
          + _knob_problems(model, title, {**SEQUENTIAL, "parallel_residual": [False, True]}))


def _gptj_problems(model):
  title = "HF GPT-J"
  rotary = type(model.positions) is ROTARY
  base = ([f"RotaryPositions.base = {model.positions.base} ({title}: 10000)"]
          if rotary and model.positions.base != GPTJ_ROTARY_BASE else [])
  return (_common_problems(model, title) + _positions_problem(model, ROTARY, title, True)
          + base + _attention_problem(model, title, {"global"})
          + _knob_problems(model, title, {
              "qkv_bias": [False], "parallel_residual": [True], "shared_layer_norm": [True],
              "tie_embeddings": [False], "lm_head_bias": [True]}))


def head_scale(model):
  """1/sqrt(d_head): the q·k scale GPT-NeoX and GPT-J always apply."""
  return (model.n_embd // model.n_head) ** -0.5


def standard_scale(model):
  """The q·k scale of the standard parametrization: what HF GPT-2's scale_attn_weights means."""
  return head_scale(model) if model.scale_attention else 1.0


# --- config.json of each architecture for our model.

def _attention_types(layer_types):
  """HF GPT-Neo's [[types, count], ...] from one type per layer (runs of equal types merged)."""
  runs = []
  for kind in layer_types:
    name = attention.lookup(kind).hf_name
    if runs and runs[-1][0] == [name]:
      runs[-1][1] += 1
    else:
      runs.append([[name], 1])
  return runs


def _gpt_neo_config(model):
  return {"vocab_size": model.n_vocab, "max_position_embeddings": model.n_ctx,
          "hidden_size": model.n_embd, "num_layers": model.n_layer, "num_heads": model.n_head,
          "intermediate_size": model.n_embd * model.mlp_ratio,
          "attention_types": _attention_types(model.layer_types),
          "window_size": model.window_size,
          "activation_function": ACTIVATIONS[model.activation.__name__],
          "layer_norm_epsilon": model.layer_norm_epsilon, "initializer_range": model.init_std,
          "embed_dropout": model.embed_dropout, "attention_dropout": model.attn_dropout,
          "resid_dropout": model.res_dropout}


def _gpt2_config(model):
  return {"vocab_size": model.n_vocab, "n_positions": model.n_ctx, "n_embd": model.n_embd,
          "n_layer": model.n_layer, "n_head": model.n_head,
          "n_inner": model.n_embd * model.mlp_ratio,
          "activation_function": ACTIVATIONS[model.activation.__name__],
          "scale_attn_weights": model.scale_attention, "scale_attn_by_inverse_layer_idx": False,
          "reorder_and_upcast_attn": False, "layer_norm_epsilon": model.layer_norm_epsilon,
          "initializer_range": model.init_std, "embd_pdrop": model.embed_dropout,
          "attn_pdrop": model.attn_dropout, "resid_pdrop": model.res_dropout}


def _gpt_neox_config(model):
  fraction, base = model.positions.fraction, model.positions.base
  return {"vocab_size": model.n_vocab, "max_position_embeddings": model.n_ctx,
          "hidden_size": model.n_embd, "num_hidden_layers": model.n_layer,
          "num_attention_heads": model.n_head,
          "intermediate_size": model.n_embd * model.mlp_ratio,
          "hidden_act": ACTIVATIONS[model.activation.__name__],
          "use_parallel_residual": model.parallel_residual, "attention_bias": True,
          # transformers 5 reads rope_parameters; 4.x reads rotary_pct and rotary_emb_base.
          "rope_parameters": {"rope_type": "default", "rope_theta": base,
                              "partial_rotary_factor": fraction},
          "rotary_pct": fraction, "rotary_emb_base": base,
          "layer_norm_eps": model.layer_norm_epsilon, "initializer_range": model.init_std,
          "hidden_dropout": model.res_dropout, "attention_dropout": model.attn_dropout}


GPTJ_ROTARY_BASE = 10000.0  # HF GPT-J's rotation frequencies: not in its config


def _gptj_config(model):
  return {"vocab_size": model.n_vocab, "n_positions": model.n_ctx, "n_embd": model.n_embd,
          "n_layer": model.n_layer, "n_head": model.n_head,
          "rotary_dim": int(model.positions.rotary_size(model.n_embd // model.n_head)),
          "n_inner": model.n_embd * model.mlp_ratio,
          "activation_function": ACTIVATIONS[model.activation.__name__],
          "layer_norm_epsilon": model.layer_norm_epsilon, "initializer_range": model.init_std,
          "embd_pdrop": model.embed_dropout, "attn_pdrop": model.attn_dropout,
          "resid_pdrop": model.res_dropout}


# --- Our bindings from each architecture's config.json (every value type-checked).

def _mlp_ratio(hidden, intermediate, path, key):
  intermediate = intermediate or 4 * hidden
  if intermediate % hidden:
    raise fields.unsupported(path, f"{key} = {intermediate} is not a multiple of the hidden "
                             f"size {hidden}, but ours needs one (GPT.mlp_ratio is an integer)")
  return intermediate // hidden


def _knobs(field, keys):
  """{GPT.knob: value} for (knob, HF key, check, default) rows."""
  return {f"GPT.{knob}": field(key, check, *default) for knob, key, check, *default in keys}


_ACTIVATION = fields.one_of(HF_ACTIVATIONS)


def _attention_types_check():
  names = hf_attention_names()

  def accepts(value):
    return type(value) is list and all(
        type(entry) is list and len(entry) == 2 and type(entry[0]) is list
        and all(type(name) is str and name in names for name in entry[0])
        and fields.is_int(entry[1]) and entry[1] > 0 for entry in value)
  return accepts, (f'a list of [[type names], count] pairs such as [[["global", "local"], '
                   f'6]], the names among {sorted(names)}')


def _gpt_neo_values(config, path):
  field = _field(config, path)
  hidden = field("hidden_size", fields.POSITIVE_INT)
  ratio = _mlp_ratio(hidden, field("intermediate_size", fields.OPTIONAL_POSITIVE_INT, None),
                     path, "intermediate_size")
  names = hf_attention_names()
  runs = field("attention_types", _attention_types_check())
  return {"GPT.n_layer": field("num_layers", fields.POSITIVE_INT), "GPT.n_embd": hidden,
          **_knobs(field, [("n_head", "num_heads", fields.POSITIVE_INT),
                           ("n_ctx", "max_position_embeddings", fields.POSITIVE_INT),
                           ("n_vocab", "vocab_size", fields.POSITIVE_INT)]),
          "GPT.mlp_ratio": ratio, "GPT.feed_forward": Reference("mlp"),
          "GPT.activation": Reference(HF_ACTIVATIONS[field("activation_function",
                                                           _ACTIVATION)]),
          "GPT.attention_layers": [[[names[name] for name in types], count]
                                   for types, count in runs],
          "GPT.window_size": field("window_size", fields.POSITIVE_INT, 256),
          "GPT.scale_attention": False, "GPT.positions": Reference("LearnedPositions()"),
          "GPT.tie_embeddings": field("tie_word_embeddings", fields.BOOL, True),
          **_knobs(field, [("layer_norm_epsilon", "layer_norm_epsilon", fields.POSITIVE_REAL,
                            1e-5),
                           ("embed_dropout", "embed_dropout", fields.PROBABILITY, 0.0),
                           ("attn_dropout", "attention_dropout", fields.PROBABILITY, 0.0),
                           ("res_dropout", "resid_dropout", fields.PROBABILITY, 0.0),
                           ("init_std", "initializer_range", fields.POSITIVE_REAL, 0.02)])}


def _gpt2_shaped(field, path, dropout):
  """The bindings GPT-2's and GPT-J's config.json share (GPT-J's keys are GPT-2's); `dropout`
  the default of their dropout rates."""
  hidden = field("n_embd", fields.POSITIVE_INT)
  return {"GPT.n_layer": field("n_layer", fields.POSITIVE_INT), "GPT.n_embd": hidden,
          **_knobs(field, [("n_head", "n_head", fields.POSITIVE_INT),
                           ("n_ctx", "n_positions", fields.POSITIVE_INT),
                           ("n_vocab", "vocab_size", fields.POSITIVE_INT)]),
          "GPT.mlp_ratio": _mlp_ratio(hidden, field("n_inner", fields.OPTIONAL_POSITIVE_INT,
                                                    None), path, "n_inner"),
          "GPT.feed_forward": Reference("mlp"),
          "GPT.activation": Reference(HF_ACTIVATIONS[field("activation_function", _ACTIVATION,
                                                           "gelu_new")]),
          "GPT.attention_layers": None,
          **_knobs(field, [("layer_norm_epsilon", "layer_norm_epsilon", fields.POSITIVE_REAL,
                            1e-5),
                           ("embed_dropout", "embd_pdrop", fields.PROBABILITY, dropout),
                           ("attn_dropout", "attn_pdrop", fields.PROBABILITY, dropout),
                           ("res_dropout", "resid_pdrop", fields.PROBABILITY, dropout),
                           ("init_std", "initializer_range", fields.POSITIVE_REAL, 0.02)])}


def _gpt2_values(config, path):
  field = _field(config, path)
  field("scale_attn_by_inverse_layer_idx",
        fields.equal_to(False, "ours scales q·k the same in every layer"), False)
  field("add_cross_attention", fields.equal_to(False, "ours is a decoder only"), False)
  return {**_gpt2_shaped(field, path, dropout=0.1),
          "GPT.scale_attention": field("scale_attn_weights", fields.BOOL, True),
          "GPT.positions": Reference("LearnedPositions()"),
          "GPT.qkv_bias": True,  # c_attn's bias
          "GPT.tie_embeddings": field("tie_word_embeddings", fields.BOOL, True)}


def _rotary(config, path, field):
  """(fraction, base) from rope_parameters (transformers 5) or rotary_pct/rotary_emb_base."""
  rope = field("rope_parameters", fields.OBJECT, None)
  if rope is None:  # transformers 4.x: scaled RoPE in rope_scaling
    field("rope_scaling", fields.equal_to(None, "ours is plain RoPE", valid=lambda v: True),
          None)
    return (field("rotary_pct", fields.FRACTION, 0.25),
            field("rotary_emb_base", fields.POSITIVE_REAL, 10000))
  rope_field = _field(rope, f"{path} rope_parameters")
  rope_field("rope_type", fields.equal_to("default", "ours is plain RoPE"), "default")
  return (rope_field("partial_rotary_factor", fields.FRACTION, 0.25),
          rope_field("rope_theta", fields.POSITIVE_REAL, 10000))


def _gpt_neox_values(config, path):
  field = _field(config, path)
  field("attention_bias", fields.equal_to(True, "ours has an attention output bias"), True)
  hidden = field("hidden_size", fields.POSITIVE_INT)
  fraction, base = _rotary(config, path, field)
  dropout = field("hidden_dropout", fields.PROBABILITY, 0.0)
  return {"GPT.n_layer": field("num_hidden_layers", fields.POSITIVE_INT), "GPT.n_embd": hidden,
          **_knobs(field, [("n_head", "num_attention_heads", fields.POSITIVE_INT),
                           ("n_ctx", "max_position_embeddings", fields.POSITIVE_INT),
                           ("n_vocab", "vocab_size", fields.POSITIVE_INT)]),
          "GPT.mlp_ratio": _mlp_ratio(hidden, field("intermediate_size",
                                                    fields.OPTIONAL_POSITIVE_INT, None),
                                      path, "intermediate_size"),
          "GPT.feed_forward": Reference("mlp"),
          "GPT.activation": Reference(HF_ACTIVATIONS[field("hidden_act", _ACTIVATION,
                                                           "gelu")]),
          "GPT.attention_layers": None, "GPT.scale_attention": True,
          "GPT.positions": Reference("RotaryPositions()"),
          "RotaryPositions.fraction": float(fraction), "RotaryPositions.base": float(base),
          "RotaryPositions.interleaved": False, "GPT.qkv_bias": True,
          "GPT.parallel_residual": field("use_parallel_residual", fields.BOOL, True),
          "GPT.tie_embeddings": field("tie_word_embeddings", fields.BOOL, False),
          **_knobs(field, [("layer_norm_epsilon", "layer_norm_eps", fields.POSITIVE_REAL,
                            1e-5),
                           ("attn_dropout", "attention_dropout", fields.PROBABILITY, 0.0),
                           ("init_std", "initializer_range", fields.POSITIVE_REAL, 0.02)]),
          "GPT.embed_dropout": dropout, "GPT.res_dropout": dropout}


def _gptj_values(config, path):
  field = _field(config, path)
  field("tie_word_embeddings", fields.equal_to(False, "ours ties no output projection that "
                                                      "has a bias"), False)
  bindings = _gpt2_shaped(field, path, dropout=0.0)
  head_size = bindings["GPT.n_embd"] // bindings["GPT.n_head"]
  rotary_dim = field("rotary_dim", fields.OPTIONAL_POSITIVE_INT, 64)
  return {**bindings, "GPT.scale_attention": True,
          "GPT.positions": Reference("RotaryPositions()"),
          # rotary_dim null: the whole head (a fraction above 1 is refused by build_model)
          "RotaryPositions.fraction": rotary_dim / head_size if rotary_dim else 1.0,
          "RotaryPositions.base": GPTJ_ROTARY_BASE, "RotaryPositions.interleaved": True,
          "GPT.parallel_residual": True, "GPT.shared_layer_norm": True,
          "GPT.tie_embeddings": False, "GPT.lm_head_bias": True}


def _field(config, path):
  return lambda key, check, default=fields.REQUIRED: fields.field(config, path, key, check,
                                                                  default)


GPT_NEO = Architecture(
    name="gpt_neo", title="HF GPT-Neo", hf_class="GPTNeoForCausalLM", top=TRANSFORMER_TOP,
    layer=GPT_NEO_LAYER, layer_prefix="transformer.h.{i}", head="lm_head.weight",
    problems=_gpt_neo_problems, config=_gpt_neo_config, values=_gpt_neo_values,
    hf_scale=lambda model: 1.0)  # GPT-Neo does not scale q·k: ours is folded into q
GPT2 = Architecture(
    name="gpt2", title="HF GPT-2", hf_class="GPT2LMHeadModel", top=TRANSFORMER_TOP,
    layer=GPT2_LAYER, layer_prefix="transformer.h.{i}", head="lm_head.weight",
    problems=_gpt2_problems, config=_gpt2_config, values=_gpt2_values,
    hf_scale=standard_scale,  # scale_attn_weights = GPT.scale_attention
    qkv_bias_layer=GPT2_QKV_BIAS)
GPT_NEOX = Architecture(
    name="gpt_neox", title="HF GPT-NeoX", hf_class="GPTNeoXForCausalLM", top=GPT_NEOX_TOP,
    layer=GPT_NEOX_LAYER, layer_prefix="gpt_neox.layers.{i}", head="embed_out.weight",
    problems=_gpt_neox_problems, config=_gpt_neox_config, values=_gpt_neox_values,
    hf_scale=head_scale, aliases={"lm_head.weight": "embed_out.weight"},  # transformers 5's
    qkv_bias_layer=GPT_NEOX_QKV_BIAS)
GPTJ = Architecture(
    name="gptj", title="HF GPT-J", hf_class="GPTJForCausalLM", top=GPTJ_TOP,
    layer=GPTJ_LAYER, layer_prefix="transformer.h.{i}", head="lm_head.weight",
    problems=_gptj_problems, config=_gptj_config, values=_gptj_values, hf_scale=head_scale,
    head_bias="lm_head.bias")
ARCHITECTURES = {arch.name: arch for arch in (GPT_NEO, GPT2, GPT_NEOX, GPTJ)}


def choose(model, name="auto"):
  """The Architecture to export `model` to: `name`, or for "auto" GPT-J for interleaved rotary
  positions, GPT-NeoX for other rotary ones, GPT-2 for a q/k/v bias, GPT-Neo otherwise; a
  one-line UserError if it cannot express the model."""
  if name == "auto":
    rotary = type(model.positions) is ROTARY
    arch = ((GPTJ if model.positions.interleaved else GPT_NEOX) if rotary
            else GPT2 if model.qkv_bias else GPT_NEO)
    forced = ""
  elif name in ARCHITECTURES:
    arch, forced = ARCHITECTURES[name], f" (--architecture={name})"
  else:
    raise UserError(f"--architecture={name}; use auto or one of {sorted(ARCHITECTURES)}")
  problems = arch.problems(model)
  if problems:
    raise UserError(f"{arch.title}{forced} cannot express this model: " + "; ".join(problems))
  return arch


def query_factor(arch, model):
  """What the exported query weights (and bias) are multiplied by so HF's q·k scale gives
  ours (GPT.attention_scale): exact, as the query is linear in them (1/sqrt(d_head) folded in
  for GPT-Neo, muP's sqrt(base / width) for all)."""
  return model.attention_scale() / arch.hf_scale(model)


# Our weights the logits are linear in (after the last LayerNorm's normalization): muP's
# output multiplier is folded into them, exactly, for every architecture.
OUTPUT_LINEAR = ("gpt/ln_f/g", "gpt/ln_f/b", "gpt/lm_head/b")


def from_hf_config(config, path):
  """The Architecture of an HF config.json's model_type; a one-line UserError if none."""
  model_type = config.get("model_type")
  arch = ARCHITECTURES.get(model_type) if type(model_type) is str else None
  if "model_type" not in config:
    raise UserError(f"{path} has no model_type; is it an HF config.json (save_pretrained "
                    f"writes one)?")
  if arch is None:
    classes = config.get("architectures")
    shown = ", ".join(map(str, classes)) if type(classes) is list else ""
    raise UserError(f"{path} holds a {model_type!r} model ({shown}); only "
                    f"{', '.join(a.title for a in ARCHITECTURES.values())} (model_type "
                    f"{', '.join(repr(a) for a in ARCHITECTURES)}) can be imported")
  return arch


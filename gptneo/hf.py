"""HuggingFace GPT-Neo interop: export our checkpoints as `GPTNeoForCausalLM` folders and
import such folders as our checkpoints. Neither direction needs torch or transformers.

Only models HF GPT-Neo computes exactly are exported: anything else is refused in one line
rather than written as a model that computes something different.
"""
import functools
import json
import math
import os
import re

import gin
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from gptneo import checkpoints
from gptneo import inference
from gptneo import model_dir as model_dir_lib
from gptneo import runtime
from gptneo.compat import tf
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.errors import UserError
from gptneo.model import attention
from gptneo.model import feedforward
from gptneo.model import gpt as gpt_lib
from gptneo.model import positions as positions_lib

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # save_pretrained's sharded weights
MODEL_GIN = "model.gin"
# Our activation (by function name) <-> HF's `activation_function`.
ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
_HF_ACTIVATIONS = {**{hf: ours for ours, hf in ACTIVATIONS.items()}, "swish": "silu"}
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


# --- Weight names and layouts. Ours: qkv w [embd, 3, heads, kv] (HF: q_proj, k_proj and
# v_proj), out w [heads, kv, embd], dense w [in, out]. HF: nn.Linear weights [out, in].

def _layer_pairs(layer):
  """(our name, HF names, kind) per weight of block `layer`; kind says how to convert."""
  ours, hf = f"gpt/h{layer}", f"transformer.h.{layer}"
  pairs = [(f"{ours}/{n}/{p}", (f"{hf}.{n}.{q}",), "copy") for n in ("ln_1", "ln_2")
           for p, q in (("g", "weight"), ("b", "bias"))]
  pairs += [(f"{ours}/attn/qkv/w",
             tuple(f"{hf}.attn.attention.{n}_proj.weight" for n in ("q", "k", "v")), "qkv"),
            (f"{ours}/attn/out/w", (f"{hf}.attn.attention.out_proj.weight",), "out"),
            (f"{ours}/attn/out/b", (f"{hf}.attn.attention.out_proj.bias",), "copy")]
  for n, m in (("fc", "c_fc"), ("proj", "c_proj")):
    pairs += [(f"{ours}/mlp/{n}/w", (f"{hf}.mlp.{m}.weight",), "linear"),
              (f"{ours}/mlp/{n}/b", (f"{hf}.mlp.{m}.bias",), "copy")]
  return pairs


def weight_pairs(n_layer):
  pairs = [("gpt/wte", ("transformer.wte.weight",), "copy"),
           ("gpt/wpe", ("transformer.wpe.weight",), "copy"),
           ("gpt/ln_f/g", ("transformer.ln_f.weight",), "copy"),
           ("gpt/ln_f/b", ("transformer.ln_f.bias",), "copy")]
  for layer in range(n_layer):
    pairs += _layer_pairs(layer)
  return pairs


def _to_hf(kind, array):
  """Our array -> the list of HF arrays it holds."""
  if kind == "qkv":  # [embd, 3, heads, kv] -> 3 x [heads * kv, embd]
    return [part.reshape(array.shape[0], -1).T for part in np.moveaxis(array, 1, 0)]
  if kind == "out":  # [heads, kv, embd] -> [embd, heads * kv]
    return [array.reshape(-1, array.shape[-1]).T]
  return [array.T if kind == "linear" else array]


def _from_hf(kind, arrays, n_head):
  """The list of HF arrays -> our array."""
  if kind == "qkv":
    return np.stack([a.T.reshape(a.shape[1], n_head, -1) for a in arrays], axis=1)
  (array,) = arrays
  if kind == "out":
    return array.T.reshape(n_head, -1, array.shape[0])
  return array.T if kind == "linear" else array


# --- Export.

def check_exportable(model):
  """Raises ValueError (one line) unless HF GPT-Neo computes exactly what `model` does."""
  problems = []
  if getattr(model.activation, "__name__", None) not in ACTIVATIONS:
    problems.append(f"GPT.activation = {getattr(model.activation, '__name__', model.activation)}"
                    f" (HF GPT-Neo: {sorted(ACTIVATIONS)})")
  if model.feed_forward is not feedforward.mlp:
    problems.append("GPT.feed_forward is not @mlp")
  if model.scale_attention:
    problems.append("GPT.scale_attention = True (GPT-Neo does not scale q·k)")
  if not model.tie_embeddings:
    problems.append("GPT.tie_embeddings = False")
  if type(model.positions) is not positions_lib.LearnedPositions:
    problems.append(f"GPT.positions = {type(model.positions).__name__}()")
  if model.moe is not None:
    problems.append("GPT.moe is set")
  unexportable = sorted({kind for kind in model.layer_types
                         if attention.lookup(kind).hf_name is None})
  if unexportable:
    problems.append(f"GPT.attention_layers uses {unexportable} (HF GPT-Neo: "
                    f"{sorted(_hf_attention_names())})")
  if problems:
    raise UserError("HF GPT-Neo cannot express this model: " + "; ".join(problems))


def _attention_types(layer_types):
  """HF's [[types, count], ...] from one type per layer (runs of equal types merged)."""
  runs = []
  for kind in layer_types:
    name = attention.lookup(kind).hf_name
    if runs and runs[-1][0] == [name]:
      runs[-1][1] += 1
    else:
      runs.append([[name], 1])
  return runs


def _hf_attention_names():
  """HF GPT-Neo's attention type name -> ours, for the types it computes as we do."""
  return {kind.hf_name: kind.name for kind in attention.ATTENTION_TYPES.values()
          if kind.hf_name is not None}


def hf_config(model, eos_id, dtype):
  """config.json of the GPTNeoForCausalLM that computes `model`."""
  return {"architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo",
          "vocab_size": model.n_vocab, "max_position_embeddings": model.n_ctx,
          "hidden_size": model.n_embd, "num_layers": model.n_layer, "num_heads": model.n_head,
          "intermediate_size": model.n_embd * model.mlp_ratio,
          "attention_types": _attention_types(model.layer_types),
          "window_size": model.window_size,
          "activation_function": ACTIVATIONS[model.activation.__name__],
          "layer_norm_epsilon": model.layer_norm_epsilon, "initializer_range": model.init_std,
          "embed_dropout": model.embed_dropout, "attention_dropout": model.attn_dropout,
          "resid_dropout": model.res_dropout, "bos_token_id": eos_id, "eos_token_id": eos_id,
          "tie_word_embeddings": True, "use_cache": True, "dtype": dtype}


def write_tokenizer(model_dir, output_dir, n_ctx):
  """tokenizer.json plus the configs AutoTokenizer needs to load it as a fast GPT-2 BPE."""
  tokenizer = inference.load_tokenizer(model_dir)
  tokenizer.save(os.path.join(output_dir, "tokenizer.json"))
  eos = tokenizer_lib.EOS_TOKEN
  special = {"bos_token": eos, "eos_token": eos, "unk_token": eos}
  config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": n_ctx,
            "add_prefix_space": False, "add_bos_token": False, **special}
  for name, content in (("tokenizer_config.json", config),
                        ("special_tokens_map.json", special)):
    with open(os.path.join(output_dir, name), "w") as f:
      json.dump(content, f, indent=2)
  return tokenizer_lib.eos_id(tokenizer)


@gin.configurable(denylist=["model_dir", "output_dir"])
def export_hf(model_dir, output_dir, model=gin.REQUIRED, dtype="float32"):
  """Writes the newest intact checkpoint of `model_dir` as an HF GPTNeoForCausalLM folder.

  Args:
    model_dir: a trained model's folder (a flag).
    output_dir: the folder to write config.json, model.safetensors and the tokenizer to.
    model: the model, as trained (read from the operative config).
    dtype: "float32" or "bfloat16" weights.

  Returns:
    the path of the checkpoint exported.
  """
  if dtype not in EXPORT_DTYPES:
    raise UserError(f"export_hf.dtype = {dtype!r}; use one of {sorted(EXPORT_DTYPES)}")
  check_exportable(model)
  inference.check_model_dir(model_dir)
  checkpoint = checkpoints.require(model_dir).path
  reader = tf.train.load_checkpoint(checkpoint)
  tensors = {}
  for ours, names, kind in weight_pairs(model.n_layer):
    arrays = _to_hf(kind, reader.get_tensor(ours))
    tensors.update({name: np.ascontiguousarray(array, EXPORT_DTYPES[dtype])
                    for name, array in zip(names, arrays, strict=True)})
  os.makedirs(output_dir, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(output_dir, WEIGHTS_FILE),
                              metadata={"format": "pt"})
  eos = write_tokenizer(model_dir, output_dir, model.n_ctx)
  with open(os.path.join(output_dir, "config.json"), "w") as f:
    json.dump(hf_config(model, eos, dtype), f, indent=2)
  return checkpoint


# --- Import.

def read_hf_config(hf_dir):
  """config.json of an HF GPT-Neo folder (a dict; its values are checked by gin_bindings)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{path} not found; --hf_dir must be a folder save_pretrained wrote")
  with open(path) as f:
    config = json.load(f)
  if not isinstance(config, dict):
    raise UserError(f"{path} holds a JSON {_json_type(config)}, not an object; is it an HF "
                    f"config.json?")
  if config.get("model_type") != "gpt_neo":
    raise UserError(f"{hf_dir} holds a {config.get('model_type')!r} model "
                    f"({', '.join(map(str, config.get('architectures') or []))}); only HF "
                    f"GPT-Neo (model_type 'gpt_neo') can be imported")
  if not _field(config, path, "tie_word_embeddings", _BOOL, default=True):
    raise UserError(f"{hf_dir} has untied input and output embeddings; ours are tied")
  return config


# --- Checks of config.json values: (accepts(value), what is expected). bool is an int in
# Python, so every number check names the types it takes.

def _is_int(value):
  return type(value) is int


def _is_real(value):
  return type(value) in (int, float) and math.isfinite(value)


def _is_attention_types(value):
  """HF's [[[type names], count], ...], every name one HF GPT-Neo and we both compute."""
  return type(value) is list and all(
      type(entry) is list and len(entry) == 2 and type(entry[0]) is list
      and all(type(name) is str and name in _hf_attention_names() for name in entry[0])
      and _is_int(entry[1]) and entry[1] > 0 for entry in value)


_BOOL = (lambda value: type(value) is bool, "true or false")
_POSITIVE_INT = (lambda value: _is_int(value) and value > 0, "a positive integer")
_OPTIONAL_POSITIVE_INT = (lambda value: value is None or _POSITIVE_INT[0](value),
                          "null or a positive integer")
_POSITIVE_REAL = (lambda value: _is_real(value) and value > 0, "a positive number")
_PROBABILITY = (lambda value: _is_real(value) and 0 <= value < 1, "a number in [0, 1)")
_ACTIVATION = (lambda value: type(value) is str and value in _HF_ACTIVATIONS,
               f"one of {sorted(_HF_ACTIVATIONS)}")
_REQUIRED = object()


def _json_type(value):
  """The JSON name of a json.load value's type, for error messages."""
  names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
           dict: "object", type(None): "null"}
  return names.get(type(value), type(value).__name__)


def _attention_types_expected():
  return (f'a list of [[type names], count] pairs such as [[["global", "local"], 6]], the '
          f'names among {sorted(_hf_attention_names())}')


def _field(config, path, key, check, default=_REQUIRED):
  """config[key] (`default` if absent) once `check` accepts it; else a one-line UserError."""
  if key not in config:
    if default is _REQUIRED:
      raise UserError(f"{path} lacks {key}; every HF GPT-Neo config.json has it")
    return default
  value = config[key]
  accepts, expected = check
  if not accepts(value):
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    raise UserError(f"{path}: {key} = {shown} (a JSON {_json_type(value)}), expected "
                    f"{expected}; fix config.json")
  return value


class Reference(str):
  """A gin reference, @name or @name(), to one of our configurables: never config.json text."""


def gpt_values(config, path="config.json"):
  """Our GPT's knob -> value for an HF GPT-Neo config, every value read from it type-checked."""
  field = functools.partial(_field, config, path)
  hidden = field("hidden_size", _POSITIVE_INT)
  intermediate = field("intermediate_size", _OPTIONAL_POSITIVE_INT, None) or 4 * hidden
  if intermediate % hidden:
    raise UserError(f"{path}: intermediate_size {intermediate} is not a multiple of "
                    f"hidden_size {hidden}; GPT.mlp_ratio must be an integer")
  names = _hf_attention_names()
  runs = field("attention_types", (_is_attention_types, _attention_types_expected()))
  return {"n_layer": field("num_layers", _POSITIVE_INT), "n_embd": hidden,
          "n_head": field("num_heads", _POSITIVE_INT),
          "n_ctx": field("max_position_embeddings", _POSITIVE_INT),
          "n_vocab": field("vocab_size", _POSITIVE_INT), "mlp_ratio": intermediate // hidden,
          "feed_forward": Reference("mlp"),
          "activation": Reference(_HF_ACTIVATIONS[field("activation_function", _ACTIVATION)]),
          "attention_layers": [[[names[name] for name in types], count]
                               for types, count in runs],
          "window_size": field("window_size", _POSITIVE_INT, 256), "scale_attention": False,
          "positions": Reference("LearnedPositions()"), "tie_embeddings": True,
          "layer_norm_epsilon": field("layer_norm_epsilon", _POSITIVE_REAL, 1e-5),
          "embed_dropout": field("embed_dropout", _PROBABILITY, 0.0),
          "attn_dropout": field("attention_dropout", _PROBABILITY, 0.0),
          "res_dropout": field("resid_dropout", _PROBABILITY, 0.0),
          "init_std": field("initializer_range", _POSITIVE_REAL, 0.02)}


def gin_bindings(config, path="config.json"):
  """Our GPT's bindings for an HF GPT-Neo config, each value written by gin_literal."""
  return [f"GPT.{name} = {gin_literal(value)}"
          for name, value in gpt_values(config, path).items()]


def gin_literal(value):
  """A gin literal of `value`: the one path by which config.json values reach gin text.

  Strings are JSON-quoted (ASCII, newlines escaped), so no value can end its binding and
  start another; anything but None, bools, finite numbers, strings, lists and References
  is refused.
  """
  if type(value) is Reference and re.fullmatch(r"[A-Za-z_]\w*(\(\))?", value):
    return "@" + value
  if value is None or type(value) in (bool, int):
    return repr(value)
  if type(value) is float and math.isfinite(value):
    return repr(value)
  if type(value) is str:
    return json.dumps(value)
  if type(value) in (list, tuple):
    return "[" + ", ".join(gin_literal(item) for item in value) + "]"
  raise TypeError(f"gin_literal cannot write {value!r} ({type(value).__name__}); check the "
                  f"value before rendering it")


def _hf_weights(hf_dir):
  """{HF name: float32 array} from model.safetensors or the shards its index lists."""
  index = os.path.join(hf_dir, WEIGHTS_INDEX)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(hf_dir, WEIGHTS_FILE)):
    files = [WEIGHTS_FILE]
  else:
    raise UserError(f"{hf_dir} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX}; save the HF "
                    f"model with safe_serialization=True (.bin weights are not supported)")
  weights = {}
  for name in files:
    tensors = _load_safetensors(os.path.join(hf_dir, name))
    weights.update({key: value.astype(np.float32) for key, value in tensors.items()})
  return weights


def _load_safetensors(path):
  """{name: array} of a safetensors file; a damaged one (truncated, not safetensors) is bad
  input, named in one line."""
  try:
    return safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError) as error:
    raise UserError(f"{path} is not a readable safetensors file ({str(error)[:120]}); "
                    f"save the model again with save_pretrained") from None


def _read_tokenizer(hf_dir):
  try:
    tokenizer = tokenizer_lib.load_tokenizer(hf_dir)
  except ValueError as error:
    raise UserError(f"{hf_dir} has no usable tokenizer ({error})") from None
  tokenizer_lib.eos_id(tokenizer)
  return tokenizer


def write_checkpoint(model, spec, model_dir, weights):
  """Saves {our name: array} as step 0 of `model_dir`, through the inference graph."""
  restored = inference.RestoredModel(model, runtime.Runtime(spec), model_dir, batch_size=1)
  with restored.graph.as_default():
    masters = {v.op.name: v for v in tf.global_variables()}
    missing = sorted(set(masters) - set(weights))
    if missing:
      raise UserError(f"the HF weights lack {missing[:3]}; is the folder complete?")
    restored.checkpoints.restore_or_initialize(restored.session)
    for name, variable in masters.items():
      variable.load(weights[name].reshape(variable.shape.as_list()), restored.session)
    restored.session.run(restored.lowering.copy_masters_to_slices())
    return restored.checkpoints.save(restored.session, 0)


def import_hf(hf_dir, model_dir, spec, overwrite=False):
  """Writes model_dir: a checkpoint, model.gin (+ operative_config.gin) and tokenizer.json.

  Everything is read and checked before anything is written. model_dir must be empty unless
  `overwrite`: then the model it holds is deleted first (model_dir.MODEL_FILES).

  Returns:
    the checkpoint path.
  """
  bindings = gin_bindings(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"))
  hf_tensors = _hf_weights(hf_dir)
  tokenizer = _read_tokenizer(hf_dir)
  model_dir_lib.check_empty(model_dir, overwrite)
  with gin.unlock_config():
    gin.parse_config(bindings)
  model = gpt_lib.GPT()
  weights = {ours: _from_hf(kind, [hf_tensors[name] for name in names], model.n_head)
             for ours, names, kind in weight_pairs(model.n_layer)
             if all(name in hf_tensors for name in names)}
  missing = [ours for ours, _, _ in weight_pairs(model.n_layer) if ours not in weights]
  if missing:  # before anything is written; write_checkpoint checks again, on the graph
    raise UserError(f"the HF weights lack {missing[:3]}; is the folder complete?")
  os.makedirs(model_dir, exist_ok=True)
  model_dir_lib.clear(model_dir)
  tokenizer.save(os.path.join(model_dir, inference.TOKENIZER_FILE))
  checkpoint = write_checkpoint(model, spec, model_dir, weights)
  text = (f"# Imported from the HF GPT-Neo folder {hf_dir} by bin/import_hf.\n"
          + "\n".join(bindings) + "\n")
  # model.gin holds the shape only, for bin/train --gin_file; the operative config also
  # names no dataset, so bin/eval asks for --dataset_dir.
  for name, extra in ((MODEL_GIN, ""), (inference.OPERATIVE_CONFIG, "DATASET_DIR = None\n")):
    with open(os.path.join(model_dir, name), "w") as f:
      f.write(text + extra)
  return checkpoint


"""HuggingFace GPT-Neo interop: export our checkpoints as `GPTNeoForCausalLM` folders and
import such folders as our checkpoints. Neither direction needs torch or transformers.

Only models HF GPT-Neo computes exactly are exported: anything else is refused in one line
rather than written as a model that computes something different.
"""
import json
import os

import gin
import ml_dtypes
import numpy as np
import safetensors.numpy

from gptneo import inference
from gptneo.compat import tf
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.errors import UserError
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
  if "linear" in model.layer_types:
    problems.append("linear attention layers")
  if problems:
    raise UserError("HF GPT-Neo cannot express this model: " + "; ".join(problems))


def _attention_types(layer_types):
  """HF's [[types, count], ...] from one type per layer (runs of equal types merged)."""
  runs = []
  for kind in layer_types:
    if runs and runs[-1][0] == [kind]:
      runs[-1][1] += 1
    else:
      runs.append([[kind], 1])
  return runs


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
  """Writes the latest checkpoint of `model_dir` as an HF GPTNeoForCausalLM folder.

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
  checkpoint = tf.train.latest_checkpoint(model_dir)
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
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{path} not found; --hf_dir must be a folder save_pretrained wrote")
  with open(path) as f:
    config = json.load(f)
  if config.get("model_type") != "gpt_neo":
    raise UserError(f"{hf_dir} holds a {config.get('model_type')!r} model "
                    f"({', '.join(config.get('architectures') or [])}); only HF GPT-Neo "
                    f"(model_type 'gpt_neo') can be imported")
  if not config.get("tie_word_embeddings", True):
    raise UserError(f"{hf_dir} has untied input and output embeddings; ours are tied")
  if config.get("activation_function") not in _HF_ACTIVATIONS:
    raise UserError(f"{hf_dir} uses activation {config.get('activation_function')!r}; "
                    f"supported: {sorted(_HF_ACTIVATIONS)}")
  return config


def gin_bindings(config):
  """Our GPT's bindings for an HF GPT-Neo config (values as gin literals)."""
  hidden = config["hidden_size"]
  intermediate = config.get("intermediate_size") or 4 * hidden
  if intermediate % hidden:
    raise UserError(f"intermediate_size {intermediate} is not a multiple of hidden_size "
                    f"{hidden}; GPT.mlp_ratio must be an integer")
  values = {"n_layer": config["num_layers"], "n_embd": hidden, "n_head": config["num_heads"],
            "n_ctx": config["max_position_embeddings"], "n_vocab": config["vocab_size"],
            "mlp_ratio": intermediate // hidden, "feed_forward": "@mlp",
            "activation": "@" + _HF_ACTIVATIONS[config["activation_function"]],
            "attention_layers": json.dumps(config["attention_types"]),
            "window_size": config.get("window_size", 256), "scale_attention": False,
            "positions": "@LearnedPositions()", "tie_embeddings": True,
            "layer_norm_epsilon": config.get("layer_norm_epsilon", 1e-5),
            "embed_dropout": config.get("embed_dropout", 0.0),
            "attn_dropout": config.get("attention_dropout", 0.0),
            "res_dropout": config.get("resid_dropout", 0.0),
            "init_std": config.get("initializer_range", 0.02)}
  return [f"GPT.{name} = {value}" for name, value in values.items()]


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
    tensors = safetensors.numpy.load_file(os.path.join(hf_dir, name))
    weights.update({key: value.astype(np.float32) for key, value in tensors.items()})
  return weights


def _import_tokenizer(hf_dir, model_dir):
  try:
    tokenizer = tokenizer_lib.load_tokenizer(hf_dir)
  except ValueError as error:
    raise UserError(f"{hf_dir} has no usable tokenizer ({error})") from None
  tokenizer_lib.eos_id(tokenizer)
  tokenizer.save(os.path.join(model_dir, inference.TOKENIZER_FILE))


def write_checkpoint(model, spec, model_dir, weights):
  """Saves {our name: array} as step 0 of `model_dir`, through the inference graph."""
  restored = inference.RestoredModel(model, spec, model_dir, batch_size=1)
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


def import_hf(hf_dir, model_dir, spec):
  """Writes model_dir: a checkpoint, model.gin (+ operative_config.gin) and tokenizer.json.

  Returns:
    the checkpoint path.
  """
  bindings = gin_bindings(read_hf_config(hf_dir))
  hf_tensors = _hf_weights(hf_dir)
  with gin.unlock_config():
    gin.parse_config(bindings)
  model = gpt_lib.GPT()
  weights = {ours: _from_hf(kind, [hf_tensors[name] for name in names], model.n_head)
             for ours, names, kind in weight_pairs(model.n_layer)
             if all(name in hf_tensors for name in names)}
  os.makedirs(model_dir, exist_ok=True)
  _import_tokenizer(hf_dir, model_dir)
  checkpoint = write_checkpoint(model, spec, model_dir, weights)
  text = (f"# Imported from the HF GPT-Neo folder {hf_dir} by bin/import_hf.\n"
          + "\n".join(bindings) + "\n")
  # model.gin holds the shape only, for bin/train --gin_file; the operative config also
  # names no dataset, so bin/eval asks for --dataset_dir.
  for name, extra in ((MODEL_GIN, ""), (inference.OPERATIVE_CONFIG, "DATASET_DIR = None\n")):
    with open(os.path.join(model_dir, name), "w") as f:
      f.write(text + extra)
  return checkpoint


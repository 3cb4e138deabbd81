"""HuggingFace interop: export our checkpoints as HF GPT-Neo, GPT-2 or GPT-NeoX folders and
import such folders as our checkpoints. Neither direction needs torch or transformers.

Only models an HF architecture computes exactly are exported: anything else is refused in
one line naming the knob, rather than written as a model that computes something different.
architectures.py holds the three architectures' weight tables and configs.
"""
import json
import os

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
from gptneo.gin_utils import gin_literal
from gptneo.hf import architectures
from gptneo.hf import fields
from gptneo.hf.architectures import ARCHITECTURES, GPT_NEO  # noqa: F401  (bin/export)
from gptneo.model import gpt as gpt_lib

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # save_pretrained's sharded weights
MODEL_GIN = "model.gin"
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def weight_pairs(n_layer):
  """(our name, HF names, kind) of every weight of an n_layer HF GPT-Neo model."""
  return GPT_NEO.weight_pairs(n_layer)


def _to_hf(kind, array):
  """Our array -> the list of HF arrays it holds (architectures.CONVERSIONS)."""
  return architectures.CONVERSIONS[kind][0](array)


# --- Export.

def check_exportable(model, architecture="auto"):
  """The Architecture that computes exactly what `model` does (UserError, one line, if none)."""
  return architectures.choose(model, architecture)


def hf_config(model, eos_id, dtype, arch=GPT_NEO):
  """config.json of the `arch` model that computes `model`."""
  return {"architectures": [arch.hf_class], "model_type": arch.name, **arch.config(model),
          "bos_token_id": eos_id, "eos_token_id": eos_id,
          "tie_word_embeddings": model.tie_embeddings, "use_cache": True, "dtype": dtype}


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


@gin.configurable(denylist=["model_dir", "output_dir", "architecture"])
def export_hf(model_dir, output_dir, architecture="auto", model=gin.REQUIRED, dtype="float32"):
  """Writes the newest intact checkpoint of `model_dir` as an HF model folder.

  Args:
    model_dir: a trained model's folder (a flag).
    output_dir: the folder to write config.json, model.safetensors and the tokenizer to.
    architecture: "gpt_neo", "gpt2", "gpt_neox", or "auto" (GPT-NeoX for rotary positions,
      GPT-Neo otherwise); a flag, bin/export --architecture.
    model: the model, as trained (read from the operative config).
    dtype: "float32" or "bfloat16" weights.

  Returns:
    the path of the checkpoint exported.
  """
  if dtype not in EXPORT_DTYPES:
    raise UserError(f"export_hf.dtype = {dtype!r}; use one of {sorted(EXPORT_DTYPES)}")
  arch = check_exportable(model, architecture)
  inference.check_model_dir(model_dir)
  checkpoint = checkpoints.require(model_dir).path
  reader = tf.train.load_checkpoint(checkpoint)
  factor = architectures.query_factor(arch, model)
  tensors = {}
  for ours, names, kind in arch.weight_pairs(model.n_layer, model.tie_embeddings):
    arrays = _to_hf(kind, _scaled_queries(reader.get_tensor(ours), ours, factor))
    tensors.update({name: np.ascontiguousarray(array, EXPORT_DTYPES[dtype])
                    for name, array in zip(names, arrays, strict=True)})
  os.makedirs(output_dir, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(output_dir, WEIGHTS_FILE),
                              metadata={"format": "pt"})
  eos = write_tokenizer(model_dir, output_dir, model.n_ctx)
  with open(os.path.join(output_dir, "config.json"), "w") as f:
    json.dump(hf_config(model, eos, dtype, arch), f, indent=2)
  return checkpoint


def _scaled_queries(array, ours, factor):
  """A qkv weight [embd, 3, heads, kv] with its queries times `factor` (other weights as is)."""
  if factor == 1.0 or not ours.endswith("attn/qkv/w"):
    return array
  array = array.astype(np.float64)
  array[:, 0] *= factor
  return array.astype(np.float32)


# --- Import.

def read_hf_config(hf_dir):
  """config.json of an HF folder of one of ARCHITECTURES (its values: checked by gin_bindings)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{path} not found; --hf_dir must be a folder save_pretrained wrote")
  with open(path) as f:
    config = json.load(f)
  if not isinstance(config, dict):
    raise UserError(f"{path} holds a JSON {fields.json_type(config)}, not an object; is it an "
                    f"HF config.json?")
  architectures.from_hf_config(config, hf_dir)
  return config


def gin_bindings(config, path="config.json"):
  """Our bindings for an HF config (any of ARCHITECTURES), each value written by gin_literal."""
  arch = architectures.from_hf_config(config, path)
  return [f"{name} = {gin_literal(value)}" for name, value in arch.values(config, path).items()]


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


def our_weights(arch, model, hf_tensors):
  """{our name: array} from {HF name: array}; a one-line UserError if one is missing."""
  hf_tensors = {arch.aliases.get(name, name): array for name, array in hf_tensors.items()}
  pairs = arch.weight_pairs(model.n_layer, model.tie_embeddings)
  missing = sorted({name for _, names, _ in pairs for name in names} - set(hf_tensors))
  if missing:  # before anything is written; write_checkpoint checks again, on the graph
    raise UserError(f"the HF weights lack {missing[:3]}; is the folder complete?")
  return {ours: architectures.CONVERSIONS[kind][1]([hf_tensors[n] for n in names],
                                                  model.n_head, names)
          for ours, names, kind in pairs}


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
  config = read_hf_config(hf_dir)
  arch = architectures.from_hf_config(config, hf_dir)
  bindings = gin_bindings(config, os.path.join(hf_dir, "config.json"))
  hf_tensors = _hf_weights(hf_dir)
  tokenizer = _read_tokenizer(hf_dir)
  model_dir_lib.check_empty(model_dir, overwrite)
  with gin.unlock_config():
    gin.parse_config(bindings)
  model = gpt_lib.GPT()
  weights = our_weights(arch, model, hf_tensors)
  os.makedirs(model_dir, exist_ok=True)
  model_dir_lib.clear(model_dir)
  with model_dir_lib.open_file(os.path.join(model_dir, inference.TOKENIZER_FILE), "w") as f:
    f.write(tokenizer.to_str(pretty=True))  # as tokenizer.save, never through a link
  checkpoint = write_checkpoint(model, spec, model_dir, weights)
  text = (f"# Imported from the {arch.title} folder {gin_literal(hf_dir)} by bin/import_hf.\n"
          + "\n".join(bindings) + "\n")
  # model.gin holds the shape only, for bin/train --gin_file; the operative config also
  # names no dataset, so bin/eval asks for --dataset_dir.
  for name, extra in ((MODEL_GIN, ""), (inference.OPERATIVE_CONFIG, "DATASET_DIR = None\n")):
    with model_dir_lib.open_file(os.path.join(model_dir, name), "w") as f:
      f.write(text + extra)
  return checkpoint


"""Export: our checkpoints as HF GPT-Neo, GPT-2, GPT-NeoX or GPT-J folders (config.json,
model.safetensors, the tokenizer). Only models an HF architecture computes exactly are
exported: anything else is refused in one line naming the knob, rather than written as a
model that computes something different.
"""
import json
import os

import gin
import ml_dtypes
import numpy as np
import safetensors.numpy

from gptneo import checkpoints
from gptneo import inference
from gptneo.compat import tf
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.errors import UserError
from gptneo.hf import architectures
from gptneo.hf.architectures import GPT_NEO

WEIGHTS_FILE = "model.safetensors"
EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def weight_pairs(n_layer):
  """(our name, HF names, kind) of every weight of an n_layer HF GPT-Neo model."""
  return GPT_NEO.weight_pairs(n_layer)


def check_exportable(model, architecture="auto"):
  """The Architecture that computes exactly what `model` does (UserError, one line, if none)."""
  return architectures.choose(model, architecture)


def hf_config(model, eos_id, dtype, arch=GPT_NEO):
  """config.json of the `arch` model that computes `model`."""
  return {"architectures": [arch.hf_class], "model_type": arch.name, **arch.config(model),
          "bos_token_id": eos_id, "eos_token_id": eos_id,
          "tie_word_embeddings": model.tie_embeddings, "use_cache": True, "dtype": dtype}


def write_tokenizer(tokenizer, output_dir, n_ctx):
  """tokenizer.json plus the configs AutoTokenizer needs to load it as a fast GPT-2 BPE."""
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
    architecture: "gpt_neo", "gpt2", "gpt_neox", "gptj", or "auto" (architectures.choose);
      a flag, bin/export --architecture.
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
  tokenizer = inference.load_tokenizer(model_dir)  # read before anything is written
  tokenizer_lib.eos_id(tokenizer)
  reader = tf.train.load_checkpoint(checkpoint)
  factor = architectures.query_factor(arch, model)
  tensors = {}
  for ours, names, kind in arch.model_weight_pairs(model):
    array = sum(_folded(reader.get_tensor(name), name, factor, model.output_multiplier())
                for name in architectures.our_names(ours))
    arrays = architectures.to_hf(kind, array)
    tensors.update({name: np.ascontiguousarray(array, EXPORT_DTYPES[dtype])
                    for name, array in zip(names, arrays, strict=True)})
  os.makedirs(output_dir, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(output_dir, WEIGHTS_FILE),
                              metadata={"format": "pt"})
  eos = write_tokenizer(tokenizer, output_dir, model.n_ctx)
  with open(os.path.join(output_dir, "config.json"), "w") as f:
    json.dump(hf_config(model, eos, dtype, arch), f, indent=2)
  return checkpoint


def _folded(array, ours, query_factor, output_multiplier):
  """Our weight `ours` with the scales HF doesn't apply folded in: a qkv weight [embd, 3,
  heads, kv] or bias [3, heads, kv] with its queries times `query_factor`, the weights the
  logits are linear in (architectures.OUTPUT_LINEAR) times `output_multiplier` (muP's), other
  weights as is."""
  if query_factor != 1.0 and ours.endswith(("attn/qkv/w", "attn/qkv/b")):
    array = array.astype(np.float64)
    queries = (slice(None), 0) if ours.endswith("/w") else (0,)
    array[queries] *= query_factor
    return array.astype(np.float32)
  if output_multiplier != 1.0 and ours in architectures.OUTPUT_LINEAR:
    return (array.astype(np.float64) * output_multiplier).astype(np.float32)
  return array

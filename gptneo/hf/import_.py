"""Import: HF GPT-Neo, GPT-2, GPT-NeoX or GPT-J folders (save_pretrained, safetensors) as our
model dirs. Gin is read by the program, not here: `read_source` gives the folder's bindings,
the program parses them (with its layout) and builds the model (`build_model`), and
`import_hf` writes the model dir of that model and the folder's weights and tokenizer.
"""
import dataclasses
import os

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from gptneo import checkpoints
from gptneo import errors
from gptneo import inference
from gptneo import model_dir as model_dir_lib
from gptneo.model_dir import MODEL_GIN
from gptneo.data import tokenizer as tokenizer_lib
from gptneo.errors import UserError
from gptneo.gin_utils import gin_literal
from gptneo.hf import architectures
from gptneo.hf import fields
from gptneo.hf.export import WEIGHTS_FILE
from gptneo.model import gpt as gpt_lib

WEIGHTS_INDEX = "model.safetensors.index.json"  # save_pretrained's sharded weights
# Buffers older transformers saved with the weights (attention masks, rotary frequencies):
# computed from the config, not learned; the last two parts of their names.
HF_BUFFERS = {("attn", "bias"), ("attn", "masked_bias"), ("attention", "bias"),
              ("attention", "masked_bias"), ("rotary_emb", "inv_freq")}
FLOAT_DTYPES = {np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)}


def read_hf_config(hf_dir):
  """config.json of an HF folder of one of ARCHITECTURES (its values: checked by gin_bindings)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{path} not found; --hf_dir must be a folder save_pretrained wrote")
  config = errors.read_json(path, "--hf_dir must be a folder save_pretrained wrote")
  if not isinstance(config, dict):
    raise UserError(f"{path} holds a JSON {fields.json_type(config)}, not an object; is it an "
                    f"HF config.json?")
  architectures.from_hf_config(config, hf_dir)
  return config


def gin_bindings(config, path="config.json"):
  """Our bindings for an HF config (any of ARCHITECTURES), each value written by gin_literal."""
  arch = architectures.from_hf_config(config, path)
  return [f"{name} = {gin_literal(value)}" for name, value in arch.values(config, path).items()]


@dataclasses.dataclass(frozen=True)
class Source:
  """An HF folder read for import: its config.json checked, its architecture, and the gin
  bindings of our model computing it (what the program parses, and model.gin holds).

  Attributes:
    hf_dir: the folder.
    arch: the Architecture of its config.json.
    bindings: our bindings, e.g. "GPT.n_layer = 12", each value written by gin_literal.
  """
  hf_dir: str
  arch: architectures.Architecture
  bindings: tuple[str, ...]

  @property
  def config_path(self) -> str:
    return os.path.join(self.hf_dir, "config.json")


def read_source(hf_dir: str) -> Source:
  """Reads and checks an HF folder's config.json (UserError, one line, if it is not one of
  ARCHITECTURES or ours can't express it); touches no gin.

  Args:
    hf_dir: a folder save_pretrained wrote.
  """
  config = read_hf_config(hf_dir)
  config_path = os.path.join(hf_dir, "config.json")
  return Source(hf_dir, architectures.from_hf_config(config, hf_dir),
                tuple(gin_bindings(config, config_path)))


def _weight_files(hf_dir):
  """The safetensors files of an HF folder: model.safetensors or the shards its index lists
  (file names in the folder: an index names no path outside it)."""
  index = os.path.join(hf_dir, WEIGHTS_INDEX)
  if not os.path.exists(index):
    if os.path.exists(os.path.join(hf_dir, WEIGHTS_FILE)):
      return [WEIGHTS_FILE]
    raise UserError(f"{hf_dir} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX}; save the HF "
                    f"model with safe_serialization=True (.bin weights are not supported)")
  fix = "save the model again with save_pretrained"
  weight_map = errors.read_json(index, fix)
  weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
  if not isinstance(weight_map, dict):
    raise UserError(f"{index} has no weight_map object; {fix}")
  for name in weight_map.values():
    if type(name) is not str or name != os.path.basename(name) or name in ("", ".", ".."):
      raise UserError(f"{index} lists the shard {name!r}, not a file name in {hf_dir}; {fix}")
  shards = sorted(set(weight_map.values()))
  for name in shards:
    if not os.path.exists(os.path.join(hf_dir, name)):
      raise UserError(f"{index} lists the shard {name}, which {hf_dir} lacks; is the folder "
                      f"complete (every shard)?")
  return shards


def _hf_weights(hf_dir):
  """({HF name: array, as stored}, {HF name: the file holding it}) of an HF folder."""
  weights, sources = {}, {}
  for name in _weight_files(hf_dir):
    path = os.path.join(hf_dir, name)
    tensors = _load_safetensors(path)
    weights.update(tensors)
    sources.update(dict.fromkeys(tensors, path))
  return weights, sources


def _load_safetensors(path):
  """{name: array} of a safetensors file; a damaged one (truncated, not safetensors) is bad
  input, named in one line."""
  try:
    return safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError) as error:
    raise UserError(f"{path} is not a readable safetensors file ({str(error)[:120]}); "
                    f"save the model again with save_pretrained") from None


def _read_tokenizer(hf_dir, n_vocab):
  """The tokenizer of an HF folder, once it fits the model: its ids below n_vocab, with our
  end-of-document token."""
  try:
    tokenizer = tokenizer_lib.load_tokenizer(hf_dir)
  except ValueError as error:  # a UserError, or json's error on a damaged vocab.json
    raise UserError(f"{hf_dir} has no usable tokenizer ({fields.culprit(error)}); copy the "
                    f"model's tokenizer.json (or vocab.json and merges.txt) into it") from None
  if tokenizer.token_to_id(tokenizer_lib.EOS_TOKEN) is None:
    raise fields.unsupported(hf_dir, f"its tokenizer has no {tokenizer_lib.EOS_TOKEN} token, "
                             f"but ours ends every document with it")
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  if size > n_vocab:
    raise UserError(f"{hf_dir}: its tokenizer has {size} tokens, more than the model's "
                    f"vocab_size = {n_vocab} embeddings; is it the tokenizer saved with this "
                    f"model?")
  return tokenizer


def hf_shapes(arch, model):
  """{HF name: shape} of every weight the `arch` model computing `model` holds."""
  return architectures.their_shapes(model, arch.model_weight_pairs(model), architectures.to_hf)


def check_weights(arch, model, hf_tensors, sources, hf_dir):
  """Refuses (one line) HF weights that are not the model config.json describes: one missing,
  an extra one, one of another shape, not floating point, or not finite.

  Args:
    arch: the Architecture of config.json.
    model: our GPT of config.json's bindings.
    hf_tensors: {HF name: array} (aliases resolved).
    sources: {HF name: the file holding it}, to name it.
    hf_dir: the HF folder.
  """
  expected = hf_shapes(arch, model)
  config = os.path.join(hf_dir, "config.json")
  agree = f"{config} the one saved with these weights?"
  missing = sorted(set(expected) - set(hf_tensors))
  if missing:
    raise UserError(f"{hf_dir}'s weights lack {missing[:3]}, which the model {config} "
                    f"describes has; is the folder complete (every shard), and {agree}")
  ignored = {arch.head} if model.tie_embeddings else set()  # HF ties it too
  extra = sorted(name for name in set(hf_tensors) - set(expected) - ignored
                 if tuple(name.split(".")[-2:]) not in HF_BUFFERS)
  if extra:
    raise UserError(f"{hf_dir}'s weights hold {extra[:3]}, which the model {config} describes "
                    f"has no place for; is {agree}")
  for name, shape in expected.items():
    array = hf_tensors[name]
    if array.dtype not in FLOAT_DTYPES:
      raise UserError(f"{sources.get(name, hf_dir)}: {name} holds {array.dtype} values, not "
                      f"floating point (a quantized model?); import the model's float16, "
                      f"bfloat16 or float32 weights")
    if array.shape != shape:
      raise UserError(f"{sources.get(name, hf_dir)}: {name} has shape {list(array.shape)}, "
                      f"but the model {config} describes needs {list(shape)}; is {agree}")
    if not np.isfinite(array).all():
      raise UserError(f"{sources.get(name, hf_dir)}: {name} holds NaN or infinite values; "
                      f"the weights are damaged (a diverged run?): import a good checkpoint")


def our_weights(arch, model, hf_tensors, sources=None, hf_dir="the HF folder"):
  """{our name: float32 array} from {HF name: array}, once check_weights accepts them."""
  aliases = arch.aliases
  hf_tensors = {aliases.get(name, name): array for name, array in hf_tensors.items()}
  sources = {aliases.get(name, name): path for name, path in (sources or {}).items()}
  check_weights(arch, model, hf_tensors, sources, hf_dir)
  weights = {}
  for ours, names, kind in arch.model_weight_pairs(model):
    array = architectures.CONVERSIONS[kind][1](
        [hf_tensors[n].astype(np.float32) for n in names], model.n_head, names)
    first, *summed = architectures.our_names(ours)  # the sum's other terms: zero
    weights.update({first: array, **{name: np.zeros_like(array) for name in summed}})
  return weights


def build_model(source: Source) -> gpt_lib.GPT:
  """Our GPT of source.bindings, which the program parsed (gin_utils.parse) just before; one
  the config describes but ours can't build (a window not dividing the context, a rotary
  share of odd size) is refused as a model that can't be imported.

  Args:
    source: the HF folder, as read_source read it.
  """
  try:
    return gpt_lib.GPT()
  except UserError as error:  # in our knobs' terms, with a fix for a gin file: not for here
    raise fields.unsupported(source.config_path, f"ours can't build the model it describes "
                                                 f"({fields.culprit(error)})") from None


def import_hf(source: Source, model: gpt_lib.GPT, model_dir: str,
              overwrite: bool = False) -> str:
  """Writes model_dir: a checkpoint, model.gin (+ operative_config.gin) and tokenizer.json.

  Everything is read and checked before anything is written. model_dir must be empty unless
  `overwrite`: then the model it holds is deleted first (model_dir.MODEL_FILES). Reads no gin:
  the program parsed `source.bindings` and built `model` of them (build_model).

  Args:
    source: the HF folder, as read_source read it.
    model: our GPT of source.bindings (build_model, once the program parsed them).
    model_dir: the local folder to write.
    overwrite: replace the model model_dir holds.

  Returns:
    the checkpoint path.
  """
  hf_dir = source.hf_dir
  weights = our_weights(source.arch, model, *_hf_weights(hf_dir), hf_dir)
  tokenizer = _read_tokenizer(hf_dir, model.n_vocab)
  model_dir_lib.clear_for_import(model_dir, overwrite)
  with model_dir_lib.open_file(os.path.join(model_dir, inference.TOKENIZER_FILE), "w") as f:
    f.write(tokenizer.to_str(pretty=True))  # as tokenizer.save, never through a link
  checkpoint = checkpoints.save_arrays(model_dir, 0, weights)  # the masters, as a graph saves
  text = (f"# Imported from the {source.arch.title} folder {gin_literal(hf_dir)} by "
          f"bin/import_hf.\n" + "\n".join(source.bindings) + "\n")
  # model.gin holds the shape only, for bin/train --gin_file; the operative config also
  # names no dataset, so bin/eval asks for --dataset_dir.
  for name, extra in ((MODEL_GIN, ""), (inference.OPERATIVE_CONFIG, "DATASET_DIR = None\n")):
    with model_dir_lib.open_file(os.path.join(model_dir, name), "w") as f:
      f.write(text + extra)
  return checkpoint

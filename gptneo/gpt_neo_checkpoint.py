"""GPT-Neo's Mesh-TF training checkpoints (EleutherAI/gpt-neo) as our model dirs, and back.

A GPT-Neo checkpoint is TF's `model.ckpt-N` in its model_path, holding what its code makes
(models/gpt2/gpt2.py, models/layers.py, optimizers.py, model_fns.py):

- `gpt2/wte` [vocab, embd], `gpt2/wpe` [n_ctx, embd], `gpt2/ln_f/g|b` [embd];
- per layer `gpt2/h<i>/`: `norm_1/g|b`, `norm_2/g|b` [embd]; `attn/q|k|v` [embd, heads * kv]
  and `attn/o` [heads * kv, embd] (mtf's attention_params_simple, heads and kv combined, the
  head major); `attn/compute_output_bias/o_b` [embd]; `mlp/conv1d_main/c_fc/kernel` [embd,
  4 embd] and `/bias`, `mlp/conv1d_main/c_proj/kernel|bias`;
- `<variable>/adam_m`, `<variable>/adam_v`: AdamWeightDecayOptimizer's moments, float32;
- `global_step` (int64). The weights' masters are bfloat16 under `"precision": "bfloat16"`.

Ours holds the same weights (q, k and v stacked in attn/qkv/w [embd, 3, heads, kv], attn/out/w
[heads, kv, embd]), Adam's moments under the same suffixes and the step: an import is a
renaming and reshaping, exact both ways; bfloat16 masters are widened to our float32 ones
(exact) and narrowed back on export. The vocabulary keeps the config's n_vocab rows, padding
included, as GPT-Neo trains them (HF's converter trims them to its vocab_size).
"""
import os
import re
import tempfile

import gin
import ml_dtypes
import numpy as np

from gptneo import checkpoints
from gptneo import gin_utils
from gptneo import gpt_neo_config
from gptneo import memory
from gptneo import model_dir as model_dir_lib
from gptneo.compat import tf
from gptneo.errors import UserError
from gptneo.hf import architectures
from gptneo.model import gpt as gpt_lib

SCOPE = "gpt2/"
STEP = "global_step"
SLOTS = ("adam_m", "adam_v")  # mtf's get_variable(var.name + "/adam_m"), ours alike
_CHECKPOINT = re.compile(r"model\.ckpt-(\d+)\.index")
MASTER_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


# --- Conversions: kind -> (ours -> [GPT-Neo arrays], ([GPT-Neo arrays], n_head) -> ours).

def _qkv_to_neo(array):
  return [array[:, part].reshape(array.shape[0], -1) for part in range(3)]


def _qkv_from_neo(arrays, n_head):
  return np.stack([a.reshape(a.shape[0], n_head, -1) for a in arrays], axis=1)


CONVERSIONS = {
    "copy": (lambda a: [a], lambda arrays, n_head: arrays[0]),
    "qkv": (_qkv_to_neo, _qkv_from_neo),  # [embd, 3, heads, kv] <-> q, k, v [embd, heads*kv]
    "out": (lambda a: [a.reshape(-1, a.shape[-1])],  # [heads, kv, embd] <-> [heads*kv, embd]
            lambda arrays, n_head: arrays[0].reshape(n_head, -1, arrays[0].shape[-1])),
}
TOP = [("wte", ("wte",), "copy"), ("wpe", ("wpe",), "copy"),
       ("ln_f/g", ("ln_f/g",), "copy"), ("ln_f/b", ("ln_f/b",), "copy")]
LAYER = [("ln_1/g", ("norm_1/g",), "copy"), ("ln_1/b", ("norm_1/b",), "copy"),
         ("attn/qkv/w", ("attn/q", "attn/k", "attn/v"), "qkv"),
         ("attn/out/w", ("attn/o",), "out"),
         ("attn/out/b", ("attn/compute_output_bias/o_b",), "copy"),
         ("ln_2/g", ("norm_2/g",), "copy"), ("ln_2/b", ("norm_2/b",), "copy"),
         ("mlp/fc/w", ("mlp/conv1d_main/c_fc/kernel",), "copy"),
         ("mlp/fc/b", ("mlp/conv1d_main/c_fc/bias",), "copy"),
         ("mlp/proj/w", ("mlp/conv1d_main/c_proj/kernel",), "copy"),
         ("mlp/proj/b", ("mlp/conv1d_main/c_proj/bias",), "copy")]


def weight_pairs(n_layer: int) -> list:
  """(our weight, GPT-Neo's weights, kind) of every weight of an n_layer model, full names.

  Args:
    n_layer: the model's layers (GPT.n_layer, GPT-Neo's n_layer).
  """
  pairs = [(f"gpt/{ours}", tuple(SCOPE + n for n in neo), kind) for ours, neo, kind in TOP]
  for layer in range(n_layer):
    pairs += [(f"gpt/h{layer}/{ours}", tuple(f"{SCOPE}h{layer}/{n}" for n in neo), kind)
              for ours, neo, kind in LAYER]
  return pairs


def _pairs(model):
  """weight_pairs of `model`, which must be exactly the weights it has (a bug if not: the
  model comes from gpt_neo_config, which converts GPT-Neo's models only)."""
  pairs = weight_pairs(model.n_layer)
  ours = {"gpt/" + name for name, _ in memory.weight_shapes(model)}
  if ours != {name for name, _, _ in pairs}:
    raise AssertionError(f"our weights {sorted(ours)} are not GPT-Neo's {pairs}")
  return pairs


def neo_shapes(model) -> dict:
  """{GPT-Neo variable: shape} of the model's weights (each also has its two Adam slots).

  Args:
    model: our GPT of a GPT-Neo config (read_model).
  """
  return architectures.their_shapes(model, _pairs(model),
                                    lambda kind, array: CONVERSIONS[kind][0](array))


# --- The config.

def read_model(config_path: str):
  """(config, gin text, our GPT) of a GPT-Neo JSON config; the gin text is what
  gptneo-convert-config writes (its refusals: one line), parsed to build the model.

  Args:
    config_path: GPT-Neo's configs/<name>.json of the run.
  """
  config = gpt_neo_config.read_config(config_path)
  text = gpt_neo_config.convert(config, os.path.basename(config_path))
  if config["opt_name"].lower() != "adam":  # convert accepted adam or adafactor
    raise UserError(f"{config_path}: opt_name {config['opt_name']!r}; only Adam's training "
                    f"state (adam_m, adam_v) imports: GPT-Neo's Adafactor slots have no "
                    f"place here")
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, "gpt_neo.gin")
    with open(path, "w") as f:
      f.write(text)
    gin_utils.parse([path], ['DATASET_DIR = "unused"', 'mesh.mesh_shape = ""',
                             'mesh.layout = ""', "mesh.implementation = 'placement'"])
  model = gpt_lib.GPT()
  return config, text, model


def precision(config: dict) -> str:
  """GPT-Neo's master dtype name ("float32" or "bfloat16"; convert checked the value)."""
  return config.get("precision", "float32")


# --- Import.

def find_checkpoint(checkpoint_dir: str) -> str:
  """The newest `model.ckpt-N` prefix in `checkpoint_dir`, found by listing it (TF's
  `checkpoint` file, which may name any path, is not read).

  Args:
    checkpoint_dir: GPT-Neo's model_path, a local folder.
  """
  fix = "point --checkpoint_dir at the model_path of a GPT-Neo run (its model.ckpt-N files)"
  if not os.path.isdir(checkpoint_dir):
    raise UserError(f"--checkpoint_dir={checkpoint_dir} is not a folder; {fix}")
  steps = [int(match.group(1)) for match in map(_CHECKPOINT.fullmatch,
                                                os.listdir(checkpoint_dir)) if match]
  if not steps:
    raise UserError(f"--checkpoint_dir={checkpoint_dir} holds no TF checkpoint "
                    f"(model.ckpt-N.index); {fix}")
  return os.path.join(checkpoint_dir, f"model.ckpt-{max(steps)}")


def _reader(prefix):
  try:
    return tf.train.load_checkpoint(prefix)
  except (tf.errors.OpError, ValueError) as error:
    raise UserError(f"{prefix} is not a readable TF checkpoint "
                    f"({str(error).splitlines()[0][:120]}); copy it again from its run") from None


def _tensor(reader, prefix, name):
  try:
    return reader.get_tensor(name)
  except (tf.errors.OpError, ValueError) as error:
    raise UserError(f"{prefix}: {name} can't be read ({str(error).splitlines()[0][:120]}); "
                    f"copy the checkpoint again from its run") from None


def check_variables(reader, prefix: str, model, config_path: str) -> None:
  """Refuses (one line) a GPT-Neo checkpoint that is not the config's model's: a weight or
  Adam slot missing, one of another shape or dtype, a weight the model has no place for, or no
  global_step.

  Args:
    reader: TF's CheckpointReader of `prefix`.
    prefix: the checkpoint's path, to name it.
    model: our GPT of the config (read_model).
    config_path: the config's path, to name it.
  """
  stored, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
  agree = f"is {config_path} the config of the run that wrote it?"
  if STEP not in stored or stored[STEP] != [] or not dtypes[STEP].is_integer:
    raise UserError(f"{prefix} has no integer scalar {STEP}; is it a GPT-Neo training "
                    f"checkpoint?")
  for name, shape in neo_shapes(model).items():
    for entry, kinds in ((name, (tf.float32, tf.bfloat16)),
                         *((f"{name}/{slot}", (tf.float32,)) for slot in SLOTS)):
      if entry not in stored:
        raise UserError(f"{prefix} lacks {entry}, which the model of {config_path} has; {agree}")
      if tuple(stored[entry]) != shape:
        raise UserError(f"{prefix}: {entry} has shape {stored[entry]}, but the model of "
                        f"{config_path} needs {list(shape)}; {agree}")
      if dtypes[entry] not in kinds:
        raise UserError(f"{prefix}: {entry} holds {dtypes[entry].name} values, not "
                        f"{' or '.join(kind.name for kind in kinds)}; {agree}")
  known = {f"{name}/{slot}" for name in neo_shapes(model) for slot in SLOTS}
  known |= set(neo_shapes(model))
  extra = sorted(name for name in stored if name.startswith(SCOPE) and name not in known)
  if extra:
    raise UserError(f"{prefix} holds {extra[0]}" + (f" and {len(extra) - 1} more" if
                    len(extra) > 1 else "") + f", which the model of {config_path} has no "
                    f"place for; {agree}")


def our_arrays(reader, prefix: str, model, config_path: str) -> tuple[int, dict]:
  """(step, {our checkpoint key: array}) of a GPT-Neo checkpoint, once check_variables accepts
  it: the weights (float32), their Adam slots and global_step.

  Args:
    reader, prefix, model, config_path: as check_variables'.
  """
  check_variables(reader, prefix, model, config_path)
  arrays = {}
  for ours, names, kind in _pairs(model):
    for suffix in ("", *(f"/{slot}" for slot in SLOTS)):
      parts = [_tensor(reader, prefix, name + suffix).astype(np.float32) for name in names]
      arrays[ours + suffix] = np.ascontiguousarray(CONVERSIONS[kind][1](parts, model.n_head))
  step = int(_tensor(reader, prefix, STEP))
  if step < 0:
    raise UserError(f"{prefix}: {STEP} = {step} is negative; is it a GPT-Neo checkpoint?")
  arrays[STEP] = np.int64(step)
  return step, arrays


def import_checkpoint(checkpoint_dir: str, config_path: str, model_dir: str,
                      overwrite: bool = False) -> str:
  """Writes model_dir from GPT-Neo's newest checkpoint in checkpoint_dir: a checkpoint at its
  step (weights, Adam's moments, the step; no data position: a resumed run reads its data
  from the start), model.gin (the converted config, to train on with) and
  operative_config.gin (the model, for gptneo-eval, -sample, -export).

  Args:
    checkpoint_dir: GPT-Neo's model_path (a local folder).
    config_path: the JSON config of the run that wrote it.
    model_dir: the local folder to write; it must be empty unless `overwrite`.
    overwrite: delete the model model_dir holds first (model_dir.MODEL_FILES).

  Returns:
    the path of the checkpoint written.
  """
  _, text, model = read_model(config_path)
  operative = gin.operative_config_str()
  prefix = find_checkpoint(checkpoint_dir)
  step, arrays = our_arrays(_reader(prefix), prefix, model, config_path)
  model_dir_lib.clear_for_import(model_dir, overwrite)
  path = checkpoints.save_arrays(model_dir, step, arrays)
  header = (f"# Imported from GPT-Neo's {gin_utils.gin_literal(prefix)} by "
            f"gptneo-import-gpt-neo.\n")
  for name, body in ((model_dir_lib.MODEL_GIN, text),
                     ("operative_config.gin", operative + "DATASET_DIR = None\n")):
    with model_dir_lib.open_file(os.path.join(model_dir, name), "w") as f:
      f.write(header + body)
  return path


# --- Export.

def neo_arrays(reader, path: str, model, master_dtype) -> tuple[int, dict]:
  """(step, {GPT-Neo checkpoint key: array}) of our checkpoint `path`: masters in
  `master_dtype`, Adam's moments float32 (zeros where ours has none: an HF import's step 0),
  global_step.

  Args:
    reader: TF's CheckpointReader of our checkpoint `path`.
    path: its path (its step, where it holds no global_step).
    model: our GPT of the GPT-Neo config exported for.
    master_dtype: the weights' numpy dtype in GPT-Neo's checkpoint (MASTER_DTYPES).
  """
  stored = reader.get_variable_to_shape_map()
  arrays = {}
  for ours, names, kind in _pairs(model):
    for suffix, dtype in (("", master_dtype), *((f"/{slot}", np.float32) for slot in SLOTS)):
      if suffix and ours + suffix not in stored:  # no optimizer state yet: Adam's initial
        array = np.zeros(stored[ours], np.float32)
      else:
        array = reader.get_tensor(ours + suffix)
      for name, part in zip(names, CONVERSIONS[kind][0](array), strict=True):
        arrays[name + suffix] = np.ascontiguousarray(part.astype(dtype))
  step = int(reader.get_tensor(STEP)) if STEP in stored else int(
      path.rsplit("-", 1)[1])  # an HF import's checkpoint has no step variable
  arrays[STEP] = np.int64(step)
  return step, arrays


def export_checkpoint(model_dir: str, output_dir: str, config_path: str) -> str:
  """Writes the newest intact checkpoint of `model_dir` (or the one checkpoints.choose named)
  as GPT-Neo's `output_dir/model.ckpt-<step>` (+ TF's `checkpoint` file), for the run of
  `config_path`: its names, shapes and precision.

  Args:
    model_dir: our model dir (local), whose model must be the config's.
    output_dir: the folder to write (checked by the program: empty, or --overwrite).
    config_path: the GPT-Neo JSON config the checkpoint is for.

  Returns:
    the path of our checkpoint exported.
  """
  config, _, model = read_model(config_path)
  path = checkpoints.require(model_dir).path
  reader = tf.train.load_checkpoint(path)
  stored = reader.get_variable_to_shape_map()
  for name, shape in memory.weight_shapes(model):
    shape = [size for _, size in shape]
    if stored.get("gpt/" + name) != shape:
      held = (f"gpt/{name} of shape {stored['gpt/' + name]}" if "gpt/" + name in stored
              else f"no gpt/{name}")
      raise UserError(f"{path} has {held}, but the model of {config_path} needs {shape}; is "
                      f"it the config of this model dir's model?")
  step, arrays = neo_arrays(reader, path, model, MASTER_DTYPES[precision(config)])
  os.makedirs(output_dir, exist_ok=True)
  name = f"model.ckpt-{step}"
  checkpoints.write_arrays(os.path.join(output_dir, name), arrays)
  tf.train.update_checkpoint_state(output_dir, name)  # what GPT-Neo's estimator reads
  return path

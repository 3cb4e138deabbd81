"""GPT-Neo's JSON configs (EleutherAI/gpt-neo configs/*.json) as gin files of our presets' shape.

Each key GPT-Neo's configs use is mapped to the binding that does what GPT-Neo's code does with
it (models/gpt2/gpt2.py, models/layers.py, optimizers.py, model_fns.py, inputs.py, main.py),
or refused in one line naming the key; keys of no effect on training (where GPT-Neo saves, its
--predict mode) become comments. docs/import_models.md lists the mapping and what differs.
"""
import json
import math

from gptneo import errors
from gptneo.errors import UserError
from gptneo.gin_utils import Reference
from gptneo.gin_utils import gin_literal

# GPT-Neo's layout names (mtf.Dimension names in models/) -> ours (gptneo/model/gpt.py's Dims);
LAYOUT_DIMS = {"batch": "batch", "sequence": "sequence", "heads": "heads", "features_per_head": "kv",
               "intermediate_expanded": "mlp", "vocab": "vocab", "embd": "embd"}
# Dimensions GPT-Neo's layouts split and ours can't: refused, with the layout to write instead.
UNSPLIT = {
    "memory_length": "our attention's softmax runs over the keys whole",
    "memory": "our attention's softmax runs over the keys whole",
}
# models/activations.py's BASE_FNS that we have (mtf.gelu is the tanh approximation).
ACTIVATIONS = {"gelu": "@gelu_tanh", "relu": "@relu", "selu": "@selu", "silu": "@silu"}
ATTENTION_TYPES = ("global", "local", "linear")
# inputs.py's generic_text sampling modes -> train.sampling.
SAMPLING = {"documents_random": "random_chunk", "documents_fixed": "document", "chunks": "fixed"}
# main.py's --steps_per_checkpoint default: GPT-Neo evaluates after every checkpoint.
STEPS_PER_CHECKPOINT = 5000
# mtf's AdafactorOptimizer defaults, the only epsilons our Adafactor computes with.
ADAFACTOR_EPSILONS = {"ada_epsilon1": 1e-30, "ada_epsilon2": 1e-3}
REQUIRED = ("n_head", "n_embd", "n_layer", "n_ctx", "n_vocab", "attention_types", "lr",
            "opt_name", "train_batch_size", "train_steps", "datasets")
# Keys that change nothing in a training run: written as comments.
NOTES = {
    "model_path": "GPT-Neo's model_path {!r}: pass your model dir as --model_dir",
    "predict_steps": "predict_steps {!r} (GPT-Neo's --predict): sample with gptneo-sample",
    "predict_batch_size": "predict_batch_size {!r} (GPT-Neo's --predict): gptneo-sample's "
                          "sample.batch_size",
}
IGNORED_BY_GPT_NEO = {  # keys its code never reads: they must hold what it does anyway
    "activation_function": ("activation_fn", "gelu"),
}


def read_config(path: str) -> dict:
  """The JSON object in `path`, or one line saying why there is none.

  Args:
    path: a GPT-Neo model config (configs/<name>.json).
  """
  config = errors.read_json(path, "give a GPT-Neo configs/*.json")
  if not isinstance(config, dict):
    raise UserError(f"{path} holds a JSON {type(config).__name__}, not a GPT-Neo config object")
  return config


def _value(config, key, kinds, check=lambda value: True, rule=""):
  """config[key] if it is one of `kinds` and passes `check`, else one line naming the key."""
  value = config[key]
  if type(value) not in kinds or not check(value):
    expected = rule or " or ".join(kind.__name__ for kind in kinds)
    raise UserError(f"config key {key!r} = {json.dumps(value)}: expected {expected}")
  return value


def _positive_int(config, key):
  return _value(config, key, (int,), lambda v: v > 0, "a positive integer")


def _count(config, key):
  return _value(config, key, (int,), lambda v: v >= 0, "an integer >= 0")


def _number(config, key, low=0.0, high=math.inf, rule="a number >= 0"):
  return float(_value(config, key, (int, float), lambda v: low <= v < high, rule))


def _flag(config, key):
  return _value(config, key, (bool,))


class _Gin:
  """Bindings in sections; every value goes through gin_literal."""

  def __init__(self):
    self.lines = []

  def section(self, title):
    self.lines += ["", f"# {title}"]

  def bind(self, name, value):
    self.lines.append(f"{name} = {gin_literal(value)}")

  def note(self, text):
    self.lines.append(f"# {text}")


def convert(config: dict, name: str, dataset_dirs: dict | None = None,
            layout: str | None = None) -> str:
  """The gin text of GPT-Neo model config `config`: includes, then overrides.

  Args:
    config: the parsed configs/<name>.json.
    name: what to call it in the header (its file name).
    dataset_dirs: {GPT-Neo dataset id: our prepared dataset folder}; None leaves DATASET_DIR
      to the user (one dataset) as the presets do.
    layout: replaces the config's layout (GPT-Neo's dimension names or ours).

  Raises:
    UserError: a key we don't convert, a required key missing, or a value of the wrong kind.
  """
  known = set(REQUIRED) | set(NOTES) | set(IGNORED_BY_GPT_NEO) | set(ADAFACTOR_EPSILONS) | {
      "embed_dropout", "attn_dropout", "res_dropout", "scale_by_depth", "scale_by_in",
      "local_attention_radius", "activation_fn", "recompute_grad", "lr_decay", "lr_decay_end",
      "warmup_steps", "beta1", "beta2", "epsilon", "weight_decay", "gradient_clipping",
      "eval_steps", "eval_batch_size", "iterations", "mesh_shape", "layout", "precision",
      "tokens_per_mb_per_replica", "input_fn", "z_loss"}
  for key in config:
    if key not in known:
      raise UserError(f"config key {key!r} has no equivalent here (gptneo-convert-config "
                      f"converts {', '.join(sorted(known))}); remove it or write its gin by hand")
  for key in REQUIRED:
    if key not in config:
      raise UserError(f"config has no {key!r}; GPT-Neo needs it too")
  for key, (read, value) in IGNORED_BY_GPT_NEO.items():
    if key in config and config[key] != value and read not in config:
      raise UserError(f"config key {key!r} = {json.dumps(config[key])} is never read by "
                      f"GPT-Neo (it trains with {value!r}); write {read!r} to choose another")
  adafactor = _value(config, "opt_name", (str,), lambda v: v.lower() in ("adam", "adafactor"),
                     '"adam" or "adafactor"').lower() == "adafactor"
  out = _Gin()
  out.note(f"GPT-Neo's {name} (EleutherAI/gpt-neo configs), by gptneo-convert-config.")
  out.note("What differs from GPT-Neo's own run: docs/import_models.md.")
  for include in ("runs/train.gin", "models/gpt_neo.gin",
                  f"optimizers/{'adafactor' if adafactor else 'adam'}.gin"):
    out.lines.append(f"include '{include}'")
  _model(config, out)
  _optimizer(config, out, adafactor)
  _run(config, out)
  _mesh(config, out, layout)
  _datasets(config, out, dataset_dirs)
  out.section("Not used in training")
  for key, text in NOTES.items():
    if key in config:
      out.note(text.format(config[key]))
  return "\n".join(out.lines) + "\n"


def _attention_layers(config):
  """attention_types [[types, count], ...] as GPT.attention_layers, checked against n_layer."""
  value = config["attention_types"]
  rule = 'a list of [[types...], count] pairs, e.g. [[["global", "local"], 12]]'
  if type(value) is not list or not value:
    raise UserError(f"config key 'attention_types' = {json.dumps(value)}: expected {rule}")
  layers = []
  for pair in value:
    if not (type(pair) is list and len(pair) == 2 and type(pair[0]) is list and pair[0]
            and all(type(kind) is str for kind in pair[0]) and type(pair[1]) is int
            and pair[1] > 0):
      raise UserError(f"config key 'attention_types' entry {json.dumps(pair)}: expected {rule}")
    for kind in pair[0]:
      if kind not in ATTENTION_TYPES:
        raise UserError(f"config key 'attention_types' names {kind!r}, which we lack (we have "
                        f"{', '.join(ATTENTION_TYPES)}); GPT-Neo's 'none' block doubles its "
                        f"input, which no layer here does")
    layers.append([list(pair[0]), pair[1]])
  if sum(len(kinds) * count for kinds, count in layers) != config["n_layer"]:
    raise UserError(f"config key 'attention_types' describes "
                    f"{sum(len(k) * c for k, c in layers)} layers but n_layer = "
                    f"{config['n_layer']}; GPT-Neo asserts they are equal")
  return layers


def _model(config, out):
  out.section("The model (models/gpt2/gpt2.py: pre-LayerNorm, tied embeddings, unscaled q.k)")
  for key in ("n_layer", "n_embd", "n_head", "n_ctx", "n_vocab"):
    out.bind(f"GPT.{key}", _positive_int(config, key))
  layers = _attention_layers(config)
  out.bind("GPT.attention_layers", layers)
  if "local_attention_radius" in config:  # models/layers.py: local_attention_1d's radius
    out.bind("GPT.window_size", _positive_int(config, "local_attention_radius"))
  activation = config.get("activation_fn", "gelu")  # get_activation_fn reads activation_fn
  if activation not in ACTIVATIONS:
    raise UserError(f"config key 'activation_fn' = {json.dumps(activation)}: we have "
                    f"{', '.join(ACTIVATIONS)}")
  out.bind("GPT.activation", Reference(ACTIVATIONS[activation]))
  for key in ("embed_dropout", "attn_dropout", "res_dropout"):  # absent: None, no dropout
    out.bind(f"GPT.{key}", _number(config, key, 0.0, 1.0, "a rate in [0, 1)")
             if key in config else 0.0)
  for key in ("scale_by_depth", "scale_by_in", "recompute_grad"):  # absent: None, falsy
    out.bind(f"GPT.{key}", _flag(config, key) if key in config else False)
  # models/gpt2/gpt2.py: params.get("z_loss", 1e-4), mtf's softmax_cross_entropy_with_logits
  # adds z_loss * log_z^2 per token: ours is the same mean, logged apart from the loss.
  out.bind("GPT.z_loss", _number(config, "z_loss") if "z_loss" in config else 1e-4)


def _optimizer(config, out, adafactor):
  out.section("The optimizer and schedule (optimizers.py)")
  weight_decay = _number(config, "weight_decay") if "weight_decay" in config else None
  if adafactor:
    for key, value in ADAFACTOR_EPSILONS.items():
      if key in config and _number(config, key) != value:
        raise UserError(f"config key {key!r} = {config[key]}: our Adafactor computes with "
                        f"mtf's default {value}; remove the key")
    out.bind("Adafactor.beta1", _number(config, "beta1", 0.0, 1.0, "a number in [0, 1)"))
    out.bind("Adafactor.decay_rate", weight_decay)  # GPT-Neo passes weight_decay as decay_rate
    out.bind("Adafactor.multiply_by_parameter_scale", True)  # mtf's default, GPT-Neo's
    out.bind("Adafactor.clipping_threshold", 1.0)
    # GPT-Neo's Adafactor gets params["lr"], not the schedule: a constant rate.
    out.bind("learning_rate_schedule.learning_rate", _number(config, "lr"))
    out.bind("learning_rate_schedule.warmup_steps", 0)
    out.bind("learning_rate_schedule.decay", "constant")
  else:
    for key in ("beta1", "beta2", "epsilon"):
      if key not in config:
        raise UserError(f"config has no {key!r}; GPT-Neo's Adam needs it")
      out.bind(f"Adam.{key}", _number(config, key, 0.0, 1.0, "a number in [0, 1)"))
    out.bind("Adam.weight_decay", weight_decay or 0.0)
    out.bind("learning_rate_schedule.learning_rate", _number(config, "lr"))
    out.bind("learning_rate_schedule.warmup_steps",
             _count(config, "warmup_steps") if "warmup_steps" in config else 0)
    decay = _value(config, "lr_decay", (str,), lambda v: v in ("cosine", "linear"),
                   '"cosine" or "linear"') if "lr_decay" in config else "constant"
    out.bind("learning_rate_schedule.decay", decay)
    out.bind("learning_rate_schedule.min_ratio", 0.1)  # GPT-Neo decays to 10% of lr
    if "lr_decay_end" in config:  # else train_steps, as ours
      out.bind("learning_rate_schedule.decay_steps", _positive_int(config, "lr_decay_end"))
  clip = _number(config, "gradient_clipping") if "gradient_clipping" in config else None
  out.bind("train.clip_norm", clip or None)


def _run(config, out):
  out.section("The run (main.py, model_fns.py)")
  batch_size = _positive_int(config, "train_batch_size")
  out.bind("train.batch_size", batch_size)
  out.bind("train.train_steps", _positive_int(config, "train_steps"))
  eval_steps = _count(config, "eval_steps") if "eval_steps" in config else 0
  if eval_steps:  # eval_steps batches of eval_batch_size after every checkpoint
    eval_batch = _positive_int(config, "eval_batch_size") if "eval_batch_size" in config else (
        batch_size)
    batches = math.ceil(eval_steps * eval_batch / batch_size)  # as many windows scored
    out.bind("train.steps_per_checkpoint", STEPS_PER_CHECKPOINT)
    if config.get("mesh_shape"):  # a TPU mesh: our device loop has no periodic evaluation
      out.note(f"GPT-Neo evaluates every {STEPS_PER_CHECKPOINT} steps: on a TPU ours can't "
               f"yet, so gptneo-eval the checkpoints; the run ends with one evaluation")
      out.bind("train.eval_batches", batches)
    else:
      out.bind("train.eval_every_n_steps", STEPS_PER_CHECKPOINT)
      out.bind("train.eval_steps", batches)
  else:
    out.bind("train.eval_batches", 0)
  precision = _value(config, "precision", (str,), lambda v: v in ("float32", "bfloat16"),
                     '"float32" or "bfloat16"') if "precision" in config else "float32"
  out.bind("train.precision", precision)
  if "iterations" in config:
    out.bind("train.steps_per_loop", _positive_int(config, "iterations"))


def _mesh(config, out, layout_override):
  out.section("The mesh: GPT-Neo's TPU slice; name it with --gin_param=\"mesh.tpu = 'my-tpu'\"")
  shape = config.get("mesh_shape", "")
  layout = layout_override if layout_override is not None else config.get("layout", "")
  for key, value in (("mesh_shape", shape), ("layout", layout)):
    if type(value) is not str:
      raise UserError(f"config key {key!r} = {json.dumps(value)}: expected a string like "
                      f"{'x:16,y:16' if key == 'mesh_shape' else 'batch:x,heads:y'}")
  sizes = {}
  for item in filter(None, shape.split(",")):
    dim, _, size = item.partition(":")
    if not (dim.strip() and size.strip().isdigit() and int(size) > 0):
      raise UserError(f"config key 'mesh_shape' item {item!r}: expected name:size, e.g. x:16")
    sizes[dim.strip()] = int(size)
  rules = _layout_rules(layout, sizes, shape, "--layout" if layout_override else
                        "config key 'layout'", config)
  out.bind("mesh.implementation", "simd" if sizes else "placement")
  out.bind("mesh.mesh_shape", ",".join(f"{dim}:{size}" for dim, size in sizes.items()))
  out.bind("mesh.layout", ",".join(rules))
  if "tokens_per_mb_per_replica" in config:
    out.bind("train.microbatches_per_batch", _microbatches(config, sizes, rules))


def _layout_rules(layout, sizes, shape, source, config):
  """GPT-Neo's layout rules in our dimension names ("batch:x,heads:y")."""
  ours = set(LAYOUT_DIMS.values())
  pairs = [tuple(part.strip() for part in item.partition(":")[::2])
           for item in filter(None, layout.split(","))]
  for dim, mesh_dim in pairs:
    if dim not in LAYOUT_DIMS and dim not in ours and dim not in UNSPLIT:
      raise UserError(f"{source} names tensor dimension {dim!r}, which we lack; write one of "
                      f"{', '.join(LAYOUT_DIMS)} (ours: {', '.join(sorted(ours))})")
    if mesh_dim not in sizes:
      raise UserError(f"{source} maps {dim!r} to {mesh_dim!r}, which mesh_shape {shape!r} "
                      f"doesn't define")
  unsplit = [(dim, mesh_dim) for dim, mesh_dim in pairs if dim in UNSPLIT]
  if unsplit:
    raise UserError(f"{source} splits {', '.join(f'{d} over {m!r}' for d, m in unsplit)}, "
                    f"which ours can't ({'; '.join(UNSPLIT[d] for d, _ in unsplit)}): convert "
                    f"with --layout={_without_unsplit(pairs)!r} or another")
  return [f"{LAYOUT_DIMS.get(dim, dim)}:{mesh_dim}" for dim, mesh_dim in pairs]


def _without_unsplit(pairs):
  """`pairs` without the dimensions we can't split, in our names."""
  return ",".join(f"{LAYOUT_DIMS.get(dim, dim)}:{mesh_dim}" for dim, mesh_dim in pairs
                  if dim not in UNSPLIT)


def _microbatches(config, sizes, rules):
  """mtf.transformer.utils.serialize_num_microbatches, as model_fns.py calls it."""
  tokens = _positive_int(config, "tokens_per_mb_per_replica")
  replicas = math.prod(sizes[mesh_dim] for rule in rules
                       for dim, mesh_dim in [rule.split(":")] if dim == "batch")
  if config["train_batch_size"] % replicas:
    raise UserError(f"config key 'train_batch_size' = {config['train_batch_size']} doesn't "
                    f"split over the {replicas} replicas of its layout")
  batch_per_replica = config["train_batch_size"] // replicas
  microbatch = max(1, tokens // config["n_ctx"])
  while batch_per_replica % microbatch:
    microbatch -= 1
  return batch_per_replica // microbatch


def _dataset_entries(config):
  """[(id, sampling mode or None, weight)] from `datasets`: ids, or [id, stitch, mode, weight]."""
  value = config["datasets"]
  rule = 'a list of dataset ids or [id, stitch, mode, weight], e.g. [["pile", 25, ' \
         '"documents_random", 1.0]]'
  if type(value) is not list or not value:
    raise UserError(f"config key 'datasets' = {json.dumps(value)}: expected {rule}")
  entries = []
  for entry in value:
    if type(entry) is str:
      entries.append((entry, None, 1.0))
      continue
    if not (type(entry) is list and len(entry) == 4 and type(entry[0]) is str
            and type(entry[1]) is int and entry[1] > 0 and type(entry[3]) in (int, float)
            and entry[3] > 0):
      raise UserError(f"config key 'datasets' entry {json.dumps(entry)}: expected {rule}")
    if entry[2] not in SAMPLING:
      raise UserError(f"config key 'datasets' entry {json.dumps(entry)}: sampling mode "
                      f"{entry[2]!r} is not one of {', '.join(SAMPLING)}")
    entries.append((entry[0], entry[2], float(entry[3])))
  return entries


def _datasets(config, out, dataset_dirs):
  """train.sampling and DATASET_DIR: as generic_text samples them, or sequential_input reads."""
  entries = _dataset_entries(config)
  input_fn = config.get("input_fn", "sequential_input")  # main.py's default
  if input_fn not in ("sequential_input", "generic_text"):
    raise UserError(f"config key 'input_fn' = {json.dumps(input_fn)}: expected "
                    f'"sequential_input" or "generic_text"')
  out.section("The data: prepare GPT-Neo's tfrecords with gptneo-prepare-data "
              "(docs/data.md)")
  ids = [dataset_id for dataset_id, _, _ in entries]
  if input_fn == "sequential_input":
    # Reads the stored n_ctx + 1 windows of every dataset's files in turn: no modes, no weights.
    out.note(f"GPT-Neo's sequential_input reads stored windows; {ids}'s modes and weights "
             f"apply only with input_fn generic_text")
    sampling, weights = "fixed", None
    if len(entries) > 1:
      raise UserError(f"config key 'datasets' names {len(entries)} datasets, which GPT-Neo's "
                      f"sequential_input reads as one: prepare their files as one dataset "
                      f"and give it one id")
  else:
    modes = {SAMPLING[mode] if mode else "fixed" for _, mode, _ in entries}
    if len(modes) > 1:
      raise UserError(f"config key 'datasets' mixes sampling modes {sorted(modes)}; ours "
                      f"(train.sampling) is one for the run: use one mode")
    sampling, weights = modes.pop(), {dataset_id: w for dataset_id, _, w in entries}
  out.bind("train.sampling", sampling)
  if dataset_dirs is None:
    if len(entries) > 1:
      raise UserError(f"config key 'datasets' names {len(entries)} datasets; give each its "
                      f"prepared folder: --dataset_dirs={','.join(i + '=FOLDER' for i in ids)}")
    out.note(f"{ids[0]}: give its prepared folder with --gin_param='DATASET_DIR=\"FOLDER\"'")
    return
  missing = [dataset_id for dataset_id in ids if dataset_id not in dataset_dirs]
  extra = sorted(set(dataset_dirs) - set(ids))
  if missing or extra:
    raise UserError(f"--dataset_dirs names {extra or 'no'} extra and misses {missing or 'no'} "
                    f"dataset ids of the config's {ids}")
  if weights is None or len(entries) == 1:
    out.bind("DATASET_DIR", dataset_dirs[ids[0]])
  else:
    out.bind("DATASET_DIR", {dataset_dirs[i]: weights[i] for i in ids})


def parse_dataset_dirs(text: str) -> dict | None:
  """--dataset_dirs "pile=data/pile,owt=data/owt" as {id: folder}; "" is None.

  Args:
    text: comma-separated id=folder pairs.
  """
  if not text:
    return None
  pairs = {}
  for item in text.split(","):
    dataset_id, sep, folder = item.partition("=")
    if not (sep and dataset_id.strip() and folder.strip()):
      raise UserError(f"--dataset_dirs item {item!r} is not id=FOLDER")
    pairs[dataset_id.strip()] = folder.strip()
  return pairs

"""The checks of a training run's settings, before anything is built or written: the knobs'
ranges, the memory a step needs, the dataset (its vocabulary, context and first records), the
loop; and naming the corrupt shard behind a read error in the middle of a run.

Each raises UserError (one line naming the binding or file and the fix); `train.Settings.check`
runs them all.
"""
import os

from gptneo import flops
from gptneo import loggers as loggers_lib
from gptneo import memory
from gptneo.compat import tf
from gptneo.data import inputs
from gptneo.data import prepare
from gptneo.errors import UserError
from gptneo.layout_search import cost_model


NONFINITE_POLICIES = ("stop", "skip")


def check_ranges(s):
  """Every train.* number in its range, and the learning rate: one line naming the binding."""
  for name in ("train_steps", "batch_size", "microbatches_per_batch", "steps_per_checkpoint",
               "keep_checkpoints", "log_every_n_steps", "max_nonfinite_steps", "steps_per_loop"):
    _check_number(f"train.{name}", getattr(s, name), int, 1, "a positive integer")
  for name in ("eval_every_n_steps", "eval_steps"):
    _check_number(f"train.{name}", getattr(s, name), int, 0, "0 or a positive integer")
  if s.init_from_step is not None:
    _check_number("train.init_from_step", s.init_from_step, int, 0, "None (the newest) or a step")
  if s.eval_batches is not None:
    _check_number("train.eval_batches", s.eval_batches, int, 0,
                  "None (as train.eval_steps), or 0 or a positive integer")
  for name in ("clip_norm", "checkpoint_every_secs"):
    if getattr(s, name) is not None:
      _check_number(f"train.{name}", getattr(s, name), (int, float), 0, "None or 0 (off), or a "
                    "positive number")
  if s.on_nonfinite not in NONFINITE_POLICIES:
    raise UserError(f"train.on_nonfinite = {s.on_nonfinite!r}; use one of {NONFINITE_POLICIES}")
  if s.sampling not in inputs.SAMPLINGS:  # inputs would say so too, once the graph is built
    raise UserError(f"train.sampling = {s.sampling!r} is unknown; use one of "
                    f"{list(inputs.SAMPLINGS)}")
  flops.check_peak_setting(s.peak_flops)
  loggers_lib.check(s.loggers)
  check_learning_rate(s.schedule_learning_rate)


def _check_number(binding, value, types, least, fix):
  # bool is an int to Python, never to a user who wrote True
  if isinstance(value, bool) or not isinstance(value, types) or not value >= least:
    raise UserError(f"{binding} = {value!r}; use {fix}")


def check_learning_rate(rate):
  """The schedule's peak rate as bound (None: unbound, its default, fine): negative would train
  uphill, without a word."""
  if isinstance(rate, (int, float)) and not isinstance(rate, bool) and not rate >= 0:
    raise UserError(f"learning_rate_schedule.learning_rate = {rate!r}; use a positive number, "
                    f"e.g. 6e-4")


def check_dataset(model, info, dataset_dir):
  """The dataset must fit the model's vocabulary and context."""
  if info["n_vocab"] > model.n_vocab:
    raise UserError(f"dataset {dataset_dir!r} has vocab size {info['n_vocab']} > "
                    f"GPT.n_vocab = {model.n_vocab}; raise GPT.n_vocab to at least "
                    f"{info['n_vocab']}")
  if info["n_ctx"] != model.n_ctx:
    raise UserError(f"dataset {dataset_dir!r} has n_ctx {info['n_ctx']} but GPT.n_ctx = "
                    f"{model.n_ctx}; set GPT.n_ctx = {info['n_ctx']} or prepare the data "
                    f"with --n_ctx={model.n_ctx}")


TRAINING_FIXES = ("lower train.batch_size or raise train.microbatches_per_batch, set "
                  "GPT.recompute_grad = True or train.precision = 'bfloat16', or split the model "
                  "over more devices (gptneo-search-layout --gin_file=... --devices=N)")


def training_estimate(s):
  """A step's estimated memory (gptneo/memory.py) on one device of the mesh's layout."""
  micro = s.batch_size // s.microbatches_per_batch
  return memory.per_device(
      memory.training_memory_bytes(s.model, micro, s.precision, s.optimizer),
      cost_model.Workload.of(s.model, s.batch_size, s.microbatches_per_batch, s.precision),
      s.mesh, s.optimizer)


def check_memory(s):
  """A step's estimated memory must fit the mesh's devices; analytic, before anything is
  built or allocated."""
  micro = s.batch_size // s.microbatches_per_batch
  estimate = training_estimate(s)
  what = (f"training {s.model.num_parameters() / 1e6:.0f}M parameters on batches of {micro} x "
          f"{s.model.n_ctx} tokens (train.batch_size / train.microbatches_per_batch, GPT.n_ctx)")
  memory.check(estimate, s.mesh, what, TRAINING_FIXES)


def check_first_records(dataset_dir, split, n_ctx):
  """The first record of each local shard of `split` must be a window of n_ctx + 1 tokens:
  a corrupt or foreign shard is named now, before the model dir is touched (a gs:// dataset's
  shards, fetched as they are read, are checked as they are read: `corrupt_shard`)."""
  for _, folder, _, info in inputs.components(dataset_dir):
    for name in info["splits"][split]["files"]:
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        _check_first_record(path, n_ctx)


def _check_first_record(path, n_ctx):
  rerun = "prepare the dataset again (gptneo-prepare-data --overwrite)"
  try:
    record = next(iter(tf.io.tf_record_iterator(path)), None)
    example = tf.train.Example.FromString(record) if record is not None else None
  except (tf.errors.OpError, ValueError) as error:  # DecodeError is a ValueError
    raise UserError(f"dataset shard {path} is corrupt ({record_error(error)}); {rerun}") from None
  if example is None:
    raise UserError(f"dataset shard {path} holds no window; {rerun}")
  tokens = example.features.feature[prepare.TOKEN_FEATURE].int64_list.value
  if len(tokens) != n_ctx + 1:
    raise UserError(f"dataset shard {path} holds windows of {len(tokens)} tokens, not "
                    f"n_ctx + 1 = {n_ctx + 1} as its dataset.json says; {rerun}")


def record_error(error):
  """What a record reader's error says about the record (TF's message of a session.run
  wraps it in the node's name and stack), else its first line."""
  lines = [line.strip() for line in (getattr(error, "message", None) or str(error)).splitlines()
           if line.strip()] or [type(error).__name__]
  return next((line for line in lines if " record" in line), lines[0])


def corrupt_shard(dataset_dir, splits):
  """The first local shard of `splits` whose records do not all read back whole, or None:
  what a DataLossError in the middle of a run (which names no file) was about."""
  for _, folder, _, info in inputs.components(dataset_dir):
    for split in splits:
      for name in info["splits"].get(split, {}).get("files", []):
        path = os.path.join(folder, name)
        try:
          for _ in tf.io.tf_record_iterator(path) if os.path.isfile(path) else ():
            pass
        except tf.errors.DataLossError:
          return path
  return None


def check_loop(spec, steps_per_loop):
  """Loops on the device exist on the TPU only."""
  if spec.implementation != "simd" and steps_per_loop != 1:
    raise UserError(f"train.steps_per_loop = {steps_per_loop} loops on a TPU only; drop it or "
                    f"set mesh.implementation = 'simd' (docs/tpu.md)")

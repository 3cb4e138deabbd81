"""Checkpoints that can be trusted: each committed by a manifest written last, found by listing
the model dir, verified before it is loaded; pruned and cleaned up here, not by TF's Saver.

Checkpoint N of a model dir is TF's `model.ckpt-N.index` and `model.ckpt-N.data-*` plus our
`model.ckpt-N.manifest.json` (each file's size and CRC-32), renamed into place once they are
all written: from that moment on the checkpoint exists. One without a manifest above a step
that has one was interrupted; one whose files disagree with its manifest was damaged since.
Checkpoints below every manifest predate manifests: they load as legacy, unverified. TF's
`checkpoint` index is kept current for TF's own tools and never read.

mtf keeps one slice variable per device; checkpoints hold the full master copies, so a
checkpoint written on one mesh restores onto any other.
"""
import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import re
import uuid
import zlib

from absl import logging

from gptneo import model_dir as model_dir_lib
from gptneo.compat import tf
from gptneo.errors import UserError

PREFIX = "model.ckpt"
MANIFEST_SUFFIX = ".manifest.json"
_FILE = re.compile(r"model\.ckpt-(\d+)\.(.+)")
# What interrupted writes leave behind: TF's partial checkpoint files, TF's partial
# `checkpoint` index, our manifest's temporary. Nothing else is ever deleted as partial.
_PARTIAL = re.compile(r"model\.ckpt-\d+\..*\.tempstate\d*|checkpoint\.tmp[0-9a-f]+|"
                      r"\.model\.ckpt-\d+\.manifest\.json\.[0-9a-f]+\.tmp")
_SHARD = re.compile(r".*\.data-(\d+)-of-(\d+)")
_CHUNK = 8 << 20


def path_of(model_dir, step):
  return os.path.join(model_dir, f"{PREFIX}-{step}")


def _manifest(step):
  return f"{PREFIX}-{step}{MANIFEST_SUFFIX}"


def _index(step):
  return f"{PREFIX}-{step}.index"


# --------------------------------------------------------------------------- finding


def _listing(model_dir):
  """{step: names of its files} in model_dir, without the partial files of interrupted writes."""
  try:
    names = os.listdir(model_dir)
  except FileNotFoundError:
    return {}
  except NotADirectoryError:
    raise UserError(f"model dir {model_dir!r} is a file; pass a folder as --model_dir") from None
  steps = {}
  for name in names:
    match = _FILE.fullmatch(name)
    if match and not _PARTIAL.fullmatch(name):
      steps.setdefault(int(match[1]), set()).add(name)
  return steps


def _committed(steps):
  return sorted(step for step, names in steps.items() if _manifest(step) in names)


def _is_legacy(steps, step, committed):
  """Written before manifests: an index, no manifest, and no manifest at a lower step."""
  names = steps[step]
  return (_index(step) in names and _manifest(step) not in names
          and not any(other < step for other in committed))


@dataclasses.dataclass(frozen=True)
class Newest:
  """The newest intact checkpoint of a model dir and the newer ones passed over."""
  path: str  # None: no intact checkpoint
  legacy: bool  # written before manifests: loaded unverified
  skipped: tuple  # ((path, why), ...) newest first


def newest(model_dir):
  """The newest intact checkpoint of model_dir (Newest), verifying newest first.

  Steps with neither an index nor a manifest are leftovers of a write that never got that
  far, not checkpoints: they are neither loaded nor reported. A model dir holding a link is
  refused (model_dir.check_links): TF would read a checkpoint file through it.
  """
  model_dir_lib.check_links(model_dir)
  steps = _listing(model_dir)
  committed = _committed(steps)
  skipped = []
  for step in sorted(steps, reverse=True):
    if not steps[step] & {_index(step), _manifest(step)}:
      continue
    problem = _problem(model_dir, step, steps[step], committed)
    if problem is None:
      return Newest(path_of(model_dir, step), step not in committed, tuple(skipped))
    skipped.append((path_of(model_dir, step), problem))
  return Newest(None, False, tuple(skipped))


_CHOSEN = {}  # model dir (normalized) -> (step, the flag or knob that chose it)


def choose(model_dir: str, step: int | None, knob: str = ""):
  """Makes this process read checkpoint `step` of `model_dir` (require) instead of the newest.

  Set at the edges: the reading programs' --checkpoint_step, training's train.init_from_step.
  Training's own resume (Checkpoints.latest) always takes the newest.

  Args:
    model_dir: the local model dir (a gs:// one's mirror) the process reads.
    step: the checkpoint's step; None: the newest again.
    knob: the flag or gin binding that chose it, for the messages.
  """
  _CHOSEN.pop(os.path.normpath(model_dir), None)
  if step is not None:
    _CHOSEN[os.path.normpath(model_dir)] = (int(step), knob)


def _chosen(model_dir, step, knob):
  """Newest of checkpoint `step`, refused in one line unless it is there and intact."""
  model_dir_lib.check_links(model_dir)
  steps = _listing(model_dir)
  saved = sorted(s for s, names in steps.items() if names & {_index(s), _manifest(s)})
  if step not in saved:
    raise UserError(f"{knob} = {step}: model dir {model_dir!r} has no checkpoint of that step; "
                    f"it has {saved or 'none'}")
  committed = _committed(steps)
  problem = _problem(model_dir, step, steps[step], committed)
  if problem:
    raise UserError(f"{knob} = {step}: checkpoint {path_of(model_dir, step)} is not intact "
                    f"({problem}); choose another of {saved}")
  return Newest(path_of(model_dir, step), step not in committed, ())


def require(model_dir):
  """The checkpoint this process reads of model_dir: the one `choose` named, else the newest
  intact; refused in one line if there is none."""
  if os.path.normpath(model_dir) in _CHOSEN:
    return _chosen(model_dir, *_CHOSEN[os.path.normpath(model_dir)])
  found = newest(model_dir)
  if found.path:
    return found
  if not found.skipped:
    raise UserError(f"model dir {model_dir!r} has no checkpoint; train one with "
                    f"gptneo-train --model_dir={model_dir} first")
  raise _none_intact(model_dir, found)


def _none_intact(model_dir, found):
  return UserError(f"model dir {model_dir!r} has no intact checkpoint ({_reasons(found)}); "
                   f"restore one from a copy, or train afresh in another --model_dir")


def _reasons(found, most=3):
  shown = [f"{os.path.basename(path)}: {why}" for path, why in found.skipped[:most]]
  more = len(found.skipped) - most
  return "; ".join(shown + ([f"{more} more"] if more > 0 else []))


def describe(found, verb="resumed from"):
  """One line: the checkpoint used, and why each newer one was passed over."""
  notes = ["written before checkpoints had manifests: unverified"] if found.legacy else []
  if found.skipped:
    notes.append(f"the newest intact checkpoint; skipped {_reasons(found)}")
  return f"{verb} {found.path}" + "".join(f" ({note})" for note in notes)


# --------------------------------------------------------------------------- verifying

# (checkpoint path, whether a lower step has a manifest, its files' stats) -> problem: a
# checkpoint is read through once per process and state, not once per caller.
_checked = {}


def _problem(model_dir, step, names, committed):
  """Why checkpoint `step` can't be loaded, or None."""
  below = any(other < step for other in committed)
  key = (os.path.abspath(path_of(model_dir, step)), below, _stats(model_dir, names))
  if key not in _checked:
    if _manifest(step) in names:
      _checked[key] = _verify(model_dir, step)
    elif below:
      _checked[key] = "no manifest: its write was interrupted"
    else:
      _checked[key] = _legacy_problem(model_dir, step, names)
  return _checked[key]


def _stats(model_dir, names):
  stats = []
  for name in sorted(names):
    with contextlib.suppress(FileNotFoundError):
      stat = os.stat(os.path.join(model_dir, name))
      stats.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
  return tuple(stats)


def _verify(model_dir, step):
  """None if checkpoint step's files are as its manifest says, else what is wrong."""
  try:
    with model_dir_lib.open_file(os.path.join(model_dir, _manifest(step))) as f:
      files = json.load(f)["files"]
    entries = [(name, int(entry["size"]), int(entry["crc32"])) for name, entry in files.items()]
  except UserError:  # a link, made since newest checked: refused, not taken for damage
    raise
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
    return f"its manifest is unreadable ({type(error).__name__})"
  for name, size, crc in sorted(entries):
    if not name.startswith(f"{PREFIX}-{step}.") or os.sep in name:
      return f"its manifest names {name!r}, not a file of this checkpoint"
    problem = _file_problem(os.path.join(model_dir, name), size, crc)
    if problem:
      return f"{name} {problem}"
  return None


def _file_problem(path, size, crc):
  try:
    actual = os.path.getsize(path)
  except FileNotFoundError:
    return "is missing"
  if actual != size:
    return (f"holds {actual} bytes, its manifest says {size} "
            f"({'truncated' if actual < size else 'grown since'})")
  if crc32(path) != crc:
    return "fails its checksum"
  return None


def crc32(path):
  """zlib's CRC-32 of a file's bytes (~3.5 GB/s here: bench/checkpoint_write.py)."""
  value = 0
  with model_dir_lib.open_file(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      value = zlib.crc32(chunk, value)
  return value


def _legacy_problem(model_dir, step, names):
  """A checkpoint without a manifest needs a readable index and every data shard it names."""
  try:
    tf.train.load_checkpoint(path_of(model_dir, step))
  except (tf.errors.OpError, ValueError) as error:
    return f"its index is unreadable ({type(error).__name__})"
  shards = [match for match in map(_SHARD.fullmatch, names) if match]
  if not shards or len(shards) != int(shards[0][2]):
    return "data files are missing"
  return None


# --------------------------------------------------------------------------- committing


def _write_manifest(model_dir, step):
  """model.ckpt-step.manifest.json, renamed into place once whole: the commit."""
  names = sorted(name for name in _listing(model_dir).get(step, ())
                 if not name.endswith(MANIFEST_SUFFIX))
  files = {}
  for name in names:
    path = os.path.join(model_dir, name)
    files[name] = {"size": os.path.getsize(path), "crc32": crc32(path)}
  text = json.dumps({"format": 1, "step": step, "files": files}, indent=1, sort_keys=True)
  final = os.path.join(model_dir, _manifest(step))
  # Hidden: a mirror never uploads it; named so that cleaning up knows it for ours.
  temporary = os.path.join(model_dir, f".{_manifest(step)}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    with open(temporary, "w") as f:
      f.write(text)
    os.replace(temporary, final)
  finally:
    _remove(temporary)


def _commit(model_dir, step, keep):
  """Commits checkpoint `step`; then TF's index, pruning to `keep` and the leftovers' cleanup."""
  _write_manifest(model_dir, step)
  steps = _listing(model_dir)
  kept, pruned = _prune_plan(steps, step, keep)
  # The index first: stopped between the two, it names fewer checkpoints than there are.
  tf.train.update_checkpoint_state(
      os.path.abspath(model_dir), f"{PREFIX}-{step}",
      [f"{PREFIX}-{old}" for old in sorted(kept)] + [f"{PREFIX}-{step}"])
  for old in pruned:
    _delete_step(model_dir, old, steps[old])
  _clean_up(model_dir, steps, step)


def _prune_plan(steps, step, keep):
  """(kept, pruned): of the complete checkpoints older than `step`, the keep - 1 newest are
  kept; `step` itself, the newest good one, always is, and newer ones are left alone."""
  committed = _committed(steps)
  older = sorted((old for old in steps if old < step
                  and (old in committed or _is_legacy(steps, old, committed))), reverse=True)
  if not keep or keep < 1:  # TF's convention: keep them all
    return older, []
  return older[:keep - 1], older[keep - 1:]


def _delete_step(model_dir, step, names):
  """The manifest first: interrupted, what is left is an uncommitted leftover."""
  for name in sorted(names, key=lambda name: name != _manifest(step)):
    _remove(os.path.join(model_dir, name))


def _clean_up(model_dir, steps, step):
  """Deletes what interrupted writes left: partial files, and the files of steps below the
  one just committed that never were (written before manifests excepted)."""
  for name in os.listdir(model_dir):
    if _PARTIAL.fullmatch(name):
      _remove(os.path.join(model_dir, name))
  committed = _committed(steps)
  for old, names in steps.items():
    if old < step and old not in committed and not _is_legacy(steps, old, committed):
      _delete_step(model_dir, old, names)


def _remove(path):
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


def _is_disk_full(error):
  if isinstance(error, OSError):
    return error.errno in (errno.ENOSPC, errno.EDQUOT)
  return any(text in str(error.message) for text in ("No space left", "quota exceeded"))


@contextlib.contextmanager
def _disk_full_is_one_line(model_dir, step):
  """A full disk ends the run in one line; the partial checkpoint goes, the others stay."""
  try:
    yield
  except (OSError, tf.errors.ResourceExhaustedError) as error:
    if not _is_disk_full(error):
      raise
    if not os.path.exists(os.path.join(model_dir, _manifest(step))):
      _delete_step(model_dir, step, _listing(model_dir).get(step, ()))
      for name in os.listdir(model_dir):
        if _PARTIAL.fullmatch(name) and f"{PREFIX}-{step}." in name:
          _remove(os.path.join(model_dir, name))
    raise UserError(f"no space left in model dir {model_dir} writing checkpoint {step}: free "
                    f"space there (the checkpoints before it are intact) and resume") from None


# --------------------------------------------------------------------------- the graph's


class Checkpoints:
  """Saves and restores a graph's mesh variables (their masters) plus any extra saveables."""

  def __init__(self, lowering, model_dir, keep=5, extra_saveables=()):
    self.model_dir, self.keep = model_dir, keep
    self._to_masters = lowering.copy_slices_to_masters()
    self._to_slices = lowering.copy_masters_to_slices()
    self._variables = tf.global_variables()
    # max_to_keep=None: we prune, after the new checkpoint's manifest is written.
    self._saver = tf.train.Saver(self._variables + list(extra_saveables), max_to_keep=None,
                                 sharded=False)
    self._extra_keys = [spec.name for saveable in extra_saveables for spec in saveable.specs]
    self.found = Newest(None, False, ())

  def check(self, warm_start_from=None):
    """Raises UserError (one line) unless the checkpoint a run would start from fits."""
    path = self.latest()
    if path:
      check_fits(path, self._variables, "checkpoint")
    elif warm_start_from:
      check_fits(require(warm_start_from).path, _weights(), "train.init_from checkpoint",
                 exact=False)

  def latest(self):
    """The newest intact checkpoint's path, or None if the model dir holds none at all.

    A model dir whose checkpoints are all damaged is refused: a run never starts over
    beside them.
    """
    if not self.model_dir:  # a graph built without one restores nothing
      return None
    self.found = newest(self.model_dir)
    if self.found.skipped and not self.found.path:
      raise _none_intact(self.model_dir, self.found)
    return self.found.path

  def describe(self):
    """One line on where the run starts (after restore_or_initialize)."""
    return describe(self.found) if self.found.path else "started"

  def restore_or_initialize(self, session, init_ops=(), warm_start_from=None):
    """Restores the latest checkpoint if any, else initializes; returns the restored path.

    With no checkpoint of its own, the weights of `warm_start_from` (a model dir) replace the
    fresh ones; optimizer state, step and data position start anew (fine-tuning).
    """
    session.run([tf.global_variables_initializer(), *init_ops])
    path = self.latest()
    if path:
      self._restore_variables(session, path)
    elif warm_start_from:
      _warm_start(session, warm_start_from)
    session.run(self._to_slices)
    release_freed_memory()
    return path

  def restore(self, session, path=None):
    """Restores `path`, by default the newest intact checkpoint; returns the path."""
    path = path or require(self.model_dir).path
    self._restore_variables(session, path)
    session.run(self._to_slices)
    release_freed_memory()
    return path

  def _restore_variables(self, session, path):
    """Restores `path` once check_fits accepts it; the variables alone when it holds no data
    position (a checkpoint imported from elsewhere, gpt_neo_checkpoint.py: the data starts
    anew)."""
    stored = check_fits(path, self._variables, "checkpoint")
    saver = self._saver
    if not all(key in stored for key in self._extra_keys):
      logging.warning("%s holds no data position (an imported checkpoint): the run resumes "
                      "at its step with the data from the start", path)
      saver = tf.train.Saver(self._variables, sharded=False)
    saver.restore(session, path)

  def save(self, session, step):
    """Writes checkpoint `step` and commits it; prunes to `keep` and deletes what interrupted
    writes left. A step already committed intact is not written again. Returns its path."""
    step = int(step)  # the loop's is numpy's
    path = path_of(self.model_dir, step)
    steps = _listing(self.model_dir)
    if step in _committed(steps) and not _problem(self.model_dir, step, steps[step], ()):
      return path
    session.run(self._to_masters)
    with _disk_full_is_one_line(self.model_dir, step):
      _remove(path + MANIFEST_SUFFIX)  # uncommitted while its files change
      self._saver.save(session, path, write_meta_graph=False, write_state=False)
      _commit(self.model_dir, step, self.keep)
    return path


def save_arrays(model_dir: str, step: int, arrays: dict, keep: int = 5) -> str:
  """Writes {variable name: numpy array} as checkpoint `step` of a local `model_dir` and
  commits it, as Checkpoints.save does a graph's (an import writes what no graph of ours
  trained). Returns its path."""
  path = path_of(model_dir, step)
  with _disk_full_is_one_line(model_dir, step):
    _remove(path + MANIFEST_SUFFIX)
    write_arrays(path, arrays)
    _commit(model_dir, step, keep)
  return path


def write_arrays(prefix: str, arrays: dict) -> None:
  """Writes {name: numpy array} as the TF checkpoint `prefix` (.index, .data-00000-of-00001),
  each tensor in its array's dtype: what tf.train.Saver writes of variables holding them.

  Args:
    prefix: the checkpoint's path without suffix, e.g. DIR/model.ckpt-7.
    arrays: {checkpoint key: array}; fed, not embedded, so no 2 GB graph limit applies.
  """
  names = sorted(arrays)
  with tf.Graph().as_default():
    feeds = {name: tf.placeholder(tf.as_dtype(arrays[name].dtype), arrays[name].shape)
             for name in names}
    save = tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
                             shape_and_slices=[""] * len(names),
                             tensors=[feeds[name] for name in names])
    with tf.Session() as session:
      session.run(save, {feeds[name]: arrays[name] for name in names})


def _warm_start(session, model_dir):
  """Copies every trainable weight that `model_dir`'s newest checkpoint holds, same shape."""
  source = require(model_dir).path
  check_fits(source, _weights(), "train.init_from checkpoint", exact=False)
  tf.train.Saver(_weights()).restore(session, source)


def _weights():
  """The trainable master variables (mtf's per-device slices are trainable but not global)."""
  masters = set(tf.global_variables())
  return [v for v in tf.trainable_variables() if v in masters]


_HINT = "use the gin config that wrote it (its model dir's operative_config.gin)"


def check_fits(path, variables, what, exact=True):
  """One line naming the first of `variables` the checkpoint lacks or holds in another shape;
  with `exact`, also the first model variable it holds that `variables` lack.

  Entries outside the variables' scopes (the data position) and below a variable (an
  optimizer's slots, e.g. gpt/wte/adam_m) are not model variables.

  Returns:
    {checkpoint key: shape} of everything the checkpoint holds.
  """
  stored = tf.train.load_checkpoint(path).get_variable_to_shape_map()
  for variable in variables:
    name, shape = variable.op.name, variable.shape.as_list()
    if stored.get(name) == shape:
      continue
    held = f"{name} of shape {stored[name]}" if name in stored else f"no {name}"
    hint = _HINT
    if name.endswith("/attn/qkv/w") and name.replace("/qkv/", "/q/") in stored:
      hint = ("it predates the fused attn/qkv weight (gptneo before 2026-11-30): train or "
              "import it again")
    raise UserError(f"{what} {path} has {held}, the model needs {shape}; {hint}")
  extra = _extra(stored, {variable.op.name for variable in variables}) if exact else []
  if extra:
    more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
    raise UserError(f"{what} {path} holds {extra[0]}{more} that the model lacks; {_HINT}")
  return stored


def _extra(stored, names):
  """The entries of `stored` in the scopes of `names` that are neither one nor below one."""
  scopes = {name.split("/")[0] + "/" for name in names if "/" in name}
  extra = []
  for entry in sorted(stored):
    parts = entry.split("/")
    owned = any("/".join(parts[:end]) in names for end in range(1, len(parts) + 1))
    if not owned and any(entry.startswith(scope) for scope in scopes):
      extra.append(entry)
  return extra


def release_freed_memory():
  """Hands the heap glibc keeps after large frees back to the system (malloc_trim).

  Initializing or restoring frees the initializers' values and the restore's buffers, a few
  hundred MiB for a 20m model, which glibc keeps mapped: the training step's peak RSS then
  sits that much higher (20m: 2621 vs 2458 MiB, bench/RESULTS.md's memory section). A no-op
  where the C library is not glibc.
  """
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass

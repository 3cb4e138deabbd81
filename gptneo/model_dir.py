"""What a model dir holds, and who may write it.

`contents`, `check_empty` and `clear` say what a model dir (a folder or a gs:// prefix) holds
and delete the model in one (bin/import_hf --overwrite). `lock` makes this process its one
writer: an OS file lock on the local folder (a gs:// dir's mirror), which the kernel releases
when the process dies, plus, for gs://, a lease object in the bucket (storage.Lease), since
machines share no kernel.

A model dir comes from someone else (a download, a shared bucket), so what is in it never
points a program outside it: `check_links` refuses a symbolic link anywhere inside, before
a program writes (`lock`) or reads a checkpoint (checkpoints.newest, which every reading
program calls first) or syncs a mirror up (storage.sync_up); `open_file` opens what we read
and write ourselves without following a link (O_NOFOLLOW), so one made after the check is
refused too. What TF opens itself (checkpoints, events files) only has the check. The model
dir itself may be a link: that path is the user's own choice.
"""
import contextlib
import datetime
import errno
import fcntl
import fnmatch
import json
import os
import socket
import sys

from gptneo import storage
from gptneo.errors import UserError

# What bin/train and bin/import_hf write into a model dir: what --overwrite deletes.
MODEL_FILES = ("model.ckpt-*", "checkpoint", "checkpoint.tmp*", "events.out.tfevents.*",
               "train_metrics.jsonl", "eval.jsonl", "operative_config.gin", "model.gin",
               "command.txt", "tokenizer.json", "wandb_run_id.txt")
MODEL_GIN = "model.gin"  # an imported model's shape (bin/train --gin_file of it)


def contents(model_dir):
  """The names a model dir holds, hidden ones (a lock, a mirror's records) aside; for gs://,
  its objects'."""
  if storage.is_remote(model_dir):
    return storage.object_names(model_dir)
  try:
    return sorted(name for name in os.listdir(model_dir) if not name.startswith("."))
  except FileNotFoundError:
    return []
  except NotADirectoryError:
    raise UserError(f"model dir {model_dir!r} is a file; pass a folder as --model_dir") from None


def check_empty(model_dir, overwrite=False):
  """Refuses (one line) a model dir that holds anything, unless overwrite."""
  names = contents(model_dir)
  if names and not overwrite:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise UserError(f"model dir {model_dir} is not empty (it holds {shown}); pass "
                    f"--overwrite to replace the model in it, or choose another --model_dir")


def clear(model_dir):
  """Deletes the model a local model dir holds (MODEL_FILES); any other file stays."""
  for name in contents(model_dir):
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILES):
      os.remove(os.path.join(model_dir, name))


def clear_for_import(model_dir, overwrite=False):
  """Makes a local model dir ready for an import to write (hf, gpt_neo_checkpoint): refused
  (one line) if it holds anything, unless `overwrite`; then the model it holds is deleted.
  Called once the import has read and checked everything, so bad input loses nothing."""
  check_empty(model_dir, overwrite)
  os.makedirs(model_dir, exist_ok=True)
  clear(model_dir)


def check_links(folder: str) -> None:
  """Refuses in one line a folder holding a symbolic link anywhere inside (not the folder
  itself): through it a program would write or read a file outside the model dir.

  Args:
    folder: a local model dir, or a gs:// one's mirror; one that does not exist holds none.
  """
  link = _first_link(folder)
  if link:
    raise _link_refusal(link)


def _first_link(folder):
  try:
    entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
  except (FileNotFoundError, NotADirectoryError):
    return None
  for entry in entries:
    if entry.is_symlink():
      return entry.path
    if entry.is_dir(follow_symlinks=False) and (link := _first_link(entry.path)):
      return link
  return None


def _link_refusal(path):
  try:
    target = os.readlink(path)
  except OSError:  # gone or replaced meanwhile
    target = "another file"
  return UserError(f"{path} is a link to {target}: a model dir's files must be inside it, and "
                   f"no program follows a link out of it; remove the link (or put a copy of "
                   f"the file in its place)")


_OPEN_FLAGS = {"r": os.O_RDONLY, "rb": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
               "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_CREAT |
               os.O_APPEND}


def open_file(path: str, mode: str = "r"):
  """open(path, mode) of a file in a local model dir, never through a symbolic link.

  Args:
    path: the file.
    mode: "r", "rb", "w", "wb" or "a".

  Returns:
    the open file object; a link at `path` is refused as `check_links` refuses it.
  """
  return os.fdopen(_open_no_follow(path, _OPEN_FLAGS[mode]), mode)


def _open_no_follow(path, flags):
  """os.open(path, flags), refusing a link at path (O_NOFOLLOW) as check_links does."""
  try:
    return os.open(path, flags | os.O_NOFOLLOW, 0o644)
  except OSError as error:
    if error.errno == errno.ELOOP:
      raise _link_refusal(path) from None
    raise


LOCK_NAME = ".lock"
FORCE_HELP = (f"Take over a gs:// model dir whose lease another machine holds: only when you "
              f"know the run there is dead (a lease goes stale by itself "
              f"{storage.LEASE_SECONDS / 60:.0f} minutes after its run stopped renewing it). "
              f"A local model dir that another process writes is always refused.")
_held = {}  # real path of a locked folder -> its Writer: this process takes each once


class Writer:
  """This process's hold on a model dir (from `lock`); `release` it, or use it as a context.

  A run that fails without releasing keeps it until the process ends (then the kernel frees
  the lock; a gs:// lease goes stale, or a run of this machine takes it over).
  """

  def __init__(self, folder, fd, created, lease):
    self.folder, self._fd, self._created, self.lease = folder, fd, created, lease

  def release(self):
    if self._fd is None:
      return
    if self.lease:
      self.lease.release()
    # Deleted while still locked: a process that opened it meanwhile sees it unlinked once it
    # gets the lock, and locks a new one (_flock). Not while a shared holder still holds it:
    # a new file would let an exclusive one in beside it.
    if _sole_holder(self._fd):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(self.folder, LOCK_NAME))
    os.close(self._fd)
    self._fd = None
    _held.pop(os.path.realpath(self.folder), None)
    if self._created:  # made for this run, which wrote nothing into it
      with contextlib.suppress(OSError):
        os.rmdir(self.folder)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.release()


def lock(model_dir, force=False, shared=False, what="model dir",
         fix="wait for it to end, or use another --model_dir"):
  """Makes this process the one writer of model_dir; refuses in one line one that another
  process writes.

  Args:
    model_dir: a folder, or gs://bucket/prefix: its mirror is locked and its lease taken.
    force: take over a gs:// lease another machine holds (a run there that died recently);
      a local lock is held by a live process only and is never taken over.
    shared: hold the lock together with other shared holders (the drivers of one sweep
      search, which its study keeps apart); an exclusive holder excludes them all.
    what, fix: the refusal's words: "{what} {model_dir} is being written by ...; {fix}".

  Returns:
    the Writer (the same one if this process holds it already).
  """
  remote = storage.is_remote(model_dir)
  folder = storage.mirror_folder(model_dir) if remote else model_dir
  if os.path.realpath(folder) in _held:
    return _held[os.path.realpath(folder)]
  check_links(folder)  # before anything is written: a .lock link, or any other
  created = not os.path.exists(folder)
  try:
    os.makedirs(folder, exist_ok=True)
    fd = _flock(folder, f"{what} {model_dir}", fix, shared)
  except (FileExistsError, NotADirectoryError):
    raise UserError(f"model dir {folder} is a file, or inside one; pass a folder as "
                    f"--model_dir") from None
  except OSError as error:
    raise UserError(f"cannot write model dir {folder}: {error.strerror}; pass a --model_dir "
                    f"you may write") from None
  writer = Writer(folder, fd, created, None)
  if remote:
    try:
      writer.lease = storage.Lease(model_dir, {**_me(), "mirror": folder}).acquire(force)
    except BaseException:
      writer.release()
      raise
  _held[os.path.realpath(folder)] = writer
  return writer


@contextlib.contextmanager
def importing(uri: str, overwrite: bool = False, force: bool = False):
  """The local folder an import (bin/import_hf, bin/import_gpt_neo) writes the model dir
  `uri` in, this process its one writer (`lock`). One holding anything is refused (one line,
  unless `overwrite`) before a gs:// one is downloaded; a gs:// one is written in its mirror
  and uploaded once the import is done. The import calls clear_for_import itself, once its
  input is checked."""
  with lock(uri, force):
    check_empty(uri, overwrite)
    folder = storage.working_copy(uri)
    yield folder
    storage.sync_up(folder, uri)


def _flock(folder, locked, fix, shared):
  """An open descriptor of folder/.lock, locked (shared: LOCK_SH); refuses in one line a lock
  held already: "{locked} is being written by {holder}; {fix}" (a shared lock's record names
  its latest holder)."""
  path = os.path.join(folder, LOCK_NAME)
  while True:
    fd = _open_no_follow(path, os.O_RDWR | os.O_CREAT)  # a link made since check_links
    try:
      fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(fd)
      os.close(fd)
      raise UserError(f"{locked} is being written by {holder}; {fix}") from None
    if _is_linked(fd, path):
      break
    os.close(fd)  # its holder released it meanwhile, and deleted it
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps(_me()).encode())
  return fd


def is_locked(folder: str) -> bool:
  """Whether a process holds the lock of a local folder (see `lock`); this one too, through
  another open file.

  Args:
    folder: a local model dir, or a gs:// one's mirror.
  """
  try:
    fd = _open_no_follow(os.path.join(folder, LOCK_NAME), os.O_RDONLY)
  except (FileNotFoundError, NotADirectoryError):
    return False
  try:
    return not _sole_holder(fd)
  finally:
    os.close(fd)  # and with it, the lock _sole_holder took


def _sole_holder(fd):
  """Whether no other process holds the lock of fd's file; takes it exclusively if so."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  return True


def _is_linked(fd, path):
  try:
    return os.lstat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False


def _me():
  since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
  return {"program": os.path.basename(sys.argv[0]) or "python", "pid": os.getpid(),
          "host": socket.gethostname(), "since": since}


def _holder(fd):
  """Who holds the lock, as its holder wrote it into the lock file."""
  try:
    record = json.loads(os.pread(fd, 4096, 0))
    return (f"{record['program']} (pid {record['pid']} on {record['host']}, since "
            f"{record['since']})")
  except (OSError, ValueError, KeyError, TypeError):
    return "another process"

"""Google Cloud Storage for datasets: mirror a gs:// prefix locally, upload a folder to one.

The only module that knows GCS. It uses the google-cloud-storage client rather than
TensorFlow's gs:// filesystem, because the client can be pointed at an emulator
(STORAGE_EMULATOR_HOST=http://host:port, with anonymous credentials), which is how the
tests run it.

A mirrored prefix lives in `<cache_dir>/gcs/<bucket>/<prefix>`, with MANIFEST_NAME
recording the generation and size of every object it holds. A dataset's shards are not
mirrored for training: `gptneo.data.shard_cache` fetches them one by one into the same folder
(list_blobs, download_blob) and evicts them. Many files move in parallel (transfer_manager's
threads), one group of COMPLETING_FILES rank after the other.
"""
import contextlib
import fnmatch
import functools
import json
import os
import threading
import time
import uuid

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import storage as gcs
from google.cloud.storage import retry as gcs_retry
from google.cloud.storage import transfer_manager
import requests
import tqdm
from gptneo.errors import UserError

SCHEME = "gs://"
CACHE_DIR_ENV = "GPTNEO_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/gptneo"
MANIFEST_NAME = ".gptneo-manifest.json"
LEASE_NAME = ".lease"  # the object naming a gs:// model dir's writer (Lease)
# Files that say the rest is all there: a prepared dataset's dataset.json, a checkpoint's
# manifest (checkpoints.py), TF's `checkpoint` index of a model dir. Moved after everything
# else, in this order, so a prefix (or mirror) holding one never lacks what it names; deleted
# before the rest, in the reverse order.
COMPLETING_FILES = ("dataset.json", "*.manifest.json", "checkpoint")
_EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# The client's own policy, transient errors retried for up to 2 minutes; named once, so
# every call here waits alike (and a test can wait less).
_RETRY = gcs_retry.DEFAULT_RETRY
TRANSFER_WORKERS = 8  # files uploaded or downloaded at once (transfer_manager threads)


def is_remote(path):
  """True for a `gs://` URI, False for a local path."""
  return str(path).startswith(SCHEME)


def split_uri(uri):
  """Returns (bucket, prefix) of 'gs://bucket/prefix/', the prefix without slashes at its ends."""
  bucket, _, prefix = str(uri)[len(SCHEME):].partition("/")
  if not is_remote(uri) or not bucket:
    raise UserError(f"'{uri}' is not a gs://bucket/prefix URI; pass e.g. gs://my-bucket/data")
  return bucket, prefix.strip("/")


# --------------------------------------------------------------------------- client, errors


def _client():
  # Keyed by the emulator host, so a test that points it elsewhere gets a fresh client.
  return _client_for(os.environ.get(_EMULATOR_ENV))


@functools.lru_cache(maxsize=None)
def _client_for(emulator_host):  # pylint: disable=unused-argument
  # project=None: listing, reading and writing objects bill the bucket's project, so a
  # user whose credentials name no project can still use a bucket they may access.
  return gcs.Client(project=None)


@contextlib.contextmanager
def _gcs_errors(uri):
  """Turns the client's auth, permission, not-found and network errors into one-line ValueErrors."""
  bucket = split_uri(uri)[0]
  try:
    yield
  except (api_exceptions.Unauthorized, api_exceptions.Forbidden,
          auth_exceptions.DefaultCredentialsError, auth_exceptions.RefreshError) as error:
    raise UserError(f"{uri}: access denied ({_first_line(error)}); run `gcloud auth "
                    "application-default login` with an account that may use the bucket "
                    f"gs://{bucket}") from None
  except api_exceptions.NotFound:
    raise UserError(f"{uri}: not found: bucket gs://{bucket} does not exist or an object "
                    "vanished meanwhile; check the bucket name (`gcloud storage ls`) "
                    "and try again") from None
  except (requests.ConnectionError, requests.Timeout, auth_exceptions.TransportError,
          api_exceptions.RetryError) as error:
    raise UserError(f"{uri}: cannot reach Cloud Storage ({type(error).__name__}); check the "
                    f"network, or {_EMULATOR_ENV} if you use an emulator") from None
  except api_exceptions.GoogleAPICallError as error:
    raise UserError(f"{uri}: Cloud Storage refused ({_first_line(error)}); "
                    "check the bucket and try again") from None


def _first_line(error):
  text = str(error).strip().splitlines()
  return text[0][:200] if text else type(error).__name__


def _list_objects(bucket, prefix):
  """Blobs under prefix/ (the whole bucket for ''), folder placeholders and the writer's
  lease (never mirrored: it changes while the files don't) skipped."""
  folder_prefix = f"{prefix}/" if prefix else ""  # 'data/' must not match 'data2/...'.
  blobs = _client().list_blobs(bucket, prefix=folder_prefix, retry=_RETRY)
  return [blob for blob in blobs
          if not blob.name.endswith("/") and blob.name != folder_prefix + LEASE_NAME]


def object_names(uri):
  """The relative names of the objects under a gs:// prefix, sorted (the lease aside)."""
  bucket, prefix = split_uri(uri)
  with _gcs_errors(uri):
    return sorted(_relative_name(blob, prefix) for blob in _list_objects(bucket, prefix))


def list_blobs(uri):
  """{relative name: blob} of the objects under a gs:// prefix (the lease aside); each blob
  carries the generation and size it was listed with."""
  bucket, prefix = split_uri(uri)
  with _gcs_errors(uri):
    return {_relative_name(blob, prefix): blob for blob in _list_objects(bucket, prefix)}


def read_text(uri):
  """The text of the one object at a gs:// URI, or None if there is none (no mirroring: for
  a small file of a prefix whose other objects are big, e.g. a model dir's logs)."""
  bucket, name = split_uri(uri)
  with _gcs_errors(uri):
    blob = _client().bucket(bucket).get_blob(name, retry=_RETRY)
    return None if blob is None else blob.download_as_bytes(retry=_RETRY).decode()


def upload_file(path, uri):
  """Uploads one local file as the object at a gs:// URI (no mirror involved)."""
  bucket, name = split_uri(uri)
  with _gcs_errors(uri):
    _client().bucket(bucket).blob(name).upload_from_filename(path, retry=_RETRY)


def _relative_name(blob, prefix):
  name = blob.name[len(prefix) + 1:] if prefix else blob.name
  if os.path.isabs(name) or ".." in name.split("/"):
    raise UserError(f"object gs://{blob.bucket.name}/{blob.name} escapes its prefix; "
                    "rename it without '..' parts")
  return name


# --------------------------------------------------------------------------- download


def cache_dir_of(cache_dir=None):
  """The cache root: cache_dir, else $GPTNEO_CACHE_DIR, else ~/.cache/gptneo."""
  return os.path.expanduser(cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)


def local_copy(uri, cache_dir=None, must_exist=True, only=None):
  """Mirrors every object under a gs:// prefix into the local cache; returns that folder.

  Objects the cache holds at the same generation and size are not downloaded again;
  objects gone remotely are removed locally.

  Args:
    uri: gs://bucket/prefix, or a local path (returned unchanged).
    cache_dir: cache root; default $GPTNEO_CACHE_DIR, else ~/.cache/gptneo.
    must_exist: refuse a prefix that holds nothing (a dataset); False for a model dir a
      run is about to fill.
    only: if given, a function of a relative name: download only the objects it is true
      for (a dataset's small files; its shards come through shard_cache). The others are
      left as they are, unless they vanished remotely.

  Returns:
    The local folder `<cache_dir>/gcs/<bucket>/<prefix>`.
  """
  if not is_remote(uri):
    return uri
  folder = mirror_folder(uri, cache_dir)
  bucket, prefix = split_uri(uri)
  with _gcs_errors(uri):
    blobs = {_relative_name(blob, prefix): blob for blob in _list_objects(bucket, prefix)}
    if not blobs and must_exist:
      raise UserError(f"{uri.rstrip('/')} holds no files; check the path or run "
                      f"gptneo-prepare-data --output_dir={uri.rstrip('/')}")
    cached = read_manifest(folder)
    _remove_vanished(folder, cached, blobs)
    missing = {name: blob for name, blob in blobs.items()
               if (only is None or only(name)) and not is_cached(folder, name, blob, cached)}
    _download(uri, folder, missing, cached)
  return folder


def mirror_folder(uri, cache_dir=None):
  """The local folder that mirrors a gs:// prefix: `<cache_dir>/gcs/<bucket>/<prefix>`."""
  bucket, prefix = split_uri(uri)
  return os.path.normpath(os.path.join(cache_dir_of(cache_dir), "gcs", bucket, prefix))


def read_manifest(folder):
  """{relative name: {"generation", "size"}} of what folder holds; {} when unreadable."""
  try:
    with open(os.path.join(folder, MANIFEST_NAME)) as f:
      return json.load(f)["objects"]
  except (OSError, ValueError, KeyError, TypeError):
    return {}  # No mirror yet, or a damaged one: download everything again.


def write_manifest(folder, objects):
  """Records {relative name: {"generation", "size", "mtime_ns"}} as what folder holds."""
  atomic_write(os.path.join(folder, MANIFEST_NAME),
                lambda path: _write_json(path, {"objects": objects}))


def _write_json(path, value):
  with open(path, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)


def is_cached(folder, name, blob, cached):
  """True if folder holds the object as listed (generation, size), unchanged since."""
  entry = cached.get(name) or {}
  path = os.path.join(folder, name)
  if (entry.get("generation"), entry.get("size")) != (blob.generation, blob.size):
    return False
  # The file on disk too: one truncated, deleted or changed since is fetched again.
  return os.path.isfile(path) and not _changed(folder, name, cached)


def _remove_vanished(folder, cached, blobs):
  for name in [name for name in cached if name not in blobs]:
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(folder, name))
    del cached[name]


def _download(uri, folder, blobs, cached):
  """Downloads blobs into folder, in parallel within each COMPLETING_FILES rank, the ranks
  in order; each recorded in the manifest once in place."""
  os.makedirs(folder, exist_ok=True)
  try:
    if not blobs:
      return
    total = sum(blob.size for blob in blobs.values())
    with tqdm.tqdm(total=total, desc=f"downloading {uri}", unit="B", unit_scale=True) as bar:
      for group in _transfer_groups(blobs):
        _download_group(folder, {name: blobs[name] for name in group}, cached)
        bar.update(sum(blobs[name].size for name in group))
  finally:  # Also after an interruption, so the next call resumes where this one stopped.
    write_manifest(folder, cached)


def _download_group(folder, blobs, cached):
  """Downloads blobs at once (transfer_manager threads) to hidden names, then renames them."""
  # As listed: downloading resets blob.generation from the response headers.
  entries = {name: {"generation": blob.generation, "size": blob.size}
             for name, blob in blobs.items()}
  temporaries = {name: _temporary(os.path.join(folder, name)) for name in blobs}
  try:
    for name in blobs:
      cached.pop(name, None)  # Until the new version is in place, the old entry lies.
      os.makedirs(os.path.dirname(temporaries[name]), exist_ok=True)
    transfer_manager.download_many(
        [(blobs[name], temporaries[name]) for name in blobs], download_kwargs={"retry": _RETRY},
        worker_type=transfer_manager.THREAD, max_workers=TRANSFER_WORKERS,
        raise_exception=True)
    for name, temporary in temporaries.items():
      path = os.path.join(folder, name)
      os.replace(temporary, path)
      cached[name] = {**entries[name], "mtime_ns": os.stat(path).st_mtime_ns}
  finally:
    for temporary in temporaries.values():
      with contextlib.suppress(FileNotFoundError):
        os.remove(temporary)


def download_blob(blob, path):
  """Downloads one listed object to path (through a hidden temporary name); returns its
  manifest entry (see write_manifest)."""
  entry = {"generation": blob.generation, "size": blob.size}
  with _gcs_errors(f"{SCHEME}{blob.bucket.name}/{blob.name}"):
    atomic_write(path, functools.partial(blob.download_to_filename, retry=_RETRY))
  return {**entry, "mtime_ns": os.stat(path).st_mtime_ns}


def atomic_write(path, write):
  """Calls write(temporary path) next to path, then renames it into place."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  temporary = _temporary(path)
  try:
    write(temporary)
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise


def _temporary(path):
  """A hidden name next to path: an interrupted write never looks like the finished file."""
  directory, name = os.path.split(path)
  return os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.partial")


# --------------------------------------------------------------------------- upload


def check_upload_target(uri, overwrite=False):
  """Raises unless the prefix is empty or overwrite is True; returns the blobs it holds."""
  bucket, prefix = split_uri(uri)
  with _gcs_errors(uri):
    existing = _list_objects(bucket, prefix)
  if existing and not overwrite:
    raise UserError(f"{uri} already holds {len(existing)} objects; pass --overwrite to "
                    "replace them or choose another --output_dir")
  return existing


def upload_folder(local_dir, uri, overwrite=False):
  """Uploads every file of local_dir to a gs:// prefix, dataset.json last.

  Args:
    local_dir: the folder to upload (files in subfolders keep their relative paths;
      hidden files and folders are skipped).
    uri: gs://bucket/prefix to upload to.
    overwrite: replace what the prefix holds: its dataset.json is deleted first, the
      objects the new folder lacks once the upload is complete.
  """
  files = _local_files(local_dir)
  if not files:
    raise UserError(f"'{local_dir}' holds no files to upload; pass a prepared dataset folder")
  bucket_name, prefix = split_uri(uri)
  existing = check_upload_target(uri, overwrite)  # Again: someone may have written meanwhile.
  names = {_object_name(prefix, name) for name in files}
  with _gcs_errors(uri):
    bucket = _client().bucket(bucket_name)
    completing = {_object_name(prefix, name) for name in files if _completion_rank(name)}
    _delete(bucket, [blob.name for blob in existing if blob.name in completing])
    _upload_files(bucket, local_dir, prefix, files, f"uploading {uri}", {}, leave=True)
    _delete(bucket, [blob.name for blob in existing if blob.name not in names])


def _local_files(local_dir):
  """Relative paths of the files under local_dir, sorted, COMPLETING_FILES last."""
  files = []
  for directory, subdirs, filenames in os.walk(local_dir):
    # Hidden entries are tool state (a mirror's manifest, partial downloads), not data.
    subdirs[:] = [d for d in subdirs if not d.startswith(".")]
    relative = os.path.relpath(directory, local_dir)
    files.extend(os.path.normpath(os.path.join(relative, name)).replace(os.sep, "/")
                 for name in filenames if not name.startswith("."))
  return _in_transfer_order(files)


def _in_transfer_order(names):
  return sorted(names, key=lambda name: (_completion_rank(name), name))


def _transfer_groups(names):
  """names in groups that may move at once: the data, then each COMPLETING_FILES rank."""
  ordered = _in_transfer_order(names)
  ranks = sorted({_completion_rank(name) for name in ordered})
  return [[name for name in ordered if _completion_rank(name) == rank] for rank in ranks]


def _completion_rank(name):
  """0 for data, else 1 + the index of the COMPLETING_FILES pattern the name matches."""
  ranks = (rank for rank, pattern in enumerate(COMPLETING_FILES, 1)
           if fnmatch.fnmatchcase(name, pattern))
  return next(ranks, 0)


def _object_name(prefix, name):
  return "/".join(filter(None, [prefix, name]))


def _upload_files(bucket, local_dir, prefix, names, description, uploaded, leave):
  """Uploads names under prefix, in parallel within each COMPLETING_FILES rank, the ranks in
  order; records each group's manifest entries in `uploaded` once it is up; a tqdm bar by
  bytes."""
  total = sum(os.path.getsize(os.path.join(local_dir, name)) for name in names)
  with tqdm.tqdm(total=total, desc=description, unit="B", unit_scale=True, disable=not names,
                 leave=leave) as bar:
    for group in _transfer_groups(names):
      entries = _upload_group(bucket, local_dir, prefix, group)
      uploaded.update(entries)
      bar.update(sum(entry["size"] for entry in entries.values()))


def _delete(bucket, names):
  for name in names:
    with contextlib.suppress(api_exceptions.NotFound):  # Already gone is what we want.
      bucket.blob(name).delete(retry=_RETRY)


# --------------------------------------------------------------------------- model dirs


def working_copy(model_dir, cache_dir=None):
  """The local folder a run works in: model_dir itself, or a gs:// model dir's mirror.

  Args:
    model_dir: a local folder or gs://bucket/prefix (which may hold nothing yet).
    cache_dir: cache root; default $GPTNEO_CACHE_DIR, else ~/.cache/gptneo.

  Returns:
    A local folder; for gs://, `sync_up` sends back what the run writes into it. Work a
    stopped run left unsynced in the mirror is sent up first, unless uri changed since the
    mirror's last sync: then uri wins and the mirror is brought back to it.
  """
  if is_remote(model_dir):
    folder = mirror_folder(model_dir, cache_dir)
    if _remote_as_last_synced(folder, model_dir):
      # A run here stopped between a checkpoint and its sync: its work is the newest.
      sync_up(folder, model_dir)
  return local_copy(model_dir, cache_dir, must_exist=False)


def _remote_as_last_synced(folder, uri):
  """True if this mirror synced last and nobody wrote to uri since; then local changes win."""
  cached = read_manifest(folder)
  bucket, prefix = split_uri(uri)
  with _gcs_errors(uri):
    remote = {_relative_name(blob, prefix): blob.generation
              for blob in _list_objects(bucket, prefix)}
  return bool(cached) and remote == {name: entry.get("generation")
                                     for name, entry in cached.items()}


def sync_up(local_dir, uri):
  """Uploads what changed in a working copy since it was mirrored or last synced.

  Checkpoint data first, then their manifests, TF's `checkpoint` index last
  (COMPLETING_FILES), so the remote never commits a checkpoint that is not all there; then
  objects whose local file is gone (old checkpoints pruned) are deleted remotely, manifests
  first. A local uri: nothing to do. A link in local_dir is refused (model_dir.check_links):
  its upload would send the file it points to.

  Args:
    local_dir: the folder `working_copy(uri)` returned.
    uri: the gs:// model dir.
  """
  if not is_remote(uri):
    return
  # Here, not at the top: model_dir imports storage.
  from gptneo import model_dir as model_dir_lib  # pylint: disable=g-import-not-at-top
  model_dir_lib.check_links(local_dir)
  if uri.rstrip("/") in _leases:  # a writer that lost its lease must not write on
    _leases[uri.rstrip("/")].check()
  bucket_name, prefix = split_uri(uri)
  cached = read_manifest(local_dir)
  changed = [name for name in _local_files(local_dir) if _changed(local_dir, name, cached)]
  gone = [name for name in cached if not os.path.isfile(os.path.join(local_dir, name))]
  with _gcs_errors(uri):
    bucket = _client().bucket(bucket_name)
    try:
      _upload_files(bucket, local_dir, prefix, _in_transfer_order(changed), f"syncing {uri}",
                    cached, leave=False)
      _delete(bucket, [_object_name(prefix, name) for name in reversed(_in_transfer_order(gone))])
      for name in gone:
        del cached[name]
    finally:  # What went up is recorded, also when a later upload failed.
      write_manifest(local_dir, cached)


def _changed(folder, name, cached):
  stat = os.stat(os.path.join(folder, name))
  entry = cached.get(name) or {}
  return (entry.get("size"), entry.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns)


def _upload_group(bucket, folder, prefix, names):
  """Uploads files at once (transfer_manager threads); returns their manifest entries (as of
  the bytes read)."""
  stats = {name: os.stat(os.path.join(folder, name)) for name in names}
  blobs = {name: bucket.blob(_object_name(prefix, name)) for name in names}
  transfer_manager.upload_many(
      [(os.path.join(folder, name), blobs[name]) for name in names],
      upload_kwargs={"retry": _RETRY}, worker_type=transfer_manager.THREAD,
      max_workers=TRANSFER_WORKERS, raise_exception=True)
  return {name: {"generation": blobs[name].generation, "size": stats[name].st_size,
                 "mtime_ns": stats[name].st_mtime_ns} for name in names}


# --------------------------------------------------------------------------- the writer's lease

LEASE_SECONDS = 300.0  # a lease not renewed for this long is stale
_leases = {}  # gs:// model dir -> the Lease this process holds on it


class Lease:
  """This process's claim to write a gs:// prefix: the object `<prefix>/.lease` (LEASE_NAME),
  naming its holder and when it renewed it last.

  Every write of it is conditional on the generation its writer saw last (0: that there is
  none), so of two runs claiming it at once, one fails. The holder renews it every seconds / 4
  from a thread; one not renewed for `seconds` is stale and another run may take it over. A run
  whose lease was taken over (--force) or could not be renewed in time finds out at its next
  sync_up, which refuses in one line.

  Args:
    uri: the gs:// model dir.
    holder: who claims it: {"program", "pid", "host", "since", "mirror"} (model_dir.lock).
    seconds: when the lease goes stale (default LEASE_SECONDS).
  """

  def __init__(self, uri, holder, seconds=None):
    self.uri, self.holder = uri.rstrip("/"), dict(holder)
    self.seconds = seconds or LEASE_SECONDS
    bucket, prefix = split_uri(uri)
    # A client of its own: the renewing thread must not share the main thread's session.
    self._blob = gcs.Client(project=None).bucket(bucket).blob(_object_name(prefix, LEASE_NAME))
    self._generation, self.lost = None, None
    self._stop, self._thread = threading.Event(), None

  def acquire(self, force=False):
    """Claims the lease, then renews it until `release`; refuses (one line) a lease another
    live run holds, unless `force`. Returns self."""
    with _gcs_errors(self.uri):
      record, generation = self._read()
      if record is not None and not force and not self._may_take(record):
        raise UserError(self._held_by(record))
      if not self._write(generation):
        raise UserError(self._held_by(self._read()[0] or {}) + " (it claimed it just now)")
    _leases[self.uri] = self
    self._thread = threading.Thread(target=self._renew, name=f"lease {self.uri}", daemon=True)
    self._thread.start()
    return self

  def check(self):
    """Raises UserError (one line) once the lease is lost: this run must not write on."""
    if self.lost:
      raise UserError(f"{self.uri}: this run lost its lease ({self.lost}) and stops writing "
                      f"there; its work since the last sync stays in {self.holder['mirror']}")

  def release(self):
    """Stops renewing and deletes the lease, unless another run holds it by now."""
    self._stop.set()
    if self._thread:
      self._thread.join()
    _leases.pop(self.uri, None)
    if self.lost or self._generation is None:
      return
    # Failing to delete is harmless: the lease goes stale by itself.
    with contextlib.suppress(api_exceptions.GoogleAPICallError, requests.RequestException):
      self._blob.delete(if_generation_match=self._generation,
                        retry=gcs_retry.DEFAULT_RETRY_IF_GENERATION_SPECIFIED)

  def _read(self):
    """(the lease's record, its generation); (None, 0) if there is none. A record that is not
    a JSON object reads as {}, which names no holder and never goes stale."""
    while True:
      blob = self._blob.bucket.get_blob(self._blob.name, retry=_RETRY)
      if blob is None:
        return None, 0
      try:
        data = blob.download_as_bytes(if_generation_match=blob.generation, retry=_RETRY)
      except (api_exceptions.PreconditionFailed, api_exceptions.NotFound):
        continue  # renewed or released between the two requests: read it again
      try:
        record = json.loads(data)
      except ValueError:
        record = {}
      return (record if isinstance(record, dict) else {}), blob.generation

  def _write(self, generation):
    """Writes our record if the lease is still at `generation`; False if another run wrote it."""
    record = {**self.holder, "renewed": time.time(), "seconds": self.seconds,
              "write": uuid.uuid4().hex}
    try:
      self._blob.upload_from_string(json.dumps(record), content_type="application/json",
                                    if_generation_match=generation,
                                    retry=gcs_retry.DEFAULT_RETRY_IF_GENERATION_SPECIFIED)
      self._generation = self._blob.generation
    except api_exceptions.PreconditionFailed:
      # A retry of a write whose answer was lost fails so too: then the lease holds ours.
      current, current_generation = self._read()
      if not current or current.get("write") != record["write"]:
        return False
      self._generation = current_generation
    return True

  def holder_alive(self):
    """The record of whoever holds the lease now and renews it in time, else None (no lease,
    or a stale one): a read that takes nothing, for `--status` from another machine."""
    with _gcs_errors(self.uri):
      record, _ = self._read()
    return None if record is None or self._is_stale(record) else record

  def _is_stale(self, record):
    renewed, seconds = record.get("renewed"), record.get("seconds", self.seconds)
    return _is_number(renewed) and _is_number(seconds) and time.time() - renewed > seconds

  def _may_take(self, record):
    """A stale lease, or one of an earlier run on this machine and mirror: holding the
    mirror's lock (model_dir.lock), we know that run is gone."""
    if self._is_stale(record):
      return True
    return [record.get(key) for key in ("host", "mirror")] == [self.holder["host"],
                                                                self.holder["mirror"]]

  def _held_by(self, record):
    """Who holds the lease, and what to do about it."""
    renewed, seconds = record.get("renewed"), record.get("seconds", self.seconds)
    holder = _holder(record)
    if not (_is_number(renewed) and _is_number(seconds)):
      return (f"{self.uri} is leased by {holder}, its lease {LEASE_NAME} unreadable; if no run "
              f"writes there, pass --force")
    age = max(0.0, time.time() - renewed)
    return (f"{self.uri} is being written by {holder}, its lease renewed {age:.0f}s ago; if "
            f"that run is dead, wait {max(0.0, seconds - age):.0f}s for the lease to go stale, "
            f"or pass --force")

  def _renew(self):
    """Renews every seconds / 4 until released; sets `lost` when it can't."""
    last = time.monotonic()
    while not self._stop.wait(self.seconds / 4):
      try:
        if not self._write(self._generation):
          self.lost = f"{_holder(self._read()[0] or {})} took it over"
          return
        last = time.monotonic()
      except Exception as error:  # pylint: disable=broad-except  (retried; lost in time)
        if time.monotonic() - last > self.seconds:
          self.lost = f"it could not be renewed for {self.seconds:.0f}s: {_first_line(error)}"
          return


def _holder(record):
  return (f"{record.get('program', 'a run')} (pid {record.get('pid', '?')} on "
          f"{record.get('host', 'an unknown host')})")


def _is_number(value):
  return type(value) in (int, float)

"""Google Cloud Storage for datasets: mirror a gs:// prefix locally, upload a folder to one.

The only module that knows GCS. It uses the google-cloud-storage client rather than
TensorFlow's gs:// filesystem, because the client can be pointed at an emulator
(STORAGE_EMULATOR_HOST=http://host:port, with anonymous credentials), which is how the
tests run it.

A mirrored prefix lives in `<cache_dir>/gcs/<bucket>/<prefix>`, with MANIFEST_NAME
recording the generation and size of every object it holds.
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


def read_text(uri):
  """The text of the one object at a gs:// URI, or None if there is none (no mirroring: for
  a small file of a prefix whose other objects are big, e.g. a model dir's logs)."""
  bucket, name = split_uri(uri)
  with _gcs_errors(uri):
    blob = _client().bucket(bucket).get_blob(name, retry=_RETRY)
    return None if blob is None else blob.download_as_bytes(retry=_RETRY).decode()


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


def local_copy(uri, cache_dir=None, must_exist=True):
  """Mirrors every object under a gs:// prefix into the local cache; returns that folder.

  Objects the cache holds at the same generation and size are not downloaded again;
  objects gone remotely are removed locally.

  Args:
    uri: gs://bucket/prefix, or a local path (returned unchanged).
    cache_dir: cache root; default $GPTNEO_CACHE_DIR, else ~/.cache/gptneo.
    must_exist: refuse a prefix that holds nothing (a dataset); False for a model dir a
      run is about to fill.

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
                      f"bin/prepare_data --output_dir={uri.rstrip('/')}")
    cached = _read_manifest(folder)
    _remove_vanished(folder, cached, blobs)
    missing = {name: blob for name, blob in blobs.items()
               if not _is_cached(folder, name, blob, cached)}
    _download(uri, folder, missing, cached)
  return folder


def mirror_folder(uri, cache_dir=None):
  """The local folder that mirrors a gs:// prefix: `<cache_dir>/gcs/<bucket>/<prefix>`."""
  bucket, prefix = split_uri(uri)
  return os.path.normpath(os.path.join(cache_dir_of(cache_dir), "gcs", bucket, prefix))


def _read_manifest(folder):
  """{relative name: {"generation", "size"}} of what folder holds; {} when unreadable."""
  try:
    with open(os.path.join(folder, MANIFEST_NAME)) as f:
      return json.load(f)["objects"]
  except (OSError, ValueError, KeyError, TypeError):
    return {}  # No mirror yet, or a damaged one: download everything again.


def _write_manifest(folder, objects):
  _atomic_write(os.path.join(folder, MANIFEST_NAME),
                lambda path: _write_json(path, {"objects": objects}))


def _write_json(path, value):
  with open(path, "w") as f:
    json.dump(value, f, indent=1, sort_keys=True)


def _is_cached(folder, name, blob, cached):
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
  """Downloads blobs into folder, COMPLETING_FILES last, each recorded in the manifest once in
  place."""
  os.makedirs(folder, exist_ok=True)
  try:
    if not blobs:
      return
    total = sum(blob.size for blob in blobs.values())
    with tqdm.tqdm(total=total, desc=f"downloading {uri}", unit="B", unit_scale=True) as bar:
      for name in _in_transfer_order(blobs):
        blob = blobs[name]
        # As listed: downloading resets blob.generation from the response headers.
        entry = {"generation": blob.generation, "size": blob.size}
        cached.pop(name, None)  # Until the new version is in place, the old entry lies.
        path = os.path.join(folder, name)
        _atomic_write(path, functools.partial(blob.download_to_filename, retry=_RETRY))
        cached[name] = {**entry, "mtime_ns": os.stat(path).st_mtime_ns}
        bar.update(entry["size"])
  finally:  # Also after an interruption, so the next call resumes where this one stopped.
    _write_manifest(folder, cached)


def _atomic_write(path, write):
  """Calls write(temporary path) next to path, then renames it into place."""
  directory, name = os.path.split(path)
  os.makedirs(directory, exist_ok=True)
  # A hidden temporary name: an interrupted write never looks like the finished file.
  temporary = os.path.join(directory, f".{name}.{uuid.uuid4().hex[:8]}.partial")
  try:
    write(temporary)
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temporary)
    raise


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


def _completion_rank(name):
  """0 for data, else 1 + the index of the COMPLETING_FILES pattern the name matches."""
  ranks = (rank for rank, pattern in enumerate(COMPLETING_FILES, 1)
           if fnmatch.fnmatchcase(name, pattern))
  return next(ranks, 0)


def _object_name(prefix, name):
  return "/".join(filter(None, [prefix, name]))


def _upload_files(bucket, local_dir, prefix, names, description, uploaded, leave):
  """Uploads names (in that order) under prefix, recording each one's manifest entry in
  `uploaded` as soon as it is up; a tqdm bar by bytes."""
  total = sum(os.path.getsize(os.path.join(local_dir, name)) for name in names)
  with tqdm.tqdm(total=total, desc=description, unit="B", unit_scale=True, disable=not names,
                 leave=leave) as bar:
    for name in names:
      uploaded[name] = _upload(bucket, local_dir, name, _object_name(prefix, name))
      bar.update(uploaded[name]["size"])


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
  cached = _read_manifest(folder)
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
  first. A local uri: nothing to do.

  Args:
    local_dir: the folder `working_copy(uri)` returned.
    uri: the gs:// model dir.
  """
  if not is_remote(uri):
    return
  if uri.rstrip("/") in _leases:  # a writer that lost its lease must not write on
    _leases[uri.rstrip("/")].check()
  bucket_name, prefix = split_uri(uri)
  cached = _read_manifest(local_dir)
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
      _write_manifest(local_dir, cached)


def _changed(folder, name, cached):
  stat = os.stat(os.path.join(folder, name))
  entry = cached.get(name) or {}
  return (entry.get("size"), entry.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns)


def _upload(bucket, folder, name, object_name):
  """Uploads one file; returns its manifest entry (as of the bytes read)."""
  path = os.path.join(folder, name)
  stat = os.stat(path)
  blob = bucket.blob(object_name)
  blob.upload_from_filename(path, retry=_RETRY)
  return {"generation": blob.generation, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


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

  def _may_take(self, record):
    """A stale lease, or one of an earlier run on this machine and mirror: holding the
    mirror's lock (model_dir.lock), we know that run is gone."""
    renewed, seconds = record.get("renewed"), record.get("seconds", self.seconds)
    if _is_number(renewed) and _is_number(seconds) and time.time() - renewed > seconds:
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

"""The local mirror of a gs:// prefix: `<cache_dir>/gcs/<bucket>/<prefix>`, with MANIFEST_NAME
recording the generation and size of every object it holds; filled by `local_copy` (many
files at once, one COMPLETING_FILES rank after the other) or one object at a time
(`download_blob`, for `gptneo.data.shard_cache`)."""
import contextlib
import functools
import json
import os

from google.cloud.storage import transfer_manager
import tqdm
from gptneo.errors import UserError
from gptneo.storage import files
from gptneo.storage import gcs

CACHE_DIR_ENV = "GPTNEO_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/gptneo"
MANIFEST_NAME = ".gptneo-manifest.json"


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
  if not gcs.is_remote(uri):
    return uri
  folder = mirror_folder(uri, cache_dir)
  bucket, prefix = gcs.split_uri(uri)
  with gcs.errors(uri):
    blobs = {gcs.relative_name(blob, prefix): blob for blob in gcs.list_objects(bucket, prefix)}
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
  bucket, prefix = gcs.split_uri(uri)
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
  files.atomic_write(os.path.join(folder, MANIFEST_NAME),
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
  return os.path.isfile(path) and not changed(folder, name, cached)


def changed(folder, name, cached):
  stat = os.stat(os.path.join(folder, name))
  entry = cached.get(name) or {}
  return (entry.get("size"), entry.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns)


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
      for group in gcs.transfer_groups(blobs):
        _download_group(folder, {name: blobs[name] for name in group}, cached)
        bar.update(sum(blobs[name].size for name in group))
  finally:  # Also after an interruption, so the next call resumes where this one stopped.
    write_manifest(folder, cached)


def _download_group(folder, blobs, cached):
  """Downloads blobs at once (transfer_manager threads) to hidden names, then renames them."""
  # As listed: downloading resets blob.generation from the response headers.
  entries = {name: {"generation": blob.generation, "size": blob.size}
             for name, blob in blobs.items()}
  temporaries = {name: files.temporary(os.path.join(folder, name)) for name in blobs}
  try:
    for name in blobs:
      cached.pop(name, None)  # Until the new version is in place, the old entry lies.
      os.makedirs(os.path.dirname(temporaries[name]), exist_ok=True)
    transfer_manager.download_many(
        [(blobs[name], temporaries[name]) for name in blobs], download_kwargs={"retry": gcs.RETRY},
        worker_type=transfer_manager.THREAD, max_workers=gcs.TRANSFER_WORKERS,
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
  with gcs.errors(f"{gcs.SCHEME}{blob.bucket.name}/{blob.name}"):
    files.atomic_write(path, functools.partial(blob.download_to_filename, retry=gcs.RETRY))
  return {**entry, "mtime_ns": os.stat(path).st_mtime_ns}

"""Sending local folders to gs:// prefixes: a dataset uploaded whole (`upload_folder`), a
model dir's working copy (`working_copy`) synced up as a run writes it (`sync_up`)."""
import os

from google.cloud.storage import transfer_manager
import tqdm
from gptneo.errors import UserError
from gptneo.storage import gcs
from gptneo.storage import lease
from gptneo.storage import mirror


def check_upload_target(uri, overwrite=False):
  """Raises unless the prefix is empty or overwrite is True; returns the blobs it holds."""
  bucket, prefix = gcs.split_uri(uri)
  with gcs.errors(uri):
    existing = gcs.list_objects(bucket, prefix)
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
  bucket_name, prefix = gcs.split_uri(uri)
  existing = check_upload_target(uri, overwrite)  # Again: someone may have written meanwhile.
  names = {gcs.object_name(prefix, name) for name in files}
  with gcs.errors(uri):
    bucket = gcs.client().bucket(bucket_name)
    completing = {gcs.object_name(prefix, name) for name in files if gcs.completion_rank(name)}
    gcs.delete(bucket, [blob.name for blob in existing if blob.name in completing])
    _upload_files(bucket, local_dir, prefix, files, f"uploading {uri}", {}, leave=True)
    gcs.delete(bucket, [blob.name for blob in existing if blob.name not in names])


def _local_files(local_dir):
  """Relative paths of the files under local_dir, sorted, COMPLETING_FILES last."""
  files = []
  for directory, subdirs, filenames in os.walk(local_dir):
    # Hidden entries are tool state (a mirror's manifest, partial downloads), not data.
    subdirs[:] = [d for d in subdirs if not d.startswith(".")]
    relative = os.path.relpath(directory, local_dir)
    files.extend(os.path.normpath(os.path.join(relative, name)).replace(os.sep, "/")
                 for name in filenames if not name.startswith("."))
  return gcs.in_transfer_order(files)


def _upload_files(bucket, local_dir, prefix, names, description, uploaded, leave):
  """Uploads names under prefix, in parallel within each COMPLETING_FILES rank, the ranks in
  order; records each group's manifest entries in `uploaded` once it is up; a tqdm bar by
  bytes."""
  total = sum(os.path.getsize(os.path.join(local_dir, name)) for name in names)
  with tqdm.tqdm(total=total, desc=description, unit="B", unit_scale=True, disable=not names,
                 leave=leave) as bar:
    for group in gcs.transfer_groups(names):
      entries = _upload_group(bucket, local_dir, prefix, group)
      uploaded.update(entries)
      bar.update(sum(entry["size"] for entry in entries.values()))


def _upload_group(bucket, folder, prefix, names):
  """Uploads files at once (transfer_manager threads); returns their manifest entries (as of
  the bytes read)."""
  stats = {name: os.stat(os.path.join(folder, name)) for name in names}
  blobs = {name: bucket.blob(gcs.object_name(prefix, name)) for name in names}
  transfer_manager.upload_many(
      [(os.path.join(folder, name), blobs[name]) for name in names],
      upload_kwargs={"retry": gcs.RETRY}, worker_type=transfer_manager.THREAD,
      max_workers=gcs.TRANSFER_WORKERS, raise_exception=True)
  return {name: {"generation": blobs[name].generation, "size": stats[name].st_size,
                 "mtime_ns": stats[name].st_mtime_ns} for name in names}


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
  if gcs.is_remote(model_dir):
    folder = mirror.mirror_folder(model_dir, cache_dir)
    if _remote_as_last_synced(folder, model_dir):
      # A run here stopped between a checkpoint and its sync: its work is the newest.
      sync_up(folder, model_dir)
  return mirror.local_copy(model_dir, cache_dir, must_exist=False)


def _remote_as_last_synced(folder, uri):
  """True if this mirror synced last and nobody wrote to uri since; then local changes win."""
  cached = mirror.read_manifest(folder)
  bucket, prefix = gcs.split_uri(uri)
  with gcs.errors(uri):
    remote = {gcs.relative_name(blob, prefix): blob.generation
              for blob in gcs.list_objects(bucket, prefix)}
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
  if not gcs.is_remote(uri):
    return
  # Here, not at the top: model_dir imports storage.
  from gptneo import model_dir as model_dir_lib  # pylint: disable=g-import-not-at-top
  model_dir_lib.check_links(local_dir)
  lease.HELD.check(uri)  # a writer that lost its lease must not write on
  bucket_name, prefix = gcs.split_uri(uri)
  cached = mirror.read_manifest(local_dir)
  changed = [name for name in _local_files(local_dir) if mirror.changed(local_dir, name, cached)]
  gone = [name for name in cached if not os.path.isfile(os.path.join(local_dir, name))]
  with gcs.errors(uri):
    bucket = gcs.client().bucket(bucket_name)
    try:
      _upload_files(bucket, local_dir, prefix, gcs.in_transfer_order(changed), f"syncing {uri}",
                    cached, leave=False)
      gcs.delete(bucket, [gcs.object_name(prefix, name) for name in reversed(gcs.in_transfer_order(gone))])
      for name in gone:
        del cached[name]
    finally:  # What went up is recorded, also when a later upload failed.
      mirror.write_manifest(local_dir, cached)

"""Cloud Storage itself: gs:// URIs, the client, its errors as one line, listing and single
objects, and the order many objects move in (COMPLETING_FILES last).

It uses the google-cloud-storage client rather than TensorFlow's gs:// filesystem, because
the client can be pointed at an emulator (STORAGE_EMULATOR_HOST=http://host:port, with
anonymous credentials), which is how the tests run it.
"""
import contextlib
import fnmatch
import functools
import os

from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import storage as cloud_storage
from google.cloud.storage import retry as gcs_retry
import requests
from gptneo.errors import UserError

SCHEME = "gs://"
LEASE_NAME = ".lease"  # the object naming a gs:// model dir's writer (lease.Lease)
# Files that say the rest is all there: a prepared dataset's dataset.json, a checkpoint's
# manifest (checkpoints.py), TF's `checkpoint` index of a model dir. Moved after everything
# else, in this order, so a prefix (or mirror) holding one never lacks what it names; deleted
# before the rest, in the reverse order.
COMPLETING_FILES = ("dataset.json", "*.manifest.json", "checkpoint")
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
# The client's own policy, transient errors retried for up to 2 minutes; named once, so
# every call here waits alike (and a test can wait less). Read as gcs.RETRY at each call.
RETRY = gcs_retry.DEFAULT_RETRY
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


def client():
  """The process's Cloud Storage client (one per emulator host)."""
  # Keyed by the emulator host, so a test that points it elsewhere gets a fresh client.
  return _client_for(os.environ.get(EMULATOR_ENV))


@functools.lru_cache(maxsize=None)
def _client_for(emulator_host):  # pylint: disable=unused-argument
  # project=None: listing, reading and writing objects bill the bucket's project, so a
  # user whose credentials name no project can still use a bucket they may access.
  return cloud_storage.Client(project=None)


@contextlib.contextmanager
def errors(uri):
  """Turns the client's auth, permission, not-found and network errors into one-line ValueErrors."""
  bucket = split_uri(uri)[0]
  try:
    yield
  except (api_exceptions.Unauthorized, api_exceptions.Forbidden,
          auth_exceptions.DefaultCredentialsError, auth_exceptions.RefreshError) as error:
    raise UserError(f"{uri}: access denied ({first_line(error)}); run `gcloud auth "
                    "application-default login` with an account that may use the bucket "
                    f"gs://{bucket}") from None
  except api_exceptions.NotFound:
    raise UserError(f"{uri}: not found: bucket gs://{bucket} does not exist or an object "
                    "vanished meanwhile; check the bucket name (`gcloud storage ls`) "
                    "and try again") from None
  except (requests.ConnectionError, requests.Timeout, auth_exceptions.TransportError,
          api_exceptions.RetryError) as error:
    raise UserError(f"{uri}: cannot reach Cloud Storage ({type(error).__name__}); check the "
                    f"network, or {EMULATOR_ENV} if you use an emulator") from None
  except api_exceptions.GoogleAPICallError as error:
    raise UserError(f"{uri}: Cloud Storage refused ({first_line(error)}); "
                    "check the bucket and try again") from None


def first_line(error):
  text = str(error).strip().splitlines()
  return text[0][:200] if text else type(error).__name__


def list_objects(bucket, prefix):
  """Blobs under prefix/ (the whole bucket for ''), folder placeholders and the writer's
  lease (never mirrored: it changes while the files don't) skipped."""
  folder_prefix = f"{prefix}/" if prefix else ""  # 'data/' must not match 'data2/...'.
  blobs = client().list_blobs(bucket, prefix=folder_prefix, retry=RETRY)
  return [blob for blob in blobs
          if not blob.name.endswith("/") and blob.name != folder_prefix + LEASE_NAME]


def object_names(uri):
  """The relative names of the objects under a gs:// prefix, sorted (the lease aside)."""
  bucket, prefix = split_uri(uri)
  with errors(uri):
    return sorted(relative_name(blob, prefix) for blob in list_objects(bucket, prefix))


def list_blobs(uri):
  """{relative name: blob} of the objects under a gs:// prefix (the lease aside); each blob
  carries the generation and size it was listed with."""
  bucket, prefix = split_uri(uri)
  with errors(uri):
    return {relative_name(blob, prefix): blob for blob in list_objects(bucket, prefix)}


def read_text(uri):
  """The text of the one object at a gs:// URI, or None if there is none (no mirroring: for
  a small file of a prefix whose other objects are big, e.g. a model dir's logs)."""
  bucket, name = split_uri(uri)
  with errors(uri):
    blob = client().bucket(bucket).get_blob(name, retry=RETRY)
    return None if blob is None else blob.download_as_bytes(retry=RETRY).decode()


def upload_file(path, uri):
  """Uploads one local file as the object at a gs:// URI (no mirror involved)."""
  bucket, name = split_uri(uri)
  with errors(uri):
    client().bucket(bucket).blob(name).upload_from_filename(path, retry=RETRY)


def relative_name(blob, prefix):
  name = blob.name[len(prefix) + 1:] if prefix else blob.name
  if os.path.isabs(name) or ".." in name.split("/"):
    raise UserError(f"object gs://{blob.bucket.name}/{blob.name} escapes its prefix; "
                    "rename it without '..' parts")
  return name


def object_name(prefix, name):
  return "/".join(filter(None, [prefix, name]))


def delete(bucket, names):
  for name in names:
    with contextlib.suppress(api_exceptions.NotFound):  # Already gone is what we want.
      bucket.blob(name).delete(retry=RETRY)


def in_transfer_order(names):
  return sorted(names, key=lambda name: (completion_rank(name), name))


def transfer_groups(names):
  """names in groups that may move at once: the data, then each COMPLETING_FILES rank."""
  ordered = in_transfer_order(names)
  ranks = sorted({completion_rank(name) for name in ordered})
  return [[name for name in ordered if completion_rank(name) == rank] for rank in ranks]


def completion_rank(name):
  """0 for data, else 1 + the index of the COMPLETING_FILES pattern the name matches."""
  ranks = (rank for rank, pattern in enumerate(COMPLETING_FILES, 1)
           if fnmatch.fnmatchcase(name, pattern))
  return next(ranks, 0)

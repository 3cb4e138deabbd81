"""Google Cloud Storage: mirror a gs:// prefix locally, upload a folder to one, sync a model
dir's working copy up, lease a prefix to one writer. The only package that knows GCS.

Its rooms: `gcs` (URIs, the client and its errors in one line, listing, single objects, the
order files move in), `mirror` (the local copy of a prefix and its manifest; downloads),
`upload` (uploads and syncs), `lease` (the writer's lease and the leases this process holds),
`files` (atomic local writes). Everything callers use is importable from here, as
`storage.X`.

A mirrored prefix lives in `<cache_dir>/gcs/<bucket>/<prefix>`, with MANIFEST_NAME
recording the generation and size of every object it holds. A dataset's shards are not
mirrored for training: `gptneo.data.shard_cache` fetches them one by one into the same folder
(list_blobs, download_blob) and evicts them. Many files move in parallel (transfer_manager's
threads), one group of COMPLETING_FILES rank after the other.
"""
from gptneo.storage.files import atomic_write
from gptneo.storage.gcs import COMPLETING_FILES
from gptneo.storage.gcs import is_remote
from gptneo.storage.gcs import LEASE_NAME
from gptneo.storage.gcs import list_blobs
from gptneo.storage.gcs import object_names
from gptneo.storage.gcs import read_text
from gptneo.storage.gcs import SCHEME
from gptneo.storage.gcs import split_uri
from gptneo.storage.gcs import TRANSFER_WORKERS
from gptneo.storage.gcs import upload_file
from gptneo.storage.lease import HELD
from gptneo.storage.lease import HeldLeases
from gptneo.storage.lease import Lease
from gptneo.storage.lease import LEASE_SECONDS
from gptneo.storage.mirror import cache_dir_of
from gptneo.storage.mirror import CACHE_DIR_ENV
from gptneo.storage.mirror import DEFAULT_CACHE_DIR
from gptneo.storage.mirror import download_blob
from gptneo.storage.mirror import is_cached
from gptneo.storage.mirror import local_copy
from gptneo.storage.mirror import MANIFEST_NAME
from gptneo.storage.mirror import mirror_folder
from gptneo.storage.mirror import read_manifest
from gptneo.storage.mirror import write_manifest
from gptneo.storage.upload import check_upload_target
from gptneo.storage.upload import sync_up
from gptneo.storage.upload import upload_folder
from gptneo.storage.upload import working_copy

__all__ = [
    "atomic_write", "COMPLETING_FILES", "is_remote", "LEASE_NAME", "list_blobs", "object_names",
    "read_text", "SCHEME", "split_uri", "TRANSFER_WORKERS", "upload_file", "HELD", "HeldLeases",
    "Lease", "LEASE_SECONDS", "cache_dir_of", "CACHE_DIR_ENV", "DEFAULT_CACHE_DIR",
    "download_blob", "is_cached", "local_copy", "MANIFEST_NAME", "mirror_folder",
    "read_manifest", "write_manifest", "check_upload_target", "sync_up", "upload_folder",
    "working_copy",
]

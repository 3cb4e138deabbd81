"""A bounded local cache of gs:// datasets' shards: a dataset larger than the local disk trains.

A gs:// dataset is not mirrored whole. Its small files (dataset.json, tokenizer.json) are
(`storage.local_copy`), into `$GPTNEO_CACHE_DIR/gcs/<bucket>/<prefix>`; its shards
(`*.tfrecord`) are fetched into the same folder when an input pipeline reaches them:

  * `$GPTNEO_CACHE_MAX_BYTES` (bytes, or a number with K, M, G or T: powers of 1024; unset:
    no limit) bounds the bytes of the shards this process keeps, downloads under way
    included. The least recently used shard that no pipeline is reading goes first.
  * While a pipeline reads a shard, a background thread downloads its next PREFETCH_SHARDS.
  * The pipeline reads the shards in the order it reads a local dataset's files (the same
    seeded shuffle of the same names), and a checkpoint's iterator state names the shard being
    read, which a resumed run fetches again: it sees the same batches.

One cache per process (`current()`); each pipeline over cached shards is a `_Stream`, pinning
the shard it reads. The limit must hold one shard per pipeline read at once (training and its
validation: two), checked when the pipeline is built.
"""
import collections
import contextlib
import fcntl
import fnmatch
import gc
import os
import queue
import re
import threading
import weakref

from absl import logging
import tensorflow.compat.v1 as tf

from gptneo import storage
from gptneo.errors import UserError

MAX_BYTES_ENV = "GPTNEO_CACHE_MAX_BYTES"
PREFETCH_SHARDS = 2  # shards downloaded ahead of the one each pipeline reads
SHARD_PATTERN = "*.tfrecord"  # what bin/prepare_data writes its windows to
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_caches = {}  # (cache root, $GPTNEO_CACHE_MAX_BYTES) -> ShardCache


def is_shard(name):
  """True for a dataset's shard (fetched on demand), False for its small files (mirrored)."""
  return fnmatch.fnmatchcase(os.path.basename(name), SHARD_PATTERN)


def parse_size(text):
  """Bytes of '20G', '512M', '1000000' (K, M, G, T: powers of 1024); UserError otherwise."""
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
  size = int(float(match[1]) * _UNITS[match[2].upper()]) if match else 0
  if size <= 0:
    raise UserError(f"{MAX_BYTES_ENV}={text!r} is not a positive size; set it to bytes or a "
                    "number with K, M, G or T, e.g. 20G, or unset it for no limit")
  return size


def current():
  """This process's cache for the current $GPTNEO_CACHE_DIR and $GPTNEO_CACHE_MAX_BYTES."""
  limit = os.environ.get(MAX_BYTES_ENV, "")
  key = (storage.cache_dir_of(), limit)
  if key not in _caches:
    _caches[key] = ShardCache(parse_size(limit) if limit else None)
  return _caches[key]


def local_folder(uri):
  """Mirrors a gs:// dataset's small files, hands its shards to the cache; returns the folder
  where both live."""
  folder = storage.local_copy(uri, only=lambda name: not is_shard(name))
  current().add(uri, folder)
  return folder


def names(paths):
  """The names a pipeline reads paths by: the gs:// URIs of cached shards (a checkpoint's
  iterator state holds them, which any machine's cache can fetch), else paths."""
  cache = _holding(paths, lambda cache: cache._uris)  # pylint: disable=protected-access
  return [cache._uris[path] for path in paths] if cache else paths  # pylint: disable=protected-access


def flat_map(files, names_, read):
  """`files.flat_map(read)`; if `names_` are cached shards (see `names`), each fetched into
  the cache first, the next ones prefetched while one is read.

  Args:
    files: a `tf.data.Dataset` of `names_`, in the order they are to be read.
    names_: what `names` returned (a list of str).
    read: local path -> `tf.data.Dataset` of its records (e.g. tf.data.TFRecordDataset).
  """
  cache = _holding(names_, lambda cache: cache._blobs)  # pylint: disable=protected-access
  if cache is None:
    return files.flat_map(read)
  stream = cache.stream(names_)
  announced = files.map(lambda uri: _py_str(stream.announce, uri)).prefetch(PREFETCH_SHARDS)
  # In flat_map's function: a restored iterator calls it again for the shard it was reading.
  return announced.flat_map(lambda uri: read(_py_str(stream.ensure, uri)))


def _holding(keys, table):
  """The newest cache whose table holds all keys, or None."""
  return next((cache for cache in reversed(list(_caches.values()))
               if keys and all(key in table(cache) for key in keys)), None)


def _py_str(function, text):
  # numpy_function, not py_function: no eager tensors, a fraction of the cost per call.
  result = tf.numpy_function(lambda t: function(t.decode()).encode(), [text], tf.string,
                             stateful=True)
  result.set_shape([])
  return result


class ShardCache:
  """The shards of the gs:// datasets this process reads, on local disk within max_bytes.

  Attributes:
    max_bytes: the limit (None: none).
    high_water: the most bytes it held at once, downloads under way included.
    downloads: shards downloaded so far.
  """

  def __init__(self, max_bytes):
    self.max_bytes, self.high_water, self.downloads = max_bytes, 0, 0
    # A shard is known by its gs:// URI; it lives at a local path.
    self._blobs = {}  # URI -> (local path, folder, relative name, blob)
    self._uris = {}  # local path -> URI
    self._present = collections.OrderedDict()  # URI -> bytes, least recently used first
    self._loading = {}  # URI -> bytes, downloads under way
    self._ahead = collections.Counter()  # announced, not read yet
    self._manifests = {}  # folder -> storage manifest of what it holds
    self._streams = weakref.WeakSet()  # pipelines alive (a graph holds each)
    self._lock = threading.Condition()
    self._queue = queue.Queue()
    threading.Thread(target=self._prefetch, name="shard prefetch", daemon=True).start()

  def add(self, uri, folder):
    """Takes on a gs:// dataset's shards: those already in folder as listed count as cached,
    the least recently downloaded first; others there are removed."""
    listed = {name: blob for name, blob in storage.list_blobs(uri).items() if is_shard(name)}
    if self.max_bytes and listed:
      name, blob = max(listed.items(), key=lambda item: item[1].size)
      if blob.size > self.max_bytes:
        raise UserError(f"{MAX_BYTES_ENV}={self.max_bytes} is smaller than shard {name} of "
                        f"{uri} ({blob.size} bytes); set it to at least two shards (training and "
                        f"validation read one each): {2 * blob.size}")
    with self._lock:
      manifest = self._manifests.setdefault(folder, storage.read_manifest(folder))
      for name, blob in listed.items():
        self._take_on(uri, folder, name, blob, manifest)
      self._present = collections.OrderedDict(sorted(
          self._present.items(), key=lambda item: os.stat(self._blobs[item[0]][0]).st_mtime_ns))
      self._make_room(0, spare_ahead=False)  # a larger limit's leftovers
      storage.write_manifest(folder, manifest)

  def _take_on(self, uri, folder, name, blob, manifest):
    path, shard = os.path.join(folder, name), f"{uri.rstrip('/')}/{name}"
    self._blobs[shard], self._uris[path] = (path, folder, name, blob), shard
    if shard in self._present or shard in self._loading:
      return
    if storage.is_cached(folder, name, blob, manifest):
      self._present[shard] = blob.size
      return
    manifest.pop(name, None)
    _remove_unless_read(path)  # an older version of the object

  def stream(self, shards):
    """A new pipeline's stream over shards (URIs); refuses a limit that cannot hold a shard
    for each live pipeline."""
    largest = max(self._blobs[shard][3].size for shard in shards)
    stream = _Stream(self, largest)
    needed = largest + sum(other.largest for other in self._streams)
    if self.max_bytes and needed > self.max_bytes:
      gc.collect()  # pipelines of graphs gone may linger until collected
      needed = largest + sum(other.largest for other in self._streams)
    if self.max_bytes and needed > self.max_bytes:
      raise UserError(f"{MAX_BYTES_ENV}={self.max_bytes} cannot hold a shard for each of the "
                      f"{len(self._streams) + 1} input pipelines read at once (training, "
                      f"validation): set it to at least {needed}")
    self._streams.add(stream)
    return stream

  def announce(self, path):
    """A pipeline will read shard `path` (a URI) soon: download it in the background if
    there is room."""
    with self._lock:
      self._ahead[path] += 1
    self._queue.put(path)

  def ensure(self, stream, path):
    """Has shard `path` (a URI) on disk for `stream` to read (pinned until it reads another),
    waiting for it; returns its local path."""
    with self._lock:
      self._ahead[path] = max(0, self._ahead[path] - 1)
      stream.release()
      stream.current = path  # unpins the shard it read before
      while True:
        self._fetch(path)
        if stream.hold(self._blobs[path][0]):
          break
        self._present.pop(path)  # another process on this machine evicted it: again
      self._present.move_to_end(path)
      return self._blobs[path][0]

  def _fetch(self, path):
    """Downloads path unless present, waiting for room or for another download of it (the
    lock held, but released while downloading)."""
    collected = False
    while path not in self._present:
      if path in self._loading or not self._reserve(path, spare_ahead=False):
        if not self._loading and not collected:
          gc.collect()  # pipelines of graphs gone may still pin (and lock) a shard
          collected = True
          continue
        if not self._loading:
          raise UserError(f"{MAX_BYTES_ENV}={self.max_bytes} cannot hold {path} besides "
                          "the shards being read; raise it")
        self._lock.wait()
        continue
      self._lock.release()
      try:
        self._download(path)
      finally:
        self._lock.acquire()

  def _reserve(self, path, spare_ahead):
    """Makes room for path and counts it as loading; False if there is no room."""
    size = self._blobs[path][3].size
    if not self._make_room(size, spare_ahead):
      return False
    self._loading[path] = size
    self.high_water = max(self.high_water, self._used())
    return True

  def _make_room(self, size, spare_ahead):
    """Evicts least recently used shards no pipeline reads (with spare_ahead: nor will read
    soon) until size more bytes fit; evicts nothing and returns False if they can't."""
    if self.max_bytes is None:
      return True
    pinned = {stream.current for stream in self._streams}
    candidates = [path for path in self._present if path not in pinned]
    candidates.sort(key=lambda path: self._ahead[path] > 0)  # stable: LRU within each kind
    if spare_ahead:
      candidates = [path for path in candidates if not self._ahead[path]]
    excess = self._used() + size - self.max_bytes
    if sum(self._present[path] for path in candidates) < excess:
      return False
    for path in candidates:
      if excess <= 0:
        break
      excess -= self._evict(path)
    return excess <= 0

  def _evict(self, shard):
    """Removes a shard unless a process on this machine reads it; returns the bytes freed."""
    path, folder, name, _ = self._blobs[shard]
    if not _remove_unless_read(path):
      return 0
    size = self._present.pop(shard)
    self._manifests[folder].pop(name, None)
    storage.write_manifest(folder, self._manifests[folder])
    return size

  def _used(self):
    return sum(self._present.values()) + sum(self._loading.values())

  def _download(self, path):
    """Downloads a reserved shard (the lock not held), then records it."""
    local, folder, name, blob = self._blobs[path]
    try:
      entry = storage.download_blob(blob, local)
      with self._lock:
        self._present[path] = blob.size
        self._manifests[folder][name] = entry
        storage.write_manifest(folder, self._manifests[folder])
        self.downloads += 1
    except BaseException:
      with contextlib.suppress(FileNotFoundError):  # in place but not recorded: not kept
        os.remove(local)
      raise
    finally:
      with self._lock:
        self._loading.pop(path, None)
        self._lock.notify_all()

  def _prefetch(self):
    """The background thread: downloads announced shards that fit without evicting any a
    pipeline reads or will read soon; a shard that doesn't fit waits for `ensure`."""
    while True:
      path = self._queue.get()
      try:
        self._prefetch_one(path)
      finally:
        self._queue.task_done()

  def _prefetch_one(self, path):
    with self._lock:
      if path in self._present or path in self._loading or not self._reserve(path, True):
        return
    try:
      self._download(path)
    except Exception as error:  # pylint: disable=broad-except  (ensure tries again)
      logging.warning("prefetching %s failed: %s", path, error)


def _remove_unless_read(path):
  """Deletes path unless a reader holds its shared lock (`_Stream.hold`); True if it is gone."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:  # removed meanwhile (by hand, or another process)
    return True
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  else:
    os.remove(path)
    return True
  finally:
    os.close(fd)


class _Stream:
  """One input pipeline's reading of cached shards: the shard it reads is pinned, in this
  process by `current`, for other processes sharing the cache folder by a shared flock."""

  def __init__(self, cache, largest):
    self.cache, self.largest, self.current, self._fd = cache, largest, None, None

  def hold(self, local):
    """Takes the shared lock of the file at local (releasing the one held); False if it is
    gone or was replaced meanwhile."""
    self.release()
    try:
      fd = os.open(local, os.O_RDONLY)
    except FileNotFoundError:
      return False
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
      same = os.stat(local).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if not same:
      os.close(fd)
      return False
    self._fd = fd
    return True

  def release(self):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __del__(self):
    self.release()

  def announce(self, path):
    self.cache.announce(path)
    return path

  def ensure(self, path):
    return self.cache.ensure(self, path)

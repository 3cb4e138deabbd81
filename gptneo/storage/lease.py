"""The writer's lease on a gs:// prefix (`Lease`), and the leases this process holds
(`HeldLeases`, one per process: `HELD`), which `upload.sync_up` checks before it writes."""
import contextlib
import json
import threading
import time
import uuid

from google.api_core import exceptions as api_exceptions
from google.cloud import storage as cloud_storage
from google.cloud.storage import retry as gcs_retry
import requests
from gptneo.errors import UserError
from gptneo.storage import gcs

LEASE_SECONDS = 300.0  # a lease not renewed for this long is stale


class HeldLeases:
  """The leases a process holds, by gs:// URI: a writer that lost its lease must not write
  on, so a sync to that URI asks here first (`check`)."""

  def __init__(self):
    self._by_uri = {}

  def add(self, lease: "Lease") -> None:
    """Registers a lease just acquired."""
    self._by_uri[lease.uri] = lease

  def remove(self, lease: "Lease") -> None:
    """Forgets a lease being released."""
    self._by_uri.pop(lease.uri, None)

  def check(self, uri: str) -> None:
    """Raises UserError (one line) if this process held a lease on `uri` and lost it.

    Args:
      uri: a gs:// prefix about to be written.
    """
    lease = self._by_uri.get(uri.rstrip("/"))
    if lease is not None:
      lease.check()


HELD = HeldLeases()  # this process's leases (Lease registers in it; sync_up checks it)


class Lease:
  """This process's claim to write a gs:// prefix: the object `<prefix>/.lease` (gcs.LEASE_NAME),
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
    held: the HeldLeases it is registered in while held (default HELD, the process's).
  """

  def __init__(self, uri, holder, seconds=None, held=None):
    self.uri, self.holder = uri.rstrip("/"), dict(holder)
    self.seconds = seconds or LEASE_SECONDS
    self._held = HELD if held is None else held
    bucket, prefix = gcs.split_uri(uri)
    # A client of its own: the renewing thread must not share the main thread's session.
    self._blob = cloud_storage.Client(project=None).bucket(bucket).blob(
        gcs.object_name(prefix, gcs.LEASE_NAME))
    self._generation, self.lost = None, None
    self._stop, self._thread = threading.Event(), None

  def acquire(self, force=False):
    """Claims the lease, then renews it until `release`; refuses (one line) a lease another
    live run holds, unless `force`. Returns self."""
    with gcs.errors(self.uri):
      record, generation = self._read()
      if record is not None and not force and not self._may_take(record):
        raise UserError(self._held_by(record))
      if not self._write(generation):
        raise UserError(self._held_by(self._read()[0] or {}) + " (it claimed it just now)")
    self._held.add(self)
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
    self._held.remove(self)
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
      blob = self._blob.bucket.get_blob(self._blob.name, retry=gcs.RETRY)
      if blob is None:
        return None, 0
      try:
        data = blob.download_as_bytes(if_generation_match=blob.generation, retry=gcs.RETRY)
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
    with gcs.errors(self.uri):
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
      return (f"{self.uri} is leased by {holder}, its lease {gcs.LEASE_NAME} unreadable; if no run "
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
          self.lost = f"it could not be renewed for {self.seconds:.0f}s: {gcs.first_line(error)}"
          return


def _holder(record):
  return (f"{record.get('program', 'a run')} (pid {record.get('pid', '?')} on "
          f"{record.get('host', 'an unknown host')})")


def _is_number(value):
  return type(value) in (int, float)

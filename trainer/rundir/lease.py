"""One writer per model: a lease at <model_dir>/_leases/<model>.lease while a model trains.

Why: a resubmitted Job, a JobSet restart or a second user pointing at the same run would
otherwise interleave one model's checkpoints. The lease is taken before the model's folder is
read and released after its result is written.

  * gs:// runs: an object created only if it does not exist (if_generation_match=0), holding
    the holder's id and an expiry; a background thread renews it every ttl/3 with
    if_generation_match=<the generation it wrote>, so a writer that lost the lease finds out
    instead of overwriting the new holder's. A holder that dies (SIGKILL, a lost node) stops
    renewing; once the expiry has passed, the next process takes the lease over, again with a
    generation precondition, so of two takers exactly one wins. Expiry is the holder's wall
    clock: machines are assumed to keep time (NTP), within a small part of the ttl.
  * local runs: an exclusive fcntl.flock on that file, which the kernel drops when the holder
    dies, so there is nothing to expire. (flock is not honoured by every network filesystem.)

A process that finds a live lease waits up to `wait_seconds` (a restart overlap: the old pod
is still checkpointing after SIGTERM) and then fails with ModelBusy, exit code 5: not 2, since
the input was not bad and a later retry can succeed.
"""

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional, Tuple

from trainer import errors
from trainer.errors import StorageError
from trainer.rundir import gcs, storage
from trainer.rundir.locations import LEASES, parse_location

log = logging.getLogger(__name__)

EXIT_BUSY = errors.EXIT_BUSY
ModelBusy = errors.ModelBusy
DEFAULT_TTL_SECONDS = 60.0


class LeaseLost(ModelBusy):
  """This process's lease expired or was taken over while it trained."""


def lease_rel(model: str) -> str:
  """The lease's path relative to the run's root."""
  return f"{LEASES}/{model}.lease"


def _new_holder_id() -> str:
  return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"


def _utc(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
      "%Y-%m-%dT%H:%M:%SZ")


def _describe(record: dict) -> str:
  holder = record.get("holder") or "an unknown holder"
  if "expires" in record:
    return f"{holder}, expires {_utc(record['expires'])}"
  return holder


@dataclasses.dataclass
class _Timing:
  wait_seconds: float
  ttl_seconds: float

  @property
  def poll_seconds(self) -> float:
    return max(0.05, min(2.0, self.ttl_seconds / 4))


class Lease:
  """A held lease. Use as a context manager or call release(); ensure_held() before writing."""

  def __init__(self, model: str, where: str, holder: str):
    self.model, self.where, self.holder = model, where, holder

  def ensure_held(self) -> None:
    """Raises LeaseLost if the lease is no longer this process's (call before each save)."""

  def release(self) -> None:
    """Gives the lease up; never raises (an unreleased bucket lease expires on its own)."""

  def __enter__(self) -> "Lease":
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def _busy(self, record: dict, waited: float) -> ModelBusy:
    return ModelBusy(f"model {self.model} is busy: {self.where} is held by {_describe(record)}; "
                     f"waited {waited:.0f}s. Train each model in one process at a time")


def acquire(run: storage.RunStorage, model: str, wait_seconds: float,
            ttl_seconds: float = DEFAULT_TTL_SECONDS) -> Lease:
  """Takes model's lease in `run`, waiting up to wait_seconds for a live one to go away.

  Raises ModelBusy (exit 5) if it is still held then. ttl_seconds bounds how long a dead
  holder's bucket lease blocks others; it is renewed every ttl_seconds / 3.
  """
  if not (wait_seconds >= 0 and ttl_seconds > 0):
    raise ValueError(f"wait_seconds >= 0 and ttl_seconds > 0, got {wait_seconds}, {ttl_seconds}")
  timing = _Timing(float(wait_seconds), float(ttl_seconds))
  if run.remote is None:
    return _FileLease(run, model, timing)
  return _BucketLease(run, model, timing)


class _FileLease(Lease):
  """flock on <run>/_leases/<model>.lease; the file records the holder for waiters' messages."""

  def __init__(self, run: storage.RunStorage, model: str, timing: _Timing):
    path = os.path.join(run.local_dir, *lease_rel(model).split("/"))
    super().__init__(model, path, _new_holder_id())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    started, announced = time.monotonic(), False
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        waited = time.monotonic() - started
        if waited >= timing.wait_seconds:
          raise self._busy(self._record(), waited) from None
        if not announced:
          log.info("%s: waiting up to %.0fs for %s", model, timing.wait_seconds,
                   _describe(self._record()))
          announced = True
        time.sleep(min(0.25, timing.wait_seconds - waited))  # a local lock costs nothing
        continue
      if self._same_file(fd):
        break
      os.close(fd)  # locked a file someone removed meanwhile: lock the one there now
    self._fd: Optional[int] = fd
    record = json.dumps({"holder": self.holder, "model": model, "since": _utc(time.time())})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (record + "\n").encode(), 0)

  def _same_file(self, fd: int) -> bool:
    try:
      return os.stat(self.where).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      return False

  def _record(self) -> dict:
    try:
      with open(self.where) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def ensure_held(self) -> None:
    if self._fd is None or not self._same_file(self._fd):
      raise LeaseLost(f"model {self.model}: lease {self.where} was removed while training")

  def release(self) -> None:
    fd, self._fd = self._fd, None
    if fd is not None:
      os.close(fd)  # drops the lock; the file stays (removing it would race with new holders)


class _BucketLease(Lease):
  """An object with the holder's id and expiry, written under generation preconditions."""

  def __init__(self, run: storage.RunStorage, model: str, timing: _Timing):
    bucket_name, prefix = parse_location(run.remote, "remote")
    self._name = "/".join(p for p in (prefix, lease_rel(model)) if p)
    super().__init__(model, f"gs://{bucket_name}/{self._name}", _new_holder_id())
    self._bucket_name, self._timing = bucket_name, timing
    self._budget = gcs.retry_seconds()
    self._tls = threading.local()
    self._lost: Optional[str] = None
    self._generation = 0
    self._expires = 0.0
    try:
      self._take(timing)
    except (ModelBusy, StorageError):
      raise
    except Exception as e:  # pylint: disable=broad-except  # e.g. 403: one line, exit 3
      text = " ".join(str(e).split())[:300]
      raise StorageError(
          f"{self.where}: cannot take the lease: {type(e).__name__}: {text}") from e
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew_until_stopped, daemon=True,
                                    name=f"mnist-distill-lease-{model}")
    self._thread.start()

  # ---- requests ----
  def _bucket(self):
    if getattr(self._tls, "bucket", None) is None:  # one client per thread
      self._tls.bucket = gcs.bucket_handle(self._bucket_name)
    return self._tls.bucket

  def _retrying(self, fn, what, budget=None):
    return gcs.with_retries(fn, f"{what} {self.where}",
                            self._budget if budget is None else budget)

  def _write(self, generation: int, budget=None) -> Tuple[int, float]:
    """Writes a fresh record if the object's generation is `generation` (0: absent);
    returns (new generation, expiry). PreconditionFailed propagates."""
    expires = time.time() + self._timing.ttl_seconds
    data = json.dumps({"holder": self.holder, "model": self.model, "expires": expires,
                       "expires_utc": _utc(expires),
                       "ttl_seconds": self._timing.ttl_seconds}).encode()

    def attempt(timeout):
      blob = self._bucket().blob(self._name)
      blob.upload_from_string(data, content_type="application/json",
                              if_generation_match=generation, retry=None, timeout=timeout)
      return int(blob.generation)

    return self._retrying(attempt, "write", budget), expires

  def _read(self) -> Optional[Tuple[int, dict]]:
    """(generation, record) of the lease object, None if there is none."""
    from google.api_core import exceptions

    def attempt(timeout):
      blob = self._bucket().get_blob(self._name, retry=None, timeout=timeout)
      if blob is None:
        return None
      generation = int(blob.generation)  # the download below does not keep it
      try:
        data = blob.download_as_bytes(if_generation_match=generation, retry=None,
                                      timeout=timeout)
      except (exceptions.NotFound, exceptions.PreconditionFailed):
        return attempt(timeout)  # replaced or removed between the two requests: look again
      try:
        record = json.loads(data)
      except ValueError:
        record = None
      if not isinstance(record, dict) or not isinstance(record.get("expires"), (int, float)):
        # Not ours to parse: it expires a ttl after it was written.
        updated = blob.updated.timestamp() if blob.updated else 0.0
        record = {"holder": "an unreadable lease", "expires": updated + self._timing.ttl_seconds}
      return generation, record

    return self._retrying(attempt, "read")

  # ---- acquiring ----
  def _take(self, timing: _Timing) -> None:
    from google.api_core import exceptions
    started, announced, conflicts = time.monotonic(), False, 0
    while True:
      found = self._read()
      generation, record = found if found else (0, {})
      if record.get("holder") == self.holder:  # a write of ours whose answer was lost
        self._generation, self._expires = generation, record["expires"]
        return
      expired = found is None or record["expires"] <= time.time()
      if expired:
        try:
          self._generation, self._expires = self._write(generation)
          if found is not None:
            log.warning("%s: took over the expired lease of %s", self.model, _describe(record))
          return
        except exceptions.PreconditionFailed:
          conflicts += 1  # someone else wrote first (or our own retried write did): look again
          if conflicts > 20:
            raise self._busy(record, time.monotonic() - started) from None
          continue
      waited = time.monotonic() - started
      if waited >= timing.wait_seconds:
        raise self._busy(record, waited)
      if not announced:
        log.info("%s: waiting up to %.0fs for %s", self.model, timing.wait_seconds,
                 _describe(record))
        announced = True
      until_expiry = max(0.0, record["expires"] - time.time())
      time.sleep(min(timing.poll_seconds, timing.wait_seconds - waited, until_expiry + 0.05))

  # ---- holding ----
  def _renew_until_stopped(self) -> None:
    while not self._stop.wait(self._timing.ttl_seconds / 3):
      self._lost = self._renew()
      if self._lost is not None:
        log.error("%s: lease %s lost: %s", self.model, self.where, self._lost)
        return

  def _renew(self) -> Optional[str]:
    """Extends the lease; returns why it is lost, or None."""
    from google.api_core import exceptions
    try:
      left = max(0.0, self._expires - time.time())
      self._generation, self._expires = self._write(self._generation, left)
      return None
    except exceptions.PreconditionFailed:
      found = self._read()
      if found and found[1].get("holder") == self.holder:  # our write; its answer was lost
        self._generation, self._expires = found[0], found[1]["expires"]
        return None
      return f"taken over by {_describe(found[1])}" if found else "removed by someone else"
    except Exception as e:  # pylint: disable=broad-except
      if time.time() < self._expires:
        log.warning("%s: lease renewal failed, will retry: %s", self.model, e)
        return None
      return f"not renewed before it expired ({e})"

  def ensure_held(self) -> None:
    lost = self._lost
    if lost is None and time.time() >= self._expires:
      lost = "expired: renewals did not get through in time"
    if lost is not None:
      raise LeaseLost(f"model {self.model}: lease {self.where} lost ({lost}); stopped so as "
                      "not to overwrite the new holder's work")

  def release(self) -> None:
    if self._stop.is_set():
      return
    self._stop.set()
    self._thread.join()
    if self._lost is not None:
      return
    from google.api_core import exceptions

    def attempt(timeout):
      self._bucket().blob(self._name).delete(if_generation_match=self._generation, retry=None,
                                             timeout=timeout)

    try:
      self._retrying(attempt, "release", min(self._budget, 15.0))
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      log.warning("%s: lease %s was no longer ours at release", self.model, self.where)
    except Exception as e:  # pylint: disable=broad-except
      log.warning("%s: could not release %s (it expires by itself): %s", self.model,
                  self.where, e)

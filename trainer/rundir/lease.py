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
from trainer.rundir import gcs, storage
from trainer.rundir.locations import LEASES, parse_location

log = logging.getLogger(__name__)

EXIT_BUSY = errors.EXIT_BUSY
ModelBusy = errors.ModelBusy
DEFAULT_TTL_SECONDS = 60.0
_CONFLICTS = 20  # lost races for an expired bucket lease before giving up as busy


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


def _busy(model: str, where: str, record: dict, waited: float) -> ModelBusy:
  return ModelBusy(f"model {model} is busy: {where} is held by {_describe(record)}; "
                   f"waited {waited:.0f}s. Train each model in one process at a time")


@dataclasses.dataclass
class _Timing:
  wait_seconds: float
  ttl_seconds: float

  @property
  def poll_seconds(self) -> float:
    return max(0.05, min(2.0, self.ttl_seconds / 4))


class _Wait:
  """Waiting for a live lease held by another process: says once what it waits for, and gives
  up with ModelBusy once `wait_seconds` have passed."""

  def __init__(self, model: str, where: str, wait_seconds: float):
    self.model, self.where, self.wait_seconds = model, where, wait_seconds
    self.started, self._announced = time.monotonic(), False

  def waited(self) -> float:
    return time.monotonic() - self.started

  def busy(self, record: dict) -> ModelBusy:
    return _busy(self.model, self.where, record, self.waited())

  def sleep(self, record: dict, at_most: float) -> None:
    """Sleeps up to `at_most` seconds before the next look; ModelBusy if the wait is over."""
    waited = self.waited()
    if waited >= self.wait_seconds:
      raise self.busy(record) from None
    if not self._announced:
      log.info("%s: waiting up to %.0fs for %s", self.model, self.wait_seconds,
               _describe(record))
      self._announced = True
    time.sleep(min(at_most, self.wait_seconds - waited))


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
    return _FileLease.take(run, model, timing)
  return _BucketLease.take(run, model, timing)


class _FileLease(Lease):
  """flock on <run>/_leases/<model>.lease; the file records the holder for waiters' messages."""

  def __init__(self, model: str, path: str, holder: str, fd: int):
    super().__init__(model, path, holder)
    self._fd: Optional[int] = fd

  @classmethod
  def take(cls, run: storage.RunStorage, model: str, timing: _Timing) -> "_FileLease":
    path = os.path.join(run.local_dir, *lease_rel(model).split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    wait = _Wait(model, path, timing.wait_seconds)
    while True:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        wait.sleep(_read_record(path), 0.25)  # a local lock costs nothing to look at
        continue
      if _same_file(path, fd):
        break
      os.close(fd)  # locked a file someone removed meanwhile: lock the one there now
    held = cls(model, path, _new_holder_id(), fd)
    record = json.dumps({"holder": held.holder, "model": model, "since": _utc(time.time())})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (record + "\n").encode(), 0)
    return held

  def ensure_held(self) -> None:
    if self._fd is None or not _same_file(self.where, self._fd):
      raise LeaseLost(f"model {self.model}: lease {self.where} was removed while training")

  def release(self) -> None:
    fd, self._fd = self._fd, None
    if fd is not None:
      os.close(fd)  # drops the lock; the file stays (removing it would race with new holders)


def _same_file(path: str, fd: int) -> bool:
  try:
    return os.stat(path).st_ino == os.fstat(fd).st_ino
  except FileNotFoundError:
    return False


def _read_record(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


class _BucketLease(Lease):
  """An object with the holder's id and expiry, written under generation preconditions."""

  def __init__(self, run: storage.RunStorage, model: str, timing: _Timing):
    bucket_name, prefix = parse_location(run.remote, "remote")
    self._name = "/".join(p for p in (prefix, lease_rel(model)) if p)
    super().__init__(model, f"gs://{bucket_name}/{self._name}", _new_holder_id())
    self._timing = timing
    self._budget = gcs.retry_seconds()
    self._bucket = gcs.ThreadBuckets(bucket_name)
    self._lost: Optional[str] = None
    self._generation = 0
    self._expires = 0.0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew_until_stopped, daemon=True,
                                    name=f"mnist-distill-lease-{model}")

  @classmethod
  def take(cls, run: storage.RunStorage, model: str, timing: _Timing) -> "_BucketLease":
    held = cls(run, model, timing)
    with gcs.as_storage_error(f"{held.where}: cannot take the lease", keep=(ModelBusy,)):
      held._take()  # pylint: disable=protected-access  # e.g. 403: one line, exit 3
    held._thread.start()  # pylint: disable=protected-access
    return held

  # ---- requests ----
  def _retrying(self, fn, what, budget=None):
    return gcs.with_retries(fn, f"{what} {self.where}", self._budget if budget is None else budget)

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

    def attempt(timeout):
      while True:
        blob = self._bucket().get_blob(self._name, retry=None, timeout=timeout)
        if blob is None:
          return None
        generation = int(blob.generation)  # the download below does not keep it
        try:
          data = blob.download_as_bytes(if_generation_match=generation, retry=None,
                                        timeout=timeout)
          break
        except Exception as e:  # pylint: disable=broad-except
          if not (gcs.is_not_found(e) or gcs.is_precondition_failed(e)):
            raise
          # replaced or removed between the two requests: look again
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
  def _take(self) -> None:
    wait, conflicts = _Wait(self.model, self.where, self._timing.wait_seconds), 0
    while True:
      found = self._read()
      generation, record = found if found else (0, {})
      if record.get("holder") == self.holder:  # a write of ours whose answer was lost
        self._generation, self._expires = generation, record["expires"]
        return
      if found is None or record["expires"] <= time.time():  # free, or its holder is gone
        try:
          self._generation, self._expires = self._write(generation)
        except Exception as e:  # pylint: disable=broad-except
          if not gcs.is_precondition_failed(e):
            raise
          conflicts += 1  # someone else wrote first (or our own retried write did): look again
          if conflicts > _CONFLICTS:
            raise wait.busy(record) from None
          continue
        if found is not None:
          log.warning("%s: took over the expired lease of %s", self.model, _describe(record))
        return
      until_expiry = max(0.0, record["expires"] - time.time())
      wait.sleep(record, min(self._timing.poll_seconds, until_expiry + 0.05))

  # ---- holding ----
  def _renew_until_stopped(self) -> None:
    while not self._stop.wait(self._timing.ttl_seconds / 3):
      self._lost = self._renew()
      if self._lost is not None:
        log.error("%s: lease %s lost: %s", self.model, self.where, self._lost)
        return

  def _renew(self) -> Optional[str]:
    """Extends the lease; returns why it is lost, or None."""
    try:
      left = max(0.0, self._expires - time.time())
      self._generation, self._expires = self._write(self._generation, left)
      return None
    except Exception as e:  # pylint: disable=broad-except
      if gcs.is_precondition_failed(e):
        found = self._read()
        if found and found[1].get("holder") == self.holder:  # our write; its answer was lost
          self._generation, self._expires = found[0], found[1]["expires"]
          return None
        return f"taken over by {_describe(found[1])}" if found else "removed by someone else"
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

    def attempt(timeout):
      self._bucket().blob(self._name).delete(if_generation_match=self._generation, retry=None,
                                             timeout=timeout)

    try:
      self._retrying(attempt, "release", min(self._budget, 15.0))
    except Exception as e:  # pylint: disable=broad-except
      if gcs.is_not_found(e) or gcs.is_precondition_failed(e):
        log.warning("%s: lease %s was no longer ours at release", self.model, self.where)
      else:
        log.warning("%s: could not release %s (it expires by itself): %s", self.model,
                    self.where, e)

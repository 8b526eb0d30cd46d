"""The Cloud Storage client, which errors are worth retrying, and the retry policy: shared by the
run's mirror (trainer/rundir/storage.py), downloads (trainer/rundir/downloads.py) and leases
(trainer/rundir/lease.py). google-cloud-storage is imported on first use only: local runs never
load it.

Transient errors (5xx, 429, 408, connection refused/reset, timeouts) are retried with
exponential backoff for MNIST_DISTILL_GCS_RETRY_SECONDS (default 120) per operation. Every call
passes retry=None to the library so that with_retries() is the only bound.
"""

import contextlib
import functools
import logging
import os
import threading
import time
import types
from typing import Callable

from trainer.errors import StorageError, UsageError

log = logging.getLogger(__name__)

RETRY_ENV = "MNIST_DISTILL_GCS_RETRY_SECONDS"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
DEFAULT_RETRY_SECONDS = 120.0
# Checks and listings before training give up sooner.
CHECK_SECONDS = 15.0


def retry_seconds() -> float:
  raw = os.environ.get(RETRY_ENV, "").strip()
  if not raw:
    return DEFAULT_RETRY_SECONDS
  try:
    value = float(raw)
  except ValueError:
    value = float("nan")
  if not value >= 0:
    raise UsageError(f"{RETRY_ENV} must be a number of seconds >= 0, got {raw!r}")
  return value


def endpoint() -> str:
  """Where requests go: the emulator when STORAGE_EMULATOR_HOST is set, else real GCS."""
  host = os.environ.get(EMULATOR_ENV, "").strip()
  if not host:
    return "https://storage.googleapis.com"
  return host if "://" in host else f"http://{host}"


def bucket_handle(bucket_name: str):
  """A google-cloud-storage Bucket on the configured endpoint (no request is made)."""
  # google-cloud-storage 3.17 starts a thread per bucket that GETs its metadata for tracing (a
  # buckets.get the job's service account may not be allowed, retried for two minutes against
  # a dead endpoint): off, unless the environment chose.
  os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
  from google.cloud import storage  # pylint: disable=import-outside-toplevel  # heavy
  if os.environ.get(EMULATOR_ENV, "").strip():
    from google.auth.credentials import AnonymousCredentials  # pylint: disable=import-outside-toplevel
    client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or "test",
                            credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": endpoint()})
  else:  # object operations need no project; None skips the project lookup
    client = storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None)
  return client.bucket(bucket_name)


class ThreadBuckets:
  """bucket_handle(name) per thread: a worker thread and the training thread never share an
  HTTP session."""

  def __init__(self, bucket_name: str):
    self.name = bucket_name
    self._tls = threading.local()

  def __call__(self):
    if getattr(self._tls, "bucket", None) is None:
      self._tls.bucket = bucket_handle(self.name)
    return self._tls.bucket


def one_line(exc: BaseException) -> str:
  text = " ".join(str(exc).split()) or repr(exc)
  return f"{type(exc).__name__}: {text[:300]}"


@functools.lru_cache(maxsize=None)
def errors():
  """The client's and its HTTP stack's exception types, imported once (on the first error)."""
  # pylint: disable=import-outside-toplevel
  import http.client

  import requests
  import urllib3
  from google.api_core import exceptions as api
  from google.auth import exceptions as auth
  from google.cloud.storage.exceptions import DataCorruption

  # Not every requests/urllib3/http.client error: a malformed URL must fail at once.
  network = (ConnectionError, TimeoutError, DataCorruption,
             requests.exceptions.ConnectionError, requests.exceptions.Timeout,
             requests.exceptions.ChunkedEncodingError,
             urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError,
             http.client.BadStatusLine, http.client.IncompleteRead,
             http.client.ResponseNotReady)
  return types.SimpleNamespace(api=api, auth=auth, network=network)


def transient(exc: BaseException) -> bool:
  """Worth retrying: server-side 5xx/429/408 or a network-level failure."""
  e = errors()
  if isinstance(exc, e.api.GoogleAPICallError):
    code = exc.code or 0
    return code in (408, 429) or code >= 500
  if isinstance(exc, e.auth.TransportError):
    return True
  if isinstance(exc, e.auth.RefreshError):
    return bool(getattr(exc, "retryable", False))
  return isinstance(exc, e.network)


def is_not_found(exc: BaseException) -> bool:
  return isinstance(exc, errors().api.NotFound)


def is_precondition_failed(exc: BaseException) -> bool:
  return isinstance(exc, errors().api.PreconditionFailed)


def unusable(where: str, bucket_name: str, exc: BaseException, what: str) -> UsageError:
  """The one-line exit-2 error for a bucket that cannot be used before training starts."""
  if isinstance(exc, StorageError):
    return UsageError(f"{where}: Cloud Storage unreachable: {exc}")
  if is_not_found(exc):
    return UsageError(f"{where}: bucket {bucket_name!r} does not exist")
  if isinstance(exc, (errors().api.Forbidden, errors().api.Unauthorized)):
    return UsageError(f"{where}: access denied ({one_line(exc)})")
  return UsageError(f"{where}: {what}: {one_line(exc)}")


@contextlib.contextmanager
def as_storage_error(what: str, keep: tuple = (UsageError,)):
  """Inside it, an error that is not StorageError or of a type in `keep` becomes one line of
  StorageError: '<what>: <type>: <message>' (exit 3)."""
  try:
    yield
  except (StorageError, *keep):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f"{what}: {one_line(e)}") from e


def with_retries(fn: Callable, what: str, budget: float, also_retry=None):
  """Calls fn(timeout) until it succeeds, retrying transient errors (and those `also_retry`
  accepts) for `budget` seconds. Non-transient errors propagate unchanged; giving up raises
  StorageError with one line.

  The loop is google.api_core's (retry_target, the engine of google.api_core.retry.Retry:
  exponential backoff with jitter from 0.5 s to 10 s, a deadline, a predicate). Kept here is
  only what it lacks: each attempt's (connect, read) timeouts shrink toward the deadline, so
  that an attempt never hangs much past the budget nor starves a healthy call (Retry bounds
  only the time between attempts); a log line per retry that says when the next one comes; and
  the one-line StorageError that names the attempts, the budget and the endpoint."""
  from google.api_core import retry  # pylint: disable=import-outside-toplevel  # heavy
  deadline = time.monotonic() + budget
  failures = []

  def attempt():
    left = deadline - time.monotonic()
    return fn((min(10.0, max(2.0, left)), min(60.0, max(5.0, left))))

  def pauses():  # drawn after each retryable failure, which on_error has just recorded
    for pause in retry.exponential_sleep_generator(0.5, 10.0, 2.0):
      left = deadline - time.monotonic()
      if pause < left:
        log.warning("%s failed (%s); retry %d in %.1fs", what, one_line(failures[-1]),
                    len(failures), pause)
      yield min(pause, max(left, 0.0))  # the budget is spent retrying; then retry_target stops

  def give_up(exc_list, reason, _timeout):
    last = exc_list[-1]
    if reason == retry.RetryFailureReason.NON_RETRYABLE_ERROR:
      return last, last.__cause__
    return StorageError(f"{what}: still failing after {len(exc_list)} attempts in {budget:g}s "
                        f"({endpoint()}): {one_line(last)}"), last

  return retry.retry_target(
      attempt, lambda e: transient(e) or (also_retry is not None and also_retry(e)), pauses(),
      timeout=budget, on_error=failures.append, exception_factory=give_up)

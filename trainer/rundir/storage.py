"""Bucket layer: mirrors the job's local output folder to gs://bucket/prefix and fetches inputs.

Why this exists: TensorFlow's own gs:// filesystem cannot be pointed at a test server, so the
trainer only ever reads and writes local folders. This module moves them to and from Cloud Storage
with google-cloud-storage (which honours STORAGE_EMULATOR_HOST), uploading on one background
thread so training never waits on the network. All bucket code of the project lives here.

Locations: parse_location() is the one grammar for every flag or variable that may name a
bucket. Anything that looks like a URL is a valid gs://BUCKET[/PREFIX] or a UsageError; only
values that do not look like URLs are local paths. Object names read from a bucket must map to
a path inside the local destination, or the whole download is refused before anything is
written (see _destinations).

Mirroring rules, in short:
  * sync() snapshots the file list (and the bytes of the `last` files) when it is called; the
    worker uploads new/changed files, then the `last` files, then deletes remote leftovers. The
    bucket therefore never shows a `last` file (TF's "checkpoint" state, a result.json marker)
    before the data it refers to, nor loses data a visible `last` file still refers to.
  * "Changed" = size or mtime differ from what the object records in its custom metadata
    (`last` files: md5). pull() restores that mtime locally, so pulled files are not re-uploaded.
  * Each upload is a single object write, so no half object is ever visible.
  * Temporary files (`.tmp-*`, `*.tmp-*`) and the lease folder are never mirrored: see
    is_unmirrored().
  * Transient errors (5xx, 429, 408, connection refused/reset, timeouts) are retried with
    exponential backoff for MNIST_DISTILL_GCS_RETRY_SECONDS (default 120) per operation; the
    library's own retries are switched off so that this is the only bound.

Tested against gcp-storage-emulator 2026.7.19 with google-cloud-storage 3.17.1. Quirks found there
and how this module avoids them:
  * A ranged GET of a 0-byte object answers `Content-Range: bytes 0--1/0`, which the client
    rejects; and a 0-byte `uploadType=media` upload crashes the handler, so the connection drops
    with no response (indistinguishable from an outage: it would be retried until the deadline).
    So: blobs get chunk_size=None (one plain GET per download, never ranges), uploads always pass
    the size (0-byte files go as one multipart request, never `media`), and 0-byte objects are
    never downloaded at all (the local file is just created).
  * Resumable sessions live in the server's memory: a restart between the session POST and its
    PUT answers 404 for the session. chunk_size=None keeps uploads to one request (<= 8 MiB,
    multipart) or one session POST plus a single PUT (larger files, up to 100 MiB); a 404 during
    an upload is retried as transient when the bucket itself still exists. (Multi-chunk
    resumable uploads, with 1 MiB chunks or an unknown total size, did round-trip byte-exact
    in this emulator version; older ones could not, which is one more reason to avoid them.)
  * The emulator ignores maxResults/pageToken in object listings (returns everything at once):
    harmless, but never rely on max_results to bound work.
  * google-cloud-storage 3.17 itself starts a background thread per bucket that GETs the bucket
    metadata for tracing (a buckets.get call the job's service account may not be allowed, retried
    for two minutes against a dead endpoint); we disable it with
    DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA unless the environment already chose.
"""

import base64
import dataclasses
import hashlib
import io
import logging
import os
import queue
import random
import re
import stat
import tempfile
import threading
import time
import uuid
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from trainer.errors import StorageError, UsageError
from trainer.rundir import layout

log = logging.getLogger(__name__)

RETRY_ENV = "MNIST_DISTILL_GCS_RETRY_SECONDS"
STAGING_ENV = "MNIST_DISTILL_STAGING"
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
DEFAULT_RETRY_SECONDS = 120.0
# check() and the listing in fetch_to_local() run before training: they give up sooner.
CHECK_SECONDS = 15.0
_MTIME_KEY = "mnist-distill-mtime-ns"
_PART_SUFFIX = ".mnist-distill-part"
_TMP_MARK = ".tmp-"  # trainer.rundir.layout's temporary names (and older `name.tmp-<pid>` ones)
LEASES = layout.LEASES
_WRITE_PERMISSIONS = ("storage.objects.create", "storage.objects.delete",
                      "storage.objects.get", "storage.objects.list")


# What looks like a URL: `scheme:` followed by '/' or nothing, any scheme; or a cloud scheme
# followed by anything (`gs:bucket`). Such a value is never taken for a local folder.
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(?:/|$)")
_CLOUD_SCHEME_RE = re.compile(r"^(gs|gcs|s3[an]?|az|abfss?|wasbs?|hdfs):", re.IGNORECASE)
_BUCKET_CHARS_RE = re.compile(r"^[a-z0-9._-]+$")
_IPV4_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
# gsutil reads these as wildcards ('*', '?', '[...]') or a generation ('#'): refused, not guessed.
_WILDCARDS = "*?[]#"
_MAX_OBJECT_NAME_BYTES = 1024


def parse_location(value, flag_name: str) -> Optional[Tuple[str, str]]:
  """(bucket, prefix) for a gs://BUCKET[/PREFIX] URL, None for a local path.

  Why strict: a mistyped URL (gs:/b, gs://, s3://b) used to become a local folder named
  `gs:`, whose results vanish with the pod. Anything that looks like a URL is therefore either
  a valid Cloud Storage location or a UsageError naming `flag_name` and what is wrong. The
  prefix comes back without a trailing '/' ('' for the bucket's root).
  """
  if not isinstance(value, str):
    return None  # a pathlib.Path is always local
  match = _URL_RE.match(value.strip()) or _CLOUD_SCHEME_RE.match(value.strip())
  if not match:
    return None

  def bad(why):
    shown = value if value.isprintable() else repr(value)  # the error stays one line
    return UsageError(f"{flag_name}={shown}: {why}")

  if value != value.strip():
    raise bad("remove the white space around the URL")
  scheme = match.group(1)
  if scheme.lower() != "gs":
    raise bad(f"{scheme}: URLs are not supported; use gs://BUCKET/PREFIX, or a plain path "
              "for a local folder")
  if scheme != "gs":
    raise bad("write the scheme in lower case: gs://BUCKET/PREFIX")
  if not value.startswith("gs://"):
    raise bad("a Cloud Storage URL starts with gs:// (two slashes): gs://BUCKET/PREFIX")
  bucket, _, prefix = value[len("gs://"):].partition("/")
  why = _bucket_problem(bucket)
  if why:
    raise bad(why)
  if prefix.endswith("/") and prefix != "/" and not prefix.endswith("//"):
    prefix = prefix[:-1]  # gs://b/run/ is gs://b/run; gs://b// and gs://b/run// are refused
  if prefix:
    why = _name_problem(prefix)
    if why:
      raise bad(f"bad object prefix: {why}")
    if any(c in prefix for c in _WILDCARDS):
      raise bad(f"wildcards and generations ({' '.join(_WILDCARDS)}) are not supported in "
                "a prefix")
  return bucket, prefix


def _bucket_problem(bucket: str) -> Optional[str]:
  """Why `bucket` breaks Cloud Storage's bucket naming rules, or None."""
  if not bucket:
    return "no bucket name after gs://"
  if bucket != bucket.lower():
    return f"bucket names are lower case ({bucket!r})"
  if not _BUCKET_CHARS_RE.match(bucket):
    return (f"bucket {bucket!r}: only lower-case letters, digits, '-', '_' and '.' are "
            "allowed")
  if not (bucket[0].isalnum() and bucket[-1].isalnum()):
    return f"bucket {bucket!r} must start and end with a letter or digit"
  parts = bucket.split(".")
  if "" in parts:
    return f"bucket {bucket!r}: no '..' allowed"
  limit = 222 if len(parts) > 1 else 63
  if not 3 <= len(bucket) <= limit or any(len(p) > 63 for p in parts):
    return (f"bucket {bucket!r} must be 3-63 characters (up to 222 with dots, 63 between "
            "dots)")
  if _IPV4_RE.match(bucket):
    return f"bucket {bucket!r} looks like an IP address"
  if bucket.startswith("goog"):
    return f"bucket {bucket!r}: names starting with 'goog' are reserved"
  return None


def _name_problem(name: str) -> Optional[str]:
  """Why the '/'-separated `name` cannot map to a path inside a folder, or None.

  Cloud Storage forbids only the whole names '.' and '..'; we also refuse '.', '..' and empty
  segments anywhere, a leading '/', backslashes and control characters, so that every accepted
  name is one relative path and no two names meet at one file."""
  if "\\" in name:
    return f"{name!r}: backslashes are not allowed"
  if any(ord(c) < 32 or ord(c) == 127 for c in name):
    return f"{name!r}: control characters are not allowed"
  if len(name.encode("utf-8")) > _MAX_OBJECT_NAME_BYTES:
    return f"longer than {_MAX_OBJECT_NAME_BYTES} bytes"
  for part in name.split("/"):
    if part in ("", ".", ".."):
      what = "an empty segment ('//' or a leading '/')" if not part else f"a {part!r} segment"
      return f"{name!r} has {what}"
  return None


def location_url(bucket: str, prefix: str = "") -> str:
  """The canonical spelling of a location parse_location accepted (no trailing '/')."""
  return f"gs://{bucket}/{prefix}" if prefix else f"gs://{bucket}"


def is_remote(path, flag_name: str = "path") -> bool:
  """True for a valid gs:// URL, False for a local path; UsageError for a malformed URL."""
  return parse_location(path, flag_name) is not None


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


def _endpoint() -> str:
  """Where requests go: the emulator when STORAGE_EMULATOR_HOST is set, else real GCS."""
  host = os.environ.get(EMULATOR_ENV, "").strip()
  if not host:
    return "https://storage.googleapis.com"
  return host if "://" in host else f"http://{host}"


def bucket_handle(bucket_name: str):
  """A google-cloud-storage Bucket on the configured endpoint (no request is made)."""
  return _make_client().bucket(bucket_name)


def _make_client():
  # See the module docstring: no background bucket-metadata fetches.
  os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
  from google.cloud import storage  # Heavy import: only runs for gs:// paths.
  if os.environ.get(EMULATOR_ENV, "").strip():
    from google.auth.credentials import AnonymousCredentials
    return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or "test",
                          credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": _endpoint()})
  # Object operations need no project; None skips the project lookup.
  return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT") or None)


def _one_line(exc: BaseException) -> str:
  text = " ".join(str(exc).split()) or repr(exc)
  return f"{type(exc).__name__}: {text[:300]}"


def _transient(exc: BaseException) -> bool:
  """Worth retrying: server-side 5xx/429/408 or a network-level failure."""
  import http.client

  import requests
  import urllib3
  from google.api_core import exceptions as api_exceptions
  from google.auth import exceptions as auth_exceptions
  from google.cloud.storage.exceptions import DataCorruption

  if isinstance(exc, api_exceptions.GoogleAPICallError):
    code = exc.code or 0
    return code in (408, 429) or code >= 500
  if isinstance(exc, auth_exceptions.TransportError):
    return True
  if isinstance(exc, auth_exceptions.RefreshError):
    return bool(getattr(exc, "retryable", False))
  # Not every requests/urllib3/http.client error: a malformed URL must fail at once.
  return isinstance(exc, (ConnectionError, TimeoutError, DataCorruption,
                          requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          requests.exceptions.ChunkedEncodingError,
                          urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError,
                          http.client.BadStatusLine, http.client.IncompleteRead,
                          http.client.ResponseNotReady))


def _is_not_found(exc: BaseException) -> bool:
  from google.api_core import exceptions as api_exceptions
  return isinstance(exc, api_exceptions.NotFound)


def _is_denied(exc: BaseException) -> bool:
  from google.api_core import exceptions as api_exceptions
  return isinstance(exc, (api_exceptions.Forbidden, api_exceptions.Unauthorized))


def _unusable(where: str, bucket_name: str, exc: BaseException, what: str) -> UsageError:
  """The one-line exit-2 error for a bucket that cannot be used before training starts."""
  if isinstance(exc, StorageError):
    return UsageError(f"{where}: Cloud Storage unreachable: {exc}")
  if _is_not_found(exc):
    return UsageError(f"{where}: bucket {bucket_name!r} does not exist")
  if _is_denied(exc):
    return UsageError(f"{where}: access denied ({_one_line(exc)})")
  return UsageError(f"{where}: {what}: {_one_line(exc)}")


def with_retries(fn: Callable, what: str, budget: float, also_retry=None):
  """Calls fn(timeout) until it succeeds, retrying transient errors for `budget` seconds.

  Non-transient errors propagate unchanged; giving up raises StorageError with one line.
  """
  deadline = time.monotonic() + budget
  delay = 0.5
  attempt = 0
  while True:
    attempt += 1
    left = deadline - time.monotonic()
    # (connect, read) timeouts: never hang much past the budget, never starve a healthy call.
    timeout = (min(10.0, max(2.0, left)), min(60.0, max(5.0, left)))
    try:
      return fn(timeout)
    except Exception as e:  # pylint: disable=broad-except
      if not (_transient(e) or (also_retry is not None and also_retry(e))):
        raise
      left = deadline - time.monotonic()
      if left <= 0:
        raise StorageError(f"{what}: still failing after {attempt} attempts in {budget:g}s "
                           f"({_endpoint()}): {_one_line(e)}") from e
      pause = min(left, delay * random.uniform(0.75, 1.25))
      log.warning("%s failed (%s); retry %d in %.1fs", what, _one_line(e), attempt, pause)
      time.sleep(pause)
      delay = min(delay * 2, 10.0)


def _md5_b64(data: bytes) -> str:
  return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def _remote_mtime_ns(blob) -> Optional[int]:
  """The mtime a local copy of `blob` should carry: ours if we uploaded it, else `updated`."""
  raw = (blob.metadata or {}).get(_MTIME_KEY)
  if raw is not None and str(raw).lstrip("-").isdigit():
    return int(raw)
  if blob.updated is None:
    return None
  return int(blob.updated.timestamp()) * 10**9 + blob.updated.microsecond * 1000


def _local_matches(path: str, blob) -> bool:
  try:
    st = os.stat(path)
  except OSError:
    return False
  return (stat.S_ISREG(st.st_mode) and st.st_size == (blob.size or 0)
          and st.st_mtime_ns == _remote_mtime_ns(blob))


def _join(root: str, rel: str) -> str:
  return os.path.join(root, *[p for p in rel.split("/") if p])


def _list_tree(bucket, base: str, timeout) -> Dict[str, object]:
  """Objects named `base` or under `base/` (everything for base ''), keyed by name below base."""
  found = {}
  for blob in bucket.client.list_blobs(bucket, prefix=base or None, retry=None, timeout=timeout):
    name = blob.name
    if name.endswith("/"):
      continue  # "folder" placeholder objects made by consoles; nothing to mirror.
    if not base:
      found[name] = blob
    elif name == base:
      found[""] = blob
    elif name.startswith(base + "/"):
      found[name[len(base) + 1:]] = blob
  return found


def _download(bucket, blob, dest: str, budget: float) -> None:
  """Downloads `blob` to dest atomically (temp file + rename) and stamps the remote mtime."""
  os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
  tmp = os.path.join(os.path.dirname(dest),
                     f".{os.path.basename(dest)}.{uuid.uuid4().hex[:8]}{_PART_SUFFIX}")

  def attempt(timeout):
    with open(tmp, "wb") as f:
      if blob.size:  # 0-byte objects: nothing to fetch (and see the emulator quirk above).
        bucket.blob(blob.name, chunk_size=None).download_to_file(f, retry=None, timeout=timeout)

  try:
    with_retries(attempt, f"download gs://{bucket.name}/{blob.name}", budget)
    mtime = _remote_mtime_ns(blob)
    if mtime is not None:
      os.utime(tmp, ns=(mtime, mtime))
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _destinations(bucket_name: str, blobs: Dict[str, object], dest_root: str) -> Dict[str, str]:
  """rel -> local path below dest_root for every blob, or UsageError before anything is written.

  Why: object names are chosen by whoever can write the bucket, and Cloud Storage accepts names
  such as `data/../../x`; joined naively they land anywhere this user can write."""
  root = os.path.realpath(dest_root)
  found = {}
  for rel in sorted(blobs):
    why = _name_problem(rel) or _name_clash(rel, blobs)
    dest = _join(dest_root, rel)
    if why is None and not os.path.realpath(dest).startswith(root + os.sep):
      why = "it leads out of the destination through a symbolic link"
    if why:
      raise UsageError(f"gs://{bucket_name}/{blobs[rel].name}: refusing to download an object "
                       f"whose name does not map inside {dest_root}: {why}; nothing was "
                       "downloaded")
    found[rel] = dest
  return found


def _name_clash(rel: str, blobs: Dict[str, object]) -> Optional[str]:
  """Two objects `a` and `a/b` cannot both be local files."""
  parts = rel.split("/")
  for i in range(1, len(parts)):
    if "/".join(parts[:i]) in blobs:
      return f"{'/'.join(parts[:i])!r} is both an object and a folder"
  return None


def _download_tree(bucket, blobs: Dict[str, object], dest_root: str, budget: float) -> List[str]:
  """Makes dest_root/<rel> a copy of every blob; skips local copies that already match.
  Every name is checked first (_destinations), so a bad one means nothing is written."""
  for rel, dest in _destinations(bucket.name, blobs, dest_root).items():
    if not _local_matches(dest, blobs[rel]):
      _download(bucket, blobs[rel], dest, budget)
  return sorted(blobs)


def is_lease(rel: str) -> bool:
  """True for relpaths in the run's lease folder (trainer/rundir/lease.py)."""
  return rel.replace(os.sep, "/").split("/", 1)[0] == LEASES


def is_unmirrored(rel: str) -> bool:
  """Never uploaded, downloaded or deleted by mirroring: temporary files (any path part named
  `.tmp-*` or `*.tmp-*`, our own partial downloads) and the leases (trainer/rundir/lease.py writes
  those itself, with generation preconditions that a mirror's plain writes would defeat)."""
  parts = rel.replace(os.sep, "/").split("/")
  return (is_lease(rel) or parts[-1].endswith(_PART_SUFFIX)
          or any(_TMP_MARK in p for p in parts))


@dataclasses.dataclass
class _SyncTask:
  rel: str
  files: Dict[str, Tuple[int, int]]  # relpath -> (size, mtime_ns) when sync() was called
  last: Dict[str, bytes]  # relpath -> content, for files whose basename is in `last`
  last_rank: Dict[str, int]


class RunStorage:
  """The trainer's output folder: local_dir, mirrored to `remote` (gs://...) when set.

  With remote=None (a local model_dir) check/pull/sync/flush/close do nothing, and the *_remote
  readers look at local_dir itself, since that is then the final destination.
  """

  def __init__(self, local_dir: str, remote: Optional[str] = None):
    self.local_dir = local_dir
    self._abs_local = os.path.abspath(local_dir)
    location = parse_location(remote, "remote") if remote else None
    if remote and location is None:
      raise UsageError(f"{remote}: not a gs://BUCKET/PREFIX URL")
    self._bucket_name, self._prefix = location or ("", "")
    self.remote = location_url(*location) if location else None
    self._retry_budget = retry_seconds()
    self._tls = threading.local()
    self._lock = threading.Lock()
    self._queue = None
    self._thread = None
    self._error: Optional[StorageError] = None
    self._closed = False

  # -- helpers ---------------------------------------------------------------------------------

  def _bucket(self):
    """One client per thread: the worker and the training thread never share a session."""
    if getattr(self._tls, "bucket", None) is None:
      self._tls.bucket = _make_client().bucket(self._bucket_name)
    return self._tls.bucket

  def _rel(self, relpath) -> str:
    raw = os.fspath(relpath)
    if os.path.isabs(raw):
      inside = os.path.relpath(raw, self._abs_local)
      if inside == ".." or inside.startswith(".." + os.sep):
        raise ValueError(f"{raw!r} is not inside {self.local_dir!r}")
      raw = "" if inside == "." else inside
    parts = [p for p in raw.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if ".." in parts:
      raise ValueError(f"relpath must stay inside the run folder: {relpath!r}")
    return "/".join(parts)

  def _name(self, rel: str) -> str:
    return "/".join(p for p in (self._prefix, rel) if p)

  def _url(self, rel: str) -> str:
    return f"gs://{self._bucket_name}/{self._name(rel)}"

  def _local(self, rel: str) -> str:
    return _join(self.local_dir, rel)

  def _list(self, rel: str, timeout) -> Dict[str, object]:
    """Remote objects under rel, keyed by their relpath in the run folder."""
    base = self._name(rel)
    found = _list_tree(self._bucket(), base, timeout)
    return {"/".join(p for p in (rel, k) if p): b for k, b in found.items() if k or rel}

  def _retrying(self, fn, what, budget=None, also_retry=None):
    return with_retries(fn, what, self._retry_budget if budget is None else budget, also_retry)

  # -- before training -------------------------------------------------------------------------

  def check(self) -> None:
    """Fails fast (UsageError, one line, <= ~20 s) if the bucket is missing or unreachable."""
    if self.remote is None:
      return
    deadline = time.monotonic() + min(self._retry_budget, CHECK_SECONDS)
    try:
      bucket = self._bucket()
      self._retrying(lambda t: list(bucket.client.list_blobs(
          bucket, prefix=self._name("") or None, max_results=1, retry=None, timeout=t)),
                     f"list {self.remote}", max(0.0, deadline - time.monotonic()))
      granted = self._retrying(lambda t: bucket.test_iam_permissions(
          list(_WRITE_PERMISSIONS), retry=None, timeout=t), f"permissions on {self.remote}",
                               max(0.0, deadline - time.monotonic()))
    except Exception as e:  # pylint: disable=broad-except
      raise _unusable(self.remote, self._bucket_name, e, "cannot use this bucket") from None
    # testIamPermissions needs no permission itself. (It reads bucket IAM only: a bucket that
    # grants writes through legacy object ACLs alone would be refused here.)
    missing = sorted(set(_WRITE_PERMISSIONS) - set(granted or ()))
    if missing:
      raise UsageError(f"{self.remote}: these credentials lack {', '.join(missing)}")

  def pull(self, relpath: str = "", exact: bool = False) -> List[str]:
    """Downloads every remote object under relpath into local_dir (resume on a fresh disk).

    Returns the relpaths of all those objects; local copies that already match are kept as is.
    exact=True also removes local files under relpath that the bucket does not have (the bucket
    is the source of truth: e.g. a checkpoint or result.json a killed process never uploaded).
    """
    if self.remote is None:
      return []
    rel = self._rel(relpath)
    try:
      blobs = self._retrying(lambda t: self._list(rel, t), f"list {self._url(rel)}")
      blobs = {r: b for r, b in blobs.items() if not is_unmirrored(r)}
      pulled = _download_tree(self._bucket(), blobs, self.local_dir, self._retry_budget)
    except (StorageError, UsageError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise StorageError(f"{self._url(rel)}: pull failed: {_one_line(e)}") from e
    if exact:
      for stale in set(self._scan(rel)) - set(pulled):
        os.remove(self._local(stale))
    return pulled

  # -- during training -------------------------------------------------------------------------

  def sync(self, relpath: str, last: Sequence[str] = ()) -> None:
    """Queues mirroring of local file/folder relpath to the bucket; returns at once.

    Exact mirror: remote objects under relpath that are not local are deleted, so only sync
    folders this process owns. Files whose basename is in `last` go up after all others (in
    `last` order); their bytes are captured now, so they describe exactly this moment.
    """
    if self.remote is None:
      return
    if self._closed:
      raise RuntimeError("RunStorage.sync() after close()")
    rel = self._rel(relpath)
    if isinstance(last, str):
      last = (last,)
    rank = {name: i for i, name in reversed(list(enumerate(last)))}
    files, last_data, last_rank = self._scan(rel), {}, {}
    for r in list(files):
      base = r.rsplit("/", 1)[-1]
      if base in rank:
        try:
          with open(self._local(r), "rb") as f:
            last_data[r] = f.read()
        except FileNotFoundError:
          del files[r]
          continue
        last_rank[r] = rank[base]
    self._start_worker()
    self._queue.put(_SyncTask(rel, files, last_data, last_rank))

  def _scan(self, rel: str) -> Dict[str, Tuple[int, int]]:
    root = self._local(rel)
    if os.path.isfile(root):
      st = os.stat(root)
      return {rel: (st.st_size, st.st_mtime_ns)}
    files = {}
    for dirpath, _, filenames in os.walk(root):
      for fn in filenames:
        path = os.path.join(dirpath, fn)
        relpath = os.path.relpath(path, self.local_dir).replace(os.sep, "/")
        if is_unmirrored(relpath):
          continue  # a write or pull() in progress, or a lease
        try:
          st = os.stat(path)
        except FileNotFoundError:
          continue
        if stat.S_ISREG(st.st_mode):
          files[relpath] = (st.st_size, st.st_mtime_ns)
    return files

  def _start_worker(self):
    with self._lock:
      if self._thread is None:
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mnist-distill-storage",
                                        daemon=True)
        self._thread.start()

  def _work(self):
    while True:
      task = self._queue.get()
      try:
        if task is None:
          return
        if self._error is not None:
          # Keep the order promise: nothing queued after a failure goes up before flush()
          # has reported it (a completion marker must not outrun missing data).
          log.warning("%s: not synced, an earlier sync failed", self._url(task.rel))
          continue
        try:
          self._mirror(task)
        except StorageError as e:
          self._error = e
        except Exception as e:  # pylint: disable=broad-except
          self._error = StorageError(f"{self._url(task.rel)}: sync failed: {_one_line(e)}")
        if self._error is not None:
          log.error("%s", self._error)
      finally:
        self._queue.task_done()

  def _session_lost(self, exc) -> bool:
    """A 404 while uploading into an existing bucket: a resumable session the server forgot."""
    if not _is_not_found(exc):
      return False
    bucket = self._bucket()
    try:  # Listing, not buckets.get: the job may only hold object permissions.
      list(bucket.client.list_blobs(bucket, max_results=1, retry=None, timeout=10))
      return True
    except Exception as e:  # pylint: disable=broad-except
      return not _is_not_found(e)  # Unreachable right now is transient too.

  def _upload(self, rel: str, data: Optional[bytes] = None, mtime_ns: int = 0) -> bool:
    """Uploads local file rel (or `data`); False if the file vanished meanwhile."""
    def attempt(timeout):
      blob = self._bucket().blob(self._name(rel), chunk_size=None)
      if data is not None:
        blob.metadata = {_MTIME_KEY: str(mtime_ns)}
        blob.upload_from_file(io.BytesIO(data), size=len(data), retry=None, timeout=timeout)
        return
      with open(self._local(rel), "rb") as f:
        st = os.fstat(f.fileno())
        blob.metadata = {_MTIME_KEY: str(st.st_mtime_ns)}
        blob.upload_from_file(f, size=st.st_size, retry=None, timeout=timeout)

    try:
      self._retrying(attempt, f"upload {self._url(rel)}", also_retry=self._session_lost)
      return True
    except FileNotFoundError:
      return False

  def _mirror(self, task: _SyncTask) -> None:
    started = time.monotonic()
    remote = self._retrying(lambda t: self._list(task.rel, t), f"list {self._url(task.rel)}")
    uploaded = unchanged = deleted = 0
    superseded = False
    for rel in sorted(r for r in task.files if r not in task.last):
      blob = remote.get(rel)
      try:
        st = os.stat(self._local(rel))
      except FileNotFoundError:
        superseded = True
        continue
      if (blob is not None and blob.size == st.st_size
          and (blob.metadata or {}).get(_MTIME_KEY) == str(st.st_mtime_ns)):
        unchanged += 1
      elif self._upload(rel):
        uploaded += 1
      else:
        superseded = True
    if superseded:
      # A file of the snapshot is gone: the trainer moved on and will sync again. Publishing
      # this snapshot's `last` files or deletions now could point at data that never went up.
      log.info("%s changed while queued; its final files and deletions wait for the next sync",
               self._url(task.rel))
    else:
      for rel in sorted(task.last, key=lambda r: (task.last_rank[r], r)):
        blob = remote.get(rel)
        if blob is not None and blob.md5_hash == _md5_b64(task.last[rel]):
          unchanged += 1
        else:
          self._upload(rel, task.last[rel], task.files[rel][1])
          uploaded += 1
      for rel in sorted(r for r in set(remote) - set(task.files) if not is_lease(r)):
        self._retrying(lambda t, r=rel: self._delete(r, t), f"delete {self._url(rel)}")
        deleted += 1
    log.info("synced %s: %d uploaded, %d deleted, %d unchanged (%.1fs)", self._url(task.rel),
             uploaded, deleted, unchanged, time.monotonic() - started)

  def _delete(self, rel: str, timeout) -> None:
    try:
      self._bucket().blob(self._name(rel)).delete(retry=None, timeout=timeout)
    except Exception as e:  # pylint: disable=broad-except
      if not _is_not_found(e):  # Already gone (e.g. a retry after a lost response): fine.
        raise

  def raise_if_failed(self) -> None:
    """Raises (without waiting) if a background sync already failed for good, so that a job
    whose bucket is gone stops at its next checkpoint instead of training on unsaved."""
    error = self._error
    if error is not None:
      raise StorageError(str(error))

  def flush(self) -> None:
    """Waits for all queued syncs; raises StorageError (one line) if one failed for good.

    The failure is reported once; syncs queued after it were dropped, and a later sync()
    of the same folders uploads whatever is still missing.
    """
    if self._queue is None:
      return
    self._queue.join()
    error, self._error = self._error, None
    if error is not None:
      raise error

  def close(self) -> None:
    """flush(), then stops the worker thread (even if flush raises)."""
    if self._closed:
      return
    self._closed = True
    try:
      self.flush()
    finally:
      if self._thread is not None:
        self._queue.put(None)
        self._thread.join()
        self._thread = None

  # -- reading what is there -------------------------------------------------------------------

  def list_remote(self, relpath) -> List[str]:
    """Relpaths (relative to the run folder, '/'-separated) of the objects under relpath."""
    rel = self._rel(relpath)
    if self.remote is None:
      return sorted(self._scan(rel)) if os.path.exists(self._local(rel)) else []
    return sorted(self._call(lambda t: self._list(rel, t), f"list {self._url(rel)}"))

  def _call(self, fn, what):
    """Runs a read with retries; anything but FileNotFoundError becomes StorageError."""
    try:
      return self._retrying(fn, what)
    except (StorageError, FileNotFoundError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise StorageError(f"{what}: {_one_line(e)}") from e


def _staging_base() -> str:
  return (os.environ.get(STAGING_ENV, "").strip()
          or os.path.join(tempfile.gettempdir(), "mnist-distill-staging"))


def local_folder(model_dir: str, staging_root: Optional[str] = None,
                 flag_name: str = "--model_dir") -> str:
  """Where the run's files are written on this machine: a local model_dir itself, a gs:// one's
  staging folder (staging_root/<bucket>/<prefix>). Creates nothing."""
  location = parse_location(model_dir, flag_name)
  if not location:
    return model_dir
  bucket, prefix = location
  return _join(os.path.join(staging_root or _staging_base(), bucket), prefix)


def open_storage(model_dir: str, staging_root: Optional[str] = None,
                 flag_name: str = "--model_dir") -> RunStorage:
  """RunStorage for --model_dir: local paths as is, gs:// via a local staging folder.

  The staging folder (staging_root/<bucket>/<prefix>) is kept between runs on the same disk, so
  a restarted process finds its files; the bucket stays the source of truth (see pull()).
  A malformed URL is a UsageError naming `flag_name` (parse_location).
  """
  location = parse_location(model_dir, flag_name)
  local_dir = local_folder(model_dir, staging_root, flag_name)
  storage = RunStorage(local_dir=local_dir, remote=location_url(*location) if location else None)
  try:
    os.makedirs(storage.local_dir, exist_ok=True)
  except OSError as e:
    raise UsageError(f"{flag_name}={model_dir}: cannot create {storage.local_dir}: "
                     f"{_one_line(e)}") from None
  return storage


def fetch_to_local(url: str, dest_root: Optional[str] = None, flag_name: str = "input") -> str:
  """Returns a local folder with the contents of `url`: local paths unchanged, gs:// downloaded
  (a URL that names one object gives that file's local copy).

  The copy lives in dest_root/<bucket>/<prefix> (default: a `_inputs` folder in the staging
  root) and is an exact mirror: unchanged files are not fetched again, stale ones are removed.
  A malformed URL, a missing or unreachable bucket, an empty prefix or an object whose name
  does not map inside the copy raises UsageError (naming `flag_name` where it helps).
  """
  location = parse_location(url, flag_name)
  if location is None:
    return url
  bucket_name, prefix = location
  dest = _join(os.path.join(dest_root or os.path.join(_staging_base(), "_inputs"), bucket_name),
               prefix)
  budget = retry_seconds()
  try:
    bucket = _make_client().bucket(bucket_name)
    blobs = with_retries(lambda t: _list_tree(bucket, prefix, t), f"list {url}",
                          min(budget, CHECK_SECONDS))
  except Exception as e:  # pylint: disable=broad-except
    raise _unusable(f"{flag_name}={url}", bucket_name, e, "cannot list") from None
  if set(blobs) == {""} and not is_unmirrored(os.path.basename(prefix)):
    # The URL names one object (a .keras teacher, say): fetch that file.
    try:
      _download(bucket, blobs[""], dest, budget)
    except Exception as e:  # pylint: disable=broad-except
      raise StorageError(f"{url}: download failed: {_one_line(e)}") from e
    return dest
  blobs.pop("", None)  # An object named exactly like the folder: not part of the tree.
  blobs = {r: b for r, b in blobs.items() if not is_unmirrored(r)}
  if not blobs:
    raise UsageError(f"{flag_name}={url}: no objects under this prefix")
  try:
    _download_tree(bucket, blobs, dest, budget)
  except (StorageError, UsageError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(f"{url}: download failed: {_one_line(e)}") from e
  for dirpath, _, filenames in os.walk(dest):
    for fn in filenames:
      path = os.path.join(dirpath, fn)
      if os.path.relpath(path, dest).replace(os.sep, "/") not in blobs:
        os.remove(path)
  log.info("fetched %s to %s (%d files)", url, dest, len(blobs))
  return dest

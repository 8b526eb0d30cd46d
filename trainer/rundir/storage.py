"""The run's folder in a bucket: mirrors the job's local output folder to gs://bucket/prefix.

Why this exists: TensorFlow's own gs:// filesystem cannot be pointed at a test server, so the
trainer only ever reads and writes local folders. This module moves them to and from Cloud Storage
with google-cloud-storage (which honours STORAGE_EMULATOR_HOST), uploading on one background
thread so training never waits on the network. The rest of the bucket layer: the location
grammar (trainer/rundir/locations.py), the client and retry policy (trainer/rundir/gcs.py) and
safe downloads (trainer/rundir/downloads.py).

Mirroring rules, in short:
  * sync() snapshots the file list (and the bytes of the `last` files) when it is called; the
    worker uploads new/changed files, then the `last` files, then deletes remote leftovers. The
    bucket therefore never shows a `last` file (TF's "checkpoint" state, a result.json marker)
    before the data it refers to, nor loses data a visible `last` file still refers to.
  * "Changed" = size or mtime differ from what the object records in its custom metadata
    (`last` files: md5). pull() restores that mtime locally, so pulled files are not re-uploaded.
  * Each upload is a single object write (chunk_size=None, the size always given), so no half
    object is ever visible; a 404 while uploading into a bucket that still exists is a
    resumable session the server forgot, retried as transient.
  * Temporary files (`.tmp-*`, `*.tmp-*`) and the lease folder are never mirrored: see
    locations.is_unmirrored().
"""

import base64
import dataclasses
import hashlib
import io
import logging
import os
import queue
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from trainer.errors import StorageError, UsageError
from trainer.rundir import downloads, gcs
from trainer.rundir.downloads import MTIME_KEY, local_files
from trainer.rundir.locations import is_lease, is_unmirrored, join, location_url, parse_location

log = logging.getLogger(__name__)

_WRITE_PERMISSIONS = ("storage.objects.create", "storage.objects.delete",
                      "storage.objects.get", "storage.objects.list")


def _md5_b64(data: bytes) -> str:
  return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


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
    self._retry_budget = gcs.retry_seconds()
    self._bucket = gcs.ThreadBuckets(self._bucket_name)
    self._lock = threading.Lock()
    self._queue = None
    self._thread = None
    self._error: Optional[StorageError] = None
    self._closed = False

  # -- helpers ---------------------------------------------------------------------------------

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
    return join(self.local_dir, rel)

  def _list(self, rel: str, timeout) -> Dict[str, object]:
    """Remote objects under rel, keyed by their relpath in the run folder."""
    base = self._name(rel)
    found = downloads.list_tree(self._bucket(), base, timeout)
    return {"/".join(p for p in (rel, k) if p): b for k, b in found.items() if k or rel}

  def _retrying(self, fn, what, budget=None, also_retry=None):
    return gcs.with_retries(fn, what, self._retry_budget if budget is None else budget,
                            also_retry)

  # -- before training -------------------------------------------------------------------------

  def check(self) -> None:
    """Fails fast (UsageError, one line, <= ~20 s) if the bucket is missing or unreachable."""
    if self.remote is None:
      return
    deadline = time.monotonic() + min(self._retry_budget, gcs.CHECK_SECONDS)
    try:
      bucket = self._bucket()
      self._retrying(lambda t: list(bucket.client.list_blobs(
          bucket, prefix=self._name("") or None, max_results=1, retry=None, timeout=t)),
                     f"list {self.remote}", max(0.0, deadline - time.monotonic()))
      granted = self._retrying(lambda t: bucket.test_iam_permissions(
          list(_WRITE_PERMISSIONS), retry=None, timeout=t), f"permissions on {self.remote}",
                               max(0.0, deadline - time.monotonic()))
    except Exception as e:  # pylint: disable=broad-except
      raise gcs.unusable(self.remote, self._bucket_name, e, "cannot use this bucket") from None
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
    with gcs.as_storage_error(f"{self._url(rel)}: pull failed"):
      blobs = self._retrying(lambda t: self._list(rel, t), f"list {self._url(rel)}")
      blobs = {r: b for r, b in blobs.items() if not is_unmirrored(r)}
      pulled = downloads.download_tree(self._bucket(), blobs, self.local_dir,
                                       self._retry_budget)
    if exact:
      downloads.remove_stale(self.local_dir, rel, pulled)
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
    files, last_data, last_rank = local_files(self.local_dir, rel), {}, {}
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
          self._error = StorageError(f"{self._url(task.rel)}: sync failed: {gcs.one_line(e)}")
        if self._error is not None:
          log.error("%s", self._error)
      finally:
        self._queue.task_done()

  def _session_lost(self, exc) -> bool:
    """A 404 while uploading into an existing bucket: a resumable session the server forgot."""
    if not gcs.is_not_found(exc):
      return False
    bucket = self._bucket()
    try:  # Listing, not buckets.get: the job may only hold object permissions.
      list(bucket.client.list_blobs(bucket, max_results=1, retry=None, timeout=10))
      return True
    except Exception as e:  # pylint: disable=broad-except
      return not gcs.is_not_found(e)  # Unreachable right now is transient too.

  def _upload(self, rel: str, data: Optional[bytes] = None, mtime_ns: int = 0) -> bool:
    """Uploads local file rel (or `data`); False if the file vanished meanwhile."""
    def attempt(timeout):
      blob = self._bucket().blob(self._name(rel), chunk_size=None)
      if data is not None:
        blob.metadata = {MTIME_KEY: str(mtime_ns)}
        blob.upload_from_file(io.BytesIO(data), size=len(data), retry=None, timeout=timeout)
        return
      with open(self._local(rel), "rb") as f:
        st = os.fstat(f.fileno())
        blob.metadata = {MTIME_KEY: str(st.st_mtime_ns)}
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
          and (blob.metadata or {}).get(MTIME_KEY) == str(st.st_mtime_ns)):
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
      if not gcs.is_not_found(e):  # Already gone (e.g. a retry after a lost response): fine.
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
      return sorted(local_files(self.local_dir, rel)) if os.path.exists(self._local(rel)) else []
    return sorted(self._call(lambda t: self._list(rel, t), f"list {self._url(rel)}"))

  def _call(self, fn, what):
    """Runs a read with retries; anything but FileNotFoundError becomes StorageError."""
    with gcs.as_storage_error(what, keep=(FileNotFoundError,)):
      return self._retrying(fn, what)


def local_folder(model_dir: str, staging_root: Optional[str] = None,
                 flag_name: str = "--model_dir") -> str:
  """Where the run's files are written on this machine: a local model_dir itself, a gs:// one's
  staging folder (staging_root/<bucket>/<prefix>). Creates nothing."""
  location = parse_location(model_dir, flag_name)
  if not location:
    return model_dir
  bucket, prefix = location
  return join(os.path.join(staging_root or downloads.staging_base(), bucket), prefix)


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
                     f"{gcs.one_line(e)}") from None
  return storage


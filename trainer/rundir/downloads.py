"""Safe downloads from a bucket: every object name is checked to map inside the destination
before anything is written, each file arrives whole (a temporary name, then a rename) and keeps
the object's mtime, and copies that already match are not fetched again. fetch_to_local() gives
any input flag (--idx_dir, --teacher_model, ...) a local folder.

Objects are fetched with chunk_size=None, one plain GET each, and 0-byte objects are not
fetched at all (the local file is created): see tests/gcs_emulator.py for why.
"""

import logging
import os
import stat
import tempfile
import uuid
from typing import Dict, List, Optional, Tuple

from trainer.errors import UsageError
from trainer.rundir import gcs
from trainer.rundir.locations import PART_SUFFIX, is_unmirrored, join, name_problem, parse_location

log = logging.getLogger(__name__)

STAGING_ENV = "MNIST_DISTILL_STAGING"
MTIME_KEY = "mnist-distill-mtime-ns"  # custom metadata: the uploaded file's mtime


def staging_base() -> str:
  return (os.environ.get(STAGING_ENV, "").strip()
          or os.path.join(tempfile.gettempdir(), "mnist-distill-staging"))


def remote_mtime_ns(blob) -> Optional[int]:
  """The mtime a local copy of `blob` should carry: ours if we uploaded it, else `updated`."""
  raw = (blob.metadata or {}).get(MTIME_KEY)
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
          and st.st_mtime_ns == remote_mtime_ns(blob))


def list_tree(bucket, base: str, timeout) -> Dict[str, object]:
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


def local_files(root: str, rel: str = "") -> Dict[str, Tuple[int, int]]:
  """relpath -> (size, mtime_ns) of the regular files at or under root/rel, relpaths
  '/'-separated from root; temporary files and leases are left out (is_unmirrored)."""
  top = join(root, rel)
  if os.path.isfile(top):
    st = os.stat(top)
    return {rel: (st.st_size, st.st_mtime_ns)}
  files = {}
  for dirpath, _, filenames in os.walk(top):
    for fn in filenames:
      path = os.path.join(dirpath, fn)
      relpath = os.path.relpath(path, root).replace(os.sep, "/")
      if is_unmirrored(relpath):
        continue  # a write or download in progress, or a lease
      try:
        st = os.stat(path)
      except FileNotFoundError:
        continue
      if stat.S_ISREG(st.st_mode):
        files[relpath] = (st.st_size, st.st_mtime_ns)
  return files


def remove_stale(root: str, rel: str, keep) -> None:
  """Removes the files under root/rel that `keep` (relpaths from root) does not name: what makes
  a download an exact mirror of the bucket."""
  for stale in set(local_files(root, rel)) - set(keep):
    os.remove(join(root, stale))


def download(bucket, blob, dest: str, budget: float) -> None:
  """Downloads `blob` to dest atomically (temp file + rename) and stamps the remote mtime."""
  os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
  tmp = os.path.join(os.path.dirname(dest),
                     f".{os.path.basename(dest)}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}")

  def attempt(timeout):
    with open(tmp, "wb") as f:
      if blob.size:  # 0-byte objects: nothing to fetch
        bucket.blob(blob.name, chunk_size=None).download_to_file(f, retry=None, timeout=timeout)

  try:
    gcs.with_retries(attempt, f"download gs://{bucket.name}/{blob.name}", budget)
    mtime = remote_mtime_ns(blob)
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
    why = name_problem(rel) or _name_clash(rel, blobs)
    dest = join(dest_root, rel)
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


def download_tree(bucket, blobs: Dict[str, object], dest_root: str, budget: float) -> List[str]:
  """Makes dest_root/<rel> a copy of every blob; skips local copies that already match.
  Every name is checked first (_destinations), so a bad one means nothing is written."""
  for rel, dest in _destinations(bucket.name, blobs, dest_root).items():
    if not _local_matches(dest, blobs[rel]):
      download(bucket, blobs[rel], dest, budget)
  return sorted(blobs)


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
  dest = join(os.path.join(dest_root or os.path.join(staging_base(), "_inputs"), bucket_name),
              prefix)
  budget = gcs.retry_seconds()
  try:
    bucket = gcs.bucket_handle(bucket_name)
    blobs = gcs.with_retries(lambda t: list_tree(bucket, prefix, t), f"list {url}",
                             min(budget, gcs.CHECK_SECONDS))
  except Exception as e:  # pylint: disable=broad-except
    raise gcs.unusable(f"{flag_name}={url}", bucket_name, e, "cannot list") from None
  if set(blobs) == {""} and not is_unmirrored(os.path.basename(prefix)):
    # The URL names one object (a .keras teacher, say): fetch that file.
    with gcs.as_storage_error(f"{url}: download failed", keep=()):
      download(bucket, blobs[""], dest, budget)
    return dest
  blobs.pop("", None)  # An object named exactly like the folder: not part of the tree.
  blobs = {r: b for r, b in blobs.items() if not is_unmirrored(r)}
  if not blobs:
    raise UsageError(f"{flag_name}={url}: no objects under this prefix")
  with gcs.as_storage_error(f"{url}: download failed"):
    download_tree(bucket, blobs, dest, budget)
  remove_stale(dest, "", blobs)
  log.info("fetched %s to %s (%d files)", url, dest, len(blobs))
  return dest

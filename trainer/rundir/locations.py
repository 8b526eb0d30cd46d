"""Where the job reads and writes: the one grammar for every flag or variable that may name a
bucket, and the rules object names must follow to map onto a local folder. Pure Python (no
Cloud Storage client), so that trainer/flags.py can check locations without the bucket layer.

Anything that looks like a URL is a valid gs://BUCKET[/PREFIX] or a UsageError; only values that
do not look like URLs are local paths. Object names read from a bucket must map to a path inside
the local destination (name_problem), or a download is refused before anything is written
(trainer/rundir/downloads.py).
"""

import os
import re
from typing import Optional, Tuple

from trainer.errors import UsageError
from trainer.rundir import layout

LEASES = layout.LEASES
PART_SUFFIX = ".mnist-distill-part"  # our own partial downloads (trainer/rundir/downloads.py)
_TMP_MARK = ".tmp-"  # trainer.rundir.layout's temporary names (and older `name.tmp-<pid>` ones)


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
    why = name_problem(prefix)
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


def name_problem(name: str) -> Optional[str]:
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

def join(root: str, rel: str) -> str:
  """The local path of the '/'-separated `rel` below `root`."""
  return os.path.join(root, *[p for p in rel.split("/") if p])


def is_lease(rel: str) -> bool:
  """True for relpaths in the run's lease folder (trainer/rundir/lease.py)."""
  return rel.replace(os.sep, "/").split("/", 1)[0] == LEASES


def is_unmirrored(rel: str) -> bool:
  """Never uploaded, downloaded or deleted by mirroring: temporary files (any path part named
  `.tmp-*` or `*.tmp-*`, our own partial downloads) and the leases (trainer/rundir/lease.py
  writes those itself, with generation preconditions that a mirror's plain writes would
  defeat)."""
  parts = rel.replace(os.sep, "/").split("/")
  return (is_lease(rel) or parts[-1].endswith(PART_SUFFIX)
          or any(_TMP_MARK in p for p in parts))

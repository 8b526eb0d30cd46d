"""Readers of a RunStorage's destination that only tests need (the job never reads them back).

They look where the run's files end up: the bucket for a gs:// run, else the local folder."""

import os

from trainer.rundir import locations, storage
from trainer.rundir.gcs import bucket_handle


def _where(run: storage.RunStorage, relpath: str):
  """(bucket, object name) of relpath for a gs:// run, None for a local one."""
  if run.remote is None:
    return None
  bucket, prefix = locations.parse_location(run.remote, "remote")
  return bucket, "/".join(p for p in (prefix, relpath.strip("/")) if p)


def exists_remote(run: storage.RunStorage, relpath: str) -> bool:
  """True if relpath is an object, or a folder with at least one object, at the destination."""
  if run.remote is None:
    return os.path.exists(os.path.join(run.local_dir, *relpath.split("/")))
  return bool(run.list_remote(relpath))


def read_remote(run: storage.RunStorage, relpath: str) -> bytes:
  """Bytes of one object at the destination; FileNotFoundError if it is absent."""
  where = _where(run, relpath)
  if where is None:
    with open(os.path.join(run.local_dir, *relpath.split("/")), "rb") as f:
      return f.read()
  from google.api_core import exceptions
  bucket, name = where
  try:
    return bucket_handle(bucket).blob(name, chunk_size=None).download_as_bytes()
  except exceptions.NotFound:
    raise FileNotFoundError(f"gs://{bucket}/{name} does not exist") from None

"""A real GCS emulator (gcp-storage-emulator) on a free 127.0.0.1 port, for tests.

Why in-process: it starts in milliseconds, and stop()/start() keep the stored objects (the data
lives in this object, not in the server thread), which is what an outage looks like from the
client. STORAGE_EMULATOR_HOST is set for the fixture's lifetime, so subprocesses (e.g. the
trainer run as a command) reach it too.

Use the ready-made `gcs_emulator` fixture from tests/conftest.py, or make your own:

    from gcs_emulator import gcs_emulator_fixture
    gcs = gcs_emulator_fixture(bucket="inputs", scope="module")  # a fixture named `gcs`

    def test_something(gcs):
      url = gcs.url("run1")                 # "gs://inputs/run1"
      ...
      assert gcs.read("run1/result.json") == b"..."
"""

import functools
import http.server
import socket
import threading
from typing import Dict, Iterable, Optional

import pytest
from gcp_storage_emulator.handlers.buckets import create_bucket
from gcp_storage_emulator.server import RequestHandler
from gcp_storage_emulator.storage import Storage

HOST = "127.0.0.1"
DEFAULT_BUCKET = "test-bucket"


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


class GcsEmulator:
  """In-memory emulator; `bucket` (the first of `buckets`) exists from the start."""

  def __init__(self, buckets: Iterable[str] = (DEFAULT_BUCKET,), port: Optional[int] = None):
    self.port = port or free_port()
    self.storage = Storage(use_memory_fs=True)
    names = list(buckets)
    self.bucket = names[0] if names else None
    for name in names:
      self.create_bucket(name)
    self._server = None
    self._thread = None

  @property
  def endpoint(self) -> str:
    """The value for STORAGE_EMULATOR_HOST."""
    return f"http://{HOST}:{self.port}"

  @property
  def running(self) -> bool:
    return self._server is not None

  def start(self) -> "GcsEmulator":
    """Serves on self.port (again, after stop(): same port, same data)."""
    if self._server is None:
      # The emulator's own request handler on a plain HTTPServer (what its APIThread does), so
      # that we own the poll interval: stop() then takes milliseconds instead of 0.5 s.
      self._server = http.server.HTTPServer((HOST, self.port),
                                            functools.partial(RequestHandler, self.storage))
      self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                      name=f"gcs-emulator-{self.port}", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    """Closes the listening socket: clients get 'connection refused' until start()."""
    server, self._server = self._server, None
    if server is not None:
      server.shutdown()  # waits for the request in progress, if any
      server.server_close()
      self._thread.join(timeout=5)

  def create_bucket(self, name: str) -> None:
    create_bucket(name, self.storage)

  def url(self, prefix: str = "", bucket: Optional[str] = None) -> str:
    return f"gs://{bucket or self.bucket}/{prefix}".rstrip("/")

  def objects(self, prefix: str = "", bucket: Optional[str] = None) -> Dict[str, dict]:
    """Object name -> GCS object resource (size, generation, metadata...), read directly from
    the emulator's memory, so it also works while the server is stopped."""
    items = self.storage.objects.get(bucket or self.bucket, {})
    return {name: dict(obj) for name, obj in sorted(items.items()) if name.startswith(prefix)}

  def read(self, name: str, bucket: Optional[str] = None) -> bytes:
    """Content of one object, read directly from the emulator's memory."""
    return self.storage.get_file(bucket or self.bucket, name)

  def client(self):
    """A google-cloud-storage client for this emulator (anonymous, project 'test')."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    return storage.Client(project="test", credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": self.endpoint})

  def __enter__(self):
    return self.start()

  def __exit__(self, *exc):
    self.stop()


def gcs_emulator_fixture(bucket: str = DEFAULT_BUCKET, scope: str = "function"):
  """Returns a pytest fixture yielding a running GcsEmulator with `bucket`, with
  STORAGE_EMULATOR_HOST pointing at it; everything is undone afterwards."""

  @pytest.fixture(scope=scope)
  def _fixture():
    emulator = GcsEmulator(buckets=(bucket,)).start()
    patch = pytest.MonkeyPatch()
    patch.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint)
    try:
      yield emulator
    finally:
      patch.undo()
      emulator.stop()

  return _fixture

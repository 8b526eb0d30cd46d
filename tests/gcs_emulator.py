"""A real GCS emulator (gcp-storage-emulator) on a free 127.0.0.1 port, for tests.

Why in-process: it starts in milliseconds, and stop()/start() keep the stored objects (the data
lives in this object, not in the server thread), which is what an outage looks like from the
client. STORAGE_EMULATOR_HOST is set for the fixture's lifetime, so subprocesses (e.g. the
trainer run as a command) reach it too.

Two ways in which gcp-storage-emulator 2026.7.19 differs from Cloud Storage are mended here
(faithful=False gives the emulator exactly as released):
  * Generation preconditions: it ignores `ifGenerationMatch` and `ifGenerationNotMatch` (a
    create with ifGenerationMatch=0 over an existing object succeeds; so do writes and deletes
    naming a wrong generation). Cloud Storage answers 412, and the trainer's leases depend on
    that, so both are enforced on object writes (all upload kinds), deletes and metadata
    patches. The server handles one request at a time, so check and write are atomic, as in
    Cloud Storage.
  * Object names: it stores each object at a path made of its name, so a name with a '..'
    segment (legal in Cloud Storage) crashes the handler and 'a//b' lands on 'a/b'. Contents
    are stored under the percent-encoded name instead, so every legal name round-trips.

Quirks left as released, which the trainer's bucket code (trainer/rundir/) keeps clear of:
  * A ranged GET of a 0-byte object answers `Content-Range: bytes 0--1/0`, which the client
    rejects; and a 0-byte `uploadType=media` upload crashes the handler, so the connection drops
    with no response (indistinguishable from an outage: it would be retried until the deadline).
    So blobs get chunk_size=None (one plain GET per download, never ranges), uploads always pass
    the size (0-byte files go as one multipart request, never `media`), and 0-byte objects are
    never downloaded at all (the local file is just created).
  * Resumable sessions live in the server's memory: a restart between the session POST and its
    PUT answers 404 for the session. chunk_size=None keeps uploads to one request (<= 8 MiB,
    multipart) or one session POST plus a single PUT (larger files, up to 100 MiB); a 404 during
    an upload is retried as transient when the bucket itself still exists. (Multi-chunk
    resumable uploads, with 1 MiB chunks or an unknown total size, did round-trip byte-exact
    in this emulator version; older ones could not, which is one more reason to avoid them.)
  * Object listings ignore maxResults/pageToken (everything comes at once): harmless, but never
    rely on max_results to bound work.

Use the ready-made `gcs_emulator` fixture from tests/conftest.py, or make your own:

    from gcs_emulator import gcs_emulator_fixture
    gcs = gcs_emulator_fixture(bucket="inputs", scope="module")  # a fixture named `gcs`

    def test_something(gcs):
      url = gcs.url("run1")                 # "gs://inputs/run1"
      ...
      assert gcs.read("run1/result.json") == b"..."
"""

import ctypes
import functools
import http.server
import json
import os
import socket
import ssl
import threading
import urllib.parse
from typing import Dict, Iterable, Optional

import pytest
from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator.handlers.buckets import create_bucket
from gcp_storage_emulator.storage import Storage

HOST = "127.0.0.1"
DEFAULT_BUCKET = "test-bucket"
CLONE_NEWNET = 0x40000000


def in_netns(netns: Optional[str], fn):
  """fn() called on a thread that joined the network namespace at `netns` (a /proc/PID/ns/net
  path; None: this one), its result returned. A socket keeps the namespace it was made in, so a
  server or client socket made by fn serves or talks there for good, whichever thread uses it."""
  if netns is None:
    return fn()
  outcome = {}

  def run():
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      fd = os.open(netns, os.O_RDONLY)
      try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
          raise OSError(ctypes.get_errno(), f"setns({netns})")
      finally:
        os.close(fd)
      outcome["value"] = fn()
    except BaseException as e:  # re-raised in the caller's thread
      outcome["error"] = e

  thread = threading.Thread(target=run, name="in-netns")
  thread.start()
  thread.join()
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


def free_port(host: str = HOST) -> int:
  """A TCP port on host (127.0.0.1) that nothing listens on right now."""
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


class PreconditionFailed(Exception):
  """A write or delete whose generation precondition does not hold (HTTP 412)."""


class _FaithfulStorage(Storage):
  """The emulator's store, with Cloud Storage's preconditions and object names (see above).

  `query` holds the current request's query parameters (set by _Handler)."""

  query: Dict[str, list] = {}

  def _object_path(self, bucket_name, file_name):
    return f"{bucket_name}/{urllib.parse.quote(file_name, safe='')}"  # one flat key per name

  def _generation(self, bucket_name, file_name) -> int:
    obj = self.objects.get(bucket_name, {}).get(file_name)
    return int(obj["generation"]) if obj else 0  # 0: "does not exist", as in Cloud Storage

  def _check(self, bucket_name, file_name):
    current = self._generation(bucket_name, file_name)
    match = self.query.get("ifGenerationMatch")
    if match and int(match[0]) != current:
      raise PreconditionFailed(f"ifGenerationMatch={match[0]} but {file_name!r} has "
                               f"generation {current}")
    not_match = self.query.get("ifGenerationNotMatch")
    if not_match and int(not_match[0]) == current:
      raise PreconditionFailed(f"ifGenerationNotMatch={not_match[0]} holds for {file_name!r}")

  def create_resumable_upload(self, bucket_name, file_name, file_obj):
    self._check(bucket_name, file_name)
    return super().create_resumable_upload(bucket_name, file_name, file_obj)

  def create_file(self, bucket_name, file_name, content, file_obj, file_id=None):
    self._check(bucket_name, file_name)
    return super().create_file(bucket_name, file_name, content, file_obj, file_id)

  def delete_file(self, bucket_name, file_name):
    if self._generation(bucket_name, file_name):  # a missing object stays a 404
      self._check(bucket_name, file_name)
    return super().delete_file(bucket_name, file_name)

  def patch_object(self, bucket_name, file_name, file_obj):
    self._check(bucket_name, file_name)
    return super().patch_object(bucket_name, file_name, file_obj)


class _Handler(emulator_server.RequestHandler):
  """The emulator's handler, answering 412 when _FaithfulStorage refuses a request."""

  def _route(self, method):
    self.storage.query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
    try:
      emulator_server.Router(self).handle(method)
    except PreconditionFailed as e:
      body = json.dumps({"error": {"code": 412, "message": str(e), "errors": [
          {"domain": "global", "reason": "conditionNotMet", "message": str(e)}]}}).encode()
      self.send_response(412, "Precondition Failed")
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)
    finally:
      self.storage.query = {}

  def do_GET(self):
    self._route(emulator_server.GET)

  def do_POST(self):
    self._route(emulator_server.POST)

  def do_PUT(self):
    self._route(emulator_server.PUT)

  def do_DELETE(self):
    self._route(emulator_server.DELETE)

  def do_PATCH(self):
    self._route(emulator_server.PATCH)


class GcsEmulator:
  """In-memory emulator; `bucket` (the first of `buckets`) exists from the start."""

  def __init__(self, buckets: Iterable[str] = (DEFAULT_BUCKET,), port: Optional[int] = None,
               faithful: bool = True, host: str = HOST, netns: Optional[str] = None):
    # host and netns: where it listens (netns: a /proc/PID/ns/net path, e.g. a local cluster's,
    # so that its pods reach it; the objects stay readable here in memory).
    self.host, self.netns = host, netns
    self.port = port or in_netns(netns, lambda: free_port(host))
    # faithful=False: the emulator exactly as released (see the module docstring).
    self.storage = (_FaithfulStorage if faithful else Storage)(use_memory_fs=True)
    self._handler = _Handler if faithful else emulator_server.RequestHandler
    names = list(buckets)
    self.bucket = names[0] if names else None
    for name in names:
      self.create_bucket(name)
    self._server = None
    self._thread = None

  @property
  def endpoint(self) -> str:
    """The value for STORAGE_EMULATOR_HOST."""
    return f"http://{self.host}:{self.port}"

  @property
  def running(self) -> bool:
    return self._server is not None

  def start(self) -> "GcsEmulator":
    """Serves on self.port (again, after stop(): same port, same data)."""
    if self._server is None:
      # The emulator's own request handler on a plain HTTPServer (what its APIThread does), so
      # that we own the poll interval: stop() then takes milliseconds instead of 0.5 s.
      self._server = self._serve(self.port)
      self._thread = self._server.thread
    return self

  def _serve(self, port: int, tls: Optional[ssl.SSLContext] = None) -> http.server.HTTPServer:
    handler = functools.partial(self._handler, self.storage)
    server = in_netns(self.netns, lambda: http.server.HTTPServer((self.host, port), handler))
    if tls is not None:
      server.socket = tls.wrap_socket(server.socket, server_side=True)
    server.thread = threading.Thread(target=server.serve_forever, args=(0.02,),
                                     name=f"gcs-emulator-{port}", daemon=True)
    server.thread.start()
    return server

  def serve_tls(self, port: int, certfile: str, keyfile: str) -> http.server.HTTPServer:
    """The same objects over HTTPS on another port too (for clients that only speak https to
    Google's host names: point the name at self.host and trust certfile's CA). Stop it with
    .shutdown() and .server_close()."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    return self._serve(port, context)

  def write(self, name: str, data: bytes, bucket: Optional[str] = None) -> None:
    """Uploads one object through the emulator's own HTTP API (from its namespace)."""
    in_netns(self.netns, lambda: self.client().bucket(bucket or self.bucket).blob(name)
             .upload_from_string(data))

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

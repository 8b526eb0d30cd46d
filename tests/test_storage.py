"""trainer.rundir.storage against a real GCS emulator (tests/gcs_emulator.py), started per test."""

import hashlib
import logging
import os
import pathlib
import threading
import time

import pytest

from trainer.errors import StorageError, UsageError
from trainer.rundir import downloads, locations, storage
from trainer.rundir.gcs import RETRY_ENV

from gcs_emulator import free_port
from storage_helpers import exists_remote, read_remote


@pytest.fixture(autouse=True)
def short_retries(monkeypatch):
  # Any unexpected outage fails within seconds instead of the 120 s default.
  monkeypatch.setenv(RETRY_ENV, "5")


def write(root, rel, data=b""):
  path = os.path.join(root, *rel.split("/"))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return path


def tree(root):
  """relpath -> bytes of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for fn in files:
      path = os.path.join(dirpath, fn)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
  return out


def gens(gcs, prefix="run/"):
  return {name[len(prefix):]: int(obj["generation"]) for name, obj in gcs.objects(prefix).items()}


def open_run(gcs, tmp_path, name="stage"):
  return storage.open_storage(gcs.url("run"), staging_root=str(tmp_path / name))


def test_is_remote():
  assert locations.is_remote("gs://bucket/prefix")
  assert not locations.is_remote("/tmp/gs://x")
  assert not locations.is_remote("runs/default")
  assert not locations.is_remote(pathlib.Path("gs://bucket"))  # a Path cannot hold a URL


def test_local_model_dir_needs_no_bucket(tmp_path, monkeypatch):
  # Any network use would fail: nothing listens on this port.
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")
  model_dir = str(tmp_path / "run")
  s = storage.open_storage(model_dir)
  assert (s.local_dir, s.remote) == (model_dir, None)
  assert os.path.isdir(model_dir)
  write(model_dir, "teacher/result.json", b"{}")
  s.check()
  s.sync("teacher", last=("result.json",))
  s.flush()
  assert s.pull() == []
  assert not [t for t in threading.enumerate() if t.name == "mnist-distill-storage"]
  # The readers see the local folder, which is the final destination here.
  assert exists_remote(s, "teacher") and not exists_remote(s, "students")
  assert s.list_remote("") == ["teacher/result.json"]
  assert read_remote(s, "teacher/result.json") == b"{}"
  s.close()
  assert downloads.fetch_to_local(model_dir) == model_dir


def test_round_trip_to_a_fresh_disk(gcs_emulator, tmp_path):
  s = open_run(gcs_emulator, tmp_path)
  assert s.remote == "gs://test-bucket/run"
  assert s.local_dir == str(tmp_path / "stage" / "test-bucket" / "run")
  files = {
      "teacher/ckpt/checkpoint": b'model_checkpoint_path: "ckpt-1"\n',
      "teacher/ckpt/ckpt-1.data-00000-of-00001": os.urandom(300_000),
      "teacher/ckpt/ckpt-1.index": b"\x00\r\n\x01index",
      "teacher/empty.txt": b"",
      "teacher/sub dir/\u00fc.json": b'{"a": 1}',
      "students/a/log.txt": b"epoch 1\n",
  }
  for rel, data in files.items():
    write(s.local_dir, rel, data)
  s.sync("teacher", last=("checkpoint",))
  s.sync(os.path.join(s.local_dir, "students"))  # absolute paths inside local_dir work too
  s.flush()
  assert {n: gcs_emulator.read(n) for n in gcs_emulator.objects("run/")} == {
      f"run/{rel}": data for rel, data in files.items()}
  uploaded = gens(gcs_emulator)

  fresh = open_run(gcs_emulator, tmp_path, "fresh")
  assert fresh.pull() == sorted(files)
  assert tree(fresh.local_dir) == files
  # Pulled files carry the uploader's mtime, so syncing them back uploads nothing.
  fresh.sync("")
  fresh.flush()
  assert gens(gcs_emulator) == uploaded
  # A second pull of an up-to-date folder leaves the local files alone.
  inode = os.stat(os.path.join(fresh.local_dir, "teacher", "ckpt", "ckpt-1.index")).st_ino
  assert fresh.pull("teacher") == sorted(r for r in files if r.startswith("teacher/"))
  assert os.stat(os.path.join(fresh.local_dir, "teacher", "ckpt", "ckpt-1.index")).st_ino == inode
  s.close()
  fresh.close()


def test_only_new_or_changed_files_are_uploaded(gcs_emulator, tmp_path):
  s = open_run(gcs_emulator, tmp_path)
  for name in ("a", "b", "c"):
    write(s.local_dir, f"logs/{name}.txt", b"same size 1")
  s.sync("logs")
  s.flush()
  before = gens(gcs_emulator)
  changed = write(s.local_dir, "logs/b.txt", b"same size 2")
  st = os.stat(changed)
  os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  write(s.local_dir, "logs/d.txt", b"new")
  s.sync("logs")
  s.flush()
  after = gens(gcs_emulator)
  assert after["logs/a.txt"] == before["logs/a.txt"]
  assert after["logs/c.txt"] == before["logs/c.txt"]
  assert after["logs/b.txt"] > before["logs/b.txt"]
  assert gcs_emulator.read("run/logs/b.txt") == b"same size 2"
  assert "logs/d.txt" in after
  s.close()


def test_deletions_are_mirrored_under_relpath_only(gcs_emulator, tmp_path):
  s = open_run(gcs_emulator, tmp_path)
  for rel in ("teacher/a", "teacher/keep", "teacher/sub/b", "teacher2/c", "students/x"):
    write(s.local_dir, rel, rel.encode())
  for rel in ("teacher", "teacher2", "students"):
    s.sync(rel)
  s.flush()
  os.remove(os.path.join(s.local_dir, "teacher", "a"))
  os.remove(os.path.join(s.local_dir, "teacher", "sub", "b"))
  os.rmdir(os.path.join(s.local_dir, "teacher", "sub"))
  os.remove(os.path.join(s.local_dir, "students", "x"))
  s.sync("teacher")
  s.sync("students/x")  # a single file that no longer exists
  s.flush()
  # "teacher2" shares the "teacher" name prefix but is not under teacher/.
  assert sorted(gens(gcs_emulator)) == ["teacher/keep", "teacher2/c"]
  s.close()


def test_last_files_go_up_after_all_others_and_syncs_run_in_order(gcs_emulator, tmp_path):
  s = open_run(gcs_emulator, tmp_path)
  # Names chosen so that plain sorted order would upload the `last` files first.
  for rel in ("ckpt/checkpoint", "ckpt/zz-1.index", "ckpt/zz-1.data", "zsub/zzz", "result.json"):
    write(s.local_dir, rel, rel.encode())
  s.sync("", last=("checkpoint", "result.json"))
  write(s.local_dir, "later/a", b"queued second")
  s.sync("later")
  s.flush()
  g = gens(gcs_emulator)
  others = [g[r] for r in ("ckpt/zz-1.index", "ckpt/zz-1.data", "zsub/zzz")]
  assert max(others) < g["ckpt/checkpoint"] < g["result.json"] < g["later/a"]
  s.close()


def test_zero_byte_and_multi_megabyte_files(gcs_emulator, tmp_path):
  s = open_run(gcs_emulator, tmp_path)
  big = os.urandom(9 * 1024 * 1024 + 123)  # > 8 MiB: the client switches to a resumable upload
  write(s.local_dir, "m/big.bin", big)
  write(s.local_dir, "m/empty.bin", b"")
  write(s.local_dir, "m/result.json", b"")  # an empty `last` file too
  s.sync("m", last=("result.json",))
  s.flush()
  objs = gcs_emulator.objects("run/m/")
  assert {n: int(o["size"]) for n, o in objs.items()} == {
      "run/m/big.bin": len(big), "run/m/empty.bin": 0, "run/m/result.json": 0}
  assert hashlib.sha256(gcs_emulator.read("run/m/big.bin")).digest() == \
      hashlib.sha256(big).digest()
  assert read_remote(s, "m/empty.bin") == b""
  fresh = open_run(gcs_emulator, tmp_path, "fresh")
  assert fresh.pull("m") == ["m/big.bin", "m/empty.bin", "m/result.json"]
  assert tree(fresh.local_dir) == {"m/big.bin": big, "m/empty.bin": b"", "m/result.json": b""}
  s.close()


def test_check_accepts_a_good_bucket_and_rejects_a_missing_one(gcs_emulator, tmp_path):
  open_run(gcs_emulator, tmp_path).check()
  missing = storage.open_storage("gs://no-such-bucket/run", staging_root=str(tmp_path))
  started = time.monotonic()
  with pytest.raises(UsageError, match="no-such-bucket.*does not exist") as e:
    missing.check()
  assert time.monotonic() - started < 5
  assert "\n" not in str(e.value)


def test_check_rejects_credentials_that_cannot_write(gcs_emulator, tmp_path, monkeypatch):
  # The emulator grants every permission; pretend the bucket's IAM grants read access only.
  from google.cloud.storage import Bucket
  monkeypatch.setattr(Bucket, "test_iam_permissions",
                      lambda self, perms, **kw: [p for p in perms if p.endswith((".get", ".list"))])
  with pytest.raises(UsageError, match="lack storage.objects.create, storage.objects.delete"):
    open_run(gcs_emulator, tmp_path).check()


def test_check_fails_fast_when_the_endpoint_is_unreachable(tmp_path, monkeypatch):
  port = free_port()
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
  monkeypatch.setenv(RETRY_ENV, "1000")  # check() must not use the long mid-run budget
  monkeypatch.setattr("trainer.rundir.gcs.CHECK_SECONDS", 1.5)
  s = storage.open_storage("gs://test-bucket/run", staging_root=str(tmp_path))
  started = time.monotonic()
  with pytest.raises(UsageError, match=f"unreachable.*127.0.0.1:{port}") as e:
    s.check()
  assert 1.0 < time.monotonic() - started < 6  # it did retry, then gave up
  assert "\n" not in str(e.value)


def test_bad_retry_setting_is_a_usage_error(monkeypatch, tmp_path):
  monkeypatch.setenv(RETRY_ENV, "soon")
  with pytest.raises(UsageError, match=RETRY_ENV):
    storage.open_storage("gs://test-bucket/run", staging_root=str(tmp_path))


def test_queued_sync_survives_an_outage(gcs_emulator, tmp_path, monkeypatch, caplog):
  monkeypatch.setenv(RETRY_ENV, "30")
  s = open_run(gcs_emulator, tmp_path)
  write(s.local_dir, "teacher/early", b"before the outage")
  s.sync("teacher")
  s.flush()
  gcs_emulator.stop()
  write(s.local_dir, "teacher/ckpt-1.data", os.urandom(50_000))
  write(s.local_dir, "teacher/result.json", b'{"done": true}')
  s.sync("teacher", last=("result.json",))
  time.sleep(1.5)  # the worker is retrying against a closed port meanwhile
  assert sorted(gens(gcs_emulator)) == ["teacher/early"]
  gcs_emulator.start()  # same port, same data
  s.flush()
  assert sorted(gens(gcs_emulator)) == ["teacher/ckpt-1.data", "teacher/early",
                                        "teacher/result.json"]
  assert gcs_emulator.read("run/teacher/result.json") == b'{"done": true}'
  assert any("retry" in r.getMessage() for r in caplog.records if r.name == "trainer.rundir.gcs")
  s.close()


def test_flush_raises_when_the_bucket_stays_down(gcs_emulator, tmp_path, monkeypatch):
  monkeypatch.setenv(RETRY_ENV, "2")
  s = open_run(gcs_emulator, tmp_path)
  write(s.local_dir, "data/x", b"x")
  write(s.local_dir, "final/result.json", b"{}")
  gcs_emulator.stop()
  s.sync("data")
  s.sync("final", last=("result.json",))
  started = time.monotonic()
  with pytest.raises(StorageError, match="still failing") as e:
    s.flush()
  assert time.monotonic() - started < 2 + 3
  assert "\n" not in str(e.value)
  assert e.value.exit_code == 3
  gcs_emulator.start()
  s.flush()  # reported once
  assert gens(gcs_emulator) == {}
  s.sync("data")  # and later syncs work again
  s.sync("final", last=("result.json",))
  s.close()
  assert sorted(gens(gcs_emulator)) == ["data/x", "final/result.json"]
  with pytest.raises(RuntimeError):
    s.sync("data")


def test_nothing_queued_after_a_failure_is_uploaded(gcs_emulator, tmp_path, monkeypatch):
  monkeypatch.setenv(RETRY_ENV, "30")
  s = open_run(gcs_emulator, tmp_path)
  write(s.local_dir, "data/x", b"x")
  write(s.local_dir, "final/result.json", b"{}")
  gcs_emulator.stop()  # holds the worker on the first sync
  s.sync("data")
  s.sync("final", last=("result.json",))
  # data/x turns into a folder before its upload: a failure no retry can fix.
  os.remove(os.path.join(s.local_dir, "data", "x"))
  os.makedirs(os.path.join(s.local_dir, "data", "x"))
  gcs_emulator.start()
  with pytest.raises(StorageError, match="data"):
    s.flush()
  # The completion marker queued after the failure was dropped, not published without its data.
  assert gens(gcs_emulator) == {}
  s.close()


def test_a_superseded_snapshot_does_not_publish_its_checkpoint_state(
    gcs_emulator, tmp_path, monkeypatch, caplog):
  monkeypatch.setenv(RETRY_ENV, "30")
  caplog.set_level(logging.INFO, logger="trainer.rundir.storage")
  s = open_run(gcs_emulator, tmp_path)
  gcs_emulator.stop()  # the worker falls behind the trainer
  write(s.local_dir, "ckpt/ckpt-1.data", b"one")
  write(s.local_dir, "ckpt/checkpoint", b"ckpt-1")
  s.sync("ckpt", last=("checkpoint",))
  write(s.local_dir, "ckpt/ckpt-2.data", b"two")
  os.remove(os.path.join(s.local_dir, "ckpt", "ckpt-1.data"))  # like CheckpointManager
  write(s.local_dir, "ckpt/checkpoint", b"ckpt-2")
  s.sync("ckpt", last=("checkpoint",))
  gcs_emulator.start()
  s.flush()
  assert sorted(gens(gcs_emulator)) == ["ckpt/checkpoint", "ckpt/ckpt-2.data"]
  assert gcs_emulator.read("run/ckpt/checkpoint") == b"ckpt-2"
  # The first snapshot lost ckpt-1.data before it could go up, so its "ckpt-1" state file
  # was never published: the first sync uploaded nothing, the second both files.
  assert any("changed while queued" in r.getMessage() for r in caplog.records)
  summaries = [r.getMessage().split(": ", 1)[1].split(" (")[0] for r in caplog.records
               if r.getMessage().startswith("synced ")]
  assert summaries == ["0 uploaded, 0 deleted, 0 unchanged", "2 uploaded, 0 deleted, 0 unchanged"]
  s.close()


def test_remote_readers(gcs_emulator, tmp_path):
  s = open_run(gcs_emulator, tmp_path)
  write(s.local_dir, "students/a/result.json", b'{"acc": 0.9}')
  write(s.local_dir, "students/b/result.json", b'{"acc": 0.8}')
  write(s.local_dir, "students2/c", b"c")
  s.sync("")
  s.flush()
  assert exists_remote(s, "students") and exists_remote(s, "students/a/result.json")
  assert not exists_remote(s, "student") and not exists_remote(s, "students/z")
  assert s.list_remote("students") == ["students/a/result.json", "students/b/result.json"]
  assert s.list_remote("nothing") == []
  assert read_remote(s, "students/b/result.json") == b'{"acc": 0.8}'
  with pytest.raises(FileNotFoundError):
    read_remote(s, "students/z/result.json")
  with pytest.raises(ValueError):
    s.sync("../elsewhere")
  s.close()


def test_fetch_to_local_mirrors_a_gs_folder(gcs_emulator, tmp_path):
  bucket = gcs_emulator.client().bucket(gcs_emulator.bucket)
  images = os.urandom(200_000)
  for name, data in (("inputs/mnist/train-images.gz", images), ("inputs/mnist/sub/labels", b"l"),
                     ("inputs/mnist/empty", b""), ("inputs/mnist-other/x", b"not mine")):
    bucket.blob(name).upload_from_string(data)
  cache = str(tmp_path / "cache")
  dest = downloads.fetch_to_local(gcs_emulator.url("inputs/mnist"), dest_root=cache)
  assert dest == os.path.join(cache, "test-bucket", "inputs", "mnist")
  assert tree(dest) == {"train-images.gz": images, "sub/labels": b"l", "empty": b""}
  # Again: unchanged files are kept (same inode), stale ones dropped, changed ones refreshed.
  inode = os.stat(os.path.join(dest, "train-images.gz")).st_ino
  write(dest, "stale", b"old")
  time.sleep(0.01)
  bucket.blob("inputs/mnist/sub/labels").upload_from_string(b"L2")
  assert downloads.fetch_to_local(gcs_emulator.url("inputs/mnist"), dest_root=cache) == dest
  assert tree(dest) == {"train-images.gz": images, "sub/labels": b"L2", "empty": b""}
  assert os.stat(os.path.join(dest, "train-images.gz")).st_ino == inode
  with pytest.raises(UsageError, match="no objects"):
    downloads.fetch_to_local(gcs_emulator.url("inputs/nothing"), dest_root=cache)
  with pytest.raises(UsageError, match="does not exist"):
    downloads.fetch_to_local("gs://no-such-bucket/inputs", dest_root=cache)


def test_a_forgotten_upload_session_is_retried(gcs_emulator, tmp_path):
  # The emulator keeps resumable sessions in memory: a restart between the session POST and its
  # PUT answers 404. Simulate exactly that once, on a file big enough to need a session.
  from gcp_storage_emulator.exceptions import NotFound
  real, forgotten = gcs_emulator.storage.get_resumable_file_obj, []

  def forget_once(upload_id):
    if not forgotten:
      forgotten.append(upload_id)
      raise NotFound
    return real(upload_id)

  gcs_emulator.storage.get_resumable_file_obj = forget_once
  s = open_run(gcs_emulator, tmp_path)
  big = os.urandom(8 * 1024 * 1024 + 1)
  write(s.local_dir, "big.bin", big)
  s.sync("big.bin")
  s.flush()
  assert forgotten
  assert gcs_emulator.read("run/big.bin") == big
  s.close()


def test_a_deleted_bucket_fails_at_once_not_after_retries(gcs_emulator, tmp_path, monkeypatch):
  monkeypatch.setenv(RETRY_ENV, "30")
  s = open_run(gcs_emulator, tmp_path)
  write(s.local_dir, "x", b"x")
  gcs_emulator.storage.delete_bucket(gcs_emulator.bucket)
  started = time.monotonic()
  s.sync("x")
  with pytest.raises(StorageError, match="NotFound"):
    s.flush()
  assert time.monotonic() - started < 5  # a 404 is not worth 30 s of retries
  s.close()


# ---- one URL grammar -------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("gs://test-bucket", ("test-bucket", "")),
    ("gs://test-bucket/", ("test-bucket", "")),
    ("gs://b_1-x/runs/a/", ("b_1-x", "runs/a")),
    ("gs://my.bucket.example.com/run one/\u00fc", ("my.bucket.example.com", "run one/\u00fc")),
    ("gs://" + ".".join(["a" * 63] * 3), (".".join(["a" * 63] * 3), "")),  # 191 chars, dotted
])
def test_parse_location_accepts_cloud_storage_urls(value, expected):
  assert locations.parse_location(value, "--model_dir") == expected
  assert locations.is_remote(value)
  assert locations.location_url(*expected) == value.rstrip("/")


@pytest.mark.parametrize("value", [
    "runs/default", "/tmp/gs://x", "./gs:", "gs", "gs-runs/x", "run:v1", "my:folder/x", "",
])
def test_parse_location_leaves_local_paths_alone(value):
  assert locations.parse_location(value, "--model_dir") is None
  assert not locations.is_remote(value)


def test_a_path_object_is_always_local():
  assert locations.parse_location(pathlib.Path("gs://bucket"), "--model_dir") is None


@pytest.mark.parametrize("value, why", [
    ("gs://", "no bucket name"),
    ("gs:///x", "no bucket name"),
    ("gs:/bucket/x", "two slashes"),
    ("gs:bucket/x", "two slashes"),
    ("gs:", "two slashes"),
    ("GS://bucket/x", "lower case: gs://"),
    ("Gs://bucket", "lower case: gs://"),
    ("s3://bucket/x", "s3: URLs are not supported"),
    ("gcs://bucket/x", "gcs: URLs are not supported"),
    ("S3:bucket", "S3: URLs are not supported"),
    ("https://storage.googleapis.com/bucket/x", "https: URLs are not supported"),
    ("file:///tmp/x", "file: URLs are not supported"),
    ("gs://Bucket/x", "lower case"),
    ("gs://ab/x", "3-63 characters"),
    ("gs://" + "a" * 64, "3-63 characters"),
    ("gs://" + ".".join(["a" * 64, "b"]), "3-63 characters"),
    ("gs://-bucket/x", "start and end with a letter or digit"),
    ("gs://bucket_/x", "start and end with a letter or digit"),
    ("gs://my..bucket/x", "'..'"),
    ("gs://192.168.0.1/x", "IP address"),
    ("gs://google-runs/x", "'goog'"),
    ("gs://my bucket/x", "only lower-case letters"),
    ("gs://user@bucket/x", "only lower-case letters"),
    ("gs://bucket/a//b", "empty segment"),
    ("gs://bucket//a", "empty segment"),
    ("gs://bucket/a//", "empty segment"),
    ("gs://bucket//", "empty segment"),
    (" gs://bucket/x", "white space"),
    ("gs://bucket/x\t", "white space"),
    ("gs://bucket/a/../b", "'..' segment"),
    ("gs://bucket/..", "'..' segment"),
    ("gs://bucket/./a", "'.' segment"),
    ("gs://bucket/a\\b", "backslashes"),
    ("gs://bucket/a\nb", "control characters"),
    ("gs://bucket/run*", "wildcards"),
    ("gs://bucket/run#12", "wildcards"),
    ("gs://bucket/" + "x" * 1100, "1024 bytes"),
])
def test_every_malformed_url_is_a_usage_error_naming_the_flag(value, why, tmp_path):
  for call in (lambda: locations.parse_location(value, "--teacher_dir"),
               lambda: locations.is_remote(value, "--teacher_dir"),
               lambda: downloads.fetch_to_local(value, str(tmp_path), flag_name="--teacher_dir"),
               lambda: storage.open_storage(value, str(tmp_path), flag_name="--teacher_dir")):
    with pytest.raises(UsageError) as e:
      call()
    message = str(e.value)
    assert message.startswith("--teacher_dir=") and why in message, message
    assert "\n" not in message
    assert e.value.exit_code == 2
  assert os.listdir(tmp_path) == []  # no local folder was made from the URL


# ---- object names must stay inside their destination -----------------------------------------

ESCAPES = {
    "dot-dot": "data/../../../../../../../../../../../../tmp/{marker}",
    "issue": "data/../../../../tmp/{marker}",
    "absolute": "/tmp/{marker}",  # <prefix>//tmp/...: an empty segment, i.e. a leading '/'
    "dot": "a/./{marker}",
    "backslash": "a\\..\\..\\{marker}",
    "whole-dot-dot": "..",
    "clash": "good/{marker}",  # "good" is an object too: a file and a folder at once
}


def _plant(gcs, prefix, bad):
  bucket = gcs.client().bucket(gcs.bucket)
  bucket.blob(f"{prefix}/good").upload_from_string(b"fine")
  bucket.blob(f"{prefix}/{bad}").upload_from_string(b"evil")


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_fetch_refuses_object_names_that_leave_the_destination(case, gcs_emulator, tmp_path):
  marker = f"mnist-distill-escape-{os.getpid()}-{case}"
  _plant(gcs_emulator, "inputs/evil", ESCAPES[case].format(marker=marker))
  cache = tmp_path / "work" / "cache"
  with pytest.raises(UsageError, match="refusing to download.*nothing was downloaded") as e:
    downloads.fetch_to_local(gcs_emulator.url("inputs/evil"), dest_root=str(cache),
                           flag_name="--idx_dir")
  assert "\n" not in str(e.value)
  assert not os.path.exists(f"/tmp/{marker}")
  assert tree(tmp_path) == {}  # not even the good object: the whole fetch was refused


@pytest.mark.parametrize("case", ["dot-dot", "issue", "absolute"])
def test_pull_refuses_object_names_that_leave_the_run_folder(case, gcs_emulator, tmp_path):
  marker = f"mnist-distill-escape-{os.getpid()}-pull-{case}"
  _plant(gcs_emulator, "run/teacher/checkpoints", ESCAPES[case].format(marker=marker))
  s = open_run(gcs_emulator, tmp_path / "work")
  write(s.local_dir, "teacher/checkpoints/mine", b"local")
  with pytest.raises(UsageError, match="refusing to download"):
    s.pull("teacher/checkpoints", exact=True)
  assert not os.path.exists(f"/tmp/{marker}")
  assert tree(tmp_path) == {"work/stage/test-bucket/run/teacher/checkpoints/mine": b"local"}
  s.close()


def test_a_symlink_in_the_destination_cannot_lead_downloads_out(gcs_emulator, tmp_path):
  bucket = gcs_emulator.client().bucket(gcs_emulator.bucket)
  bucket.blob("inputs/mnist/sub/x").upload_from_string(b"x")
  outside = tmp_path / "outside"
  outside.mkdir()
  dest = tmp_path / "cache" / "test-bucket" / "inputs" / "mnist"
  dest.mkdir(parents=True)
  os.symlink(outside, dest / "sub")
  with pytest.raises(UsageError, match="symbolic link"):
    downloads.fetch_to_local(gcs_emulator.url("inputs/mnist"), dest_root=str(tmp_path / "cache"))
  assert os.listdir(outside) == []


# ---- what is never mirrored -------------------------------------------------------------------

def test_temporary_files_and_leases_are_never_mirrored(gcs_emulator, tmp_path):
  s = open_run(gcs_emulator, tmp_path)
  for rel in ("teacher/model.keras", "teacher/.tmp-12-ab-model.keras", "teacher/result.json.tmp-7",
              "teacher/.tmp-12-cd-export/saved_model.pb", "_leases/teacher.lease"):
    write(s.local_dir, rel, b"x")
  lease = gcs_emulator.client().bucket(gcs_emulator.bucket).blob("run/_leases/student.lease")
  lease.upload_from_string(b"held", if_generation_match=0)
  s.sync("")
  s.flush()
  # Exact mirror of "", yet the remote lease survives and no temporary or local lease went up.
  assert sorted(gens(gcs_emulator)) == ["_leases/student.lease", "teacher/model.keras"]
  fresh = open_run(gcs_emulator, tmp_path, "fresh")
  assert fresh.pull("") == ["teacher/model.keras"]
  assert tree(fresh.local_dir) == {"teacher/model.keras": b"x"}
  assert locations.is_unmirrored("a/.tmp-1-b/c") and locations.is_unmirrored("x.tmp-3")
  assert not locations.is_unmirrored("teacher/tmp-notes.txt")
  s.close()
  fresh.close()

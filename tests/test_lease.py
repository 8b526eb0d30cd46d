"""trainer.rundir.lease: one writer per model, locally (flock) and on a real GCS emulator."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from trainer.rundir import lease, storage
from trainer.rundir.gcs import RETRY_ENV

from gcs_emulator import GcsEmulator
from helpers import REPO, cli_env

# A process that takes the teacher's lease and holds it for HOLD seconds (or until killed).
CHILD = """
import sys, time
from trainer.rundir import lease, storage
model_dir, staging, wait, ttl, hold = sys.argv[1:6]
run = storage.open_storage(model_dir, staging_root=staging)
try:
  held = lease.acquire(run, "teacher", wait_seconds=float(wait), ttl_seconds=float(ttl))
except lease.ModelBusy as e:
  print("busy", e, flush=True)
  sys.exit(e.exit_code)
print("held", held.holder, flush=True)
time.sleep(float(hold))
held.ensure_held()
held.release()
print("released", flush=True)
"""


@pytest.fixture(autouse=True)
def short_retries(monkeypatch):
  monkeypatch.setenv(RETRY_ENV, "5")


def start_child(model_dir, staging, wait=0.0, ttl=30.0, hold=60.0):
  return subprocess.Popen([sys.executable, "-c", CHILD, model_dir, str(staging), str(wait),
                           str(ttl), str(hold)], cwd=REPO, env=cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc, timeout=60):
  """The child's first line of output ('held ...' or 'busy ...')."""
  result = []
  reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
  reader.start()
  reader.join(timeout)
  assert result and result[0], f"child said nothing: {proc.poll()} {proc.stderr.read()}"
  return result[0]


def lease_object(gcs, model="teacher"):
  name = f"run/{lease.lease_rel(model)}"
  objects = gcs.objects(name)
  if name not in objects:
    return None
  return int(objects[name]["generation"]), json.loads(gcs.read(name))


def run_on(gcs, tmp_path, name="stage"):
  return storage.open_storage(gcs.url("run"), staging_root=str(tmp_path / name))


# ---- the emulator can be trusted with preconditions --------------------------------------------

def test_the_emulator_wrapper_enforces_generation_preconditions():
  from google.api_core.exceptions import PreconditionFailed
  for faithful in (False, True):
    with GcsEmulator(faithful=faithful) as gcs:
      blob = gcs.client().bucket(gcs.bucket).blob("x")
      blob.upload_from_string(b"first", if_generation_match=0)
      if not faithful:  # as released: the second create silently overwrites
        blob.upload_from_string(b"second", if_generation_match=0)
        assert gcs.read("x") == b"second"
        continue
      with pytest.raises(PreconditionFailed):
        blob.upload_from_string(b"second", if_generation_match=0)
      with pytest.raises(PreconditionFailed):
        blob.delete(if_generation_match=blob.generation + 1)
      blob.upload_from_string(b"third", if_generation_match=blob.generation)
      assert gcs.read("x") == b"third"


# ---- local runs: flock ------------------------------------------------------------------------

def test_local_lease_excludes_a_second_holder_until_released(tmp_path):
  run = storage.open_storage(str(tmp_path / "run"))
  first = lease.acquire(run, "teacher", wait_seconds=0)
  started = time.monotonic()
  with pytest.raises(lease.ModelBusy) as e:
    lease.acquire(run, "teacher", wait_seconds=0.5)
  assert 0.5 <= time.monotonic() - started < 3
  assert e.value.exit_code == 5
  assert "model teacher is busy" in str(e.value) and first.holder in str(e.value)
  lease.acquire(run, "student", wait_seconds=0).release()  # other models are not blocked
  first.ensure_held()
  first.release()
  with lease.acquire(run, "teacher", wait_seconds=0) as second:
    second.ensure_held()


def test_a_waiter_gets_the_lease_when_the_holder_releases(tmp_path):
  run = storage.open_storage(str(tmp_path / "run"))
  first = lease.acquire(run, "teacher", wait_seconds=0)
  threading.Timer(0.5, first.release).start()
  started = time.monotonic()
  lease.acquire(run, "teacher", wait_seconds=10).release()
  assert 0.4 < time.monotonic() - started < 5


def test_two_local_processes_exactly_one_holds_and_a_sigkill_frees_it(tmp_path):
  model_dir = str(tmp_path / "run")
  children = [start_child(model_dir, tmp_path / "stage", wait=1.0) for _ in range(2)]
  kinds = [wait_for_line(c).split()[0] for c in children]
  assert sorted(kinds) == ["busy", "held"]
  busy, holder = children[kinds.index("busy")], children[kinds.index("held")]
  assert busy.wait(30) == 5
  assert holder.poll() is None
  run = storage.open_storage(model_dir)
  with pytest.raises(lease.ModelBusy):
    lease.acquire(run, "teacher", wait_seconds=0)
  holder.send_signal(signal.SIGKILL)
  holder.wait(30)
  lease.acquire(run, "teacher", wait_seconds=5).release()  # the kernel dropped the lock


# ---- gs:// runs: an object under generation preconditions --------------------------------------

def test_two_processes_on_the_emulator_exactly_one_holds(gcs_emulator, tmp_path):
  children = [start_child(gcs_emulator.url("run"), tmp_path / f"stage{i}", wait=1.0, ttl=30)
              for i in range(2)]
  said = [wait_for_line(c).split() for c in children]
  kinds = [s[0] for s in said]
  assert sorted(kinds) == ["busy", "held"]
  busy, holder = children[kinds.index("busy")], children[kinds.index("held")]
  assert busy.wait(30) == 5
  _, record = lease_object(gcs_emulator)
  assert record["holder"] == said[kinds.index("held")][1]
  assert record["expires"] > time.time() + 20
  holder.send_signal(signal.SIGKILL)
  holder.wait(30)


def test_an_expired_lease_is_taken_over_after_its_holder_is_killed(gcs_emulator, tmp_path):
  child = start_child(gcs_emulator.url("run"), tmp_path / "stage", ttl=2.0)
  assert wait_for_line(child).startswith("held")
  child.send_signal(signal.SIGKILL)
  child.wait(30)
  generation, record = lease_object(gcs_emulator)
  run = run_on(gcs_emulator, tmp_path)
  started = time.monotonic()
  with lease.acquire(run, "teacher", wait_seconds=20, ttl_seconds=30) as taken:
    taken_at, waited = time.time(), time.monotonic() - started
    assert taken_at >= record["expires"]  # not before the dead holder's lease expired
    assert waited < 10
    new_generation, new_record = lease_object(gcs_emulator)
    assert new_generation != generation and new_record["holder"] == taken.holder
  assert lease_object(gcs_emulator) is None  # released


def test_the_lease_is_renewed_while_held_and_blocks_others(gcs_emulator, tmp_path):
  run = run_on(gcs_emulator, tmp_path)
  held = lease.acquire(run, "teacher", wait_seconds=0, ttl_seconds=1.5)
  seen = set()
  for _ in range(8):  # 4 s: more than two ttls
    seen.add(lease_object(gcs_emulator)[0])
    time.sleep(0.5)
  held.ensure_held()
  assert len(seen) >= 4  # renewed every ttl/3, each time under a new generation
  with pytest.raises(lease.ModelBusy, match="teacher is busy"):
    lease.acquire(run_on(gcs_emulator, tmp_path, "other"), "teacher", wait_seconds=0.5,
                  ttl_seconds=1.5)
  held.release()
  assert lease_object(gcs_emulator) is None


def test_a_holder_whose_lease_was_taken_over_stops(gcs_emulator, tmp_path):
  run = run_on(gcs_emulator, tmp_path)
  held = lease.acquire(run, "teacher", wait_seconds=0, ttl_seconds=1.5)
  blob = gcs_emulator.client().bucket(gcs_emulator.bucket).blob(f"run/{lease.lease_rel('teacher')}")
  generation, _ = lease_object(gcs_emulator)
  intruder = {"holder": "elsewhere/1/x", "expires": time.time() + 60}
  blob.upload_from_string(json.dumps(intruder), if_generation_match=generation)
  time.sleep(1.5)  # at least one renewal: it finds another generation and gives up
  with pytest.raises(lease.LeaseLost, match="taken over by elsewhere/1/x") as e:
    held.ensure_held()
  assert e.value.exit_code == 5
  held.release()
  assert lease_object(gcs_emulator)[1]["holder"] == "elsewhere/1/x"  # not deleted by the loser


def test_of_two_takers_of_an_expired_lease_only_one_wins(gcs_emulator, tmp_path, monkeypatch):
  # Taker A read the expired lease; before it writes, taker B takes it over. A's takeover is
  # conditioned on the generation it read, so it must fail and A must see B's live lease.
  bucket = gcs_emulator.client().bucket(gcs_emulator.bucket)
  blob = bucket.blob(f"run/{lease.lease_rel('teacher')}")
  blob.upload_from_string(json.dumps({"holder": "dead/1/x", "expires": time.time() - 1}))
  stale = lease_object(gcs_emulator)
  b = lease.acquire(run_on(gcs_emulator, tmp_path, "b"), "teacher", wait_seconds=0,
                    ttl_seconds=30)
  reads = []
  real_read = lease._BucketLease._read

  def stale_first(self):
    reads.append(1)
    return stale if len(reads) == 1 else real_read(self)

  monkeypatch.setattr(lease._BucketLease, "_read", stale_first)
  with pytest.raises(lease.ModelBusy, match=b.holder):
    lease.acquire(run_on(gcs_emulator, tmp_path, "a"), "teacher", wait_seconds=0.3,
                  ttl_seconds=30)
  assert len(reads) >= 2  # the stale view was tried, refused (412), and read again
  assert lease_object(gcs_emulator)[1]["holder"] == b.holder
  b.release()


def test_sync_never_deletes_a_lease(gcs_emulator, tmp_path):
  run = run_on(gcs_emulator, tmp_path)
  held = lease.acquire(run, "teacher", wait_seconds=0)
  with open(os.path.join(run.local_dir, "results.json"), "w") as f:
    f.write("{}")
  run.sync("")  # an exact mirror of the whole run folder
  run.flush()
  held.ensure_held()
  assert lease_object(gcs_emulator)[1]["holder"] == held.holder
  held.release()
  run.close()


def test_a_lost_answer_to_our_own_create_still_gives_us_the_lease(gcs_emulator, tmp_path,
                                                                  monkeypatch):
  # The create reaches the server but its answer is lost: the retry meets 412 (the object now
  # exists), and the lease must see that it is its own rather than report itself busy.
  import requests
  from google.cloud.storage import Blob
  real, lost = Blob.upload_from_string, []

  def answer_lost_once(self, *args, **kwargs):
    real(self, *args, **kwargs)
    if not lost:
      lost.append(self.name)
      raise requests.exceptions.ConnectionError("connection reset")

  monkeypatch.setattr(Blob, "upload_from_string", answer_lost_once)
  held = lease.acquire(run_on(gcs_emulator, tmp_path), "teacher", wait_seconds=0)
  assert lost and lease_object(gcs_emulator)[1]["holder"] == held.holder
  held.ensure_held()
  held.release()
  assert lease_object(gcs_emulator) is None

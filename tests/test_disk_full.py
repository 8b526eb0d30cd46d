"""A full disk under the run's folder, on a real tmpfs: exit 3 and one line (the folder, what was
being written, the room the run needs), no traceback, the last complete checkpoint kept, and a
rerun after space was freed resumes from it. Both for a local --model_dir and for the staging
folder of a gs:// run (against the GCS emulator).

Mounting a tmpfs needs root, as the test machine and the CI container give."""

import contextlib
import errno
import os
import re
import subprocess

import pytest

from trainer.errors import EXIT_STORAGE
from trainer.rundir import disk_full, layout

from helpers import MNIST_DIR, error_lines, run_cli

# 256 training examples in batches of 32: 8 steps an epoch, a teacher checkpoint every 8 steps.
TINY = [f"--idx_dir={MNIST_DIR}", "--max_train_examples=256", "--validation_examples=128",
        "--max_test_examples=256", "--teacher_epochs=3", "--student_epochs=1", "--batch_size=32",
        "--nolitert", "--student=d:alpha=0.5"]
# A teacher checkpoint is 13.7 MB (1,144,074 parameters, weights and Adam's two moments): 3 MB
# hold none, 24 MB one but not two, 200 MB the whole run.
NONE_FITS, ONE_FITS, ALL_FIT = "3m", "24m", "200m"


@contextlib.contextmanager
def tmpfs(folder, size):
  """A real tmpfs of `size` at `folder`, unmounted at the end whatever happened."""
  os.makedirs(folder, exist_ok=True)
  subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
  try:
    yield lambda new_size: subprocess.run(
        ["mount", "-o", f"remount,size={new_size}", str(folder)], check=True)
  finally:
    if subprocess.run(["umount", str(folder)]).returncode:
      subprocess.run(["umount", "-l", str(folder)], check=True)


def folder_bytes(root):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def assert_one_line(proc, folder_text):
  """Exit 3, exactly one line on stderr that is not TensorFlow's own log, and no traceback."""
  assert proc.returncode == EXIT_STORAGE, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  [line] = error_lines(proc.stderr)
  assert proc.stderr.rstrip().endswith(line)
  assert line.startswith(f"mnist-distill: error: no space left on the disk of {folder_text} "
                         "while writing teacher's checkpoint ckpt-"), line
  needed = re.search(r"this run needs about (\d+) MB there \(an estimate", line)
  assert needed, line
  return line, int(needed.group(1)) * 10**6


def kept_checkpoint(checkpoints):
  """The checkpoint the `checkpoint` file names; its files are all there, no half-written one."""
  with open(os.path.join(checkpoints, "checkpoint")) as f:
    name = re.search(r'^model_checkpoint_path: "([^"]+)"', f.read(), re.MULTILINE).group(1)
  files = os.listdir(checkpoints)
  assert f"{name}.index" in files and f"{name}.data-00000-of-00001" in files, files
  assert not [f for f in files if f.endswith("_temp")], files
  return name


def test_full_local_model_dir_exits_3_keeps_the_last_checkpoint_and_resumes(tmp_path):
  disk = tmp_path / "disk"
  run_dir = disk / "run"
  args = [f"--model_dir={run_dir}", *TINY]
  with tmpfs(disk, NONE_FITS) as resize:
    proc = run_cli(args)  # the first checkpoint does not fit
    line, _ = assert_one_line(proc, f"--model_dir {run_dir}")
    assert "(teacher/checkpoints/ckpt-8): " in line, line
    assert "teacher had no complete checkpoint yet" in line, line
    assert re.search(r"and \d\.\d MB of 3\.\d MB are free", line), line
    assert line.endswith("Free space (or use another --model_dir) and rerun the same command: "
                         "it resumes")

    resize(ONE_FITS)  # the first checkpoint fits, the second does not
    proc = run_cli(args)
    line, needed = assert_one_line(proc, f"--model_dir {run_dir}")
    assert "teacher's last complete checkpoint ckpt-8 is kept." in line, line
    assert kept_checkpoint(run_dir / "teacher" / "checkpoints") == "ckpt-8"

    resize(ALL_FIT)
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"Resumed from \S+/teacher/checkpoints/ckpt-8 \(epoch 1, step 0\)",
                     proc.stderr), proc.stderr[-3000:]
    assert layout.read_json(str(run_dir / layout.RESULTS_JSON))["models"][1]["name"] == "d"
    # The estimate is honest: at least what the finished run holds (its most, since the
    # teacher's exports outweigh the checkpoint it writes while training), and not much more.
    used = folder_bytes(run_dir)
    assert used <= needed <= used + 3 * 10**6, (used, needed)


def test_full_staging_folder_of_a_bucket_run_exits_3_and_resumes(gcs_emulator, tmp_path):
  disk = tmp_path / "staging"
  staging = disk / gcs_emulator.bucket / "run"
  args = [f"--model_dir={gcs_emulator.url('run')}", *TINY]
  with tmpfs(disk, ONE_FITS) as resize:
    proc = run_cli(args, MNIST_DISTILL_STAGING=str(disk))
    line, _ = assert_one_line(
        proc, f"the staging folder {staging} of {gcs_emulator.url('run')} "
              "($MNIST_DISTILL_STAGING)")
    assert "teacher's last complete checkpoint ckpt-8 is kept." in line, line
    assert line.endswith("Free space there (or point $MNIST_DISTILL_STAGING at a larger disk) "
                         "and rerun the same command: it resumes from what the bucket holds")
    # The bucket has the kept checkpoint: it was uploaded before the job left.
    state = gcs_emulator.read("run/teacher/checkpoints/checkpoint").decode()
    assert 'model_checkpoint_path: "ckpt-8"' in state
    assert "run/teacher/checkpoints/ckpt-8.index" in gcs_emulator.objects("run/teacher/")

    resize(ALL_FIT)
    proc = run_cli(args, MNIST_DISTILL_STAGING=str(disk))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"Resumed from \S+/teacher/checkpoints/ckpt-8 \(epoch 1, step 0\)",
                     proc.stderr), proc.stderr[-3000:]
    assert "run/results.json" in gcs_emulator.objects("run/")


def test_a_disk_full_before_training_exits_3_not_2(tmp_path):
  """Already full when the job starts: the output location failed, the input is fine."""
  disk = tmp_path / "disk"
  with tmpfs(disk, "1m"):
    with open(disk / "filler", "wb") as f:
      with pytest.raises(OSError):
        f.write(b"x" * 2 * 2**20)
    proc = run_cli([f"--model_dir={disk / 'run'}", *TINY])
    assert proc.returncode == EXIT_STORAGE, proc.stderr[-3000:]
    [line] = error_lines(proc.stderr)
    assert proc.stderr.rstrip().endswith(line) and "Traceback" not in proc.stderr
    assert line.startswith(f"mnist-distill: error: no space left on the disk of --model_dir "
                           f"{disk / 'run'} while writing a test file (the check that the "
                           "folder can be written): this run needs about "), line


def test_a_failed_write_names_its_file_and_leaves_no_temporary(tmp_path):
  """Python's write() says 'No space left on device' without naming the file; the job's one
  writer adds the name, which the one line turns into what was being written."""
  disk = tmp_path / "tiny"
  with tmpfs(disk, "64k"):
    path = os.path.join(disk, "run", "teacher", layout.PREDICTIONS)
    with pytest.raises(OSError) as raised:
      layout.write_bytes(path, b"x" * 10**6)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == path
    assert disk_full.disk_full_error(RuntimeError("wrapped")) is None
    assert os.listdir(os.path.dirname(path)) == []
  assert disk_full.describe(f"teacher/{layout.TMP_PREFIX}123-0a1b2c3d-{layout.PREDICTIONS}") == (
      "teacher's test predictions")


@pytest.mark.parametrize("rel,what", [
    ("teacher/checkpoints/ckpt-16_temp/part-00000-of-00001.data-00000-of-00001.tempstate1",
     "teacher's checkpoint ckpt-16"),
    (f"d/{layout.TMP_PREFIX}7-0a1b2c3d-export/variables/variables_temp/part-0",
     "d's SavedModel"),
    (f"d/{layout.MODEL_FILE}", "d's Keras file"),
    ("d/litert/int8.tflite", "d's LiteRT flatbuffers"),
    ("logs/teacher/train/events.out.tfevents.1.v2", "the TensorBoard logs of teacher"),
    ("teacher_logits/5bab293fd49b7124/train.npy", "the teacher's cached logits"),
    (f"{layout.TMP_PREFIX}9-0a1b2c3d-{layout.RESULTS_JSON}", "the merged report"),
    (f"{layout.TMP_PREFIX}write-probe-123", "a test file (the check that the folder can be "
                                             "written)"),
])
def test_what_was_being_written_is_named_by_the_layout(rel, what):
  assert disk_full.describe(rel) == what

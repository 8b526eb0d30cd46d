"""--teacher_logits=cached and --teacher_logits=online train the very same students.

tests/test_distiller.py shows both give the same loss and gradients on one batch; this runs
the whole job both ways. With --deterministic the two runs train bit-identical teachers, the
cached logits (computed once, in batches of 1000) equal the ones the teacher gives inside each
training step (batches of 64) on this CPU, and so the students' weights are identical.
"""

import json

import keras
import numpy as np

from helpers import MNIST_DIR, run_cli

ARGS = [f"--idx_dir={MNIST_DIR}", "--max_train_examples=1024", "--validation_examples=256",
        "--max_test_examples=256", "--teacher_epochs=1", "--student_epochs=2",
        "--batch_size=64", "--deterministic", "--student=distilled:alpha=0.5,temperature=4",
        "--nolitert"]


def test_online_and_cached_teacher_logits_give_the_same_student(tmp_path):
  weights, summaries = {}, {}
  for mode in ("cached", "online"):
    model_dir = tmp_path / mode
    proc = run_cli([f"--model_dir={model_dir}", f"--teacher_logits={mode}", *ARGS])
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(model_dir / "results.json") as f:
      summaries[mode] = {m["name"]: m for m in json.load(f)["models"]}
    weights[mode] = {name: keras.models.load_model(model_dir / name / "model.keras",
                                                   compile=False).get_weights()
                     for name in ("teacher", "distilled")}
  assert not (tmp_path / "online" / "teacher_logits").exists()  # online never caches
  assert (tmp_path / "cached" / "teacher_logits").is_dir()
  for name in ("teacher", "distilled"):
    for cached, online in zip(weights["cached"][name], weights["online"][name]):
      np.testing.assert_array_equal(cached, online, err_msg=name)
  assert summaries["cached"]["distilled"]["teacher_logits"] == "cached"
  assert summaries["online"]["distilled"]["teacher_logits"] == "online"
  for field in ("test_accuracy", "test_loss", "validation_loss"):
    assert summaries["cached"]["distilled"][field] == summaries["online"]["distilled"][field]

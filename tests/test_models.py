"""The architectures are the notebook's, to the parameter."""

from trainer.modeling import models


def test_teacher_matches_notebook():
  teacher = models.build_teacher()
  assert teacher.count_params() == 1_144_074
  convs = [layer.filters for layer in teacher.layers if layer.__class__.__name__ == "Conv2D"]
  dense = [layer.units for layer in teacher.layers if layer.__class__.__name__ == "Dense"]
  pools = [layer for layer in teacher.layers if layer.__class__.__name__ == "AveragePooling2D"]
  assert convs == [16, 32, 64] and dense == [1024, 512, 10] and len(pools) == 3
  assert teacher.output_shape == (None, 10)


def test_student_matches_notebook():
  student = models.build_student()
  assert student.count_params() == 28_226
  convs = [layer.filters for layer in student.layers if layer.__class__.__name__ == "Conv2D"]
  dense = [layer.units for layer in student.layers if layer.__class__.__name__ == "Dense"]
  assert convs == [8, 8] and dense == [64, 32, 10]


def test_outputs_are_logits_not_probabilities():
  import numpy as np
  student = models.build_student()
  out = student(np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)).numpy()
  assert out.shape == (4, 10)
  assert not np.allclose(out.sum(axis=1), 1.0)  # no softmax at the end


def _weights(net):
  return [w.copy() for w in net.get_weights()]


def test_seeded_weights_ignore_other_draws_from_the_global_random():
  """A seeded build is the one Keras makes after random.seed(seed) (so earlier runs keep their
  initial weights), whatever else draws from the global `random` meanwhile: in a bucket run the
  lease and upload threads do, and a resumed student once started from other weights."""
  import random
  import threading

  import numpy as np

  random.seed(7)
  keras_default = _weights(models.build_student())
  stop = threading.Event()

  def draw():
    while not stop.is_set():
      random.random()

  thread = threading.Thread(target=draw)
  thread.start()
  try:
    seeded = [_weights(models.build_student(seed=7)) for _ in range(3)]
  finally:
    stop.set()
    thread.join()
  for weights in seeded:
    assert all(np.array_equal(a, b) for a, b in zip(weights, keras_default, strict=True))
  other = _weights(models.build_student(seed=8))
  assert not np.array_equal(other[0], keras_default[0])
  teacher = [_weights(models.build_teacher(seed=7)) for _ in range(2)]
  assert all(np.array_equal(a, b) for a, b in zip(*teacher, strict=True))

"""The architectures are the notebook's, to the parameter."""

from trainer import models


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

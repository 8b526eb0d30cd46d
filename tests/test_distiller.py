"""The Distiller computes trainer/modeling/losses.py's objective, with a frozen teacher or cached
logits, and its pluggable losses and metrics are the ones it trains and reports with."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.modeling import losses
from trainer.modeling.distiller import Distiller
from trainer.training.loop import graph_step

RNG = np.random.default_rng(7)
T = 4.0


def _softmax(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _student(seed=0):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                           keras.layers.Dense(10)])


def _teacher():
  keras.utils.set_random_seed(1)
  return keras.Sequential([keras.Input((6,)), keras.layers.Dense(32, activation="relu"),
                           keras.layers.BatchNormalization(), keras.layers.Dense(10)])


def _batch(n=8):
  x = RNG.normal(size=(n, 6)).astype("float32")
  y = RNG.integers(0, 10, size=n)
  t = (3 * RNG.normal(size=(n, 10))).astype("float32")
  return x, y, t


@pytest.mark.parametrize("weight,keyword", [(0.0, "distillation_weight"), (0.3, "alpha"),
                                            (1.0, "distillation_weight")])
def test_step_reports_the_objective_with_its_weight(weight, keyword):
  x, y, t = _batch()
  distiller = Distiller(_student())
  distiller.compile(optimizer="adam", temperature=T, **{keyword: weight})
  assert distiller.distillation_weight == distiller.alpha == weight
  expected = losses.distillation_objective(y, distiller.student(x), t, weight, T)
  logs = distiller.test_step((x, y, t))
  for name, values in (("loss", expected.total), ("distillation_loss", expected.distillation),
                       ("student_loss", expected.student)):
    assert float(logs[name]) == pytest.approx(float(np.mean(values)), rel=1e-5), name


def test_train_step_leaves_teacher_untouched_and_runs_it_in_inference_mode():
  x, y, _ = _batch(16)
  teacher, student = _teacher(), _student()
  teacher(x)  # build
  before = [w.numpy().copy() for w in teacher.weights]
  student_before = [w.numpy().copy() for w in student.weights]
  distiller = Distiller(student, teacher)
  distiller.compile(optimizer=keras.optimizers.SGD(0.1), distillation_weight=0.5, temperature=T)
  with tf.GradientTape() as tape:  # the teacher's gradient is zero
    s = student(x, training=True)
    total = tf.reduce_mean(
        losses.distillation_objective(y, s, distiller.teacher_logits((x, y)), 0.5, T).total)
  teacher_grads = tape.gradient(total,
                                teacher.trainable_variables + teacher.non_trainable_variables)
  assert all(g is None or not np.any(g.numpy()) for g in teacher_grads)
  distiller.train_step((x, y))
  for w, b in zip(teacher.weights, before):  # incl. BatchNorm moving stats: inference mode
    np.testing.assert_array_equal(w.numpy(), b)
  assert any(not np.array_equal(w.numpy(), b) for w, b in zip(student.weights, student_before))


def test_cached_and_online_teacher_give_same_loss_and_gradients():
  x, y, _ = _batch(16)
  teacher = _teacher()
  cached_logits = teacher(x, training=False).numpy()
  results = []
  for data in ((x, y), (x, y, cached_logits)):
    student = _student(seed=3)
    distiller = Distiller(student, teacher if len(data) == 2 else None)
    distiller.compile(optimizer="sgd", distillation_weight=0.7, temperature=T)
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(losses.distillation_objective(
          y, student(x, training=True), distiller.teacher_logits(data), 0.7, T).total)
    results.append((float(loss), [g.numpy() for g in tape.gradient(loss, student.weights)]))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
  for a, b in zip(results[0][1], results[1][1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_metrics_are_running_means_over_examples():
  distiller = Distiller(_student())
  distiller.compile(optimizer="adam", distillation_weight=0.5, temperature=T)
  batches = [_batch(8), _batch(3)]
  per_example = []
  for x, y, t in batches:
    logs = distiller.test_step((x, y, t))
    per_example.append(
        losses.distillation_objective(y, distiller.student(x), t, 0.5, T).total.numpy())
  assert np.ndim(logs["loss"]) == 0  # a scalar, not a per-example vector
  expected = np.concatenate(per_example).mean()  # not the mean of the two batch means
  assert float(logs["loss"]) == pytest.approx(float(expected), rel=1e-5)
  assert set(logs) >= {"loss", "distillation_loss", "student_loss", "accuracy"}


def test_compile_rejects_bad_weight_and_temperature():
  distiller = Distiller(_student())
  with pytest.raises(ValueError):
    distiller.compile(alpha=1.5)
  with pytest.raises(ValueError):
    distiller.compile(distillation_weight=-0.1)
  with pytest.raises(ValueError, match="not both"):
    distiller.compile(distillation_weight=0.5, alpha=0.5)
  with pytest.raises(ValueError):
    distiller.compile(temperature=0)


def test_labels_only_needs_no_teacher():
  x, y, _ = _batch()
  distiller = Distiller(_student())
  distiller.compile(optimizer="sgd", distillation_weight=0.0, temperature=T)
  logs = distiller.train_step((x, y))
  assert float(logs["distillation_loss"]) == 0.0 and float(logs["student_loss"]) > 0.0
  distiller.compile(optimizer="sgd", distillation_weight=0.5, temperature=T)
  with pytest.raises(ValueError, match="no teacher"):
    distiller.train_step((x, y))


def _one_sgd_step_on_output_bias(weight, **loss_fns):
  """One SGD(1.0) step from a zero output bias: returns (student logits before the step,
  logs, the gradient the step applied to that bias)."""
  x, y, t = _batch(16)
  student = _student(seed=5)
  bias = student.layers[-1].bias
  assert not np.any(bias.numpy())  # Dense starts from zeros: -bias after one step is the grad
  s = student(x).numpy()
  distiller = Distiller(student)
  distiller.compile(optimizer=keras.optimizers.SGD(1.0), distillation_weight=weight,
                    temperature=T, **loss_fns)
  logs = distiller.train_step((x, y, t))
  return (x, y, t, s), logs, -bias.numpy()


def _default_gradient(y, t, s, weight):
  """d(objective)/d(logits), averaged over the batch: (1-w)(p - onehot) + w T (p_T - q_T)."""
  onehot = np.eye(10)[y]
  kd = T * (_softmax(s / T) - _softmax(t / T))
  return ((1 - weight) * (_softmax(s) - onehot) + weight * kd).mean(axis=0)


def test_custom_student_loss_is_trained_on():
  """Label smoothing 0.1 as the student loss: the labels' gradient pulls towards
  0.9 * onehot + 0.01 instead of onehot."""
  def smoothed_ce(labels, logits):
    return keras.losses.categorical_crossentropy(tf.one_hot(labels, 10), logits, from_logits=True,
                                                 label_smoothing=0.1)
  (_, y, t, s), logs, grad = _one_sgd_step_on_output_bias(0.3, student_loss_fn=smoothed_ce)
  smoothed = 0.9 * np.eye(10)[y] + 0.01
  expected = ((0.7 * (_softmax(s) - smoothed)) + 0.3 * T * (_softmax(s / T) - _softmax(t / T)))
  np.testing.assert_allclose(grad, expected.mean(axis=0), rtol=1e-4, atol=1e-6)
  assert np.abs(grad - _default_gradient(y, t, s, 0.3)).max() > 1e-3  # not the default's
  hand_student = -(smoothed * np.log(_softmax(s))).sum(axis=-1).mean()
  assert float(logs["student_loss"]) == pytest.approx(hand_student, rel=1e-5)


def test_custom_distillation_loss_is_trained_on():
  """Logit matching, 0.5 * ||s - t||^2 (Ba & Caruana 2014), as the distillation loss: its
  gradient is s - t, whatever the temperature."""
  def logit_matching(teacher_logits, student_logits, temperature):
    return 0.5 * tf.reduce_sum(tf.square(student_logits - teacher_logits), axis=-1)
  (_, y, t, s), logs, grad = _one_sgd_step_on_output_bias(0.6,
                                                          distillation_loss_fn=logit_matching)
  expected = 0.4 * (_softmax(s) - np.eye(10)[y]) + 0.6 * (s - t)
  np.testing.assert_allclose(grad, expected.mean(axis=0), rtol=1e-4, atol=1e-6)
  assert np.abs(grad - _default_gradient(y, t, s, 0.6)).max() > 1e-3
  hand = 0.5 * ((s - t) ** 2).sum(axis=-1).mean()
  assert float(logs["distillation_loss"]) == pytest.approx(hand, rel=1e-5)


def test_a_custom_loss_may_branch_on_tensors_in_the_loops_graph_step():
  """The loop traces its steps without AutoGraph (trainer/training/loop.py graph_step); a
  caller's loss with a Python `if` on a tensor still works there, as under Keras' fit."""
  def clipped_ce(labels, logits):
    per_example = losses.sparse_cross_entropy(labels, logits)
    if tf.reduce_max(per_example) > 100.0:  # a Python `if` on a tensor: needs AutoGraph
      per_example = tf.minimum(per_example, 100.0)
    return per_example
  x, y, t = _batch(16)
  distiller = Distiller(_student(seed=5))
  distiller.compile(optimizer=keras.optimizers.SGD(0.1), distillation_weight=0.0,
                    temperature=T, student_loss_fn=clipped_ce)
  step = tf.function(graph_step(distiller.train_step))
  logs = step((tf.constant(x), tf.constant(y), tf.constant(t)))
  expected = losses.sparse_cross_entropy(y, _student(seed=5)(x)).numpy().mean()
  assert float(logs["student_loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_extra_metrics_are_updated_with_labels_and_student_logits():
  distiller = Distiller(_student())
  top3 = keras.metrics.SparseTopKCategoricalAccuracy(k=3, name="top3")
  distiller.compile(optimizer="adam", metrics=[top3], distillation_weight=0.5, temperature=T)
  batches = [_batch(8), _batch(5)]
  hits = []
  for x, y, t in batches:
    logs = distiller.test_step((x, y, t))
    ranks = np.argsort(-distiller.student(x).numpy(), axis=-1)[:, :3]
    hits.extend(label in row for label, row in zip(y, ranks))
  assert top3 in distiller.metrics
  assert float(logs["top3"]) == pytest.approx(np.mean(hits), rel=1e-6)

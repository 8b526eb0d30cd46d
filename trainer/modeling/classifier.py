"""Plain supervised training of a logits network (the teacher), reduced like the Distiller.

Written out rather than left to Keras' default train_step so that the teacher and the students
share one custom training loop, one loss reduction and one set of metric names.
"""

import keras
import tensorflow as tf

from trainer.modeling import batch_slices
from trainer.modeling.losses import sparse_cross_entropy
from trainer.modeling.metrics import ExampleMeans, correct_predictions


class Classifier(keras.Model):
  """Trains `net` with sparse cross-entropy on logits."""

  def __init__(self, net, **kwargs):
    super().__init__(**kwargs)
    self.net = net

  def compile(self, optimizer="adam", slices=1, **kwargs):
    """`slices` > 1 runs `net` over that many slices of each batch side by side
    (trainer/modeling/batch_slices.py)."""
    super().compile(optimizer=optimizer, **kwargs)
    self.slices = slices
    self.means = ExampleMeans(("loss", "accuracy"))  # one op per step for both

  @property
  def metrics(self):
    return [self.means]

  def call(self, images, training=False):
    return self.net(images, training=training)

  def _update_metrics(self, labels, logits, per_example):
    self.means.update_state({"loss": per_example,
                             "accuracy": correct_predictions(labels, logits)})
    return self.get_metrics_result()

  def train_step(self, data):
    images, labels = data[0], data[1]
    with tf.GradientTape() as tape:
      logits = batch_slices.forward(self.net, images, True, self.slices)
      per_example = sparse_cross_entropy(labels, logits)
      scaled = self.optimizer.scale_loss(tf.nn.compute_average_loss(per_example))
    variables = self.net.trainable_variables
    self.optimizer.apply(tape.gradient(scaled, variables), variables)
    return self._update_metrics(labels, logits, per_example)

  def test_step(self, data):
    logits = batch_slices.forward(self.net, data[0], False, self.slices)
    return self._update_metrics(data[1], logits, sparse_cross_entropy(data[1], logits))

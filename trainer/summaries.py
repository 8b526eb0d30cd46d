"""TensorBoard scalars per epoch: logs/<model>/train and logs/<model>/validation.

Train and validation use the same tag names in two runs, so TensorBoard draws them as two
curves on one chart, and every model's runs sit side by side under logs/.
"""

import os

import tensorflow as tf


class ModelLogs:
  """Summary writers of one model; a no-op on workers that must not write (non-chief)."""

  def __init__(self, log_root: str, name: str, enabled: bool = True):
    self.enabled = enabled
    self.dir = os.path.join(log_root, name)
    if enabled:
      self.train = tf.summary.create_file_writer(os.path.join(self.dir, "train"))
      self.validation = tf.summary.create_file_writer(os.path.join(self.dir, "validation"))

  def write_epoch(self, record: dict) -> None:
    if not self.enabled:
      return
    step = record["epoch"]
    with self.train.as_default(step=step):
      for tag, value in record["train"].items():
        tf.summary.scalar(tag, value)
      tf.summary.scalar("learning_rate", record["learning_rate"])
      tf.summary.scalar("examples_per_second", record["examples_per_second"])
    with self.validation.as_default(step=step):
      for tag, value in record["validation"].items():
        tf.summary.scalar(tag, value)
    self.flush()

  def flush(self) -> None:
    if self.enabled:
      self.train.flush()
      self.validation.flush()

  def close(self) -> None:
    if self.enabled:
      self.train.close()
      self.validation.close()

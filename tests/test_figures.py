"""trainer/evaluation/figures.py: the pictures show what they are given (no timing asserted)."""

import numpy as np
import tensorflow as tf

from trainer.evaluation import figures


def _dark_pixels(png):
  image = tf.io.decode_png(png, channels=1).numpy()
  return int(np.sum(image < 64))


def test_digits_grid_draws_every_digit():
  ink = np.full((5, 28, 28), 255, np.uint8)  # solid digits: 784 dark pixels each, at 100 dpi
  labels, predicted = np.arange(5), (np.arange(5) + 1) % 10
  dark = [_dark_pixels(figures.digits_png(ink[:n], labels[:n], predicted[:n], "t", "c"))
          for n in (0, 1, 5)]
  assert dark[0] < dark[1] < dark[2]
  per_digit = (dark[2] - dark[1]) / 4
  assert per_digit > 28 * 28 * 0.5, dark  # each tile drawn at about its own size or more
  none = figures.digits_png(ink[:0], labels[:0], predicted[:0], "t", "nothing to show")
  assert tf.io.decode_png(none).shape[1] == 8 * 90  # the same width as a grid


def test_confusion_matrix_picture_is_remembered_per_counts_and_title():
  counts = figures.confusion_matrix([0, 1, 2, 2], [0, 1, 2, 1], num_classes=3)
  first = figures.confusion_matrix_png(counts, "m")
  assert figures.confusion_matrix_png(counts.copy(), "m") == first
  assert figures.confusion_matrix_png(counts, "other") != first
  changed = counts.copy()
  changed[2, 2] += 1
  assert figures.confusion_matrix_png(changed, "m") != first

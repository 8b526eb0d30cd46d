"""The teacher and student CNNs, layer for layer as in the course notebook.

Teacher: 1,144,074 parameters; student: 28,226. Both output logits (no softmax), because the
losses and the distillation temperature work on logits.
"""

import keras
from keras import layers

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def _cnn(name, conv_filters, dense_units):
  stack = [keras.Input(INPUT_SHAPE, name="image")]
  for filters in conv_filters:
    stack += [layers.Conv2D(filters, 3, padding="same", activation="relu"),
              layers.AveragePooling2D(2)]
  stack.append(layers.Flatten())
  stack += [layers.Dense(units, activation="relu") for units in dense_units]
  # Logits stay float32 under mixed precision: softmax/KL at low precision lose the tails.
  stack.append(layers.Dense(NUM_CLASSES, name="logits", dtype="float32"))
  return keras.Sequential(stack, name=name)


def build_teacher() -> keras.Model:
  """Conv 16/32/64 each followed by 2x2 average pooling, then dense 1024/512/10."""
  return _cnn("teacher", (16, 32, 64), (1024, 512))


def build_student() -> keras.Model:
  """Conv 8/8 each followed by 2x2 average pooling, then dense 64/32/10."""
  return _cnn("student", (8, 8), (64, 32))

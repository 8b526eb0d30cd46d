"""The teacher and student CNNs, layer for layer as in the course notebook.

Teacher: 1,144,074 parameters; student: 28,226. Both output logits (no softmax), because the
losses and the distillation temperature work on logits.

With a `seed`, each kernel initializer takes its seed from a private random.Random(seed), in the
order Keras would draw them from Python's global `random` after random.seed(seed): the same
weights, but no other thread (a lease renewal, an upload's retry jitter) can draw in between.
"""

import random

import keras
from keras import layers

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def _kernel(rng):
  """Keras' default kernel initializer, seeded from `rng` when there is one."""
  if rng is None:
    return "glorot_uniform"
  return keras.initializers.GlorotUniform(seed=rng.randint(1, int(1e9)))


def _cnn(name, conv_filters, dense_units, seed):
  rng = None if seed is None else random.Random(seed)
  stack = [keras.Input(INPUT_SHAPE, name="image")]
  for filters in conv_filters:
    stack += [layers.Conv2D(filters, 3, padding="same", activation="relu",
                            kernel_initializer=_kernel(rng)),
              layers.AveragePooling2D(2)]
  stack.append(layers.Flatten())
  stack += [layers.Dense(units, activation="relu", kernel_initializer=_kernel(rng))
            for units in dense_units]
  # Logits stay float32 under mixed precision: softmax/KL at low precision lose the tails.
  stack.append(layers.Dense(NUM_CLASSES, name="logits", dtype="float32",
                            kernel_initializer=_kernel(rng)))
  return keras.Sequential(stack, name=name)


def build_teacher(seed=None) -> keras.Model:
  """Conv 16/32/64 each followed by 2x2 average pooling, then dense 1024/512/10."""
  return _cnn("teacher", (16, 32, 64), (1024, 512), seed)


def build_student(seed=None) -> keras.Model:
  """Conv 8/8 each followed by 2x2 average pooling, then dense 64/32/10."""
  return _cnn("student", (8, 8), (64, 32), seed)


def param_counts() -> tuple:
  """The teacher's and a student's parameter counts (they build the models: Keras loads)."""
  return build_teacher().count_params(), build_student().count_params()

"""Adam with one fused kernel per variable: the same update as keras.optimizers.Adam, cheaper.

Keras' Adam updates each variable with about ten separate element-wise ops, each a pass over
memory. For the teacher (1.1M parameters) at small batches those passes cost as much as the
forward pass; TensorFlow's ResourceApplyAdam kernel does the whole update in one pass:

    m <- m + (g - m)(1 - beta1);  v <- v + (g^2 - v)(1 - beta2)
    var <- var - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + epsilon)

which is Keras' formula term for term (tests/test_optimizers.py checks the two agree). Anything
the kernel does not cover (amsgrad, sparse gradients, non-float32 variables) falls back to Keras.

Weight decay is Keras' own, decoupled from the gradient (AdamW, Loshchilov & Hutter 2019): each
step shrinks a weight by lr * weight_decay * weight before the Adam update, so it regularizes
the teacher without touching its layers or parameter count.
"""

import keras
import tensorflow as tf


class FusedAdam(keras.optimizers.Adam):
  """keras.optimizers.Adam whose per-variable update is a single ResourceApplyAdam op."""

  def update_step(self, gradient, variable, learning_rate):
    if (self.amsgrad or isinstance(gradient, tf.IndexedSlices)
        or variable.dtype != tf.float32):
      return super().update_step(gradient, variable, learning_rate)
    index = self._get_variable_index(variable)
    momentum, velocity = self._momentums[index], self._velocities[index]
    step = tf.cast(self.iterations + 1, tf.float32)
    tf.raw_ops.ResourceApplyAdam(
        var=_handle(variable), m=_handle(momentum), v=_handle(velocity),
        beta1_power=tf.pow(tf.cast(self.beta_1, tf.float32), step),
        beta2_power=tf.pow(tf.cast(self.beta_2, tf.float32), step),
        lr=tf.cast(learning_rate, tf.float32), beta1=tf.cast(self.beta_1, tf.float32),
        beta2=tf.cast(self.beta_2, tf.float32), epsilon=tf.cast(self.epsilon, tf.float32),
        grad=tf.cast(gradient, tf.float32), use_locking=False)
    return None


def _handle(variable):
  """The resource handle of a Keras or tf variable (under tf.distribute: this device's copy)."""
  if isinstance(variable, keras.Variable):
    variable = variable.value
  return variable.handle


def cosine_adam(learning_rate: float, decay_steps: int, weight_decay: float = 0.0) -> FusedAdam:
  """FusedAdam with the job's cosine schedule to 0 over `decay_steps`; `weight_decay` > 0 adds
  decoupled weight decay to kernels only (biases are not shrunk: they do not scale outputs)."""
  schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, decay_steps))
  if not weight_decay:
    return FusedAdam(schedule)
  optimizer = FusedAdam(schedule, weight_decay=weight_decay)
  optimizer.exclude_from_weight_decay(var_names=["bias"])
  return optimizer

"""Run as a script: trains one step on 1 device and on 2 mirrored logical CPUs, prints JSON.

A separate process because logical devices must be configured before TensorFlow starts.
SGD, not Adam: Adam's update hardly changes when the gradient doubles, so only SGD exposes a
loss reduced per replica instead of over the global batch. The fused Adam
(trainer/modeling/optimizers.py) runs too: its kernel must update every replica's copy of each
variable, not only the first.
"""

import json
import os
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

from trainer.data import idx
from trainer.data.pipeline import ArrayPipeline
from trainer.modeling import models
from trainer.modeling.classifier import Classifier
from trainer.modeling.distiller import Distiller
from trainer.modeling.optimizers import FusedAdam
from trainer.training import distribution
from trainer.training.loop import LoopConfig, TrainingLoop

BATCH = 64
KINDS = ("teacher", "distiller_cached", "distiller_online", "teacher_fused_adam")


def make_optimizer(kind):
  return FusedAdam(1e-3) if kind.endswith("fused_adam") else keras.optimizers.SGD(0.05)


def train_one_step(strategy, kind, images, labels, teacher_logits):
  keras.utils.set_random_seed(0)
  with strategy.scope():
    if kind.startswith("teacher"):
      net = models.build_teacher()
      model = Classifier(net)
      model.compile(optimizer=make_optimizer(kind))
      extras = None
    else:
      net = models.build_student()
      teacher = None
      if kind == "distiller_online":
        keras.utils.set_random_seed(1)
        teacher = models.build_teacher()
      model = Distiller(net, teacher)
      model.compile(optimizer=make_optimizer(kind), alpha=0.5, temperature=4.0)
      extras = teacher_logits if kind == "distiller_cached" else None
  pipe = ArrayPipeline(images, labels, BATCH, strategy.num_replicas_in_sync, extras)
  loop = TrainingLoop(model, net, strategy, pipe, pipe, tempfile.mkdtemp(),
                      LoopConfig(epochs=1, seed=0))
  history = loop.run()
  replica_spread = max(  # largest difference between two replicas' copies of a weight
      float(np.ptp(np.stack([c.numpy() for c in strategy.experimental_local_results(w.value)]),
                   axis=0).max()) for w in net.weights)
  return [w.numpy() for w in net.weights], history[0]["train"]["loss"], replica_spread


def main():
  distribution.split_cpu(2)
  cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
  images, labels = idx.load_split(sys.argv[1], "test")
  images, labels = images[:BATCH], labels[:BATCH]
  teacher_logits = np.random.default_rng(0).normal(size=(BATCH, 10)).astype("float32") * 3
  one_device = tf.distribute.OneDeviceStrategy(cpus[0])
  mirrored = tf.distribute.MirroredStrategy(cpus)  # one per process: collectives share keys
  out = {}
  for kind in KINDS:
    one, loss_one, _ = train_one_step(one_device, kind, images, labels, teacher_logits)
    two, loss_two, spread = train_one_step(mirrored, kind, images, labels, teacher_logits)
    keras.utils.set_random_seed(0)
    initial = [w.numpy() for w in (models.build_teacher() if kind.startswith("teacher")
                                   else models.build_student()).weights]
    out[kind] = {
        "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(one, two)),
        "max_update": max(float(np.abs(a - b).max()) for a, b in zip(one, initial)),
        "loss_one_device": loss_one, "loss_mirrored": loss_two, "replica_spread": spread,
    }
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
  # TensorFlow aborts in interpreter teardown in about 1 run of 5 of this script ("terminate
  # called ... exception not rethrown", seen before and after batch slices), after the result
  # is printed and flushed: skip the teardown, it has nothing left to do.
  os._exit(0)

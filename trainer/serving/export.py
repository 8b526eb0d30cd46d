"""Writes a trained network as a SavedModel (for serving) and a .keras file, each atomically
(trainer/rundir/layout.py), so a reader or a restarted pod never sees half an export."""

import keras
import tensorflow as tf

from trainer.data.pipeline import normalize_images
from trainer.rundir import layout


def export_saved_model(net: keras.Model, path: str) -> None:
  """SavedModel whose `serving_default` takes raw uint8 images [N,28,28].

  Serving callers send pixels as they come; normalization lives inside the graph so it can
  never drift from training. Outputs: logits, probabilities, classes.
  """
  archive = keras.export.ExportArchive()
  archive.track(net)

  def serve(images):
    logits = tf.cast(net(normalize_images(images), training=False), tf.float32)
    return {"logits": logits, "probabilities": tf.nn.softmax(logits),
            "classes": tf.argmax(logits, axis=-1)}

  archive.add_endpoint("serving_default", serve,
                       input_signature=[tf.TensorSpec([None, 28, 28], tf.uint8, name="images")])
  with layout.atomic_path(path) as tmp:
    archive.write_out(tmp, verbose=False)


def save_keras(net: keras.Model, path: str) -> None:
  """The network as a .keras file (the teacher is reloaded from it by --mode=students)."""
  with layout.atomic_path(path) as tmp:
    net.save(tmp)

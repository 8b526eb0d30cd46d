"""Reading TensorBoard event files in tests: one place for the file pattern and for a model's
HParams session, which several tests check."""

import glob
import os

import tensorflow as tf
from tensorboard.plugins.hparams import metadata as hparams_metadata


def events(run_dir):
  """Every event of the files directly in run_dir, in file order."""
  for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
    yield from tf.compat.v1.train.summary_iterator(path)


def session_hparams(run_dir):
  """{name: string or number} of the HParams session start info written in run_dir."""
  for event in events(run_dir):
    for value in event.summary.value:
      if value.tag == hparams_metadata.SESSION_START_INFO_TAG:
        start = hparams_metadata.parse_session_start_info_plugin_data(
            value.metadata.plugin_data.content)
        return {k: (v.string_value if v.HasField("string_value") else v.number_value)
                for k, v in start.hparams.items()}
  raise AssertionError(f"no HParams session in {run_dir}")

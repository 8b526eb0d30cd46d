"""Layer 1, the run's folder: where a run writes and how, locally or in a gs:// bucket.

locations (the model_dir grammar and object-name rules, pure Python), layout (the folder's names
and atomic writes), gcs (the Cloud Storage client and retry policy), downloads (safe downloads,
input flags' local copies), storage (the run folder's bucket mirror), lease (one writer per
model) and disk_full (a full disk in one line). Imports nothing of trainer but errors.
"""

"""Layer 1, the run's folder: where a run writes and how, locally or in a gs:// bucket.

layout (the folder's names and atomic writes), storage (the model_dir grammar and the bucket
mirror), lease (one writer per model) and disk_full (a full disk in one line). Imports nothing
of trainer but errors.
"""

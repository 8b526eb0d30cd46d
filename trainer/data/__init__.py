"""Layer 1, the data: MNIST's IDX files and TFDS splits, the transfer set, the input pipeline
and its augmentations (shifts, affine, elastic; mixup). Imports nothing of trainer but errors.
"""

"""What the input pipeline accepts, stated once for the pipeline and for trainer/flags.py, which
checks the flags before TensorFlow loads: pure Python."""

# trainer/data/augment.py's kinds (its KINDS).
AUGMENTATIONS = ("none", "shift", "affine", "elastic", "shift_flip")
# trainer/data/mixup.py's range of Beta concentrations (0: mixup off).
MIN_MIXUP = 0.1  # below it Beta(c, c) puts nearly all pairs at w = 0 or 1
MAX_MIXUP = 100.0  # above it every w is about 0.5

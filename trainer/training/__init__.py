"""Layer 2, the training loop and where it runs: the custom loop (checkpoints, evaluation,
non-finite checks), tf.distribute strategies and TF_CONFIG, the watchdog for stuck peers and
SIGTERM's grace period. Uses layers 0 and 1 only.
"""

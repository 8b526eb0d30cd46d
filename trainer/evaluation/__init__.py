"""Layer 3, what a run found: test accuracy and its interval, the student to ship, results.json
and results.md, the comparison across models, figures, TensorBoard summaries and hparams, and
the lines a run ends with. Uses layers 0 to 2.
"""

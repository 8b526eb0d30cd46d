"""The benchmark of this project's training path against the course notebook's way.

Kept outside the `trainer` package, so neither the wheel nor the image carries it: the job never
imports it. Run it from a checkout: `python -m benchmarks --help`.
"""

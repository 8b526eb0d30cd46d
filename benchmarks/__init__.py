"""The benchmark of this project's training path against the course notebook's way.

Kept outside the `trainer` package, so neither the wheel nor the image carries it: the job never
imports it. Run it from a checkout: `python -m benchmarks --help`.
"""

import json


def emit(lines, found, json_out=None) -> int:
  """The end of a benchmark's command: its report lines on stdout, every measurement in
  `json_out` when given; the exit status."""
  print("\n".join(lines))
  if json_out:
    with open(json_out, "w") as f:
      json.dump(found, f, indent=1)
  return 0

#!/usr/bin/env python3
"""Aggregates the results.json of several runs (one per seed) into a markdown accuracy table.

Usage: scripts/accuracy_table.py RUN_DIR [RUN_DIR ...] [--command "TEXT"]
Each RUN_DIR is a finished job's --model_dir (or its results.json). Every model name found is
one row: test accuracy as mean ± sample standard deviation over the runs that have it, with
the number of seeds. Runs that differ in anything but --seed and --model_dir are reported on
stderr (they would not be replicas of one experiment); the exit code is then 1.
"""

import argparse
import json
import os
import statistics
import sys

IGNORED_FLAGS = ("seed", "model_dir", "teacher_dir")


def load(path):
  if os.path.isdir(path):
    path = os.path.join(path, "results.json")
  with open(path) as f:
    return json.load(f)


def _mean_sd(values):
  mean = statistics.fmean(values)
  sd = statistics.stdev(values) if len(values) > 1 else float("nan")
  return mean, sd


def _fmt_pct(mean, sd):
  return f"{100 * mean:.2f} ± {100 * sd:.2f}" if sd == sd else f"{100 * mean:.2f}"


def _sort_key(model):
  teacher = model["role"] == "teacher"
  alpha = model.get("alpha")
  return (not teacher, -1.0 if alpha is None else alpha, model.get("temperature") or 0.0,
          model["name"])


def differing_flags(summaries):
  """Flags (other than the seed and folders) whose values differ between the runs."""
  keys = set().union(*(s.get("flags", {}) for s in summaries))
  return sorted(k for k in keys - set(IGNORED_FLAGS)
                if len({json.dumps(s.get("flags", {}).get(k), sort_keys=True)
                        for s in summaries}) > 1)


def table(summaries) -> str:
  rows = {}
  for summary in summaries:
    for model in summary["models"]:
      rows.setdefault(model["name"], []).append(model)
  lines = ["| model | role | alpha | T | test accuracy % (mean ± sd) | test errors (mean) | "
           "seeds |", "|---|---|---|---|---|---|---|"]
  for name, runs in sorted(rows.items(), key=lambda item: _sort_key(item[1][0])):
    first = runs[0]
    mean, sd = _mean_sd([r["test_accuracy"] for r in runs])
    errors = statistics.fmean(r["test_errors"] for r in runs)
    alpha = "" if first.get("alpha") is None else f"{first['alpha']:g}"
    temperature = "" if first.get("temperature") is None or first.get("alpha") == 0 \
        else f"{first['temperature']:g}"
    lines.append(f"| {name} | {first['role']} | {alpha} | {temperature} | "
                 f"{_fmt_pct(mean, sd)} | {errors:.1f} | {len(runs)} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+", help="run folders (--model_dir) or results.json files")
  parser.add_argument("--command", default=None, help="the command that produced the runs")
  args = parser.parse_args(argv)
  summaries = [load(path) for path in args.runs]
  print(table(summaries))
  seeds = [s.get("flags", {}).get("seed") for s in summaries]
  first = summaries[0]
  print()
  print(f"{len(summaries)} runs, seeds {', '.join(str(s) for s in seeds)}; dataset "
        f"{first.get('dataset')}; {first.get('precision')}; TensorFlow {first.get('tensorflow')},"
        f" Keras {first.get('keras')}; sd is the sample standard deviation over seeds.")
  if args.command:
    print(f"Command: `{args.command}`")
  different = differing_flags(summaries)
  if different:
    print(f"accuracy_table: the runs differ in more than the seed: {', '.join(different)}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

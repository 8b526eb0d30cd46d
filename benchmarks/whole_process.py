"""The short run as its user waits for it: one process, start to exit, against the notebook's.

Ours is the command a user types to distill one student from an existing teacher:

    mnist-distill --mode=students --teacher_dir=T --student=s:alpha=0.5,temperature=4 \\
        --student_epochs=3 --batch_size=32 --idx_dir=D

with everything it does by default (teacher logits cached once, validation every epoch,
checkpoints, SavedModel and .keras exports, LiteRT flatbuffers measured in the interpreter,
figures, the report). The notebook's side is benchmarks/notebook.py in a process of its own:
the same teacher loaded from T's model.keras, its Distiller (the teacher run in every step)
fit for 3 epochs at batch 32 on the training split (all 60,000 images, as the notebook does;
ours trains on 55,000 and validates on 5,000), then evaluated on the test split.

Both are timed wall to wall, from spawning the process to its exit, in turns (ours, notebook,
ours, ...); the ratio is the notebook's median over ours. Their CPU seconds (user + system) are
reported too: on cores shared with other work, wall time grows with the load and CPU time much
less. Each turn also times a process that only imports TensorFlow and Keras: the part of a
start-up that no change to this project can remove. With --other_code=DIR (a checkout of other
code, e.g. before a change) each turn also runs ours from that code, so that the two are
compared in the same turns. Ours is broken down from its log (start-up to its first line,
teacher logits, training, the rest: evaluation, exports, LiteRT, report).
"""

import argparse
import datetime
import json
import os
import re
import statistics
import sys
import time

from benchmarks import emit
from benchmarks.end_to_end import child_env, run_subprocess

TARGET = 4.0  # ours must take at most a quarter of the notebook's wall time
STUDENT = ("s", 0.5, 4.0)  # name, alpha, temperature: the notebook's "distilled" student
EPOCHS = 3
BATCH_SIZE = 32
FLOOR_CODE = "import tensorflow, keras"

_LOG_TIME = re.compile(r"^[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d+)")
_LOGITS = re.compile(r"Cached teacher logits for \d+ examples in ([\d.]+)s")


def ours_command(idx_dir, teacher_dir, model_dir, subset=()) -> list:
  name, alpha, temperature = STUDENT
  return ["-m", "trainer", "--mode=students", f"--teacher_dir={teacher_dir}",
          f"--student={name}:alpha={alpha:g},temperature={temperature:g}",
          f"--student_epochs={EPOCHS}", f"--batch_size={BATCH_SIZE}", f"--idx_dir={idx_dir}",
          f"--model_dir={model_dir}", *_ours_subset(subset)]


def notebook_command(idx_dir, teacher_dir, subset=()) -> list:
  train, test = subset or (None, None)
  return ["-m", "benchmarks.notebook", f"--idx_dir={idx_dir}",
          f"--teacher_model={os.path.join(teacher_dir, 'model.keras')}",
          "--students=distilled", f"--student_epochs={EPOCHS}"] + (
              [f"--max_train_examples={train}", f"--max_test_examples={test}"] if subset else [])


def _ours_subset(subset) -> list:
  if not subset:
    return []
  train, test = subset
  return [f"--max_train_examples={train}", f"--max_test_examples={test}",
          f"--validation_examples={test}"]


def prepare_teacher(idx_dir, workdir, subset=()) -> str:
  """A finished teacher (1 epoch: its quality does not change either side's cost)."""
  model_dir = os.path.join(workdir, "whole-process-teacher")
  run = run_subprocess([sys.executable, "-m", "trainer", "--mode=teacher", "--teacher_epochs=1",
                        "--nolitert", f"--idx_dir={idx_dir}", f"--model_dir={model_dir}",
                        *_ours_subset(subset)], workdir, "whole-process-teacher")
  if run["returncode"] != 0:
    raise RuntimeError(f"training the teacher failed; see {run['log']}")
  return os.path.join(model_dir, "teacher")


def _log_seconds(line: str, day: datetime.date):
  """Wall-clock time (epoch seconds) of an absl log line, or None."""
  found = _LOG_TIME.match(line)
  if not found:
    return None
  stamp = datetime.datetime.strptime(f"{day.year}{found.group(1)} {found.group(2)}",
                                     "%Y%m%d %H:%M:%S.%f")
  return stamp.timestamp()


def breakdown(log_path, spawned: float, wall: float, train_seconds) -> dict:
  """Where ours' seconds went: start-up (spawn to its first log line: interpreter, imports,
  flags), teacher logits, training (the loop's own clock), report and exit (its last log line
  to the process' end: results merged, summary printed, teardown), and the rest."""
  with open(log_path, errors="replace") as f:
    lines = f.read().splitlines()
  day = datetime.date.fromtimestamp(spawned)
  stamps = [t for t in (_log_seconds(line, day) for line in lines) if t is not None]
  logits = next((float(m.group(1)) for m in map(_LOGITS.search, lines) if m), 0.0)
  parts = {"start-up": max(0.0, stamps[0] - spawned) if stamps else None,
           "teacher logits": logits, "training": train_seconds,
           "report and exit": max(0.0, spawned + wall - stamps[-1]) if stamps else None}
  known = sum(v for v in parts.values() if v)
  parts["the rest"] = max(0.0, wall - known)
  return parts


def _result(model_dir):
  path = os.path.join(model_dir, STUDENT[0], "result.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _ours_turn(found, key, idx_dir, teacher_dir, workdir, name, subset, code=None):
  """One run of ours; `code`: the root of another checkout to run it from."""
  model_dir = os.path.join(workdir, name)
  env = dict(child_env(), PYTHONPATH=code) if code else None
  spawned = time.time()
  ours = run_subprocess([sys.executable, *ours_command(idx_dir, teacher_dir, model_dir, subset)],
                        workdir, name, env, cwd=code)  # `-m` imports from the cwd first
  if ours["returncode"] != 0:
    found["failed"].append(f"{name}: exit {ours['returncode']}, {ours['log']}")
  found[key].append(ours["wall_seconds"])
  found[f"{key}_cpu"].append(ours["cpu_seconds"])
  return ours, spawned, _result(model_dir)


def measure(idx_dir, workdir, runs=3, teacher_dir=None, subset=(), other_code=None) -> dict:
  """`runs` turns of ours, the notebook and the import floor, each a process of its own (and
  ours from `other_code`, a checkout's root, when given)."""
  teacher_dir = os.path.abspath(teacher_dir or prepare_teacher(idx_dir, workdir, subset))
  found = {"ours": [], "notebook": [], "floor": [], "ours_parts": [], "load": [],
           "ours_accuracy": [], "notebook_accuracy": [], "failed": [], "ours_cpu": [],
           "notebook_cpu": [], "other": [], "other_cpu": [], "other_code": other_code}
  for turn in range(runs):
    found["load"].append(os.getloadavg()[0])
    if other_code:
      _ours_turn(found, "other", idx_dir, teacher_dir, workdir,
                 f"whole-process-other-{turn}", subset, os.path.abspath(other_code))
    ours, spawned, result = _ours_turn(found, "ours", idx_dir, teacher_dir, workdir,
                                       f"whole-process-ours-{turn}", subset)
    found["ours_accuracy"].append(result.get("test_accuracy"))
    found["ours_parts"].append(breakdown(ours["log"], spawned, ours["wall_seconds"],
                                         result.get("train_seconds")))
    book = run_subprocess([sys.executable, *notebook_command(idx_dir, teacher_dir, subset)],
                          workdir, f"whole-process-notebook-{turn}")
    if book["returncode"] != 0:
      found["failed"].append(f"notebook turn {turn + 1}: exit {book['returncode']}, "
                             f"{book['log']}")
      book_accuracy = None
    else:
      book_accuracy = json.loads(
          book["stdout"].strip().splitlines()[-1])["test_accuracy"]["distilled"]
    found["notebook"].append(book["wall_seconds"])
    found["notebook_cpu"].append(book["cpu_seconds"])
    found["notebook_accuracy"].append(book_accuracy)
    found["floor"].append(run_subprocess([sys.executable, "-c", FLOOR_CODE], workdir,
                                         f"whole-process-floor-{turn}")["wall_seconds"])
    other = f", other code {found['other'][-1]:.1f} s" if other_code else ""
    print(f"whole process turn {turn + 1}/{runs}: ours {found['ours'][-1]:.1f} s, notebook "
          f"{found['notebook'][-1]:.1f} s, import floor {found['floor'][-1]:.1f} s{other}",
          file=sys.stderr, flush=True)
  found["command"] = "mnist-distill " + " ".join(
      a for a in ours_command("DATA", "TEACHER", "OUT", subset)[2:]
      if not a.startswith("--model_dir"))
  found["runs"] = runs
  found["subset"] = list(subset)
  return found


def median(values) -> float:
  kept = [v for v in values if v is not None]
  return float(statistics.median(kept)) if kept else float("nan")


def report_lines(found) -> list:
  ours, book, floor = (median(found[k]) for k in ("ours", "notebook", "floor"))
  ratio = book / ours
  label = "" if not found["subset"] else (f" (subset: {found['subset'][0]} training, "
                                          f"{found['subset'][1]} test images)")
  lines = [f"- whole process, short run{label}: `{found['command']}`",
           f"  ours {ours:.1f} s, the notebook's Distiller {book:.1f} s (median of "
           f"{found['runs']}, in turns; load {min(found['load']):.1f}-{max(found['load']):.1f}):"
           f" {ratio:.2f}x (target >= {TARGET:g}x): " + ("met" if ratio >= TARGET else "MISSED")]
  cpu = (median(found["ours_cpu"]), median(found["notebook_cpu"]))
  lines.append(f"  CPU seconds (user + system): ours {cpu[0]:.1f}, the notebook's {cpu[1]:.1f}: "
               f"{cpu[1] / cpu[0]:.2f}x")
  if found.get("other_code"):
    other = median(found["other"])
    lines.append(f"  ours from {found['other_code']}: {other:.1f} s, "
                 f"{median(found['other_cpu']):.1f} CPU s: {book / other:.2f}x; this code "
                 f"takes {ours / other:.2f} of its wall time")
  parts = {k: median([p[k] for p in found["ours_parts"]]) for k in found["ours_parts"][0]}
  lines.append("  ours, median seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
               + f"; `python -c '{FLOOR_CODE}'` alone {floor:.1f}")
  fixed = floor + parts["teacher logits"] + (parts["training"] or 0.0)
  lines.append(f"  floor: import + teacher logits + training = {fixed:.1f} s, so at most "
               f"{book / fixed:.2f}x with everything else free")
  accuracy = (median(found["ours_accuracy"]), median(found["notebook_accuracy"]))
  lines.append(f"  test accuracy: ours {accuracy[0]:.4f}, the notebook's {accuracy[1]:.4f}")
  lines += [f"  FAILED: {f}" for f in found["failed"]]
  return lines


def parse_subset(raw: str) -> tuple:
  """'TRAIN,TEST' (image counts for a smoke run) or '' (the real run's full splits)."""
  if not raw:
    return ()
  train, test = (int(v) for v in raw.split(","))
  return train, test


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m benchmarks.whole_process",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--idx_dir", default=os.environ.get("MNIST_DIR"))
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--teacher_dir", default=None, help="default: train a 1-epoch teacher")
  parser.add_argument("--subset", default="", help="TRAIN,TEST image counts (smoke runs)")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--json_out", default=None)
  parser.add_argument("--other_code", default=None,
                      help="also run ours from this checkout's root in every turn")
  args = parser.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  found = measure(args.idx_dir, os.path.abspath(args.workdir), args.runs, args.teacher_dir,
                  parse_subset(args.subset), args.other_code)
  return emit(report_lines(found), found, args.json_out)


if __name__ == "__main__":
  sys.exit(main())

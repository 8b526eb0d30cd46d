"""What the benchmark prints and saves: the throughput table, the targets (ours over the faster
of the two baselines at the same batch size), the other modes, the end-to-end runs, and the
notebook's whole schedule extrapolated from the measured baseline, the short run as a whole
process, and mixed_bfloat16 against float32 on this CPU."""

import keras
import tensorflow as tf

from benchmarks import cluster as cluster_bench
from benchmarks import notebook, precision, whole_process
from benchmarks.throughput import DEFAULT_THREADS, EXTRA_MODES, PHASES, baseline_name, variant_name

TARGETS = {"teacher training": 1.5, "distillation": 4.0}  # ours/baseline at equal batch size
BF16_RULE = 1.5  # mixed_bfloat16 must be this much faster than float32 for auto to choose it
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> dict:
  """Which of BF16_FLAGS this machine's CPU reports (Linux /proc/cpuinfo), and its model."""
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return {"model": "unknown", **{flag: None for flag in BF16_FLAGS}}
  flags = set()
  model = "unknown"
  for line in text.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "flags":
      flags.update(value.split())
    elif key.strip() == "model name" and model == "unknown":
      model = value.strip()
  return {"model": model, **{flag: flag in flags for flag in BF16_FLAGS}}


def _fmt_ratio(ours, base):
  return f"{ours / base:.2f}x"


def _median(phases, phase, variant) -> float:
  return phases[phase][variant].median()


def _notebook_rate(phases, phase, batch) -> float:
  """The faster of the baseline's medians at `batch`: in this process, and in the partner
  with TensorFlow's default threads. Every target is taken against this."""
  names = (baseline_name(batch), baseline_name(batch, DEFAULT_THREADS))
  return max(_median(phases, phase, name) for name in names if name in phases[phase])


def extrapolate_notebook(phases) -> dict:
  """Seconds the notebook's schedule would take at the measured baseline throughputs."""
  def rate(phase):
    return _notebook_rate(phases, phase, notebook.BATCH_SIZE)
  students = len(notebook.STUDENTS)
  parts = {
      "teacher": notebook.TEACHER_EPOCHS * notebook.TRAIN_EXAMPLES / rate("teacher training"),
      "students": students * notebook.STUDENT_EPOCHS * notebook.TRAIN_EXAMPLES
                  / rate("distillation"),
      "evaluation": notebook.TEST_EXAMPLES * (1 / rate("evaluation (teacher)")
                                              + students / rate("evaluation (student)")),
  }
  parts["total"] = sum(parts.values())
  return parts


def throughput_table(phases, batch_sizes) -> str:
  """One row per phase and batch size: the notebook's way with TensorFlow's default threads
  and in our process, ours, and ours over the faster of the two."""
  header = ["phase", "batch", "notebook, TF default threads (img/s)",
            "notebook, in our process (img/s)", "ours (img/s)", "ours / faster notebook"]
  lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|---:|"]
  for phase in PHASES:
    for batch in batch_sizes:
      ours = _median(phases, phase, variant_name(batch))
      default_threads = _median(phases, phase, baseline_name(batch, DEFAULT_THREADS))
      row = [phase, str(batch), f"{default_threads:,.0f}",
             f"{_median(phases, phase, baseline_name(batch)):,.0f}", f"{ours:,.0f}",
             _fmt_ratio(ours, _notebook_rate(phases, phase, batch))]
      lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def target_lines(phases, batch_sizes, extra_modes=()) -> list:
  """Each target at each batch size (ours and the baseline at that same batch size), for
  float32 and for each extra mode that was measured."""
  lines = []
  for mode in ("", *extra_modes):
    label = f" in {_mode_label(mode)}" if mode else ""
    for batch in batch_sizes:
      for phase, target in TARGETS.items():
        ratio = (_median(phases, phase, variant_name(batch, mode))
                 / _notebook_rate(phases, phase, batch))
        verdict = "met" if ratio >= target else "MISSED"
        lines.append(f"- {phase} at batch {batch}{label}: {ratio:.2f}x (target >= "
                     f"{target:g}x): {verdict}")
  return lines


def default_batch_lines(phases, batch_sizes) -> list:
  """Ours at each larger batch size against the notebook at its own batch 32: what changing
  the batch size adds on top (not the targets, which compare equal batch sizes)."""
  lines = []
  for batch in batch_sizes[1:]:
    parts = [f"{phase} " + _fmt_ratio(_median(phases, phase, variant_name(batch)),
                                      _notebook_rate(phases, phase, notebook.BATCH_SIZE))
             for phase in TARGETS]
    lines.append(f"- ours at batch {batch} vs the notebook at batch {notebook.BATCH_SIZE}: "
                 + ", ".join(parts))
  return lines


def _mode_label(mode) -> str:
  policy, jit = EXTRA_MODES[mode]
  return f"{policy}{', XLA' if jit else ''}"


def mode_lines(phases, batch_sizes, extra_modes) -> list:
  lines = []
  for mode in extra_modes:
    for batch in batch_sizes:
      parts = []
      for phase in TARGETS:
        plain = _median(phases, phase, variant_name(batch))
        other = _median(phases, phase, variant_name(batch, mode))
        base = _notebook_rate(phases, phase, batch)
        parts.append(f"{phase} {other:,.0f} img/s = {other / plain:.2f}x float32, "
                     f"{other / base:.2f}x notebook")
      lines.append(f"- ours at batch {batch} in {_mode_label(mode)}: " + "; ".join(parts))
  return lines


def bf16_lines(phases, batch_sizes, extra_modes, flags) -> list:
  """mixed_bfloat16 over float32 on our training steps (teacher, student), with the CPU's
  bf16 features and the rule for --mixed_precision=auto."""
  if "bf16" not in extra_modes:
    return []
  have = ", ".join(f"{flag} {'yes' if flags.get(flag) else 'no'}" for flag in BF16_FLAGS)
  ratios = {(phase, batch): _median(phases, phase, variant_name(batch, "bf16"))
            / _median(phases, phase, variant_name(batch))
            for phase in TARGETS for batch in batch_sizes}
  parts = [f"{'teacher step' if phase == 'teacher training' else 'student step'} at batch "
           f"{batch} {ratio:.2f}x" for (phase, batch), ratio in ratios.items()]
  slowest = min(ratios.values())
  verdict = (f"all >= {BF16_RULE:g}x" if slowest >= BF16_RULE
             else f"below the {BF16_RULE:g}x rule ({slowest:.2f}x at the least)")
  return [f"- mixed_bfloat16 / float32 on this CPU ({flags.get('model', 'unknown')}; {have}): "
          + ", ".join(parts) + f": {verdict}"]


def _accuracy_line(accuracies) -> str:
  return "  test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(accuracies.items()))


def _run_line(what, run) -> str:
  ok = run["returncode"] == 0
  return (f"- {what}: wall {run['wall_seconds']:.0f} s, peak RSS {run['max_rss_mib']:.0f} MiB"
          + ("" if ok else f", FAILED (exit {run['returncode']})"))


def end_to_end_lines(job, notebook_run, extrapolated) -> list:
  label = "full MNIST" if job.get("full") else "subset " + " ".join(job["args"][2:])
  ok = job["returncode"] == 0
  lines = [_run_line(f"default job ({label})", job)]
  if ok and job["test_accuracy"]:
    lines.append(_accuracy_line(job["test_accuracy"]))
  e = extrapolated
  lines.append(f"- notebook schedule, EXTRAPOLATED from the baseline throughput above: "
               f"{e['total']:.0f} s (teacher {e['teacher']:.0f} s, students {e['students']:.0f} "
               f"s, evaluation {e['evaluation']:.0f} s)")
  measured = notebook_run is not None and notebook_run["returncode"] == 0
  if notebook_run is not None:
    lines.append(_run_line("notebook schedule, MEASURED", notebook_run))
    if measured:
      lines.append(_accuracy_line(notebook_run["test_accuracy"]))
  if job.get("full") and ok:
    reference = notebook_run["wall_seconds"] if measured else e["total"]
    kind = "measured" if measured else "extrapolated"
    share = job["wall_seconds"] / reference
    lines.append(f"- ours/notebook wall time: {share:.2f} ({kind} notebook; target <= 0.33): "
                 + ("met" if share <= 1 / 3 else "MISSED"))
  return lines


def print_report(run, measured, job, notebook_run, whole=None, steps=None, cluster=None) -> None:
  """Prints the whole report. `run`: what was run (date, cpu_count, examples, runs, warmup,
  batch_sizes, batch_slices, intra_op_threads, extra_modes); `measured`: measure_throughput's;
  `cluster`: benchmarks/cluster.py's figures, or {"skipped": why}."""
  phases, batch_sizes = measured["phases"], run["batch_sizes"]
  slices = ", ".join(f"{run['batch_slices'][b]} at {b}" for b in batch_sizes)
  load = run.get("load_average")
  print(f"## Benchmark: notebook baseline vs ours ({run['date']}, {run['cpu_count']} CPU "
        f"cores, TensorFlow {tf.__version__}, Keras {keras.__version__}"
        + (f", load average {load[0]:.1f} at the end" if load else "") + ")")
  print(f"{run['examples']} real MNIST training images per run; median of {run['runs']} runs "
        f"after {run['warmup']} warm-up; runs of each variant alternate. Ours: batch slices "
        f"{slices}, intra-op threads {run['intra_op_threads'] or 'TF default'}.")
  print()
  print(throughput_table(phases, batch_sizes))
  print()
  print(f"- teacher logits cached once: {measured['teacher_logits_images']} images in "
        f"{measured['teacher_logits_seconds']:.2f} s")
  lines = (target_lines(phases, batch_sizes, run["extra_modes"])
           + default_batch_lines(phases, batch_sizes)
           + mode_lines(phases, batch_sizes, run["extra_modes"])
           + bf16_lines(phases, batch_sizes, run["extra_modes"], run.get("cpu_flags", {})))
  if steps:
    lines += precision.report_lines(steps, run["precision_rounds"], run["precision_steps"])
  if job is not None:
    lines += end_to_end_lines(job, notebook_run, extrapolate_notebook(phases))
  if whole is not None:
    lines += whole_process.report_lines(whole)
  if cluster is not None:
    lines += ([f"- cluster rows: not measured ({cluster['skipped']})"] if "skipped" in cluster
              else cluster_bench.report_lines(cluster))
  for line in lines:
    print(line)


def json_report(run, measured, job, notebook_run, default_students, whole=None,
                steps=None, cluster=None) -> dict:
  """Every measurement, every run of each variant included, for --json_out."""
  phases = measured["phases"]
  return {
      **run,
      "throughput": {p: {v: t.values for v, t in vs.items()} for p, vs in phases.items()},
      "median": {p: {v: t.median() for v, t in vs.items()} for p, vs in phases.items()},
      "teacher_logits_seconds": measured["teacher_logits_seconds"],
      "default_job": job, "notebook": notebook_run,
      "notebook_extrapolated": extrapolate_notebook(phases),
      "default_students": list(default_students), "whole_process": whole, "cluster": cluster,
      "precision_steps": {str(batch): {f"{role} {policy}": values
                                       for (role, policy), values in found.items()}
                          for batch, found in (steps or {}).items()}}

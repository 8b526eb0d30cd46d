"""The lines a run ends with: how each model did, which student to ship and why, and where to look
next (results.md, the exported models, TensorBoard).

Why: the log before them has a line per epoch and ends at the last student's accuracy; these
say what the run found without opening a file. They come from the merged summary that
results.json holds (trainer/evaluation/results.py), so they agree with it.
"""

from trainer.evaluation import results
from trainer.rundir import layout


def _join(model_dir: str, *parts: str) -> str:
  return "/".join([model_dir.rstrip("/"), *parts])


def lines(summary: dict, model_dir: str) -> list:
  """The summary as plain lines; `model_dir` as the user gave it (a local path or gs://)."""
  models = summary["models"]
  width = max(len(m["name"]) for m in models) if models else 0
  out = [f"mnist-distill: done: {len(models)} model(s) in {model_dir}, test accuracy with its "
         "95% interval:"]
  for m in models:
    interval = m.get("test_accuracy_interval")
    bounds = (f" [{100 * interval['lower']:.2f}, {100 * interval['upper']:.2f}]"
              if interval else "")
    given = (" (given by --teacher_model, not trained here)"
             if m.get("trained_here") is False else "")
    of = f" of {m['test_examples']:,}" if m.get("test_examples") else ""
    out.append(f"  {m['name']:<{width}}  {100 * m['test_accuracy']:.2f}%{bounds}  "
               f"{m['test_errors']} errors{of}{given}")
  choice = summary.get("selection")
  out.append(results.verdict(choice) if choice else
             "No student has finished in this model_dir yet: none is chosen.")
  out.append(f"Report: {_join(model_dir, layout.RESULTS_MD)} (and {layout.RESULTS_JSON})")
  exported = [m["name"] for m in models if m.get("trained_here", True)]
  if exported:
    litert = any((m.get("exports") or {}).get("litert_float32") for m in models)
    chosen = (choice or {}).get("chosen")
    out.append(f"Exported models ({layout.EXPORT}/ SavedModel, {layout.MODEL_FILE}"
               f"{', litert/*.tflite' if litert else ''}) in {_join(model_dir, '<model>')}/ for "
               f"{', '.join(exported)}" + (f"; the chosen student's SavedModel: "
                                           f"{_join(model_dir, chosen, layout.EXPORT)}"
                                           if chosen else ""))
  out.append(f"TensorBoard: tensorboard --logdir {_join(model_dir, layout.LOGS)}")
  return out

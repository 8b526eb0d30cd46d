"""Per-model result.json files and the merged results.json / results.md at the run's root.

A model's result.json is its completion marker: written last, atomically, after its export.
The merge reads only those markers, so partial work never shows up as a result.
"""

import os

from trainer import layout


def read_model_result(model_dir: str, name: str):
  """The finished result of model `name`, or None if it has not finished."""
  return layout.read_json(layout.local(model_dir, layout.result_rel(name)))


def finished_models(model_dir: str) -> list:
  """Results of every finished model under model_dir: the teacher first, then by name."""
  found = []
  if os.path.isdir(model_dir):
    for name in sorted(os.listdir(model_dir)):
      result = read_model_result(model_dir, name)
      if result is not None and result.get("name") == name:
        found.append(result)
  return sorted(found, key=lambda r: (r.get("role") != "teacher", r["name"]))


def best_student(models):
  """The student to ship: highest validation accuracy (ties: fewer parameters, then name).

  The test split only reports; choosing by it would make its numbers optimistic.
  """
  students = [m for m in models if m.get("role") == "student"]
  if not students:
    return None
  return min(students, key=lambda m: (-(m.get("validation_accuracy") or 0.0), m["params"],
                                      m["name"]))


def _pct(value):
  return "" if value is None else f"{100 * value:.2f}%"


def render_markdown(summary: dict) -> str:
  """results.md: one table a person can read in a bucket browser or a pull request."""
  lines = [
      "# mnist-distill results", "",
      f"Dataset `{summary['dataset']}`, strategy `{summary['strategy']}` with "
      f"{summary['replicas']} replica(s), TensorFlow {summary['tensorflow']}.", "",
      "| model | role | params | alpha | T | test accuracy | test errors | test loss | "
      "validation accuracy | train s | examples/s |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for m in summary["models"]:
    alpha = "" if m.get("alpha") is None else f"{m['alpha']:g}"
    temp = "" if m.get("temperature") is None else f"{m['temperature']:g}"
    lines.append(
        f"| {m['name']} | {m['role']} | {m['params']:,} | {alpha} | {temp} | "
        f"{_pct(m['test_accuracy'])} | {m['test_errors']} | {m['test_loss']:.4f} | "
        f"{_pct(m.get('validation_accuracy'))} | {m['train_seconds']:.1f} | "
        f"{m['train_examples_per_second']:.0f} |")
  best = best_student(summary["models"])
  if best is not None:
    lines += ["", f"Best student by validation accuracy: **{best['name']}** "
              f"({_pct(best.get('validation_accuracy'))} validation, "
              f"{_pct(best['test_accuracy'])} test accuracy, {best['params']:,} parameters)."]
  pictures = summary.get("figures") or ()
  if pictures:
    lines += ["", "## Figures", "",
              "The same pictures are in TensorBoard (`tensorboard --logdir logs`): the confusion "
              "matrices under each model's `test` run, the others under `_comparison`.", ""]
    for picture in pictures:
      lines += [f"### {picture['title']}", "", f"![{picture['title']}]({picture['path']})", ""]
    lines.pop()
  return "\n".join(lines) + "\n"


def merge(model_dir: str, run_info: dict, figures=None) -> dict:
  """Writes results.json (last, atomically) and results.md from every finished model.

  `figures(model_dir, models)` may draw pictures first; it returns [{"title", "path"}] (paths
  relative to model_dir), which results.md links to.
  """
  models = finished_models(model_dir)
  summary = dict(run_info, models=models)
  if figures is not None:
    summary["figures"] = figures(model_dir, models)
  layout.write_text(os.path.join(model_dir, layout.RESULTS_MD), render_markdown(summary))
  layout.write_json(os.path.join(model_dir, layout.RESULTS_JSON), summary)
  return summary

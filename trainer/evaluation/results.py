"""Per-model result.json files and the merged results.json / results.md at the run's root.

A model's result.json is its completion marker: written last, atomically, after its export.
The merge reads only per-model files (the markers and the files in MODEL_FILES beside them), so
partial work never shows up as a result, and `--mode=report` re-reports finished models without
retraining anything. From them it computes, for results.json and results.md:
  - each model's 95% interval on its test accuracy (Clopper-Pearson,
  trainer/evaluation/selection.py);
  - the choice of student (`selection`): made from validation outputs alone, with the paired
    tests behind it; the same tests on the test split are reported beside it, never used;
  - the deployment table: sizes, LiteRT accuracies and latencies from each model's exports.json.
"""

import logging
import os

from trainer.evaluation import comparison, evaluation, hparams_logging, selection
from trainer.rundir import layout
from trainer.serving import litert_export

# What the merge reads in <model_dir>/<model>/ besides result.json (a bucket merge pulls these).
MODEL_FILES = (comparison.PREDICTIONS_FILE, comparison.VALIDATION_PREDICTIONS_FILE,
               litert_export.EXPORTS_FILE)


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


def labels_only_student(models):
  """The student trained on the labels alone (alpha 0), the baseline distillation must beat."""
  found = sorted(m["name"] for m in models if m.get("role") == "student" and m.get("alpha") == 0)
  return found[0] if found else None


def test_accuracy_interval(result: dict):
  """The 95% interval of a model's test accuracy, from its error count and test examples."""
  examples = result.get("test_examples")
  if not examples:
    return None
  return selection.accuracy_interval(result["test_errors"], examples)


def _int8_latency(exports):
  """The tie-break's latency: the int8 flatbuffer's single-image median, the edge target."""
  entry = (exports or {}).get("litert_int8") or {}
  return (entry.get("latency") or {}).get("median_ms")


def _load_each(models, model_dir: str, load) -> dict:
  """{name: load(model_dir, name)} for the models that have that file."""
  found = {m["name"]: load(model_dir, m["name"]) for m in models}
  return {name: data for name, data in found.items() if data is not None}


def _same_examples(outputs: dict, digest_key: str, split: str) -> dict:
  """Keeps the models whose outputs are on the examples most models saw (by image digest)."""
  digests = {}
  for name, data in outputs.items():
    digests.setdefault(str(data[digest_key]), []).append(name)
  if len(digests) <= 1:
    return outputs
  keep = min(digests.values(), key=lambda names: (-len(names), min(names)))  # most, then name
  dropped = sorted(set(outputs) - set(keep))
  logging.warning("%s were evaluated on other %s examples than %s: left out of the paired "
                  "tests", ", ".join(dropped), split, ", ".join(sorted(keep)))
  return {name: outputs[name] for name in keep}


def select(model_dir: str, models: list, level: float = selection.LEVEL):
  """The `selection` block: the choice from validation files, the test split's tests beside."""
  students = [m for m in models if m.get("role") == "student"]
  if not students:
    return None
  validation = _same_examples(_load_each(students, model_dir,
                                          comparison.load_validation_predictions),
                              "validation_images_sha256", "validation")
  labels_only = labels_only_student(models)
  competitors = [dict(m, latency_ms=_int8_latency(m.get("exports"))) for m in students]
  choice = selection.choose_student(
      competitors, {name: {"correct": data["correct"], "cross_entropy": data["cross_entropy"]}
                    for name, data in validation.items()},
      labels_only_name=labels_only, level=level)
  tested = _same_examples(_load_each(students, model_dir, comparison.load_predictions),
                          "test_images_sha256", "test")
  choice["test_split"] = selection.paired_report(
      [m["name"] for m in students],
      {name: data["predictions"] == data["labels"] for name, data in tested.items()},
      chosen=choice.get("chosen"), labels_only_name=labels_only, level=level)
  return choice


def missing_files(model_dir: str, models: list) -> dict:
  """{model: [files of MODEL_FILES it lacks]}: what `--mode=report` recomputes for older runs."""
  found = {}
  for m in models:
    lacking = [f for f in MODEL_FILES if not os.path.isfile(os.path.join(model_dir, m["name"], f))]
    if lacking:
      found[m["name"]] = lacking
  return found


def finish_outputs(folder: str, net, splits, test_errors: int, log_root: str, step: int,
                   measure=litert_export.MeasureConfig(), slices: int = 1) -> dict:
  """The per-model files the merge needs beyond the test predictions, from a finished network
  (no training): validation_predictions.npz, the LiteRT exports with exports.json (the
  SavedModel must be in <folder>/export already), and logs/<model>/deployment (test_errors:
  the network's errors on splits' test images, for the interval). A finishing model calls it
  before writing its result marker; --mode=report calls it for older models that lack these
  files (missing_files). `measure` None (--nolitert) skips the exports. Returns the exports."""
  name = os.path.basename(os.path.normpath(folder))
  logits = evaluation.predict_logits(net, splits.validation_images, slices=slices)
  comparison.save_validation_predictions(folder, splits.validation_images,
                                         splits.validation_labels, logits)
  exports = None
  if measure is not None:
    exports = litert_export.export_and_measure(net, folder, splits.train_images,
                                               splits.test_images, splits.test_labels, measure)
  interval = selection.accuracy_interval(test_errors, len(splits.test_labels))
  hparams_logging.write_deployment(log_root, name, step, interval, exports)
  return exports


# ---- results.md ----
def _pct(value):
  return "" if value is None else f"{100 * value:.2f}%"


def _interval(interval):
  return "" if not interval else f"[{100 * interval['lower']:.2f}, {100 * interval['upper']:.2f}]"


def _size(entry):
  if not entry:
    return ""
  if "error" in entry:
    return "failed"
  size = entry["bytes"]
  return f"{size / 1e6:.2f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def _ms(entry, key="latency"):
  stats = (entry or {}).get(key) or {}
  if "median_ms" not in stats:
    return ""
  return f"{stats['median_ms']:.3f} / {stats['p99_ms']:.3f}"


def _p_value(value):
  return "" if value is None else (f"{value:.2g}" if value < 0.001 else f"{value:.3f}")


def verdict(choice: dict, emphasis: str = "") -> str:
  """The choice of student and its reason in one sentence (results.md, the run's last lines);
  `emphasis` goes around the chosen name (Markdown's '**')."""
  chosen = choice.get("chosen")
  if chosen is None:
    return f"No student chosen: {choice['why']}"
  name = f"{emphasis}{chosen}{emphasis}"
  if choice["tie_break"] is None:
    return (f"Chosen student: {name}: the lowest validation cross-entropy, and significantly "
            f"more accurate on validation than every other student.")
  if not choice["significant"]:
    return (f"Chosen student: {name}, by the tie-break ({choice['tie_break']}): no difference "
            f"between the students is significant on validation (level {choice['level']:g}), so "
            f"none is crowned the best.")
  return (f"Chosen student: {name}, by the tie-break ({choice['tie_break']}) among the students "
          f"the leader does not significantly beat: {', '.join(choice['candidates'])}.")


def _selection_lines(summary: dict) -> list:
  choice = summary.get("selection")
  if not choice:
    return []
  lines = ["", "## Which student to ship", ""]
  chosen = choice.get("chosen")
  if chosen is None:
    return lines + [choice["why"]]
  lines += [verdict(choice, emphasis="**"), "", choice["why"], "",
            f"Criterion: {choice['criterion_description']}; test: {choice['test']}, on the "
            f"{choice['validation_examples']:,} validation examples.", ""]
  by_name = {m["name"]: m for m in summary["models"]}
  test_split = choice.get("test_split") or {}
  test_p = test_split.get("p_values") or {}
  lines += ["| student | validation cross-entropy | validation accuracy | validation errors | "
            "p vs chosen (validation) | test accuracy (95% CI) | p vs chosen (test) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
  for row in choice["ranking"]:
    model = by_name.get(row["name"], {})
    name = f"**{row['name']}**" if row["name"] == chosen else row["name"]
    lines.append(
        f"| {name} | {row['validation_cross_entropy']:.4f} | {_pct(row['validation_accuracy'])}"
        f" | {row['validation_errors']} | {_p_value(choice['p_values'].get(row['name']))} | "
        f"{_pct(model.get('test_accuracy'))} {_interval(model.get('test_accuracy_interval'))} | "
        f"{_p_value(test_p.get(row['name']))} |")
  if test_split.get("pairs"):
    significant = [f"{p['a']} vs {p['b']} (p = {_p_value(p['p_value'])})"
                   for p in test_split["pairs"] if p["significant"]]
    lines += ["", f"The same test on the {test_split['examples']:,} test examples is reported "
              f"only and was never used for the choice: "
              + ("; ".join(significant) + " significant at that level."
                 if significant else f"no difference is significant at {choice['level']:g}.")]
  if choice.get("missing"):
    lines += ["", f"Left out (no validation outputs): {', '.join(choice['missing'])}."]
  return lines


def _given_teacher_lines(summary: dict) -> list:
  """A teacher given by --teacher_model: where it came from and which file it was, beside its
  test accuracy, so its row can be compared with the students' (the table has no room)."""
  lines = []
  for m in summary["models"]:
    if m.get("trained_here") is False:
      lines += ["", f"{m['name']} was not trained here: `{m.get('source')}` "
                f"({m.get('format')}, sha256 `{m.get('sha256')}`), test accuracy "
                f"{_pct(m['test_accuracy'])} {_interval(m.get('test_accuracy_interval'))} "
                "(95% CI)."]
  return lines


def _deployment_lines(summary: dict) -> list:
  models = summary["models"]
  if not any(m.get("exports") for m in models):
    return []
  chosen = (summary.get("selection") or {}).get("chosen")
  lines = ["", "## Deployment", "",
           "Sizes on disk (kB: 1,000 bytes; exact bytes in results.json); LiteRT accuracies "
           "measured by running each flatbuffer in the interpreter on the test split; latencies "
           "in ms as median / p99, LiteRT on one thread for one image, the SavedModel's "
           "`serving_default` per call at batch 1 and per image at batch 256.", "",
           "| model | params | test accuracy (95% CI) | test errors | SavedModel | "
           "LiteRT float32 | LiteRT int8 | int8 test accuracy (errors) | float32 ms | int8 ms | "
           "SavedModel ms, batch 1 | SavedModel ms/image, batch 256 |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for m in models:
    exports = m.get("exports") or {}
    float32, int8 = exports.get("litert_float32"), exports.get("litert_int8")
    saved = exports.get("saved_model") or {}
    served = saved.get("latency") or {}
    int8_accuracy = ("" if not int8 or "error" in int8
                     else f"{_pct(int8['test_accuracy'])} ({int8['test_errors']})")
    per_image = (served.get(f"batch_{(exports.get('measure') or {}).get('batch_size', 256)}")
                 or {}).get("per_image_median_ms")
    name = f"**{m['name']}** (chosen)" if m["name"] == chosen else m["name"]
    lines.append(
        f"| {name} | {m['params']:,} | {_pct(m['test_accuracy'])} "
        f"{_interval(m.get('test_accuracy_interval'))} | {m['test_errors']} | {_size(saved)} | "
        f"{_size(float32)} | {_size(int8)} | {int8_accuracy} | {_ms(float32)} | {_ms(int8)} | "
        f"{_ms(served, 'batch_1')} | {'' if per_image is None else f'{per_image:.4f}'} |")
  failed = [f"{m['name']} {kind}: {entry['error']}" for m in models
            for kind, entry in (m.get("exports") or {}).items()
            if isinstance(entry, dict) and "error" in entry]
  if failed:
    lines += ["", "Exports that failed (the job went on): " + "; ".join(failed) + "."]
  return lines


def render_markdown(summary: dict) -> str:
  """results.md: the tables a person can read in a bucket browser or a pull request."""
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
    if m.get("mixup"):  # trainer/data/mixup.py: told beside T rather than in a column of its own
      temp += f" (mixup {m['mixup']:g})"
    lines.append(
        f"| {m['name']} | {m['role']} | {m['params']:,} | {alpha} | {temp} | "
        f"{_pct(m['test_accuracy'])} | {m['test_errors']} | {m['test_loss']:.4f} | "
        f"{_pct(m.get('validation_accuracy'))} | {m['train_seconds']:.1f} | "
        f"{m['train_examples_per_second']:.0f} |")
  lines += _given_teacher_lines(summary)
  lines += _selection_lines(summary)
  lines += _deployment_lines(summary)
  pictures = summary.get("figures") or ()
  if pictures:
    lines += ["", "## Figures", "",
              "The same pictures are in TensorBoard (`tensorboard --logdir logs`): the confusion "
              "matrices under each model's `test` run, the others under `_comparison`.", ""]
    for picture in pictures:
      lines += [f"### {picture['title']}", "", f"![{picture['title']}]({picture['path']})", ""]
    lines.pop()
  return "\n".join(lines) + "\n"


def merge(model_dir: str, run_info: dict, figures=None, level: float = selection.LEVEL) -> dict:
  """Writes results.json (last, atomically) and results.md from every finished model.

  Reads per-model files only (result.json and MODEL_FILES). `figures(model_dir, models,
  chosen)` may draw pictures first; it returns [{"title", "path"}] (paths relative to
  model_dir), which results.md links to.
  """
  models = finished_models(model_dir)
  for m in models:
    m["test_accuracy_interval"] = test_accuracy_interval(m)
    m["exports"] = litert_export.read_exports(model_dir, m["name"])
  choice = select(model_dir, models, level)
  summary = dict(run_info, models=models, selection=choice)
  if figures is not None:
    summary["figures"] = figures(model_dir, models, (choice or {}).get("chosen"))
  layout.write_text(os.path.join(model_dir, layout.RESULTS_MD), render_markdown(summary))
  layout.write_json(os.path.join(model_dir, layout.RESULTS_JSON), summary)
  return summary

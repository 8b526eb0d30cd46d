"""Which student to ship, chosen on validation data, with how sure the choice is.

Accuracy alone is a noisy criterion: on a 5,000-example validation split students a few
examples apart are indistinguishable, and ranking them by it crowns noise. So the students are
ranked by their mean validation cross-entropy with the true labels (every example contributes a
graded amount, not one bit), and the leader's accuracy is then tested against each other
student's with McNemar's exact test on the same examples. A student the leader does not beat
significantly stays in the running, and the choice among those left is made by a stated
tie-break (fewest parameters, then fastest) instead of by the noise; only when neither
separates them does the lower cross-entropy decide, as the best estimate there is (the name,
arbitrary, would waste it).

The test split never enters the choice: `choose_student` takes validation outputs only, and
`paired_report` runs the same tests on the test split for the report alone.

Statistics are computed exactly here (numpy and Python integers): scipy is not a dependency.
"""

import itertools
import math

import numpy as np

LEVEL = 0.05  # two-sided significance level of each paired test
CONFIDENCE = 0.95  # of the accuracy intervals
LATENCY_MARGIN = 0.2  # latencies within 20% of the fastest count as equally fast
CRITERION = "validation_cross_entropy"
CRITERION_DESCRIPTION = ("mean cross-entropy with the true labels on the validation split "
                         "(lower is better)")
TEST = "McNemar's exact two-sided test on paired per-example correctness"
TIE_BREAKS = ("fewest parameters", "fastest", "lowest validation cross-entropy")


# ---- binomial arithmetic ----
def _log_binomial_pmf(n: int, p: float) -> np.ndarray:
  """log P(X = i) for i = 0..n, X ~ Binomial(n, p), with 0 < p < 1."""
  i = np.arange(1, n + 1, dtype=np.float64)
  log_choose = np.concatenate([[0.0], np.cumsum(np.log(n - i + 1) - np.log(i))])
  k = np.arange(n + 1, dtype=np.float64)
  return log_choose + k * math.log(p) + (n - k) * math.log1p(-p)


def binomial_cdf(k: int, n: int, p: float) -> float:
  """P(X <= k) for X ~ Binomial(n, p)."""
  if k < 0:
    return 0.0
  if k >= n:
    return 1.0
  if p <= 0.0:
    return 1.0
  if p >= 1.0:
    return 0.0
  return float(min(1.0, np.exp(_log_binomial_pmf(n, p)[:k + 1]).sum()))


def _bisect(f, target: float, iterations: int = 80) -> float:
  """The p in [0, 1] where the increasing function f crosses target."""
  low, high = 0.0, 1.0
  for _ in range(iterations):
    mid = (low + high) / 2
    if f(mid) < target:
      low = mid
    else:
      high = mid
  return (low + high) / 2


def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple:
  """Clopper-Pearson interval (lower, upper) of a binomial proportion.

  Chosen over Wilson's score interval because it is guaranteed: its coverage is at least the
  stated confidence for every true proportion, while Wilson's dips below it near 0 and 1,
  which is where test accuracies of 99% and small smoke-run test sets sit. The cost, a slightly
  wider interval, is the honest side to err on for a number people ship by.
  """
  if trials <= 0:
    raise ValueError("an interval needs at least one trial")
  if not 0 <= successes <= trials:
    raise ValueError(f"{successes} successes out of {trials} trials")
  tail = (1.0 - confidence) / 2
  # lower: P(X >= successes | p) = tail, which increases with p
  lower = 0.0 if successes == 0 else _bisect(
      lambda p: 1.0 - binomial_cdf(successes - 1, trials, p), tail)
  # upper: P(X <= successes | p) = tail, which decreases with p
  upper = 1.0 if successes == trials else _bisect(
      lambda p: -binomial_cdf(successes, trials, p), -tail)
  return lower, upper


def accuracy_interval(errors: int, examples: int, confidence: float = CONFIDENCE) -> dict:
  """The Clopper-Pearson interval of an accuracy measured as `errors` out of `examples`."""
  lower, upper = clopper_pearson(int(examples) - int(errors), int(examples), confidence)
  return {"lower": lower, "upper": upper, "confidence": confidence, "method": "Clopper-Pearson"}


def mcnemar_exact(a_correct, b_correct) -> dict:
  """McNemar's exact test of two classifiers scored on the same examples.

  Only disagreements carry information: under "equally accurate", each of the n examples that
  exactly one of them gets right is A's with probability 1/2. The two-sided p-value is twice
  the smaller binomial tail (capped at 1), computed exactly with integers.
  """
  a = np.asarray(a_correct, dtype=bool)
  b = np.asarray(b_correct, dtype=bool)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired outcomes need equal 1-D shapes, got {a.shape} and {b.shape}")
  a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
  n = a_only + b_only
  if n == 0:
    p_value = 1.0
  else:
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    p_value = min(1.0, 2 * tail / 2**n)
  return {"a_only_correct": a_only, "b_only_correct": b_only, "p_value": p_value}


# ---- the choice ----
def _pairs(names, correct: dict, level: float) -> list:
  found = []
  for a, b in itertools.combinations(names, 2):
    test = mcnemar_exact(correct[a], correct[b])
    found.append(dict(a=a, b=b, **test, significant=test["p_value"] < level))
  return found


def _test_between(pairs: list, x: str, y: str) -> dict:
  """The test of x against y from `pairs`, oriented so that x is the first classifier."""
  for pair in pairs:
    if (pair["a"], pair["b"]) == (x, y):
      return pair
    if (pair["a"], pair["b"]) == (y, x):
      return dict(pair, a=x, b=y, a_only_correct=pair["b_only_correct"],
                  b_only_correct=pair["a_only_correct"])
  raise KeyError((x, y))


def _beats(pairs: list, x: str, y: str) -> bool:
  """Whether x is significantly more accurate than y in `pairs`."""
  test = _test_between(pairs, x, y)
  return test["significant"] and test["a_only_correct"] > test["b_only_correct"]


def _p(value: float) -> str:
  return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def _tie_break(candidates: list, pairs: list, latency_margin: float):
  """Applies fewest parameters, then fastest, then the lowest validation cross-entropy among
  those no other one left beats significantly in accuracy (the criteria can disagree); the
  candidates come ranked by cross-entropy, equal values by name. Returns (chosen, rule, note).
  """
  fewest = min(m["params"] for m in candidates)
  left = [m for m in candidates if m["params"] == fewest]
  if len(left) == 1:
    return left[0], TIE_BREAKS[0], f"{left[0]['name']} has the fewest parameters ({fewest:,})"
  notes = [f"{len(left)} have {fewest:,} parameters"]
  latencies = [m.get("latency_ms") for m in left]
  if all(v is not None and v > 0 for v in latencies):
    fastest = min(latencies)
    quick = [m for m in left if m["latency_ms"] <= fastest * (1 + latency_margin)]
    if len(quick) == 1:
      return quick[0], TIE_BREAKS[1], (f"{notes[0]}; {quick[0]['name']} is the fastest "
                                      f"({fastest:.3g} ms per image, the others over "
                                      f"{100 * latency_margin:.0f}% slower)")
    notes.append(f"{len(quick)} run within {100 * latency_margin:.0f}% of the fastest "
                 f"latency")
    left = quick
  else:
    notes.append("latency not known for all of them, so not compared")
  outdone = {}  # name -> a candidate left that is significantly more accurate
  for m in left:
    by = next((o["name"] for o in left if o is not m and _beats(pairs, o["name"], m["name"])),
              None)
    if by:
      outdone[m["name"]] = by
  unbeaten = [m for m in left if m["name"] not in outdone] or left
  if len(unbeaten) < len(left):
    notes.append(", ".join(f"{name} is significantly less accurate than {by}"
                           for name, by in outdone.items()))
  chosen = unbeaten[0]
  among = "the rest" if len(unbeaten) < len(left) else "them"
  return chosen, TIE_BREAKS[2], "; ".join(notes) + (
      f"; by the lowest validation cross-entropy among {among}, {chosen['name']} "
      f"({chosen['validation_cross_entropy']:.4f}: the best estimate, not a proven best)")


def choose_student(models, validation: dict, labels_only_name=None, level: float = LEVEL,
                   latency_margin: float = LATENCY_MARGIN):
  """The student to ship and why, from validation outputs alone.

  models: result dicts (name, role, params, optionally latency_ms for the tie-break); only
  role "student" competes. validation: {name: {"correct": bool [N], "cross_entropy": float
  [N]}} on the same N validation examples for every student. labels_only_name: the student
  trained without the teacher, if any, reported against the chosen one.

  Rule: the leader has the lowest mean validation cross-entropy. Every student whose validation
  accuracy the leader does not beat significantly (McNemar, two-sided, at `level`, unadjusted
  for the number of comparisons) stays a candidate; if the leader is alone it is chosen, else
  the tie-break picks among the candidates. Returns None when there is no student.
  """
  students = [m for m in models if m.get("role") == "student"]
  if not students:
    return None
  base = {"criterion": CRITERION, "criterion_description": CRITERION_DESCRIPTION, "test": TEST,
          "level": level, "tie_break_order": list(TIE_BREAKS),
          "latency_margin": latency_margin, "labels_only": labels_only_name}
  missing = sorted(m["name"] for m in students if m["name"] not in validation)
  ranked = [m for m in students if m["name"] in validation]
  if not ranked:
    return dict(base, chosen=None, missing=missing,
                why="no student has per-example validation outputs, so none is chosen")
  lengths = {len(np.asarray(validation[m["name"]]["correct"])) for m in ranked}
  if len(lengths) != 1 or 0 in lengths:
    raise ValueError(f"students were validated on different numbers of examples: {lengths}")
  rows = []
  for m in ranked:
    outputs = validation[m["name"]]
    correct = np.asarray(outputs["correct"], dtype=bool)
    rows.append({"name": m["name"], "params": int(m["params"]),
                 "latency_ms": m.get("latency_ms"),
                 "validation_cross_entropy": float(np.mean(outputs["cross_entropy"])),
                 "validation_accuracy": float(correct.mean()),
                 "validation_errors": int((~correct).sum())})
  rows.sort(key=lambda r: (r["validation_cross_entropy"], r["name"]))
  names = [r["name"] for r in rows]
  correct = {name: np.asarray(validation[name]["correct"], dtype=bool) for name in names}
  pairs = _pairs(names, correct, level)
  leader = rows[0]
  versus_leader = {r["name"]: _test_between(pairs, leader["name"], r["name"]) for r in rows[1:]}
  beaten = {name for name in versus_leader if _beats(pairs, leader["name"], name)}
  better = sorted(name for name in versus_leader if _beats(pairs, name, leader["name"]))
  candidates = [r for r in rows if r["name"] not in beaten]
  if len(candidates) == 1:
    chosen, rule, note = leader, None, None
  else:
    chosen, rule, note = _tie_break(candidates, pairs, latency_margin)
  versus_chosen = {r["name"]: _test_between(pairs, chosen["name"], r["name"])["p_value"]
                   for r in rows if r["name"] != chosen["name"]}
  labels_only_p = versus_chosen.get(labels_only_name) if labels_only_name else None
  why = _why(leader, chosen, versus_leader, beaten, better, candidates, note, level)
  return dict(base, validation_examples=lengths.pop(), ranking=rows, leader=leader["name"],
              chosen=chosen["name"], candidates=[r["name"] for r in candidates],
              significant=any(t["significant"] for t in versus_leader.values()),
              p_values=versus_chosen, p_value_vs_labels_only=labels_only_p, pairs=pairs,
              tie_break=rule, missing=missing, why=why)


def _why(leader, chosen, versus_leader, beaten, better, candidates, note, level) -> str:
  ce = f"{leader['validation_cross_entropy']:.4f}"
  if not versus_leader:
    return f"{leader['name']} is the only student with validation outputs."
  tests = ", ".join(f"p = {_p(t['p_value'])} vs {name}" for name, t in versus_leader.items())
  head = (f"{leader['name']} has the lowest validation cross-entropy ({ce}); McNemar's exact "
          f"test of its validation accuracy against the others gives {tests} (level {level:g}).")
  if len(candidates) == 1:
    return head + (f" It is significantly more accurate than every other student, so "
                   f"{leader['name']} is chosen.")
  if not beaten:
    text = head + (" No difference is significant: the validation data cannot tell these "
                   "students apart, so the lower cross-entropy is not taken as a win by itself.")
  else:
    text = head + (f" It is significantly more accurate than {', '.join(sorted(beaten))} only; "
                   f"{', '.join(c['name'] for c in candidates)} cannot be told apart.")
  if better:
    text += (f" ({', '.join(better)} is significantly more accurate than {leader['name']} "
             "despite its higher cross-entropy: the criteria disagree.)")
  return text + (" Tie-break (fewest parameters, then fastest, then the lowest validation "
                 f"cross-entropy): {note}.")


def paired_report(names, correct: dict, chosen=None, labels_only_name=None,
                  level: float = LEVEL) -> dict:
  """The same paired tests on another split (the test split): reported, never used to choose.

  correct: {name: bool [N]}; names missing from it are skipped.
  """
  names = [n for n in names if n in correct]
  pairs = _pairs(names, {n: np.asarray(correct[n], dtype=bool) for n in names}, level)
  report = {"test": TEST, "level": level, "pairs": pairs,
            "examples": int(len(correct[names[0]])) if names else 0,
            "significant": any(p["significant"] for p in pairs),
            "used_for_choice": False}
  if chosen in names:
    report["p_values"] = {n: _test_between(pairs, chosen, n)["p_value"]
                          for n in names if n != chosen}
    report["p_value_vs_labels_only"] = report["p_values"].get(labels_only_name)
  return report

"""The choice of student and its statistics, against values worked out by hand."""

import math

import numpy as np
import pytest

from trainer.evaluation import selection

N = 200  # validation examples in the made-up runs below


def _outcomes(wrong=(), ce=0.1):
  """Per-example outputs: every example right except `wrong`, each with cross-entropy `ce`."""
  correct = np.ones(N, bool)
  correct[list(wrong)] = False
  return {"correct": correct, "cross_entropy": np.full(N, ce, np.float32)}


def _student(name, params=28_226, latency_ms=None, role="student"):
  return {"name": name, "role": role, "params": params, "latency_ms": latency_ms}


# ---- the exact binomial and McNemar ----
def test_binomial_cdf_by_hand():
  assert selection.binomial_cdf(2, 4, 0.5) == pytest.approx((1 + 4 + 6) / 16, abs=1e-15)
  assert selection.binomial_cdf(0, 3, 0.2) == pytest.approx(0.8**3, abs=1e-15)
  assert selection.binomial_cdf(-1, 3, 0.2) == 0.0 and selection.binomial_cdf(3, 3, 0.2) == 1.0


def test_mcnemar_by_hand():
  def p(a_only, b_only, both=5):
    a = [True] * a_only + [False] * b_only + [True] * both
    b = [False] * a_only + [True] * b_only + [True] * both
    result = selection.mcnemar_exact(a, b)
    assert (result["a_only_correct"], result["b_only_correct"]) == (a_only, b_only)
    return result["p_value"]

  assert p(0, 5) == 2 / 32  # all five disagreements one way: 2 * (1/2)^5
  assert p(5, 0) == 2 / 32  # two-sided: the same the other way
  assert p(1, 9) == 2 * (1 + 10) / 1024  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
  assert p(2, 0) == 0.5
  assert p(3, 3) == 1.0  # a tie: 2 * 42/64 capped at 1
  assert p(0, 0) == 1.0  # no disagreements: nothing tells them apart
  assert p(0, 0, both=0) == 1.0  # no examples at all
  with pytest.raises(ValueError):
    selection.mcnemar_exact([True, False], [True])


def test_clopper_pearson_by_hand():
  tail = 0.025
  lower, upper = selection.clopper_pearson(10, 10)
  assert lower == pytest.approx(tail ** (1 / 10), abs=1e-12) and upper == 1.0
  lower, upper = selection.clopper_pearson(0, 10)
  assert lower == 0.0 and upper == pytest.approx(1 - tail ** (1 / 10), abs=1e-12)
  # one success in two: 1 - (1 - L)^2 = 0.025 and 1 - U^2 = 0.025
  lower, upper = selection.clopper_pearson(1, 2)
  assert lower == pytest.approx(1 - math.sqrt(1 - tail), abs=1e-12)
  assert upper == pytest.approx(math.sqrt(1 - tail), abs=1e-12)
  # the textbook case, 5 of 10: (0.187086, 0.812914)
  lower, upper = selection.clopper_pearson(5, 10)
  assert (lower, upper) == pytest.approx((0.187086, 0.812914), abs=1e-6)
  with pytest.raises(ValueError):
    selection.clopper_pearson(3, 2)


def test_accuracy_interval_holds_the_accuracy_and_shrinks_with_examples():
  small = selection.accuracy_interval(errors=1, examples=100)
  large = selection.accuracy_interval(errors=100, examples=10_000)
  for interval, accuracy in ((small, 0.99), (large, 0.99)):
    assert interval["lower"] < accuracy < interval["upper"] <= 1.0
    assert interval["method"] == "Clopper-Pearson" and interval["confidence"] == 0.95
  assert large["upper"] - large["lower"] < small["upper"] - small["lower"]
  # the lower end at 99 errors in 10,000 solves P(X >= 9,900 | p) = 0.025 exactly
  assert 1 - selection.binomial_cdf(9_899, 10_000, large["lower"]) == pytest.approx(0.025,
                                                                                    rel=1e-9)


# ---- the choice ----
def test_no_significant_difference_falls_to_the_lowest_cross_entropy_not_the_name():
  validation = {"zeta": _outcomes(wrong=[0, 1], ce=0.05),  # lowest cross-entropy, last name
                "beta": _outcomes(wrong=[0, 1, 2], ce=0.08),
                "alpha": _outcomes(wrong=[0, 1, 3, 4], ce=0.09)}
  models = [_student("zeta"), _student("beta"), _student("alpha"),
            _student("teacher", role="teacher", params=1_144_074)]
  chosen = selection.choose_student(models, validation, labels_only_name="alpha")
  assert chosen["leader"] == "zeta" and chosen["chosen"] == "zeta"
  assert chosen["significant"] is False
  assert chosen["tie_break"] == "lowest validation cross-entropy"
  assert chosen["candidates"] == ["zeta", "beta", "alpha"]  # ranked by cross-entropy
  # zeta vs beta: 1 disagreement, p = 1; zeta vs alpha: 2 vs 0, p = 0.5
  assert chosen["p_values"] == {"beta": 1.0, "alpha": 0.5}  # the chosen zeta vs the others
  assert chosen["p_value_vs_labels_only"] == 0.5
  assert "No difference is significant" in chosen["why"]
  assert ("by the lowest validation cross-entropy among them, zeta (0.0500: the best "
          "estimate, not a proven best)") in chosen["why"]
  assert [r["name"] for r in chosen["ranking"]] == ["zeta", "beta", "alpha"]
  assert chosen["ranking"][0]["validation_cross_entropy"] == pytest.approx(0.05)
  assert chosen["validation_examples"] == N


def test_a_significant_leader_is_chosen_whatever_its_name():
  validation = {"zz": _outcomes(wrong=[], ce=0.02),
                "aa": _outcomes(wrong=range(10), ce=0.2),  # 10 vs 0: p = 2/1024
                "bb": _outcomes(wrong=range(20, 32), ce=0.3)}
  chosen = selection.choose_student([_student("zz"), _student("aa"), _student("bb")],
                                    validation, labels_only_name="aa")
  assert chosen["chosen"] == "zz" and chosen["tie_break"] is None
  assert chosen["significant"] is True and chosen["candidates"] == ["zz"]
  assert chosen["p_value_vs_labels_only"] == 2 / 1024
  assert chosen["p_values"]["bb"] == 2 / 4096
  assert "significantly more accurate than every other student" in chosen["why"]


def test_all_equal_students():
  validation = {name: _outcomes(wrong=[7], ce=0.1) for name in ("c", "a", "b")}
  chosen = selection.choose_student([_student(n) for n in ("c", "a", "b")], validation)
  assert chosen["leader"] == "a" and chosen["chosen"] == "a"  # equal criterion: by name
  assert chosen["p_values"] == {"b": 1.0, "c": 1.0}  # zero disagreements
  assert all(pair["a_only_correct"] == pair["b_only_correct"] == 0 for pair in chosen["pairs"])
  assert chosen["tie_break"] == "lowest validation cross-entropy" and not chosen["significant"]


def test_tie_break_fewest_parameters_then_fastest():
  validation = {n: _outcomes(wrong=[i], ce=0.1 + i / 100) for i, n in enumerate("abc")}
  smaller = selection.choose_student(
      [_student("a"), _student("b"), _student("c", params=1_000)], validation)
  assert smaller["chosen"] == "c" and smaller["tie_break"] == "fewest parameters"
  faster = selection.choose_student(
      [_student("a", latency_ms=1.0), _student("b", latency_ms=0.5), _student("c", latency_ms=2.0)],
      validation)
  assert faster["chosen"] == "b" and faster["tie_break"] == "fastest"
  # within the 20% margin latencies are timing noise: the lower cross-entropy decides
  close = selection.choose_student(
      [_student("a", latency_ms=0.55), _student("b", latency_ms=0.5),
       _student("c", latency_ms=2.0)], validation)
  assert close["chosen"] == "a" and close["tie_break"] == "lowest validation cross-entropy"
  assert "2 run within 20% of the fastest" in close["why"]


def test_only_students_the_leader_does_not_beat_stay_candidates():
  validation = {"lead": _outcomes(wrong=[], ce=0.01),
                "near": _outcomes(wrong=[1], ce=0.02),  # 1 disagreement: p = 1
                "far": _outcomes(wrong=range(40, 52), ce=0.05)}  # 12 vs 0
  chosen = selection.choose_student(
      [_student("lead", params=500), _student("near", params=400), _student("far", params=1)],
      validation)
  assert chosen["candidates"] == ["lead", "near"]
  assert chosen["chosen"] == "near" and chosen["tie_break"] == "fewest parameters"
  assert "significantly more accurate than far only" in chosen["why"]


def test_a_student_more_accurate_than_the_leader_is_not_dropped():
  validation = {"lowce": _outcomes(wrong=range(12), ce=0.01),
                "accurate": _outcomes(wrong=[], ce=0.02)}
  chosen = selection.choose_student([_student("lowce"), _student("accurate")], validation)
  assert chosen["leader"] == "lowce" and chosen["candidates"] == ["lowce", "accurate"]
  # 12 vs 0 disagreements (p = 2/4096): the leader by cross-entropy is outdone in accuracy
  assert chosen["chosen"] == "accurate"
  assert chosen["tie_break"] == "lowest validation cross-entropy"
  assert "criteria disagree" in chosen["why"]
  assert "lowce is significantly less accurate than accurate" in chosen["why"]
  # reversed names: the rule does not lean on them
  renamed = {"a_lowce": validation["lowce"], "z_accurate": validation["accurate"]}
  again = selection.choose_student([_student("a_lowce"), _student("z_accurate")], renamed)
  assert again["chosen"] == "z_accurate"


def test_without_students_or_outputs():
  assert selection.choose_student([_student("t", role="teacher")], {}) is None
  missing = selection.choose_student([_student("a")], {})
  assert missing["chosen"] is None and missing["missing"] == ["a"]
  with pytest.raises(ValueError, match="different numbers"):
    selection.choose_student([_student("a"), _student("b")],
                             {"a": _outcomes(), "b": {"correct": np.ones(3, bool),
                                                     "cross_entropy": np.zeros(3)}})


def test_paired_report_on_another_split():
  correct = {"a": np.r_[np.ones(10, bool), np.zeros(2, bool)], "b": np.ones(12, bool)}
  report = selection.paired_report(["a", "b", "gone"], correct, chosen="a",
                                   labels_only_name="b")
  assert report["used_for_choice"] is False and report["examples"] == 12
  assert report["p_values"] == {"b": 0.5} and report["p_value_vs_labels_only"] == 0.5
  assert report["significant"] is False and len(report["pairs"]) == 1

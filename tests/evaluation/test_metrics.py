"""Metrics on hand-made cases with known answers, checked against scikit-learn where it applies."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pneumoscope.errors import ConfigError
from pneumoscope.evaluation import calibration as C
from pneumoscope.evaluation import metrics as M

# 10 cases at threshold 0.5: tp=3 (0.9, 0.8, 0.7), fn=1 (0.3), fp=1 (0.6), tn=5
Y10 = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P10 = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.4, 0.2, 0.1, 0.05, 0.35])


def _noisy(n: int, seed: int = 0, shift: float = 1.5):
    """Scores of a decent classifier: labels 50/50, p = sigmoid(normal + shift * y)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + shift * (y - 0.5))))
    return y, p


def test_binary_metrics_hand_case():
    m = M.binary_metrics(Y10, P10, 0.5)
    assert m["confusion"] == {"tp": 3, "fp": 1, "tn": 5, "fn": 1}
    assert (m["n"], m["n_pos"], m["n_neg"]) == (10, 4, 6)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(21 / 24)  # 21 of 24 positive/negative pairs ranked right
    assert m["auc"] == pytest.approx(roc_auc_score(Y10, P10))
    assert m["threshold"] == 0.5
    assert set(m) == {"n", "n_pos", "n_neg", "accuracy", "sensitivity", "specificity", "precision", "f1", "auc",
                      "threshold", "confusion"}
    json.dumps(m)  # JSON-serialisable, no numpy scalars


def test_binary_metrics_threshold_is_inclusive():
    m = M.binary_metrics(Y10, P10, 0.7)  # 0.7 is called positive
    assert m["confusion"] == {"tp": 3, "fp": 0, "tn": 6, "fn": 1}


def test_binary_metrics_single_class():
    m = M.binary_metrics([0, 0, 0], [0.1, 0.7, 0.2], 0.5)
    assert m["auc"] is None
    assert m["sensitivity"] is None
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["confusion"] == {"tp": 0, "fp": 1, "tn": 2, "fn": 0}
    json.dumps(m)


def test_binary_inputs_are_checked():
    with pytest.raises(ConfigError, match="logits"):
        M.binary_metrics([0, 1], [-2.0, 3.0])
    with pytest.raises(ConfigError, match="length"):
        M.binary_metrics([0, 1, 1], [0.2, 0.3])
    with pytest.raises(ConfigError, match="0 or 1"):
        M.binary_metrics([0, 2], [0.2, 0.3])


def test_choose_threshold_youden_separable():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    t, info = M.choose_threshold(y, p, "youden")
    assert 0.4 < t <= 0.6
    assert np.isfinite(t)
    assert info == {"method": "youden", "threshold": t, "sensitivity": 1.0, "specificity": 1.0}


def test_choose_threshold_sensitivity_target():
    y, p = _noisy(500, seed=1)
    t, info = M.choose_threshold(y, p, "sensitivity:0.95")
    m = M.binary_metrics(y, p, t)
    assert m["sensitivity"] >= 0.95
    assert info["sensitivity"] == pytest.approx(m["sensitivity"])
    assert info["specificity"] == pytest.approx(m["specificity"])
    assert 0 < t < 1
    # the highest such threshold: the next observed score above it misses the target
    above = np.unique(p[p > t])[0]
    assert M.binary_metrics(y, p, above)["sensitivity"] < 0.95


def test_choose_threshold_sensitivity_one():
    t, info = M.choose_threshold(Y10, P10, "sensitivity:1")
    assert t == pytest.approx(0.3)  # the lowest-scored positive
    assert info["sensitivity"] == 1.0 and info["specificity"] == pytest.approx(3 / 6)


def test_choose_threshold_specificity_target():
    y, p = _noisy(500, seed=2)
    t, info = M.choose_threshold(y, p, "specificity:0.9")
    m = M.binary_metrics(y, p, t)
    assert m["specificity"] >= 0.9
    assert info["sensitivity"] == pytest.approx(m["sensitivity"])
    assert info["specificity"] == pytest.approx(m["specificity"])
    # the lowest such threshold (the most sensitive one): the next observed score below it misses the target
    below = np.unique(p[p < t])[-1]
    assert M.binary_metrics(y, p, below)["specificity"] < 0.9


def test_choose_threshold_specificity_one():
    t, info = M.choose_threshold(Y10, P10, "specificity:1")
    assert info["specificity"] == 1.0
    assert t == pytest.approx(0.7)  # the lowest-scored positive above every negative (0.6)
    assert info["sensitivity"] == pytest.approx(3 / 4)
    with pytest.raises(ConfigError, match="lower specificity target"):  # the highest-scored film is a negative one
        M.choose_threshold([0, 1, 0], [0.1, 0.5, 0.9], "specificity:1")


@pytest.mark.parametrize("method", ["foo", "sensitivity", "sensitivity:abc", "sensitivity:1.5", "sensitivity:0", "Youden",
                                    "specificity:0", "specificity:2", "specifity:0.9"])
def test_choose_threshold_bad_method(method):
    with pytest.raises(ConfigError, match="youden"):
        M.choose_threshold(Y10, P10, method)


def test_choose_threshold_one_class():
    with pytest.raises(ConfigError, match="both classes"):
        M.choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])


def test_operating_points():
    y, p = _noisy(400, seed=2)
    ops = M.operating_points(y, p, targets=(0.9, 0.95, 0.99))
    assert [o["target"] for o in ops] == [0.9, 0.95, 0.99]
    for o in ops:
        assert o["sensitivity"] >= o["target"]
        assert o["specificity"] == pytest.approx(M.binary_metrics(y, p, o["threshold"])["specificity"])
    # higher sensitivity costs threshold and specificity
    assert ops[0]["threshold"] >= ops[1]["threshold"] >= ops[2]["threshold"]
    assert ops[0]["specificity"] >= ops[1]["specificity"] >= ops[2]["specificity"]


def test_bootstrap_auc_kernel_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.random(300) * 0.6 + 0.3 * y, 1)  # many ties
    pos, neg = p[y == 1], p[y == 0]
    auc = M.auc_from_counts(pos, neg, np.ones((1, pos.size)), np.ones((1, neg.size)))
    assert auc[0] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    # integer counts are the same as repeating cases
    cpos, cneg = rng.integers(0, 3, (1, pos.size)), rng.integers(0, 3, (1, neg.size))
    yy = np.r_[np.ones(cpos.sum()), np.zeros(cneg.sum())]
    pp = np.r_[np.repeat(pos, cpos[0]), np.repeat(neg, cneg[0])]
    assert M.auc_from_counts(pos, neg, cpos, cneg)[0] == pytest.approx(roc_auc_score(yy, pp), abs=1e-12)


def test_bootstrap_ci_contains_estimate_narrows_reproducible():
    y, p = _noisy(300, seed=4)
    m = M.binary_metrics(y, p, 0.5)
    ci = M.bootstrap_ci(y, p, 0.5, n_boot=500, seed=0)
    assert set(ci) == {"accuracy", "sensitivity", "specificity", "auc"}
    for k, (lo, hi) in ci.items():
        assert lo <= m[k] <= hi
        assert 0 < hi - lo < 0.3
    y_big, p_big = _noisy(3000, seed=5)
    ci_big = M.bootstrap_ci(y_big, p_big, 0.5, n_boot=500, seed=0)
    for k in ci:
        assert ci_big[k][1] - ci_big[k][0] < 0.6 * (ci[k][1] - ci[k][0])
    assert M.bootstrap_ci(y, p, 0.5, n_boot=500, seed=0) == ci
    assert M.bootstrap_ci(y, p, 0.5, n_boot=500, seed=1) != ci
    wide = M.bootstrap_ci(y, p, 0.5, n_boot=500, seed=0, alpha=0.01)
    assert wide["auc"][0] <= ci["auc"][0] and wide["auc"][1] >= ci["auc"][1]


def test_bootstrap_ci_by_patient_is_not_narrowed_by_repeated_films():
    """Each patient's film counted three times: the case bootstrap's AUC interval shrinks by about sqrt(3), the
    patient bootstrap's stays that of one film per patient."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    p = np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.2, 120), 0, 1)
    width = lambda ci: ci["auc"][1] - ci["auc"][0]  # noqa: E731
    one = width(M.bootstrap_ci(y, p, n_boot=2000))
    y3, p3, g3 = np.repeat(y, 3), np.repeat(p, 3), np.repeat(np.arange(120), 3)
    assert width(M.bootstrap_ci(y3, p3, n_boot=2000)) < 0.75 * one
    assert width(M.bootstrap_ci(y3, p3, n_boot=2000, groups=g3)) == pytest.approx(one, rel=0.15)
    with pytest.raises(ConfigError, match="one group id per case"):
        M.bootstrap_ci(y, p, groups=np.arange(5))


def test_bootstrap_ci_single_class():
    ci = M.bootstrap_ci([1, 1, 1, 1], [0.2, 0.6, 0.7, 0.9], 0.5, n_boot=50)
    assert ci["auc"] is None and ci["specificity"] is None
    assert 0.25 <= ci["sensitivity"][0] <= ci["sensitivity"][1] <= 1.0


def test_multiclass_metrics_hand_case():
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 2, 0])
    P = np.full((9, 3), 0.1)
    P[np.arange(9), pred] = 0.8
    P[2, 0] = 0.15  # vary the scores so AUCs are not all ties
    P[5, 1] = 0.12
    P /= P.sum(axis=1, keepdims=True)
    m = M.multiclass_metrics(y, P, ["NORMAL", "BACTERIAL", "VIRAL"])
    assert m["confusion"] == [[2, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(6 / 9)
    assert m["macro_sensitivity"] == pytest.approx(2 / 3)
    assert m["macro_specificity"] == pytest.approx(5 / 6)
    assert m["macro_f1"] == pytest.approx(2 / 3)
    for k, name in enumerate(["NORMAL", "BACTERIAL", "VIRAL"]):
        pc = m["per_class"][name]
        assert pc["support"] == 3
        assert pc["precision"] == pytest.approx(2 / 3) and pc["recall"] == pytest.approx(2 / 3)
        assert pc["specificity"] == pytest.approx(5 / 6)
        assert pc["auc"] == pytest.approx(roc_auc_score(y == k, P[:, k]))
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, P, multi_class="ovr", average="macro"))
    json.dumps(m)


def test_multiclass_missing_class_auc_none():
    y = np.array([0, 0, 1, 1])
    P = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.3, 0.4, 0.3]])
    m = M.multiclass_metrics(y, P, ["A", "B", "C"])
    assert m["per_class"]["C"]["auc"] is None and m["macro_auc"] is None
    assert m["per_class"]["A"]["auc"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="label names"):
        M.multiclass_metrics(y, P, ["A", "B"])


def test_ece_and_brier_hand_case():
    y = np.array([1, 0, 0, 0])
    p = np.array([0.85, 0.85, 0.25, 0.25])
    # confidences 0.85 (1 of 2 right) and 0.75 (2 of 2 right): 0.5*|0.5-0.85| + 0.5*|1-0.75|
    assert C.expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.3)
    assert C.brier(y, p) == pytest.approx(np.mean((p - y) ** 2))
    P = np.array([[0.85, 0.15], [0.85, 0.15], [0.25, 0.75], [0.25, 0.75]])
    assert C.expected_calibration_error([0, 1, 1, 1], P, n_bins=10) == pytest.approx(0.3)
    assert C.brier([0, 1, 1, 1], P) == pytest.approx(np.mean(np.sum((P - np.eye(2)[[0, 1, 1, 1]]) ** 2, axis=1)))


def test_reliability_curve():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.12, 0.95, 0.85, 0.9])
    rc = C.reliability_curve(y, p, n_bins=2)
    assert rc["count"] == [3, 3]
    assert rc["fraction_positive"] == pytest.approx([1 / 3, 2 / 3])
    assert rc["mean_predicted"] == pytest.approx([(0.05 + 0.15 + 0.12) / 3, (0.95 + 0.85 + 0.9) / 3])


def test_temperature_scaling_recovers_overconfidence():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 4000)  # true logits
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)
    logits = 4 * z  # over-confident model
    T = C.fit_temperature(logits, y)
    assert T == pytest.approx(4.0, abs=0.5)
    before, after = C.apply_temperature(logits, 1.0), C.apply_temperature(logits, T)
    assert C.expected_calibration_error(y, after) < C.expected_calibration_error(y, before)
    assert C.brier(y, after) < C.brier(y, before)


def test_calibration_bias_undoes_class_weighting_prior_shift():
    """A class-weighted loss shifts logits by log(w_pos/w_neg); T alone cannot fix that, T and b can."""
    rng = np.random.default_rng(2)
    z = rng.normal(1.0, 2.0, 6000)  # true logits, about 70 % positive like the training data
    y = (rng.random(6000) < 1 / (1 + np.exp(-z))).astype(int)
    logits = 2.0 * z - 2.5  # over-confident and shifted towards NORMAL (the weighting of the majority class)
    T_only = C.fit_temperature(logits, y)
    T, b = C.fit_calibration(logits, y)
    assert T == pytest.approx(2.0, abs=0.2) and b == pytest.approx(1.25, abs=0.15)
    ece = {k: C.expected_calibration_error(y, C.apply_temperature(logits, *args))
           for k, args in {"raw": (1.0,), "T": (T_only,), "T+b": (T, b)}.items()}
    assert ece["T+b"] < ece["T"] and ece["T+b"] < ece["raw"] and ece["T+b"] < 0.02
    # the bias applies to binary logits only; multiclass stays temperature-only
    P = C.apply_temperature(np.zeros((2, 3)), 1.0, bias=5.0)
    assert np.allclose(P, 1 / 3)


def test_temperature_scaling_multiclass():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, (3000, 3))
    P = C.apply_temperature(z, 1.0)
    assert P.sum(axis=1) == pytest.approx(np.ones(3000))
    y = (rng.random((3000, 1)) > P.cumsum(axis=1)).sum(axis=1)
    T = C.fit_temperature(3 * z, y, multiclass=True)
    assert T == pytest.approx(3.0, abs=0.5)
    with pytest.raises(ConfigError, match="temperature"):
        C.apply_temperature(z, 0.0)


def test_apply_temperature_is_stable():
    p = C.apply_temperature(np.array([-1000.0, 0.0, 1000.0]), 1.0)
    assert p.tolist() == [0.0, 0.5, 1.0]


def test_subgroup_flags_bad_group():
    rng = np.random.default_rng(6)
    parts_y, parts_p, groups = [], [], []
    for name, shift, n in [("siteA", 1.5, 400), ("siteB", 1.5, 400), ("siteC", 1.5, 400), ("bad", 0.0, 200)]:
        y = rng.integers(0, 2, n)
        p = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + shift * (y - 0.5))))
        parts_y.append(y), parts_p.append(p), groups.extend([name] * n)
    y, p = np.concatenate(parts_y), np.concatenate(parts_p)
    res = M.subgroup_metrics(y, p, 0.5, groups, n_boot=300)
    assert set(res) == {"siteA", "siteB", "siteC", "bad"}
    assert res["bad"]["flagged"] and "auc" in res["bad"]["flag_reasons"]
    assert res["bad"]["auc"] == pytest.approx(0.5, abs=0.1)
    assert not any(res[s]["flagged"] for s in ("siteA", "siteB", "siteC"))
    assert res["siteA"]["n"] == 400 and res["siteA"]["ci"]["auc"][0] <= res["siteA"]["auc"] <= res["siteA"]["ci"]["auc"][1]
    json.dumps(res)
    with pytest.raises(ConfigError, match="group"):
        M.subgroup_metrics(y, p, 0.5, groups[:10])


def test_paired_auc_difference_sees_a_small_real_gain_that_two_separate_cis_cannot():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 600)
    shared = rng.normal(size=y.size) + 1.6 * y  # what both models see
    p_a = 1 / (1 + np.exp(-(shared + 0.5 * rng.normal(size=y.size))))
    p_b = 1 / (1 + np.exp(-(shared + 0.5 * rng.normal(size=y.size) + 0.25 * y)))  # slightly better, same cases
    d = M.paired_auc_difference(y, p_a, p_b, n_boot=500)
    assert d["difference"] == pytest.approx(roc_auc_score(y, p_b) - roc_auc_score(y, p_a))
    assert 0 < d["ci"][0] < d["difference"] < d["ci"][1]
    ci_a, ci_b = (M.bootstrap_ci(y, p, n_boot=500)["auc"] for p in (p_a, p_b))
    assert ci_b[0] < ci_a[1]  # the separate CIs overlap: unpaired, the same gain would look like noise
    same = M.paired_auc_difference(y, p_a, p_a, groups=np.arange(y.size) // 2, n_boot=200)
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]
    with pytest.raises(ConfigError, match="same"):
        M.paired_auc_difference(y, p_a, p_b[:-1])

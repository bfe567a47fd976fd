"""lab.stats against hand-computed cases (and scipy's t-tests as an independent reference)."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from lab import stats as S

T975_DF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (printed tables: 4.303)


def test_summary_mean_and_sample_std():
    s = S.summarize([70.0, 72.0, 74.0])
    assert (s.n, s.mean) == (3, 72.0) and s.std == pytest.approx(2.0)  # sqrt((4 + 0 + 4) / 2)
    one = S.summarize([65.0, float("nan"), None])
    assert one.n == 1 and one.mean == 65.0 and math.isnan(one.std)
    assert S.summarize([]).n == 0


def test_paired_by_seed_within_noise():
    # differences 1, 3, 1: mean 5/3, sd sqrt(4/3), se = sd / sqrt(3) = 2/3
    c = S.compare({0: 71.0, 1: 73.0, 2: 72.0}, {0: 70.0, 1: 70.0, 2: 71.0})
    half = T975_DF2 * 2 / 3
    assert c.method == "paired" and c.df == 2 and c.seeds_paired == [0, 1, 2]
    assert c.delta == pytest.approx(5 / 3)
    assert c.ci == pytest.approx((5 / 3 - half, 5 / 3 + half))
    assert c.verdict == "within noise"
    ref = sps.ttest_rel([71.0, 73.0, 72.0], [70.0, 70.0, 71.0])
    assert c.p_value == pytest.approx(ref.pvalue)
    assert c.ci == pytest.approx(tuple(ref.confidence_interval(0.95)))


def test_paired_better_and_worse():
    # differences 2, 3, 2.5: mean 2.5, sd 0.5, se 0.5 / sqrt(3)
    c = S.compare({"a": 72.0, "b": 73.0, "c": 73.5}, {"a": 70.0, "b": 70.0, "c": 71.0})
    half = T975_DF2 * 0.5 / math.sqrt(3)
    assert c.ci == pytest.approx((2.5 - half, 2.5 + half)) and c.ci[0] > 0
    assert c.verdict == "better"
    w = S.compare({"a": 70.0, "b": 70.0, "c": 71.0}, {"a": 72.0, "b": 73.0, "c": 73.5})
    assert w.delta == pytest.approx(-2.5) and w.verdict == "worse"
    # pairing matters: the same numbers unpaired (Welch) cannot separate them
    unpaired = S.compare({"a": 72.0, "b": 73.0, "c": 73.5, "d": 72.5}, {"a": 70.0, "b": 70.0, "c": 71.0})
    assert unpaired.method == "welch"


def test_welch_unpaired_hand_computed():
    # variant: mean 82, var 4 (n 3); baseline: mean 71.5, var 5/3 (n 4)
    c = S.compare({0: 80.0, 1: 82.0, 2: 84.0}, {10: 70.0, 11: 71.0, 12: 72.0, 13: 73.0})
    a, b = 4 / 3, (5 / 3) / 4
    df = (a + b) ** 2 / (a**2 / 2 + b**2 / 3)
    assert df == pytest.approx(3.2347, abs=1e-4)
    half = sps.t.ppf(0.975, df) * math.sqrt(a + b)
    assert c.method == "welch" and c.df == pytest.approx(df)
    assert c.delta == pytest.approx(10.5) and c.ci == pytest.approx((10.5 - half, 10.5 + half))
    assert c.verdict == "better"
    ref = sps.ttest_ind([80.0, 82.0, 84.0], [70.0, 71.0, 72.0, 73.0], equal_var=False)
    assert c.ci == pytest.approx(tuple(ref.confidence_interval(0.95))) and c.p_value == pytest.approx(ref.pvalue)


def test_missing_seed_falls_back_to_welch_over_all_seeds():
    """Seed 2 of the baseline is missing (it failed or still runs): not paired on {0, 1}, but
    Welch over every finished seed of each side."""
    v = {0: 71.0, 1: 73.0, 2: 72.0}
    b = {0: 70.0, 1: 70.0}
    c = S.compare(v, b)
    assert c.method == "welch" and (c.n, c.n_baseline) == (3, 2)
    assert c.delta == pytest.approx(72.0 - 70.0)
    # the baseline has no spread: se^2 = var(v) / 3 = 1/3, df = n_v - 1 = 2
    half = T975_DF2 * math.sqrt(1 / 3)
    assert c.df == pytest.approx(2.0) and c.ci == pytest.approx((2 - half, 2 + half))
    assert c.verdict == "within noise"


def test_failed_seed_values_are_not_counted():
    """Callers drop FAILED seeds; a NaN (a seed with no final top-1) is ignored here as well."""
    c = S.compare({0: 71.0, 1: 73.0, 2: float("nan")}, {0: 70.0, 1: 70.0, 2: 71.0})
    assert (c.n, c.n_baseline, c.method) == (2, 3, "welch")
    assert c.delta == pytest.approx(72.0 - 70 - 1 / 3)


def test_n_equals_one_cannot_tell():
    c = S.compare({0: 80.0}, {0: 70.0, 1: 71.0})
    assert c.verdict == "cannot tell (n=1)" and c.delta == 9.5 and c.method is None
    assert all(math.isnan(x) for x in c.ci)
    assert S.compare({0: 80.0, 1: 81.0}, {0: 70.0}).verdict == "cannot tell (n=1)"
    assert S.compare({}, {0: 70.0}).verdict == "no finished seed"
    assert S.format_ci(c) == "+9.50"


def test_no_spread_is_a_point_interval():
    c = S.compare({0: 72.0, 1: 73.0}, {0: 70.0, 1: 71.0})  # paired differences 2, 2
    assert c.ci == (2.0, 2.0) and c.verdict == "better"
    same = S.compare({0: 70.0, 1: 71.0}, {0: 70.0, 1: 71.0})
    assert same.ci == (0.0, 0.0) and same.verdict == "within noise"
    assert S.format_ci(S.compare({0: 71.0, 1: 73.0, 2: 72.0}, {0: 70.0, 1: 70.0, 2: 71.0})) == "+1.67 [-1.20, +4.54]"

"""Latency statistics, the timed loop, run plans and sweeps (qcrun.latency)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from qcrun.errors import UserError
from qcrun.latency import (
    check_sweep,
    fit_exponent,
    fit_growth,
    parse_axis,
    parse_sizes,
    percentile,
    plan_sweep,
    summarize,
    sweep_points,
    synthetic_feed,
    time_calls,
)

# --- statistics ------------------------------------------------------------------------------


def test_percentiles_of_a_known_sample():
    sample = list(range(1, 11))  # 1..10, given shuffled below
    shuffled = [7, 3, 10, 1, 5, 9, 2, 8, 4, 6]
    assert percentile(shuffled, 0) == 1
    assert percentile(shuffled, 50) == pytest.approx(5.5)
    assert percentile(shuffled, 90) == pytest.approx(9.1)
    assert percentile(shuffled, 99) == pytest.approx(9.91)
    assert percentile(shuffled, 100) == 10
    assert percentile([4.0], 99) == 4.0
    # numpy's default ("linear") method on a random sample
    rng = np.random.default_rng(0)
    values = list(rng.exponential(3.0, size=257))
    for q in (1, 25, 50, 90, 99):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert sample == sorted(shuffled)


def test_percentile_rejects_nonsense():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_in_milliseconds():
    stats = summarize([0.001, 0.002, 0.003, 0.004])  # seconds
    assert stats.runs == 4
    assert (stats.min_ms, stats.max_ms) == pytest.approx((1.0, 4.0))
    assert stats.p50_ms == pytest.approx(2.5)
    assert stats.p90_ms == pytest.approx(3.7)
    assert stats.p99_ms == pytest.approx(3.97)
    assert stats.mean_ms == pytest.approx(2.5)
    assert stats.std_ms == pytest.approx(math.sqrt(5 / 3))  # sample std, n - 1
    assert stats.throughput_per_s == pytest.approx(400.0)
    one = summarize([0.25])
    assert (one.runs, one.std_ms, one.p99_ms) == (1, 0.0, 250.0)


# --- the timed loop, on a fake clock ---------------------------------------------------------


class FakeClock:
    """Nanoseconds that only move when the function under test 'runs'."""

    def __init__(self):
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def work(self, seconds: float):
        def fn():
            self.now += int(seconds * 1e9)

        return fn


@pytest.mark.slow
def test_warmup_is_never_timed():
    clock = FakeClock()
    durations = iter([100.0] * 3 + [0.01, 0.02, 0.03])  # 3 slow warm-up calls, then fast ones

    def fn():
        clock.now += int(next(durations) * 1e9)

    timing = time_calls(fn, warmup=3, runs=3, clock=clock)
    assert timing.samples_s == pytest.approx([0.01, 0.02, 0.03])
    assert timing.warmup == 3


@pytest.mark.slow
def test_budget_stops_after_it_is_spent():
    clock = FakeClock()
    timing = time_calls(clock.work(0.1), warmup=0, budget_s=1.0, clock=clock)
    assert len(timing.samples_s) == 10
    assert timing.warnings == []


@pytest.mark.slow
def test_runs_and_budget_whichever_ends_first():
    clock = FakeClock()
    assert len(time_calls(clock.work(0.1), warmup=0, runs=4, budget_s=10, clock=clock)
               .samples_s) == 4
    assert len(time_calls(clock.work(0.1), warmup=0, runs=400, budget_s=0.5, clock=clock)
               .samples_s) == 5


@pytest.mark.slow
def test_budget_shorter_than_one_run_reports_one_run_and_warns():
    clock = FakeClock()
    timing = time_calls(clock.work(2.0), warmup=1, budget_s=0.5, clock=clock)
    assert timing.samples_s == pytest.approx([2.0])
    assert timing.stats.runs == 1
    assert "shorter than one run" in timing.warnings[0]


@pytest.mark.slow
def test_few_runs_warn_about_tail_percentiles():
    clock = FakeClock()
    timing = time_calls(clock.work(0.01), warmup=0, runs=3, clock=clock)
    assert "only 3 timed runs" in timing.warnings[0]


@pytest.mark.parametrize(
    "kwargs, flag",
    [({"runs": 0}, "--runs"), ({"runs": -4}, "--runs"), ({"budget_s": 0}, "--budget"),
     ({"budget_s": -1.0}, "--budget"), ({"warmup": -1, "runs": 2}, "--warmup")],
)
def test_bad_run_plans_are_user_errors(kwargs, flag):
    calls = []
    with pytest.raises(UserError, match=flag):
        time_calls(lambda: calls.append(1), **kwargs)
    assert calls == []  # refused before running anything


# --- sweeps ----------------------------------------------------------------------------------

INPUTS = [
    {"name": "image_features", "dtype": "float32", "shape": ["batch", "tokens", 16]},
    {"name": "text_ids", "dtype": "int64", "shape": ["batch", "text"]},
    {"name": "num_queries", "dtype": "int64", "shape": []},
]


def test_sweep_grid_and_labels():
    points = sweep_points({"batch": [1, 4], "tokens": [257, 1025]})
    assert [p.as_dict() for p in points] == [
        {"batch": 1, "tokens": 257}, {"batch": 1, "tokens": 1025},
        {"batch": 4, "tokens": 257}, {"batch": 4, "tokens": 1025},
    ]
    assert points[1].label() == "batch=1 tokens=1025"


ROLES = {"batch": "batch", "tokens": "tokens"}


def test_plan_sweep_defaults_and_axes():
    assert plan_sweep(INPUTS, roles=ROLES) == {"batch": [1], "tokens": [257]}
    assert plan_sweep(INPUTS, roles=ROLES, batch=[2], tokens=[5, 9], axes=["text=3,4"]) == {
        "batch": [2], "tokens": [5, 9], "text": [3, 4]}
    with pytest.raises(UserError, match="given twice"):
        plan_sweep(INPUTS, roles=ROLES, tokens=[5], axes=["tokens=7"])


def test_plan_sweep_finds_axes_by_role_not_by_name():
    renamed = [{"name": "image_features", "dtype": "float32", "shape": ["n", "patches", 16]},
               {"name": "text_ids", "dtype": "int64", "shape": ["n", "text"]}]
    roles = {"batch": "n", "tokens": "patches"}
    assert plan_sweep(renamed, roles=roles) == {"n": [1], "patches": [257]}
    assert plan_sweep(renamed, roles=roles, batch=[4], tokens=[17]) == {"n": [4], "patches": [17]}
    with pytest.raises(UserError, match=r"--tokens and --axis patches"):
        plan_sweep(renamed, roles=roles, tokens=[5], axes=["patches=7"])
    # an axis called "batch" gets no default and no flag without the role: names mean nothing
    assert plan_sweep(INPUTS) == {}
    assert plan_sweep(INPUTS, axes=["batch=2"]) == {"batch": [2]}
    with pytest.raises(UserError, match="manifest gives no axis that role") as e:
        plan_sweep(INPUTS, batch=[2])
    assert e.value.hint == "name the axis instead: --axis NAME=SIZES"
    assert "symbolic axes: batch, text, tokens" in str(e.value)


def test_parse_sizes_and_axes_reject_garbage():
    assert parse_sizes("1, 4,4", "--batch") == [1, 4]
    for text in ("1,x", "0", "-3"):
        with pytest.raises(UserError, match="--batch"):
            parse_sizes(text, "--batch")
    assert parse_axis("text=6,32") == ("text", [6, 32])
    for text in ("text", "=3", "text="):
        with pytest.raises(UserError, match="--axis"):
            parse_axis(text)


def test_check_sweep_names_the_static_axis():
    static = [{"name": "image_features", "dtype": "float32", "shape": ["batch", 37, 16]}]
    intended = {"image_features": {"0": "batch", "1": "tokens"}}
    check_sweep(static, {"batch": [1, 2], "tokens": [37]}, intended)  # 37 is what it takes
    with pytest.raises(UserError) as error:
        check_sweep(static, {"tokens": [257, 37, 1025]}, intended)
    text = str(error.value)
    assert "input 'image_features' axis 1 ('tokens') is static (37)" in text
    assert "tokens=257,1025" in text


def test_check_sweep_unknown_axis_lists_the_model_axes():
    with pytest.raises(UserError, match=r"no input has an axis named 'media'.*batch, text, tokens"):
        check_sweep(INPUTS, {"media": [2]})


def test_synthetic_feed_shapes_dtypes_and_template():
    template = {"text_ids": np.array([[5, 9, 7]]), "num_queries": np.array(24)}
    feed = synthetic_feed(INPUTS, {"batch": 2, "tokens": 11}, seed=3, template=template)
    assert feed["image_features"].shape == (2, 11, 16)
    assert feed["image_features"].dtype == np.float32
    assert feed["text_ids"].shape == (2, 3)  # the text axis comes from the template
    assert feed["text_ids"].min() >= 5 and feed["text_ids"].max() <= 9
    assert feed["num_queries"].shape == () and int(feed["num_queries"]) == 24
    again = synthetic_feed(INPUTS, {"batch": 2, "tokens": 11}, seed=3, template=template)
    assert np.array_equal(feed["image_features"], again["image_features"])  # seeded


# --- growth ----------------------------------------------------------------------------------


def test_fit_exponent_recovers_a_power_law():
    sizes = [257, 1025, 4097]
    exponent, r2 = fit_exponent(sizes, [3.0 * s**1.5 for s in sizes])
    assert exponent == pytest.approx(1.5)
    assert r2 == pytest.approx(1.0)
    with pytest.raises(ValueError):
        fit_exponent([5, 5], [1.0, 2.0])


def test_fit_growth_groups_by_the_other_axes():
    points = [({"batch": b, "tokens": t}, b * t * 0.01) for b in (1, 4) for t in (100, 400)]
    fits = {(g.axis, tuple(g.fixed.items())): g for g in fit_growth(points)}
    assert set(fits) == {("batch", (("tokens", 100),)), ("batch", (("tokens", 400),)),
                         ("tokens", (("batch", 1),)), ("tokens", (("batch", 4),))}
    for fit in fits.values():
        assert fit.exponent == pytest.approx(1.0)

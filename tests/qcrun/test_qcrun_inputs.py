"""qcrun's one input factory: the same rule for verify, profile, inspect and calibration."""

from __future__ import annotations

import numpy as np
from qcrun.inputs import axis_sizes, make_inputs

from qcexport import mechanisms

SPECS = [
    {"name": "x", "dtype": "float32", "shape": ["batch", "tokens", 4]},
    {"name": "mask", "dtype": "bool", "shape": ["batch", "tokens"]},
    {"name": "ids", "dtype": "int64", "shape": ["batch", "text"], "range": {"min": 7, "max": 9}},
    {"name": "m", "dtype": "int64", "shape": [], "range": {"min": 1, "max": 16}},
    {"name": "free", "dtype": "int32", "shape": ["batch", 3]},
]


def test_sizes_ranges_and_masks_follow_one_rule():
    feed = make_inputs(SPECS, {"batch": 3, "tokens": 40, "text": 50}, seed=5)
    assert feed["x"].shape == (3, 40, 4) and feed["x"].dtype == np.float32
    assert feed["mask"].dtype == bool and feed["mask"][:, 0].all()
    assert not feed["mask"].all()  # a real mask: 120 random positions are not all kept
    assert feed["ids"].min() == 7 and feed["ids"].max() == 9  # the recorded range, both ends
    assert feed["m"].shape == () and 1 <= int(feed["m"]) <= 16
    assert set(np.unique(feed["free"])) <= {0, 1} and feed["free"].dtype == np.int32
    again = make_inputs(SPECS, {"batch": 3, "tokens": 40, "text": 50}, seed=5)
    assert all(np.array_equal(feed[k], again[k]) for k in feed)  # seeded


def test_a_template_sets_the_other_sizes_and_the_values():
    template = {"ids": np.array([[8, 8]]), "m": np.array(11), "free": np.zeros((1, 3))}
    feed = make_inputs(SPECS, {"batch": 2}, seed=0, template=template)
    assert feed["ids"].shape == (2, 2) and (feed["ids"] == 8).all()
    assert int(feed["m"]) == 11
    assert feed["x"].shape == (2, 1, 4)  # no size and no template: the fallback size 1


def test_the_spec_example_sizes_are_the_defaults():
    spec = mechanisms.get("qformer")
    config = spec.config("tiny")
    sizes = spec.example_sizes(config)
    assert sizes == {"batch": 1, "tokens": 49, "text": 6}  # its first golden case
    example = {k: v.numpy() for k, v in spec.inputs(config, spec.golden_cases[1]).items()}
    specs = [{"name": k, "dtype": str(v.dtype), "shape": [spec.dynamic_axes[k].get(i, n)
                                                         for i, n in enumerate(v.shape)]}
             for k, v in example.items()]
    assert axis_sizes(specs, example) == {"batch": 2, "tokens": 17, "text": 8}

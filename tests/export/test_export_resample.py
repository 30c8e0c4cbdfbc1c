"""resample: fresh verification inputs like the example, with the dynamic axes grown."""

from __future__ import annotations

import torch

from qcexport.export import resample


def example() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "features": torch.randn(2, 5, 8, generator=g),
        "mask": torch.tensor([[True, True, True, False, False], [True] * 5]),
        "ids": torch.randint(3, 9, (2, 7), generator=g),
        "count": torch.tensor(4),
        "table": torch.randn(6, 3, generator=g).double(),
    }


AXES = {
    "features": {0: "batch", 1: "tokens"},
    "mask": {0: "batch", 1: "tokens"},
    "ids": {0: "batch", 1: "text"},
}


def test_shared_axis_names_grow_together():
    out = resample(example(), AXES, seed=1)
    # batch grows by one; other axes by max(3, old // 2): tokens 5 -> 8, text 7 -> 10.
    assert out["features"].shape == (3, 8, 8)
    assert out["mask"].shape == (3, 8)
    assert out["ids"].shape == (3, 10)
    assert out["table"].shape == (6, 3)  # no dynamic axes: unchanged
    assert list(out) == list(example())


def test_large_axes_grow_by_half():
    ex = {"x": torch.zeros(1, 40), "y": torch.zeros(40, 2)}
    out = resample(ex, {"x": {1: "tokens"}, "y": {0: "tokens"}}, seed=0)
    assert out["x"].shape == (1, 60) and out["y"].shape == (60, 2)


def test_values_by_dtype():
    ex = example()
    out = resample(ex, AXES, seed=1)
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in ex.items()}
    assert out["mask"].all()  # a random mask could hide every key
    assert out["count"].dim() == 0 and int(out["count"]) == 4  # counts such as m are kept
    assert int(out["ids"].min()) >= 3 and int(out["ids"].max()) <= 8  # the example's range
    assert len(out["ids"].unique()) > 1
    features = out["features"]
    assert abs(float(features.mean())) < 0.3 and 0.7 < float(features.std()) < 1.3
    assert not torch.equal(out["table"], ex["table"])  # fresh values, not the example's


def test_without_axes_shapes_are_kept_and_values_fresh():
    ex = example()
    out = resample(ex, {}, seed=1)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ex.items()}
    assert not torch.allclose(out["features"], ex["features"])


def test_seeded():
    a, b, c = (resample(example(), AXES, seed=s) for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features"], c["features"])


def test_the_batch_axis_is_the_one_the_roles_name():
    from qcexport.mechanisms.registry import AxisRoles

    ex = {"x": torch.zeros(4, 6)}
    axes = {"x": {0: "batch", 1: "images"}}
    # default roles: "batch" grows by one (4 -> 5), "images" by max(3, 6 // 2) (6 -> 9)
    assert resample(ex, axes, seed=0)["x"].shape == (5, 9)
    # a spec whose batch axis is named "images": that one grows by one, "batch" by 3
    assert resample(ex, axes, seed=0, roles=AxisRoles(batch="images"))["x"].shape == (7, 7)

"""LoRA's routed decoding path keeps its stacked factors per route (methods/lora.py ``_stacked``):
it must never serve stale factors or another route's row assignment."""

import torch
from conftest import randomize

import deltatune as dt
from deltatune.core import iter_hosts


def _alone(mlp, x, names):
    rows = []
    for i, name in enumerate(names):
        if name is None:
            with dt.disabled(mlp):
                rows.append(mlp(x[i : i + 1]))
        else:
            dt.set_active(mlp, [name])
            rows.append(mlp(x[i : i + 1]))
    return torch.cat(rows)


def _attach(mlp):
    for name, r in (("a", 2), ("b", 4), ("c", 3)):
        dt.attach(mlp, dt.LoRA(r=r, alpha=2 * r, targets=["fc1", "fc2"]), name=name)
        randomize(mlp)


def test_cached_route_follows_factor_updates_and_new_routes(mlp):
    _attach(mlp)
    x = torch.randn(5, 1, 8)  # one token per row: the stacked (decoding) path
    names = ["a", "b", None, "c", "a"]
    with torch.inference_mode():
        with dt.route(mlp, names):
            first = mlp(x)
            assert torch.equal(mlp(x), first)  # second call: served from the cache
            assert any(getattr(h, "route_cache", {}) for _, h in iter_hosts(mlp))
            host = mlp.fc1
            with torch.no_grad():
                host.part("b").lora_B.mul_(3.0)  # an in-place update bumps _version
            updated = mlp(x)
        assert not torch.allclose(updated[1], first[1])  # b's row moved
        assert torch.allclose(updated[0], first[0]) and torch.allclose(updated[2], first[2])
        assert torch.allclose(updated, _alone(mlp, x, names), atol=1e-5)
        swapped = ["c", None, "b", "a", "b"]  # same length, other rows: never the old mask
        with dt.route(mlp, swapped):
            again = mlp(x)
        assert torch.allclose(again, _alone(mlp, x, swapped), atol=1e-5)
    assert all(not getattr(h, "route_cache", {}) for _, h in iter_hosts(mlp))  # route ended


def test_no_cache_while_training_through_a_route(mlp):
    _attach(mlp)
    dt.set_active(mlp, ["a", "b", "c"])
    x = torch.randn(4, 1, 8)
    with dt.route(mlp, ["a", "b", "c", None]):
        for _ in range(2):  # twice: a cached concatenation would fail the second backward
            mlp(x).square().sum().backward()
        assert all("lora" not in getattr(h, "route_cache", {}) for _, h in iter_hosts(mlp))
    assert mlp.fc1.part("a").lora_B.grad is not None

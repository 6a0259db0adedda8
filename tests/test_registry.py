"""One registry idiom (issue 19, item 3): everything looked up by name is a core ``Registry``."""

from __future__ import annotations

import pytest

from deltatune.core.registry import Registry


class OopsError(ValueError):
    pass


def test_register_forms_and_lookup():
    reg: Registry[object] = Registry("widget", OopsError)

    @reg.register
    def alpha():
        pass

    @reg.register("beta")
    def _b():
        pass

    gamma = reg.register("gamma", object())
    reg.register("hidden", 42, internal=True)
    assert reg.get("alpha") is alpha and reg["beta"] is _b and reg.get("gamma") is gamma
    assert reg.names() == ("alpha", "beta", "gamma") == tuple(reg) and len(reg) == 3
    assert [n for n, _ in reg.items()] == ["alpha", "beta", "gamma"]
    assert "hidden" in reg and reg.get("hidden") == 42 and "hidden" not in reg.names()
    assert 3 not in reg and "delta" not in reg


def test_unknown_name_is_one_line_of_the_registry_error_with_the_closest_names():
    reg: Registry[int] = Registry("widget", OopsError)
    for name in ("alpha", "alphabet", "gamma"):
        reg.register(name, 1)
    reg.register("alpah_internal", 2, internal=True)
    with pytest.raises(OopsError) as info:
        reg.get("alpah")
    message = str(info.value)
    assert message == ("unknown widget 'alpah'; did you mean 'alpha' or 'alphabet'? "
                       "(known: alpha, alphabet, gamma)")
    with pytest.raises(OopsError, match=r"^unknown widget 'zzz' \(known: alpha, alphabet, gamma\)"):
        reg.get("zzz")
    custom = Registry("gadget", KeyError, message="no {kind} {name!r}{hint}", quote=False)
    custom.register("tent", 1)
    with pytest.raises(KeyError, match="no gadget 'tnet'; did you mean tent?"):
        custom.get("tnet")


def test_a_duplicate_name_is_a_programming_error():
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", 2)
    with pytest.raises(ValueError, match="non-empty name"):
        reg.register("", 3)


def test_key_and_lazy_load():
    loaded = []
    reg: Registry[type] = Registry("thing", key=lambda cls: cls.tag, load=lambda: loaded.append(1))

    @reg.register
    class Thing:
        tag = "t"

    assert not loaded
    assert reg.get("t") is Thing and reg.names() == ("t",) and loaded == [1]


def _kinds() -> dict[str, object]:
    from deltatune.algebra.registry import MERGE_METHODS
    from deltatune.compress.codecs import CODECS
    from deltatune.continual.strategies import STRATEGIES
    from deltatune.core.spec import METHODS
    from deltatune.data import DATASETS
    from deltatune.deploy.accuracy import ESTIMATORS
    from deltatune.deploy.base import METHODS as TTA_METHODS
    from deltatune.deploy.stats import TESTS
    from deltatune.models import MODELS

    return {"methods": METHODS, "merge methods": MERGE_METHODS, "codecs": CODECS,
            "continual strategies": STRATEGIES, "test-time methods": TTA_METHODS,
            "shift tests": TESTS, "accuracy estimators": ESTIMATORS, "models": MODELS,
            "data sets": DATASETS}


def test_registry_idioms_aim_one():
    """The issue's figure "registry idioms" (aim 1; 9 before: @register, @merge_method,
    @register_method, STRATEGIES, CODECS, TESTS, ESTIMATES, _MODELS, _BUNDLED)."""
    kinds = _kinds()
    not_registries = sorted(k for k, r in kinds.items() if not isinstance(r, Registry))
    assert not not_registries, f"look these up through a core Registry: {not_registries}"
    assert len({type(r) for r in kinds.values()}) == 1  # the figure: one idiom
    assert all(len(r) > 0 for r in kinds.values())


def test_public_names_follow_the_registries():
    import deltatune.algebra as alg
    import deltatune.deploy as dd
    from deltatune.cli.compress import CODEC_NAMES
    from deltatune.compress import CODECS
    from deltatune.core import registered_methods
    from deltatune.data import available_datasets
    from deltatune.deploy.accuracy import ESTIMATES
    from deltatune.models import available_models

    kinds = _kinds()
    assert list(registered_methods()) == list(kinds["methods"].names())
    assert list(alg.merge_methods()) == list(kinds["merge methods"].names())
    assert dd.METHODS is kinds["test-time methods"] and dd.TESTS is kinds["shift tests"]
    assert ESTIMATES == kinds["accuracy estimators"].names() == ("confidence", "atc", "doc", "cot")
    assert available_models() == list(kinds["models"].names())
    assert available_datasets() == list(kinds["data sets"].names())
    assert CODEC_NAMES == CODECS.names(), "the CLI's codec list (literal: fast --help) is stale"
    assert "raw" in CODECS and "raw" not in CODECS.names()  # stored, never chosen

import pytest

from megatron_pgpo.algorithms import ADVANTAGE_SHAPERS, POLICY_LOSSES, Registry


def test_register_get_and_errors():
    reg = Registry("widget")

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a and "a" in reg and list(reg) == ["a"]
    reg.register("a")(a)  # re-registering the same function (a module reload) is fine
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: 2)
    with pytest.raises(KeyError, match=r"unknown widget 'b'; valid names: a"):
        reg.get("b")
    with pytest.raises(ValueError):
        reg.register("")


def test_builtin_shapers():
    assert ADVANTAGE_SHAPERS.names() == ["grpo", "pgpo", "pgpo_boosting_only", "pgpo_no_normalization",
                                        "pgpo_suppression_only", "vppo"]
    assert POLICY_LOSSES.names() == ["clipped", "papo"]

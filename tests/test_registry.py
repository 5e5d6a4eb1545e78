"""Reward discovery, lazy loading, failure reporting, and the --weights syntax."""

from __future__ import annotations

import sys
import types
from importlib.metadata import EntryPoint

import numpy as np
import pytest
from click.testing import CliRunner

from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardPluginError, RewardSuite, available_rewards, parse_weights
from cellfluxrl.rewards import registry
from cellfluxrl.rewards.weights import format_weights

GROUP = "cellfluxrl.rewards"
BUILTINS = ("moa", "nuc_in_cyto", "roundness", "nuc_size", "cyto_size", "nuc_count", "cyto_count")


class FakeSegmenter:
    """Segments nothing: every image gets empty nucleus and cell labels."""

    settings = {"backend": "fake"}

    def segment(self, images):
        b, _, h, w = images.shape
        return np.zeros((b, h, w), np.int32), np.zeros((b, h, w), np.int32)


def _fake_module(monkeypatch) -> str:
    """A module ``fake_reward_plugin`` with good and bad factories, importable by entry points."""
    module = types.ModuleType("fake_reward_plugin")
    module.make_good = lambda context: (lambda batch: np.full(len(batch), 0.5))
    module.make_float32 = lambda context: (lambda batch: np.zeros(len(batch), np.float32))
    module.make_2d = lambda context: (lambda batch: np.zeros((len(batch), 1)))
    module.make_nan = lambda context: (lambda batch: np.full(len(batch), np.nan))
    module.make_list = lambda context: (lambda batch: [0.0] * len(batch))
    module.make_raises = lambda context: (_ for _ in ()).throw(RuntimeError("no GPU today"))
    module.not_callable = 42
    monkeypatch.setitem(sys.modules, "fake_reward_plugin", module)
    return "fake_reward_plugin"


def _install(monkeypatch, entries: list[tuple[str, str, str, str]]) -> None:
    """Replace discovery by ``(name, value, package, version)`` entries plus the real built-ins."""
    real = [(ep, p, v) for ep, p, v in registry.iter_entry_points() if p == "cellfluxrl"]
    fake = [(EntryPoint(name, value, GROUP), package, version) for name, value, package, version in entries]
    monkeypatch.setattr(registry, "iter_entry_points", lambda: real + fake)


def _suite(weights: dict) -> RewardSuite:
    return RewardSuite(evaluators=None, weights=weights, segmenter=FakeSegmenter())


def _images(b: int = 3) -> np.ndarray:
    return np.zeros((b, 3, 16, 16), np.float32)


# --------------------------------------------------------------------------------------------
# Discovery.


def test_builtins_and_example_plugin_discovered_without_import():
    sys.modules.pop("cellfluxrl_reward_actin_tubulin", None)
    rewards = available_rewards()
    for name in BUILTINS:
        assert rewards[name].package == "cellfluxrl" and rewards[name].builtin
        assert rewards[name].value == f"cellfluxrl.rewards.builtin:make_{name}"
    plugin = rewards["actin_tubulin"]
    assert (plugin.package, plugin.value, plugin.builtin) == (
        "cellfluxrl-reward-actin-tubulin", "cellfluxrl_reward_actin_tubulin:make", False)
    assert list(rewards) == sorted(rewards)
    assert "cellfluxrl_reward_actin_tubulin" not in sys.modules  # discovery imported nothing


def test_broken_plugin_fails_only_when_requested(monkeypatch):
    _install(monkeypatch, [("broken", "no_such_module_for_cellfluxrl:make", "cellfluxrl-reward-broken", "0.3")])
    assert "broken" in available_rewards()  # listed fine
    suite = _suite({"nuc_in_cyto": 1.0})  # not requested: no error
    assert suite.score(_images(), ["DMSO"] * 3).total.shape == (3,)
    with pytest.raises(RewardPluginError) as info:
        _suite({"nuc_in_cyto": 1.0, "broken": 1.0})
    message = str(info.value)
    assert "\n" not in message
    assert "'broken'" in message and "cellfluxrl-reward-broken==0.3" in message
    assert "ModuleNotFoundError" in message and "no_such_module_for_cellfluxrl" in message
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


@pytest.mark.parametrize("factory, expected", [
    ("make_float32", "float32"), ("make_2d", "(3, 1)"), ("make_nan", "non-finite"), ("make_list", "list"),
])
def test_wrong_output_is_an_error_naming_the_reward(monkeypatch, factory, expected):
    module = _fake_module(monkeypatch)
    _install(monkeypatch, [("bad", f"{module}:{factory}", "cellfluxrl-reward-bad", "1.2")])
    suite = _suite({"bad": 1.0})
    with pytest.raises(RewardPluginError, match=expected) as info:
        suite.score(_images(), ["DMSO"] * 3)
    assert "'bad'" in str(info.value) and "cellfluxrl-reward-bad==1.2" in str(info.value)


def test_factory_errors_are_named(monkeypatch):
    module = _fake_module(monkeypatch)
    _install(monkeypatch, [("boom", f"{module}:make_raises", "pkg-boom", "1"),
                           ("num", f"{module}:not_callable", "pkg-num", "2")])
    with pytest.raises(RewardPluginError, match=r"'boom' from pkg-boom==1 .*RuntimeError: no GPU today"):
        _suite({"boom": 1.0})
    with pytest.raises(RewardPluginError, match=r"'num' from pkg-num==2 .*not a factory"):
        _suite({"num": 1.0})


def test_good_plugin_scores_and_joins_the_sum(monkeypatch):
    module = _fake_module(monkeypatch)
    _install(monkeypatch, [("good", f"{module}:make_good", "pkg-good", "1")])
    result = _suite({"good": 4.0, "nuc_in_cyto": 2.0}).score(_images(), ["DMSO"] * 3)
    np.testing.assert_array_equal(result.components["good"], [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(result.components["nuc_in_cyto"], [0.0, 0.0, 0.0])  # nothing segmented
    np.testing.assert_array_equal(result.total, [2.0, 2.0, 2.0])


def test_duplicate_names_across_packages(monkeypatch):
    _install(monkeypatch, [("roundness", "other_pkg:make", "cellfluxrl-reward-other", "0.1")])
    with pytest.raises(RewardPluginError) as info:
        available_rewards()
    message = str(info.value)
    assert "'roundness'" in message and "cellfluxrl==" in message and "cellfluxrl-reward-other==0.1" in message


def test_unknown_reward_in_suite_lists_available():
    with pytest.raises(CellfluxError, match="unknown reward 'nope'; available: .*moa"):
        _suite({"nope": 1.0})


def test_rewards_command_lists_and_checks(monkeypatch):
    from cellfluxrl.commands.rewards import rewards

    result = CliRunner().invoke(rewards, [])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["name", "entry", "point"]
    row = next(line for line in lines if line.startswith("moa "))
    assert "cellfluxrl.rewards.builtin:make_moa" in row and "built-in" in row and row.rstrip().endswith("5")
    assert any(line.startswith("actin_tubulin") and "plugin" in line for line in lines)

    _install(monkeypatch, [("broken", "no_such_module_for_cellfluxrl:make", "cellfluxrl-reward-broken", "0.3")])
    result = CliRunner().invoke(rewards, ["--check"])
    assert result.exit_code == 1
    fails = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "'broken'" in fails[0] and "cellfluxrl-reward-broken==0.3" in fails[0]


# --------------------------------------------------------------------------------------------
# Weights.

AVAILABLE = (*BUILTINS, "actin_tubulin")


def test_default_weights_are_the_papers():
    assert DEFAULT_WEIGHTS == {"moa": 5.0, "nuc_in_cyto": 2.0, "roundness": 1.0, "nuc_size": 1.0, "cyto_size": 1.0,
                               "nuc_count": 1.0, "cyto_count": 1.0}
    assert parse_weights(None, AVAILABLE) == DEFAULT_WEIGHTS
    assert parse_weights("", AVAILABLE) == DEFAULT_WEIGHTS
    assert parse_weights("  ", AVAILABLE) == DEFAULT_WEIGHTS


def test_overrides_zeros_and_plugins():
    w = parse_weights("moa=2.5, roundness=0,nuc_size=3e-1", AVAILABLE)
    assert w == {"moa": 2.5, "nuc_in_cyto": 2.0, "nuc_size": 0.3, "cyto_size": 1.0, "nuc_count": 1.0,
                 "cyto_count": 1.0}
    assert "actin_tubulin" not in parse_weights("moa=1", AVAILABLE)  # a plugin joins only when named
    w = parse_weights("actin_tubulin=0.5", AVAILABLE)
    assert w["actin_tubulin"] == 0.5 and list(w)[-1] == "actin_tubulin" and len(w) == 8
    only = parse_weights(",".join(f"{n}=0" for n in BUILTINS[1:]), AVAILABLE)
    assert only == {"moa": 5.0}
    assert parse_weights(format_weights(w), AVAILABLE) == w  # round trip


def test_default_available_is_discovered():
    assert parse_weights("actin_tubulin=1")["actin_tubulin"] == 1.0


@pytest.mark.parametrize("spec, match", [
    ("moa", "'moa' is not NAME=WEIGHT"),
    ("=3", "'=3' is not NAME=WEIGHT"),
    ("moa=", "is not NAME=WEIGHT"),
    ("moa=x", "weight of 'moa' is not a number"),
    ("moa=inf", "must be finite"),
    ("moa=nan", "must be finite"),
    ("moa=-1", "must be >= 0"),
    ("moa=1,,roundness=2", "'' is not NAME=WEIGHT"),
    ("moa=1,moa=2", "given twice"),
])
def test_malformed_weights(spec, match):
    with pytest.raises(CellfluxError, match=match) as info:
        parse_weights(spec, AVAILABLE)
    assert "\n" not in str(info.value)


def test_unknown_name_lists_available():
    with pytest.raises(CellfluxError) as info:
        parse_weights("moa=1,mitochondria=2", AVAILABLE)
    message = str(info.value)
    assert "unknown reward 'mitochondria'" in message
    for name in AVAILABLE:
        assert name in message


def test_all_zero_is_an_error():
    with pytest.raises(CellfluxError, match="every weight is zero"):
        parse_weights(",".join(f"{n}=0" for n in BUILTINS), AVAILABLE)

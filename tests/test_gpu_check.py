"""The GPU run book (benchmarks/gpu_check.py) at toy size on CPU, so it cannot rot between GPU sessions."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
PARTS = ("setup", "correctness", "data", "posttrain", "rewards", "pretrain", "sampling", "evaluate",
         "posttrain_cfg0", "pretrain_compiled", "compile")


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _walk(value, path=""):
    """Every (path, leaf) of a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, f"{path}[{i}]")
    else:
        yield path, value


def test_smoke_runs_every_part(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["parts"]) == set(PARTS) and set(report["reached"]) == set(PARTS)
    assert report["skipped"] == []
    for path, leaf in _walk(report["parts"]):
        assert not path.endswith(".error"), f"{path}: {leaf}"
        if isinstance(leaf, float):
            assert math.isfinite(leaf), path
    parts = report["parts"]
    for name in ("setup", "correctness", "posttrain", "pretrain", "sampling", "evaluate"):
        assert parts[name]["seconds"] > 0 and parts[name]["peak_mem_gb"] > 0
    checks = parts["correctness"]["checks"]
    assert set(checks) == {"velocity_bf16_rel_err", "pretrain_loss_bf16_rel_err", "pretrain_grad_bf16_cosine_gap",
                           "nft_onpolicy_identity_rel_err"}
    assert all(check["ok"] and check["value"] <= check["tol"] for check in checks.values()), checks
    assert parts["correctness"]["generate_finite"] and parts["correctness"]["nft"]["finite"]
    assert parts["correctness"]["nft"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert parts["compile"]["ok"] and parts["compile"]["compiled_vs_eager_rel_err"] <= parts["compile"]["tol"]
    assert 2.9 < parts["setup"]["train_over_forward"] < 3.1
    for name, w in (("posttrain", 0.2), ("posttrain_cfg0", 0.0)):  # the base run records CFG 0.2
        assert parts[name]["finite"] and parts[name]["iterations"] == 2 and parts[name]["cfg_scale"] == w
        assert parts[name]["t_step"] >= parts[name]["t_rollout"]
    assert parts["posttrain"]["tflop_per_iteration"] == pytest.approx(2 * parts["posttrain_cfg0"]["tflop_per_iteration"])
    assert parts["rewards"]["finite"] and parts["pretrain_compiled"]["finite"] and parts["sampling"]["finite"]
    assert report["targets"]["correctness_within_tolerance"]["ok"] is True


def test_reward_entry_points_without_install(tmp_path, monkeypatch):
    """On a machine where cellfluxrl is not pip-installed the rewards are declared from pyproject.toml."""
    from importlib import metadata

    import cellfluxrl.rewards as rewards

    gpu_check = _load_script()
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(rewards, "available_rewards", lambda: {})
    assert "pyproject" in gpu_check.reward_entry_points(tmp_path)
    info = next((tmp_path / "site").glob("cellfluxrl-*.dist-info"))
    entry_points = {ep.name: ep for ep in metadata.PathDistribution(info).entry_points}
    assert set(entry_points) == {*rewards.DEFAULT_WEIGHTS, "moa_capped"}  # every built-in of pyproject.toml
    assert all(callable(ep.load()) for ep in entry_points.values())


def test_dataset_without_rdkit(tmp_path, monkeypatch):
    """Without rdkit (the GPU image has none) the dataset takes the shipped CellFlux embeddings."""
    from cellfluxrl.data.fingerprints import cellflux_embeddings
    from cellfluxrl.data.layout import load_dataset

    gpu_check = _load_script()
    monkeypatch.setitem(sys.modules, "rdkit", None)  # import rdkit -> ImportError
    assert "no rdkit" in gpu_check.write_dataset(tmp_path / "data", size=32, n_images=40)
    dataset = load_dataset(tmp_path / "data")
    table = cellflux_embeddings().vectors
    for name, vector in zip(dataset.conditions["compound"], dataset.embeddings):
        assert np.array_equal(np.asarray(vector), np.asarray(table[name], dtype=np.float32)), name

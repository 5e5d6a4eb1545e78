"""experiments/rl_spread.py (issue 31 item 4): the s.e. of several RL runs' mean gain counts the
between-run spread, and never falls below the pairs' own noise."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from rl_spread import pooled  # noqa: E402


def test_between_run_spread_dominates_when_runs_disagree():
    mean, sd, se = pooled(np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.1, 0.1]))
    assert mean == pytest.approx(2.0) and sd == pytest.approx(1.0)
    assert se == pytest.approx(1.0 / np.sqrt(3))  # sd / sqrt(R) > sqrt(3 x 0.01) / 3


def test_within_run_noise_is_the_floor_when_runs_agree():
    mean, sd, se = pooled(np.array([0.5, 0.5, 0.5]), np.array([0.3, 0.4, 1.2]))
    assert sd == 0.0 and se == pytest.approx(np.sqrt(0.09 + 0.16 + 1.44) / 3)

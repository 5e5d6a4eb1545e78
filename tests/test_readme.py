"""The README's Python API block runs as written (on the output of `cellfluxrl demo --quick`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

README = Path(__file__).resolve().parents[1] / "README.md"


def api_block() -> str:
    """The ```python block of the README's "Python API" section."""
    section = README.read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_api_block_is_ten_lines_of_code():
    code = [line for line in api_block().splitlines() if line.strip() and not line.startswith(("from ", "import "))]
    assert len(code) <= 10


@pytest.mark.slow
def test_readme_api_block_runs(tmp_path, capsys):
    from cellfluxrl.cli import cli

    result = CliRunner().invoke(cli, ["demo", "--quick", "--out", str(tmp_path / "runs" / "demo"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(api_block(), "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    out = namespace["out"]
    assert out.generated.dtype == np.uint8 and out.generated.shape[1:] == (48, 48, 3)
    assert out.candidate_rewards.shape == (len(out.generated), 4)
    assert np.array_equal(out.rewards, out.candidate_rewards.max(axis=1))
    assert "(" in capsys.readouterr().out

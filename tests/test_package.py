"""The habits of a package: a licence file matching pyproject, a changelog, a version that moves."""

from pathlib import Path

import cellfluxrl

ROOT = Path(__file__).resolve().parents[1]


def test_license_file_is_mit_as_pyproject_says():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()


def test_changelog_has_unreleased_section_and_version_is_0_2():
    lines = (ROOT / "CHANGELOG.md").read_text().splitlines()
    assert "## Unreleased" in lines
    assert cellfluxrl.__version__ == "0.2.0"
    assert f"Version {cellfluxrl.__version__}" in "\n".join(lines)

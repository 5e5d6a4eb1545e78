"""The console entry point: help, version, one-line user errors, --debug tracebacks."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellfluxrl import __version__
from cellfluxrl.cli import COMMANDS, main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bbbc021 import impa_rows, npy_path, write_impa, write_raw  # noqa: E402


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m cellfluxrl.cli ARGS`` in a child process (the real console entry point)."""
    return subprocess.run([sys.executable, "-m", "cellfluxrl.cli", *args], capture_output=True, text=True, timeout=120)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``cellfluxrl.cli.main(ARGS)`` in this process -> (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code if exc.code is not None else 0
    out, err = capsys.readouterr()
    return code, out, err


PROGRESS_LINE = re.compile(r"^[^:]+: \d+(/\d+)? \S+( \(\d+%\))?, \d+:\d\d:\d\d elapsed")
DEPRECATION_LINE = re.compile(r"^note: .* is deprecated in `cellfluxrl [^`]+`; use ")


def visible_lines(text: str) -> list[str]:
    """The non-blank lines a terminal shows (a carriage return overwrites the line: progress bars),
    without the plain progress lines a bar prints in a log (``cellfluxrl.progress``): they report
    work done before the error, they are not part of it; nor the notes an old option spelling prints
    (tests/test_vocabulary.py checks those), so tests written with the 0.1 spellings still read the error."""
    lines = [line.split("\r")[-1] for line in text.split("\n")]
    return [line for line in lines if line.strip() and not PROGRESS_LINE.match(line) and not DEPRECATION_LINE.match(line)]


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = visible_lines(err)
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_help_lists_every_available_command():
    result = run_cli("--help")
    assert result.returncode == 0 and result.stderr == ""
    available = [name for name, (module, _, _) in COMMANDS.items() if importlib.util.find_spec(module)]
    assert "prepare" in available
    listed = result.stdout.split("Commands:")[1].split()
    for name in COMMANDS:
        assert (name in listed) == (name in available), name
    assert "--debug" in result.stdout and "--version" in result.stdout


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"cellfluxrl, version {__version__}"


def test_prepare_help_lists_sources(capsys):
    code, out, _ = run_main(capsys, "prepare", "--help")
    assert code == 0 and "synthetic" in out and "bbbc021" in out


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = run_cli("prepare", "bbbc021", str(tmp_path / "out"), "--impa", str(tmp_path / "nowhere"), "--no-evaluators")
    assert_one_line_error(result.returncode, result.stderr, "nowhere", "does not exist")
    assert result.stdout == ""


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "prepare", "bbbc021", str(tmp_path / "out"), "--impa", str(tmp_path / "nowhere"),
                     "--no-evaluators")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "CellfluxError" in result.stderr
    assert "nowhere" in result.stderr


def test_prepare_impa_through_the_cli(tmp_path, capsys):
    rows, images = impa_rows()
    write_impa(tmp_path / "impa", rows, images)
    main_args = ["prepare", "bbbc021", str(tmp_path / "out"), "--impa", str(tmp_path / "impa"), "--no-evaluators"]
    code, out, _ = run_main(capsys, *main_args)
    assert code == 0
    assert "bbbc021-impa" in out and f"{len(rows)} images" in out
    assert (tmp_path / "out" / "meta.json").is_file()


def _impa_case(tmp_path: Path, name: str, edit=None, damage=None) -> Path:
    rows, images = impa_rows()
    rows = edit(rows) if edit else rows
    root = write_impa(tmp_path / name, rows, images)
    if damage:
        damage(root, rows)
    return root


def _set(index, column, value):
    def edit(rows):
        rows = [dict(r) for r in rows]
        rows[index][column] = value
        return rows
    return edit


IMPA_CASES = {
    "missing-folder": (lambda t: t / "nowhere", ("nowhere", "does not exist")),
    "missing-csv": (lambda t: (t / "empty").mkdir() or t / "empty", ("bbbc021_df_all.csv", "missing file")),
    "missing-column": (lambda t: _impa_case(t, "nocol", edit=lambda rows: [{k: v for k, v in r.items() if k != "BATCH"} for r in rows]),
                       ("missing column(s) BATCH",)),
    "corrupt-npy": (lambda t: _impa_case(t, "corrupt", damage=lambda root, rows: npy_path(root, rows[1]["SAMPLE_KEY"]).write_bytes(b"\x93NUMPY")),
                    ("2_11_2.0.npy", "corrupt", "more than 1%")),
    "no-smiles": (lambda t: _impa_case(t, "nosmiles", edit=_set(4, "SMILES", "")), ("line 6", "'colchicine' has no SMILES")),
    "empty-split": (lambda t: _impa_case(t, "onesplit", edit=lambda rows: [{**r, "SPLIT": "test"} for r in rows]),
                    ("split 'train' has no treated images",)),
    "plate-without-dmso": (lambda t: _impa_case(t, "nodmso", edit=lambda rows: [r for r in rows if not (r["BATCH"] == "Week1_22123" and r["CPD_NAME"] == "DMSO")]),
                           ("plate 'Week1_22123'", "no DMSO controls")),
}


@pytest.mark.parametrize("case", sorted(IMPA_CASES))
def test_impa_bad_input_is_one_line(tmp_path, capsys, case):
    make, needles = IMPA_CASES[case]
    source = make(tmp_path)
    code, out, err = run_main(capsys, "prepare", "bbbc021", str(tmp_path / "out"), "--impa", str(source), "--no-evaluators")
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial build left


def test_existing_output_is_one_line(tmp_path, capsys):
    source = _impa_case(tmp_path, "good")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("")
    code, _, err = run_main(capsys, "prepare", "bbbc021", str(tmp_path / "out"), "--impa", str(source), "--no-evaluators")
    assert_one_line_error(code, err, "out", "already exists and is not empty")


def test_raw_bad_input_is_one_line(tmp_path, capsys):
    _, rows = write_raw(tmp_path / "raw", n_interior=1)
    tiff = tmp_path / "raw" / rows[2]["Image_PathName_Actin"] / rows[2]["Image_FileName_Actin"]
    tiff.write_bytes(tiff.read_bytes()[:5000])
    code, _, err = run_main(capsys, "prepare", "bbbc021", str(tmp_path / "out"), "--raw", str(tmp_path / "raw"),
                            "--no-evaluators")
    assert_one_line_error(code, err, tiff.name, "corrupt or truncated TIFF")
    assert not (tmp_path / "out").exists()


def test_source_options_are_exclusive(tmp_path, capsys):
    for args in ([], ["--impa", str(tmp_path), "--raw", str(tmp_path)]):
        code, _, err = run_main(capsys, "prepare", "bbbc021", str(tmp_path / "out"), *args, "--no-evaluators")
        assert_one_line_error(code, err, "exactly one of --impa DIR or --raw DIR")


def test_unexpected_exception_is_one_line(tmp_path, capsys, monkeypatch):
    from cellfluxrl.data import bbbc021

    def boom(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(bbbc021, "prepare_impa", boom)
    code, _, err = run_main(capsys, "prepare", "bbbc021", str(tmp_path / "out"), "--impa", str(tmp_path), "--no-evaluators")
    assert_one_line_error(code, err, "ZeroDivisionError", "--debug")
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "prepare", "bbbc021", str(tmp_path / "out"), "--impa", str(tmp_path), "--no-evaluators"])


def test_images_survive_the_cli_exactly(tmp_path, capsys):
    from cellfluxrl.data.layout import load_dataset

    rows, images = impa_rows(cells=2, encoding="trt")
    write_impa(tmp_path / "impa", rows, images)
    code, _, _ = run_main(capsys, "prepare", "bbbc021", str(tmp_path / "out"), "--impa", str(tmp_path / "impa"),
                          "--no-evaluators")
    assert code == 0
    ds = load_dataset(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(ds.images), np.stack([images[r["SAMPLE_KEY"]] for r in rows]))


def test_a_mistyped_command_gets_did_you_mean(capsys):
    code, out, err = run_main(capsys, "sampel", "runs/x")
    assert (code, out, visible_lines(err)) == (2, "", ["error: No such command 'sampel'. Did you mean 'sample'?"])
    code, _, err = run_main(capsys, "evalute")
    assert (code, visible_lines(err)) == (2, ["error: No such command 'evalute'. Did you mean 'evaluate'?"])
    code, _, err = run_main(capsys, "zzzz")
    assert (code, visible_lines(err)) == (2, ["error: No such command 'zzzz'."])
    code, _, err = run_main(capsys, "prepare", "synthtic")
    assert code == 2 and "Did you mean 'synthetic'?" in err


def test_a_folder_option_shows_one_metavar_and_can_require_the_folder(tmp_path):
    import click
    from click.testing import CliRunner

    from cellfluxrl.commands.params import Folder

    @click.command()
    @click.argument("dataset", type=Folder("dataset"))
    @click.option("--data", type=Folder("dataset", exists=True))
    def command(dataset, data):
        click.echo(f"{dataset} {data}")

    text = CliRunner().invoke(command, ["--help"]).output
    assert "Usage: command [OPTIONS] DATASET" in text and "--data DIR" in text
    result = CliRunner().invoke(command, ["x", "--data", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and f"{tmp_path / 'nowhere'} does not exist; give a dataset folder" in result.output
    assert CliRunner().invoke(command, ["x", "--data", str(tmp_path)]).output == f"x {tmp_path}\n"


def test_every_folder_option_of_the_cli_shows_dir():
    """One metavar for folders in every command's --help (an option's own metavar, ``--out RUN``, aside)."""
    import importlib

    import click

    from cellfluxrl.commands.params import Folder

    for name, (module, attr, _) in COMMANDS.items():
        command = getattr(importlib.import_module(module), attr)
        for sub in [command, *(command.commands.values() if isinstance(command, click.Group) else [])]:
            with click.Context(sub) as ctx:
                for param in sub.params:
                    if isinstance(param, click.Option) and isinstance(param.type, Folder) and param.metavar is None:
                        assert param.make_metavar(ctx) == "DIR", (name, sub.name, param.name)

"""One vocabulary: the new option names, the old spellings as deprecated aliases (one note each),
and defaults shown one way in every command's --help."""

from __future__ import annotations

import re

import click
import numpy as np
import pytest
from click.testing import CliRunner

from cellfluxrl.cli import COMMANDS, cli
from cellfluxrl.commands.vocabulary import RenamedCommand, positional_indices
from cellfluxrl.config import tomllib
from cellfluxrl.model.pretrain import train
from test_pretrain import MICRO, make_toy_dataset, quick_cfg  # tests/ is on sys.path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    ds = make_toy_dataset(root / "ds", n_test=3)
    train(ds.root, root / "run", quick_cfg(steps=1), unet=MICRO)
    return root


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def notes(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("note: ") and "deprecated" in line]


def test_positional_indices_skip_options_and_their_values():
    arity = {"--steps": 1, "--quick": 0, "--out": 1}
    assert positional_indices(["a", "--steps", "3", "b", "--quick", "--out=x", "c"], arity) == [0, 3, 6]
    assert positional_indices(["--steps", "3", "--", "--weird"], arity) == [3]


def test_pretrain_old_spellings_give_the_same_settings_with_one_note_each(made):
    new = invoke("pretrain", made / "ds", "--out", made / "r", "--train-steps", "3", "--save-every", "2", "--dry-run")
    old = invoke("pretrain", made / "ds", made / "r", "--steps", "3", "--ckpt-every=2", "--dry-run")
    assert new.exit_code == old.exit_code == 0 and notes(new) == []
    assert old.stdout == new.stdout and tomllib.loads(old.stdout)["steps"] == 3
    assert notes(old) == [
        "note: --steps is deprecated in `cellfluxrl pretrain`; use --train-steps (optimizer steps); see docs/cli.md",
        "note: --ckpt-every is deprecated in `cellfluxrl pretrain`; use --save-every; see docs/cli.md",
        f"note: the output as a positional argument ({made / 'r'}) is deprecated in `cellfluxrl pretrain`; "
        f"use --out {made / 'r'}; see docs/cli.md"]


def test_posttrain_steps_is_iterations_and_its_output_is_out(made):
    old = invoke("posttrain", made / "run", made / "rl", "--steps", "7", "--dry-run")
    new = invoke("posttrain", made / "run", "--out", made / "rl", "--iterations", "7", "--dry-run")
    assert old.exit_code == new.exit_code == 0 and old.stdout == new.stdout
    assert tomllib.loads(new.stdout)["steps"] == 7 and len(notes(old)) == 2 and notes(new) == []
    assert "--iterations (RL iterations)" in notes(old)[0]


def test_sample_network_and_its_old_name(made, tmp_path):
    for flag in ("--network", "--weights-from"):
        result = invoke("sample", made / "run", "--n", "1", "--steps", "1", "--device", "cpu", flag, "model",
                        "--out", tmp_path / "s.npz")
        assert result.exit_code == 0, result.output
        saved = np.load(tmp_path / "s.npz")  # the key is meta_network since the sample files' v2 (meta_weights_from before)
        assert str(saved["meta_network" if "meta_network" in saved else "meta_weights_from"]) == "model"
        assert len(notes(result)) == (flag == "--weights-from")


def _rewrite(command, args):
    assert isinstance(command, RenamedCommand)
    with click.Context(command, info_name=command.name) as ctx:
        return command.rewrite(ctx, args)


def test_demo_prepare_and_cellpose_old_spellings_are_rewritten(capsys):
    from cellfluxrl.commands.cellpose_train import cellpose_model
    from cellfluxrl.commands.demo import demo
    from cellfluxrl.commands.prepare import prepare

    assert _rewrite(demo, ["--pretrain-steps", "5", "--posttrain-steps=2"]) == ["--train-steps", "5", "--iterations=2"]
    assert _rewrite(prepare.commands["synthetic"], ["data/s", "--n-images", "300"]) == [
        "--out", "data/s", "--n-images", "300"]
    assert _rewrite(prepare.commands["images"], ["--csv", "f.csv", "d"]) == ["--csv", "f.csv", "--out", "d"]
    assert _rewrite(cellpose_model, ["ds", "models", "--gpu"]) == ["ds", "--out", "models", "--device", "cuda"]
    assert _rewrite(cellpose_model, ["ds", "--out", "m", "--cpu"]) == ["ds", "--out", "m", "--device", "cpu"]
    assert len(capsys.readouterr().err.splitlines()) == 7


def test_every_command_shows_defaults_one_way():
    """Every option with a default shows it as `[default: ...]` (click's show_default, or the same
    words in the help of options whose default is computed)."""
    import importlib

    for name, (module, attr, _) in COMMANDS.items():
        command = getattr(importlib.import_module(module), attr)
        subcommands = command.commands.values() if isinstance(command, click.Group) else [command]
        for sub in subcommands:
            path = [name] if sub is command else [name, sub.name]
            text = invoke(*path, "--help").output
            assert not re.search(r"\(default[: ]", text), (path, text)
            rows = re.split(r"\n  (?=-)", text.split("Options:", 1)[1])  # one help row per option
            for param in sub.params:
                if isinstance(param, click.Option) and not param.hidden and not param.is_flag \
                        and param.default is not None and not param.required:
                    row = next(r for r in rows if r.startswith(param.opts[0]))
                    assert "[default: " in " ".join(row.split()), (path, row)


def test_help_uses_the_new_names():
    for path, present, absent in ((["pretrain"], ["--train-steps", "--save-every", "--out RUN"], ["--ckpt-every"]),
                                  (["posttrain"], ["--iterations", "--out RUN"], ["--steps "]),
                                  (["sample"], ["--network", "--steps", "--best-of"], ["--weights-from"]),
                                  (["demo"], ["--train-steps", "--iterations"], ["--pretrain-steps"]),
                                  (["prepare", "synthetic"], ["--out DIR"], []),
                                  (["prepare", "cellpose-model"], ["--out DIR", "--device"], ["--gpu"])):
        text = invoke(*path, "--help").output
        assert all(word in text for word in present) and not any(word in text for word in absent), (path, text)



def one_line_usage_error(capsys, *args) -> tuple[str, str]:
    """Run ``cellfluxrl.cli.main(ARGS)``; assert exit 2, nothing on stdout, one ``error:`` line; return it and stderr."""
    from test_cli import run_main, visible_lines  # tests/ is on sys.path

    code, out, err = run_main(capsys, *map(str, args))
    lines = visible_lines(err)
    assert code == 2 and out == "" and len(lines) == 1, err
    return lines[0], err


def test_two_spellings_of_one_option_with_different_values_are_a_usage_error(made, tmp_path, capsys):
    line, err = one_line_usage_error(capsys, "pretrain", made / "ds", "--out", tmp_path / "r", "--steps", "5",
                                     "--train-steps", "7", "--dry-run")
    assert line == ("error: --steps 5 and --train-steps 7 set one option twice with different values (--steps: the "
                    "deprecated spelling of --train-steps); give --train-steps once (see 'cellfluxrl pretrain --help')")
    assert "note:" not in err
    same = invoke("pretrain", made / "ds", "--out", tmp_path / "r", "--steps=5", "--train-steps", "05", "--dry-run")
    assert same.exit_code == 0 and tomllib.loads(same.stdout)["steps"] == 5 and len(notes(same)) == 1
    line, _ = one_line_usage_error(capsys, "prepare", "cellpose-model", tmp_path / "ds", "--out", tmp_path / "m",
                                   "--gpu", "--device", "cpu")
    assert line.startswith("error: --gpu and --device cpu set one option twice with different values (--gpu: the "
                           "deprecated spelling of --device); give --device once")
    assert list(tmp_path.iterdir()) == []


def test_a_positional_output_beside_another_out_is_a_usage_error(made, tmp_path, capsys):
    line, err = one_line_usage_error(capsys, "pretrain", made / "ds", tmp_path / "C", "--out", tmp_path / "D", "--dry-run")
    assert line == (f"error: the output is given twice: {tmp_path / 'C'} (as a positional argument, the deprecated "
                    f"spelling) and --out {tmp_path / 'D'}; give --out once (see 'cellfluxrl pretrain --help')")
    assert "note:" not in err
    same = invoke("pretrain", made / "ds", tmp_path / "C", "--out", f"{tmp_path / 'C'}/", "--dry-run")
    assert same.exit_code == 0 and len(notes(same)) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_option_is_named_not_taken_for_a_positional_output(tmp_path, capsys):
    from cellfluxrl.commands.prepare import prepare

    line, err = one_line_usage_error(capsys, "prepare", "synthetic", "--out", tmp_path / "zz", "--device", "cpu")
    assert line == "error: No such option '--device'. (see 'cellfluxrl prepare synthetic --help')" or \
        line.startswith("error: No such option: --device"), line
    assert "note:" not in err
    assert _rewrite(prepare.commands["synthetic"], ["--out", "zz", "--device", "cpu"]) == ["--out", "zz", "--device", "cpu"]
    assert list(tmp_path.iterdir()) == []

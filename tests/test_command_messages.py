"""Small messages of the commands: what posttrain says it wrote, counts in agreement, evaluate's
estimate on a dataset without held-out compounds, the help of evaluate's KID options."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from test_pretrain import MICRO, make_toy_dataset, quick_cfg  # shared toy data (tests/ is on sys.path)


def test_count_agrees_with_its_number():
    from cellfluxrl.commands.wording import count

    assert [count(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert count(1, "class", "classes") == "1 class" and count(3, "class", "classes") == "3 classes"


def test_posttrain_names_only_what_its_run_folder_holds(tmp_path):
    from cellfluxrl.commands.posttrain import written_line

    for name in ("config.json", "stats.jsonl", "checkpoint.pt"):
        (tmp_path / name).write_text("x")
    assert written_line(tmp_path) == f"posttrain run written to {tmp_path} (config.json, stats.jsonl, checkpoint.pt)"
    (tmp_path / "samples").mkdir()  # --grid-every N > 0 writes sample grids there
    assert written_line(tmp_path).endswith("(config.json, stats.jsonl, checkpoint.pt, samples/)")


def test_posttrain_says_one_remaining_iteration_in_the_singular():
    from cellfluxrl.commands.posttrain import first_iteration_line

    assert first_iteration_line(1, 2, 16.0) == ("posttrain: iteration 1 took 16 s (start-up included); the 1 "
                                                "remaining iteration needs at most about 16 s at this speed")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from cellfluxrl.model.pretrain import train

    root = tmp_path_factory.mktemp("messages")
    ds = make_toy_dataset(root / "ds", n_test=3)  # no held-out (OOD) compounds
    train(ds.root, root / "run", quick_cfg(steps=1, sample_steps=2), unet=MICRO)
    return ds, root / "run"


def test_evaluate_estimates_one_section_when_the_dataset_has_no_held_out_compounds(toy_run, tmp_path, capsys,
                                                                                   monkeypatch):
    import cellfluxrl.evaluation.pipeline
    from cellfluxrl.errors import CellfluxError
    from test_cli import run_main

    ds, run = toy_run

    def first_batch_then_stop(*args, on_progress=None, **kwargs):
        on_progress("id", 4, 4)
        raise CellfluxError("stopped after the first batch")

    monkeypatch.setattr(cellfluxrl.evaluation.pipeline, "evaluate", first_batch_then_stop)
    code, _, err = run_main(capsys, "evaluate", str(run), "--data", str(ds.root), "--out", str(tmp_path / "e"),
                            "--n", "4", "--best-of", "1", "--device", "cpu")  # --split both, the default
    assert code == 1 and err.splitlines()[-1] == "error: stopped after the first batch"
    line = next(line for line in err.splitlines() if line.startswith("evaluate: the first"))
    assert "the evaluation (4 pairs) needs at most" in line and "both sections" not in line
    assert "  run (pretrain): 4 images, about 32 network evaluations" in err.splitlines()


def test_evaluate_kid_options_have_help():
    from cellfluxrl.cli import cli

    text = CliRunner().invoke(cli, ["evaluate", "--help"], terminal_width=200).output
    assert "--kid-subset-size M" in text and "Images per KID subset" in text
    assert "--kid-subsets S" in text and "Number of random KID subsets averaged" in text

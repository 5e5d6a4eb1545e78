"""`prepare` run again resumes: a kill during the evaluators loses only the file being fitted."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bbbc021 import impa_rows, write_impa  # noqa: E402
from test_cli import assert_one_line_error, run_main  # noqa: E402

OPTIONS = ["--n-images", "300", "--size", "32", "--plates", "2"]
FILES = ("reference_stats.json", "moa_classifier.pt", "judge.pt", "classifier.json")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fits(monkeypatch):
    """One epoch per MoA classifier; records the file of every classifier fit and every reference fit."""
    import cellfluxrl.rewards.moa_classifier as mc
    from cellfluxrl.rewards import evaluators_fit as evaluators

    monkeypatch.setattr(mc, "default_epochs", lambda n, batch_size: 1)
    calls: list[str] = []
    fit_one, fit_reference = evaluators._fit_one, evaluators.fit_reference

    def counted_fit_one(*args, path, **kwargs):
        calls.append(path.name)
        return fit_one(*args, path=path, **kwargs)

    def counted_fit_reference(*args, **kwargs):
        calls.append("reference_stats.json")
        return fit_reference(*args, **kwargs)

    monkeypatch.setattr(evaluators, "_fit_one", counted_fit_one)
    monkeypatch.setattr(evaluators, "fit_reference", counted_fit_reference)
    return calls


def test_killed_during_the_judge_then_resumed(tmp_path, capsys, monkeypatch, fits):
    """Killed while fitting the judge: the folder has a dataset, a reference and the reward classifier.
    The same command fits only the judge and classifier.json; the kept files are untouched."""
    from cellfluxrl.rewards import evaluators_fit as evaluators
    from cellfluxrl.rewards.evaluators import load_evaluators

    out = tmp_path / "ds"
    fit_one = evaluators._fit_one

    def killed_at_the_judge(*args, path, **kwargs):
        if path.name == "judge.pt":
            raise KeyboardInterrupt  # what a kill (Ctrl-C) raises
        return fit_one(*args, path=path, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(evaluators, "_fit_one", killed_at_the_judge)
        code, _, err = run_main(capsys, "prepare", "synthetic", str(out), *OPTIONS)
    assert code == 130, err
    present = sorted(p.name for p in (out / "evaluators").iterdir() if not p.name.startswith("."))
    assert present == ["moa_classifier.pt", "reference_stats.json"]
    kept = {name: _digest(out / "evaluators" / name) for name in present}
    images = _digest(out / "images.npy")
    fits.clear()

    code, stdout, err = run_main(capsys, "prepare", "synthetic", str(out), *OPTIONS)
    assert code == 0, err
    assert "resuming" in err and "fitting the missing evaluators (judge.pt, classifier.json)" in err
    assert fits == ["judge.pt"]
    assert {name: _digest(out / "evaluators" / name) for name in present} == kept
    assert _digest(out / "images.npy") == images
    report = json.loads((out / "evaluators" / "classifier.json").read_text())
    assert report["seed"] == 0 and report["judge"]["seed"] == 1000 and report["judge"]["n_train"] > 0
    assert "judge: test accuracy" in stdout
    load_evaluators(out).judge("cpu")

    fits.clear()  # a finished folder: nothing left to do, nothing refitted
    code, stdout, err = run_main(capsys, "prepare", "synthetic", str(out), *OPTIONS)
    assert code == 0 and "nothing left to do" in err and fits == [] and "MoA classifier: test accuracy" in stdout

    (out / "evaluators" / "moa_classifier.pt").unlink()  # the kill of issue 13: no classifier
    judge = _digest(out / "evaluators" / "judge.pt")
    code, _, err = run_main(capsys, "prepare", "synthetic", str(out), *OPTIONS)
    assert code == 0 and fits == ["moa_classifier.pt"], err
    assert _digest(out / "evaluators" / "judge.pt") == judge
    assert all((out / "evaluators" / name).is_file() for name in FILES)


def test_other_settings_are_refused_in_one_line(tmp_path, capsys, fits):
    out = tmp_path / "ds"
    code, _, err = run_main(capsys, "prepare", "synthetic", str(out), *OPTIONS, "--no-evaluators")
    assert code == 0, err
    code, _, err = run_main(capsys, "prepare", "synthetic", str(out), *OPTIONS, "--seed", "1", "--no-evaluators")
    assert_one_line_error(code, err, str(out), "already prepared with seed 0, not 1", "choose a new folder")
    code, _, err = run_main(capsys, "prepare", "synthetic", str(out), "--n-images", "400", "--size", "32",
                            "--plates", "2", "--no-evaluators")
    assert_one_line_error(code, err, "n_images 300, not 400")
    code, _, err = run_main(capsys, "prepare", "bbbc021", str(out), "--impa", str(tmp_path), "--no-evaluators")
    assert_one_line_error(code, err, 'source "synthetic", not "bbbc021-impa"')
    assert fits == []

    # The evaluators: a reference measured with another segmenter, a classifier fitted with another seed.
    code, _, err = run_main(capsys, "prepare", "synthetic", str(out), *OPTIONS)
    assert code == 0, err
    code, _, err = run_main(capsys, "prepare", "synthetic", str(out), *OPTIONS, "--segmenter", "cellpose")
    assert_one_line_error(code, err, "reference_stats.json: measured with segmenter name \"classical\", not "
                                     "\"cellpose\"", "rewards fit DATASET --segmenter cellpose")
    from cellfluxrl.errors import CellfluxError
    from cellfluxrl.rewards.evaluators_fit import fit_evaluators

    with pytest.raises(CellfluxError, match=r"moa_classifier.pt: fitted with --seed 0, not 5; re-run with --seed 0"):
        fit_evaluators(out, seed=5, progress=False, resume=True)  # (bbbc021's --seed is only the classifiers')
    (out / "evaluators" / "reference_stats.json").unlink()
    fits.clear()
    fit_evaluators(out, seed=0, progress=False, resume=True)
    assert fits == ["reference_stats.json"]


def test_impa_resumes_and_refuses_another_source_folder(tmp_path, capsys):
    rows, images = impa_rows(cells=2, encoding="trt")
    write_impa(tmp_path / "impa", rows, images)
    write_impa(tmp_path / "other", rows, images)
    args = ["prepare", "bbbc021", str(tmp_path / "out"), "--no-evaluators"]
    assert run_main(capsys, *args, "--impa", str(tmp_path / "impa"))[0] == 0
    code, stdout, err = run_main(capsys, *args, "--impa", str(tmp_path / "impa"))
    assert code == 0 and "nothing left to do" in err and "bbbc021-impa" in stdout
    code, _, err = run_main(capsys, *args, "--impa", str(tmp_path / "other"))
    assert_one_line_error(code, err, "already prepared with impa_dir", str((tmp_path / "other").resolve()))


def test_a_folder_that_is_not_a_dataset_is_still_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code, _, err = run_main(capsys, "prepare", "synthetic", str(tmp_path / "out"), *OPTIONS, "--no-evaluators")
    assert_one_line_error(code, err, "already exists and is not empty", "no meta.json")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"

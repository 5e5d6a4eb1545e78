"""Every `prepare` subcommand and `rewards fit` check their inputs first, then hold the dataset's lock
and handle SIGINT/SIGTERM; `rewards fit` changes nothing unless it succeeds; evaluator fingerprints
ignore timings (issue 29 items 4, 6, 7 and 16)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cellfluxrl.rundir import lock_path
from test_cli import assert_one_line_error, run_main, visible_lines
from test_prepare_images import ready_cut_crops

ROOT = Path(__file__).resolve().parents[1]


def crops_csv(folder: Path) -> Path:
    """Eight ready-cut 32 px crops on two plates (DMSO and taxol), as `prepare images` takes them."""
    folder.mkdir(parents=True)
    ready_cut_crops(folder)
    return folder / "crops.csv"


def _holder(folder: Path) -> subprocess.Popen:
    """A real second process holding ``folder``'s lock (as a concurrent `prepare` would)."""
    code = (f"import time; from cellfluxrl.rundir import acquire; acquire({str(folder)!r}, 'prepare'); "
            f"print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _sigterm_inside(*args, **kwargs):
    """Stands in for the evaluator fit: the command must have a SIGTERM handler installed by now."""
    assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None), "no SIGTERM handler"
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM did not interrupt")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 100-image synthetic dataset with no evaluators (about a second)."""
    from cellfluxrl.data.synthetic import prepare_synthetic

    return prepare_synthetic(tmp_path_factory.mktemp("tiny") / "ds", n_images=100, size=32, n_plates=2,
                             progress=False)


# ---------------------------------------------------------------------------------------------- 4

def test_prepare_images_is_refused_while_another_prepare_holds_the_folder(tmp_path, capsys):
    path = crops_csv(tmp_path / "in")
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        code, _, err = run_main(capsys, "prepare", "images", "--out", str(out), "--csv", str(path), "--size", "32",
                                "--no-evaluators")
    finally:
        holder.kill()
        holder.wait()
    assert_one_line_error(code, err, str(out), f"PID {holder.pid}", "in use by prepare")
    assert not out.exists()


def test_prepare_cellpose_model_is_refused_while_another_prepare_holds_the_folder(tmp_path, capsys):
    """Every prepare subcommand takes the output folder's lock: cellpose-model too (issue 29 item 4)."""
    out = tmp_path / "models"
    holder = _holder(out)
    try:
        code, _, err = run_main(capsys, "prepare", "cellpose-model", str(tmp_path), "--out", str(out),
                                "--target", "nuclei", "--device", "cpu")
    finally:
        holder.kill()
        holder.wait()
    assert_one_line_error(code, err, str(out), f"PID {holder.pid}", "in use by prepare")
    assert not out.exists()


def test_prepare_images_sigterm_while_fitting_says_what_was_kept(tmp_path, capsys, monkeypatch):
    import cellfluxrl.rewards.evaluators_fit as evaluators_fit

    path = crops_csv(tmp_path / "in")
    out = tmp_path / "out"
    monkeypatch.setattr(evaluators_fit, "fit_evaluators", _sigterm_inside)
    code, _, err = run_main(capsys, "prepare", "images", "--out", str(out), "--csv", str(path), "--size", "32")
    assert code == 143, err
    assert visible_lines(err)[-1] == (f"prepare stopped by SIGTERM while fitting the evaluators: the dataset {out} is "
                                      f"kept, with no evaluator files yet; run the same command to fit the rest")
    assert (out / "meta.json").is_file() and not lock_path(out).exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the command


# ---------------------------------------------------------------------------------------------- 7 + 16

def test_prepare_images_checks_size_and_resize_options_up_front(tmp_path, capsys):
    path = crops_csv(tmp_path / "in")
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "prepare", "images", "--out", str(out), "--csv", str(path), "--size", "34")
    lines = visible_lines(err)  # a usage error: exit 2, one line
    assert code == 2 and len(lines) == 1 and all(n in lines[0] for n in ("--size 34", "multiple of 4", "32, 36")), err
    code, _, err = run_main(capsys, "prepare", "images", "--out", str(out), "--csv", str(path), "--size", "16")
    assert code == 2 and "--size" in err and "16 is not in the range x>=32" in err, err
    code, _, err = run_main(capsys, "prepare", "images", "--out", str(out), "--csv", str(path), "--pixel-size", "0.3",
                            "--scale", "0.5")
    assert code == 2 and "give --pixel-size or --scale, not both" in err and "Traceback" not in err, err
    assert not out.exists() and not lock_path(out).exists()


def test_prepare_help_texts(capsys):
    code, out, _ = run_main(capsys, "prepare", "synthetic", "--help")
    seed = out[out.index("--seed"):]
    assert code == 0 and "Seed of the simulator" in seed.split("--size")[0]
    code, out, _ = run_main(capsys, "prepare", "images", "--help")
    assert code == 0 and "multiple of 4, at least 32" in " ".join(out.split()) and "docs/data.md" in out


# ---------------------------------------------------------------------------------------------- 4 + 6: rewards fit

def _with_evaluators(tiny: Path, folder: Path) -> tuple[Path, dict[str, bytes]]:
    """A copy of the tiny dataset with (stand-in) evaluator files; returns it and their bytes."""
    data = folder / "ds"
    shutil.copytree(tiny, data)
    (data / "evaluators").mkdir()
    files = {"reference_stats.json": b'{"format": "old", "seconds": 1.5}\n', "moa_classifier.pt": b"old weights"}
    for name, content in files.items():
        (data / "evaluators" / name).write_bytes(content)
    return data, files


def _unchanged(data: Path, files: dict[str, bytes]) -> None:
    assert sorted(p.name for p in (data / "evaluators").iterdir()) == sorted(files)
    assert {name: (data / "evaluators" / name).read_bytes() for name in files} == files
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(".")) == []  # no staging folder left
    assert not lock_path(data).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_rewards_fit_on_an_absent_gpu_fails_before_writing(tiny, tmp_path, capsys):
    data, files = _with_evaluators(tiny, tmp_path)
    code, _, err = run_main(capsys, "rewards", "fit", str(data), "--device", "gpu")
    lines = visible_lines(err)  # refused by --device's check (exit 2) or the resolver (exit 1): before any write
    assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("error: ") and "cuda" in lines[0].lower(), err
    _unchanged(data, files)


def test_rewards_fit_failing_midway_leaves_the_evaluators_as_they_were(tiny, tmp_path, capsys, monkeypatch):
    import cellfluxrl.rewards.evaluators_fit as evaluators_fit
    from cellfluxrl.errors import CellfluxError

    data, files = _with_evaluators(tiny, tmp_path)
    fitted = []

    def reference_then_fail(*args, path, **kwargs):
        fitted.extend(p.name for p in path.parent.iterdir())
        raise CellfluxError("the classifier failed")

    monkeypatch.setattr(evaluators_fit, "_fit_one", reference_then_fail)
    code, _, err = run_main(capsys, "rewards", "fit", str(data), "--device", "cpu")
    assert_one_line_error(code, err, "the classifier failed")
    assert fitted == ["reference_stats.json"]  # the reference was fitted (in the staging folder) ...
    _unchanged(data, files)  # ... and replaced nothing

    monkeypatch.setattr(evaluators_fit, "_fit_one", _sigterm_inside)
    code, _, err = run_main(capsys, "rewards", "fit", str(data), "--device", "cpu")
    assert code == 143 and visible_lines(err)[-1].startswith(
        f"rewards fit stopped by SIGTERM: {data / 'evaluators'} is as it was"), err
    _unchanged(data, files)

    holder = _holder(data)
    try:
        code, _, err = run_main(capsys, "rewards", "fit", str(data), "--device", "cpu")
    finally:
        holder.kill()
        holder.wait()
    assert_one_line_error(code, err, str(data), f"PID {holder.pid}")
    assert {name: (data / "evaluators" / name).read_bytes() for name in files} == files


# ---------------------------------------------------------------------------------------------- 6: fingerprints

def test_evaluator_fingerprints_ignore_timings_but_see_content(tmp_path):
    from cellfluxrl.provenance import evaluator_digests, file_digest, reference_changes

    folder = tmp_path / "evaluators"
    folder.mkdir()
    reference = {"format": "cellfluxrl-reference-stats/1", "seconds": 1.25, "moas": {"DMSO": {"nuc_size": [1.0, 2.0]}}}
    info = {"seed": 0, "epochs": 3, "seconds": 40.2, "test_accuracy": 0.9}
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}

    def write(ref: dict, inf: dict, weights: dict) -> dict[str, str]:
        (folder / "reference_stats.json").write_text(json.dumps(ref, indent=2))
        torch.save({"format": "x", "state_dict": weights, "info": inf}, folder / "moa_classifier.pt")
        (folder / "notes.bin").write_bytes(b"raw")
        return evaluator_digests(tmp_path)

    first = write(reference, info, state)
    assert first["reference_stats.json"].startswith("content-sha256:") and first["notes.bin"].startswith("sha256:")
    retimed = write({**reference, "seconds": 9.5}, {**info, "seconds": 3.0}, state)
    assert retimed == first  # a re-fit that only took another time keeps its fingerprint
    assert reference_changes({"evaluators": first}, {"evaluators": retimed}, tmp_path) == []
    other_stats = write({**reference, "moas": {"DMSO": {"nuc_size": [1.0, 2.5]}}}, info, state)
    other_weights = write(reference, info, {"w": state["w"] + 1})
    other_seed = write(reference, {**info, "seed": 1}, state)
    for changed, name in ((other_stats, "reference_stats.json"), (other_weights, "moa_classifier.pt"),
                          (other_seed, "moa_classifier.pt")):
        assert changed[name] != first[name]
        assert [c.split(" (")[0] for c in reference_changes({"evaluators": first}, {"evaluators": changed}, tmp_path)] \
            == [f"{folder / name} changed"]

    # A fingerprint stored by an older version (bytes digests) is compared with the file's bytes.
    write(reference, info, state)
    old = {name: file_digest(folder / name) for name in first}
    current = evaluator_digests(tmp_path)
    assert reference_changes({"evaluators": old}, {"evaluators": current}, tmp_path) == []
    write({**reference, "seconds": 2.0}, info, state)
    assert [c.split(" (")[0] for c in reference_changes({"evaluators": old}, {"evaluators": evaluator_digests(tmp_path)},
                                                        tmp_path)] == [f"{folder / 'reference_stats.json'} changed"]

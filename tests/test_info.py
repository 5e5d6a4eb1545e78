"""`cellfluxrl info PATH [--json]` on everything the project writes (dataset, run, checkpoint, stats, samples,
sample export, evaluate folder and report, evaluator files, demo folder); `sample --data DIR` for a moved dataset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from cellfluxrl.cli import cli
from cellfluxrl.model.pretrain import train
from test_pretrain import MICRO, make_toy_dataset, quick_cfg  # shared toy data (tests/ is on sys.path)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    ds = make_toy_dataset(root / "ds", n_test=3)
    train(ds.root, root / "run", quick_cfg(steps=2, lr=1e-2, sample_steps=3, sample_cfg_scale=0.5), unet=MICRO)
    out = root / "s.npz"
    result = CliRunner().invoke(cli, ["sample", str(root / "run"), "--n", "3", "--steps", "2", "--device", "cpu",
                                      "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return ds, root / "run", out


def _info(*args):
    result = CliRunner().invoke(cli, ["info", *map(str, args)])
    return result


def test_info_dataset_text_and_json(made):
    ds, _, _ = made
    text = _info(ds.root)
    assert text.exit_code == 0, text.output
    assert text.output.splitlines()[0] == f"{ds.root}: dataset"
    assert "images: 66 of 16x16x3 (actin, tubulin, dna)" in text.output
    data = json.loads(_info(ds.root, "--json").output)
    assert data["what"] == "dataset" and data["images"] == len(ds) == 66
    assert data["counts"] == ds.meta["counts"] and data["plates"] == len(set(ds.table["batch"]))
    treated = ds.table["state"] == "treated"
    assert data["compounds"] == {c: int(np.sum(ds.table["compound"][treated] == c))
                                 for c in sorted(set(ds.table["compound"][treated]))}


def test_info_run_reports_command_steps_seed_and_sampling(made):
    _, run, _ = made
    data = json.loads(_info(run, "--json").output)
    assert data["what"] == "run" and data["command"] == "cellfluxrl pretrain"
    assert data["steps_done"] == 2 and data["steps_planned"] == 2 and data["seed"] == 3
    assert data["sampling"]["steps"] == 3 and data["sampling"]["cfg_scale"] == 0.5
    assert data["parameters"] > 0 and data["dataset_exists"] is True
    import cellfluxrl

    assert data["cellfluxrl_version"] == cellfluxrl.__version__
    text = _info(run).output
    assert "steps done: 2 of 2" in text and "made by: cellfluxrl pretrain" in text


def test_info_samples_reads_the_npz(made):
    _, _, out = made
    data = json.loads(_info(out, "--json").output)
    npz = np.load(out)
    assert data["what"] == "samples" and data["images"] == 3 and data["image_shape"] == [16, 16, 3]
    assert sum(data["compounds"].values()) == 3
    assert data["recorded"]["num_steps"] == 2 and data["recorded"]["kind"] == "pretrain"
    assert set(data["compounds"]) == set(npz["compound"])


def test_info_refuses_what_it_cannot_describe_in_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other.pt").write_bytes(b"not a torch file")
    for path, words in ((tmp_path / "notes.txt", "is a file that cellfluxrl did not write"),
                        (tmp_path / "empty", "is a folder but none that cellfluxrl writes"),
                        (tmp_path / "other.pt", "other.pt: not a readable cellfluxrl checkpoint"),
                        (tmp_path / "none", "does not exist")):
        result = _info(path)
        assert result.exit_code != 0 and words in str(result.exception)
        assert "\n" not in str(result.exception)


def test_sample_data_dir_for_a_run_whose_dataset_moved(made, tmp_path):
    ds, run, _ = made
    moved = tmp_path / "moved"
    shutil.copytree(run, tmp_path / "run")
    shutil.move(str(ds.root), moved)
    try:
        gone = CliRunner().invoke(cli, ["sample", str(tmp_path / "run"), "--n", "2", "--steps", "2",
                                        "--device", "cpu", "--out", str(tmp_path / "a.npz")])
        assert gone.exit_code == 1 and "give its new place with --data DIR" in str(gone.exception)
        ok = CliRunner().invoke(cli, ["sample", str(tmp_path / "run"), "--n", "2", "--steps", "2", "--device", "cpu",
                                      "--data", str(moved), "--out", str(tmp_path / "a.npz")])
        assert ok.exit_code == 0, ok.output
        assert str(np.load(tmp_path / "a.npz")["meta_dataset"]) == str(moved)
        assert "(gone); sampling" in ok.stderr
        wrong = CliRunner().invoke(cli, ["sample", str(tmp_path / "run"), "--n", "2", "--device", "cpu",
                                         "--data", str(tmp_path / "a.npz"), "--out", str(tmp_path / "b.npz")])
        assert wrong.exit_code == 2 and "is a file; give a dataset folder" in wrong.output
    finally:
        shutil.move(str(moved), ds.root)


# ------------------------------------------------------------------------------------------ every file written

def _json(path) -> dict:
    result = _info(path, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_info_reads_a_checkpoint_the_stats_and_every_file_of_a_run_and_a_dataset(made):
    ds, run, out = made
    checkpoint = _json(run / "checkpoint.pt")
    assert checkpoint["what"] == "checkpoint" and checkpoint["steps_done"] == 2 and checkpoint["seed"] == 3
    assert checkpoint["command"] == "cellfluxrl pretrain" and checkpoint["sampling"]["steps"] == 3
    stats = _json(run / "stats.jsonl")
    assert (stats["what"], stats["records"], stats["first_step"], stats["last_step"]) == ("stats", 2, 1, 2)
    assert stats["last"]["step"] == 2 and "loss" in stats["keys"]
    assert "  2 records, steps 1-2" in _info(run / "stats.jsonl").output
    for path, kind, whole in ((run / "config.json", "run", run), (ds.root / "metadata.csv", "dataset", ds.root),
                              (ds.root / "images.npy", "dataset", ds.root), (out.with_suffix(".png"), "samples", out)):
        data = _json(path)
        assert data["what"] == "file" and data["part_of"]["what"] == kind and data["part_of"]["path"] == str(whole)
    text = _info(ds.root / "metadata.csv").output.splitlines()
    assert text[0] == f"{ds.root / 'metadata.csv'}: file of the dataset {ds.root}" and text[1] == f"{ds.root}: dataset"


def test_info_reads_a_sample_export_folder_and_its_samples_csv(made, tmp_path):
    _, run, _ = made
    folder = tmp_path / "e"
    result = CliRunner().invoke(cli, ["sample", str(run), "--n", "3", "--steps", "2", "--device", "cpu",
                                      "--format", "png", "--out", str(folder)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = _json(folder)
    assert data["what"] == "sample images" and data["rows"] == 3 and data["files"] == 3
    assert data["formats"] == {"png": 3} and data["npz"] == str(folder / "samples.npz") and data["missing_files"] == []
    assert _json(folder / "samples.npz")["what"] == "samples"
    assert _json(folder / "grid.png")["part_of"]["what"] == "sample images"
    assert sum(data["compounds"].values()) == 3
    assert _json(folder / "samples.csv")["path"] == str(folder / "samples.csv")  # samples.csv: read on its own
    assert _json(folder / "samples.csv")["what"] == "file"
    assert "samples.csv: 3 rows; image files: 3 .png" in _info(folder).output


def _report(folder, accepted=()):
    """A minimal report.json as `evaluate` writes it (two columns, one section), with report.md and a figure."""
    cell = {"mean": 0.5, "sem": 0.1, "sem_compound": 0.2}
    section = {"split": "id", "n_pairs": 1, "n_conditions": 1, "columns": ["base", "real"],
               "rows": ["overall", "moa_accuracy"], "labels": {},
               "table": {"base": {"overall": cell, "moa_accuracy": {"mean": 0.25}},
                         "real": {"overall": {"mean": 0.75}, "moa_accuracy": {"mean": 1.0}}}}
    settings = {"dataset": "/data/x", "runs": [{"name": "base", "path": "/runs/base", "kind": "pretrain", "step": 9}],
                "n": 1, "split": "both", "seed": 4, "best_of": [1, 2], "weights": {"moa": 5.0},
                "sampling": {"text": "3 Heun steps", "reason": "recorded"},
                "fingerprints": {"accepted_reference_changes": list(accepted)}}
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"format": "cellfluxrl-evaluate/2", "settings": settings,
                                                    "sections": {"id": section}, "versions": {"cellfluxrl": "0.2.0"}}))
    (folder / "report.md").write_text("# Evaluation\n")
    (folder / "fig5_best_of_n.png").write_bytes(b"\x89PNG")
    return folder


def test_info_reads_an_evaluate_folder_its_report_and_the_changes_it_accepted(tmp_path):
    folder = _report(tmp_path / "eval", accepted=["run /runs/rl: evaluator judge.pt changed"])
    data = _json(folder)
    assert data["what"] == "evaluation" and data["seed"] == 4 and data["runs"][0]["name"] == "base"
    assert data["sections"]["id"]["overall"] == {"base": 0.5, "real": 0.75}
    assert data["sections"]["id"]["moa_accuracy"] == {"base": 0.25, "real": 1.0}
    assert data["files"] == ["fig5_best_of_n.png", "report.json", "report.md"]
    assert data["accepted_reference_changes"] == ["run /runs/rl: evaluator judge.pt changed"]
    report = _json(folder / "report.json")
    assert report["what"] == "report" and report["sections"] == data["sections"]
    for name in ("report.md", "fig5_best_of_n.png"):
        assert _json(folder / name)["part_of"]["what"] == "evaluation"
    text = _info(folder).output
    assert "  section id: 1 test pair, 1 compound" in text and "    overall: base 0.500, real 0.750" in text
    assert "accepted reference change (--allow-changed-reference): run /runs/rl: evaluator judge.pt changed" in text
    (folder / "report.json").write_text("{}")
    bad = _info(folder / "report.json")
    assert bad.exit_code == 1 and "not a cellfluxrl report" in str(bad.exception)


def test_info_shows_a_resume_made_with_allow_changed_reference(tmp_path):
    import torch

    from cellfluxrl.checkpoint import save_checkpoint

    config = {"kind": "posttrain", "dataset": str(tmp_path / "gone"), "base_run": "/runs/base",
              "posttrain": {"steps": 5, "seed": 7}, "reward_weights": {"moa": 2.0}}
    changes = [{"step": 3, "changes": ["evaluator moa_classifier.pt changed"]}]
    (tmp_path / "rl").mkdir()
    save_checkpoint(tmp_path / "rl" / "checkpoint.pt", {"kind": "posttrain", "step": 4, "config": config,
                                                        "model": {"w": torch.zeros(3)}, "reference_changes": changes})
    data = _json(tmp_path / "rl")
    assert data["what"] == "run" and data["steps_done"] == 4 and data["reference_changes"] == changes
    assert _json(tmp_path / "rl" / "checkpoint.pt")["reference_changes"] == changes
    text = _info(tmp_path / "rl").output
    assert ("  resumed against a changed reference (--allow-changed-reference) at step 3: evaluator "
            "moa_classifier.pt changed") in text
    save_checkpoint(tmp_path / "rl" / "checkpoint.pt", {"kind": "posttrain", "step": 4, "config": config,
                                                        "model": {"w": torch.zeros(3)}, "reference_changes": []})
    assert "  reference: unchanged since the run started" in _info(tmp_path / "rl").output


def test_info_reads_the_evaluator_files_of_a_dataset(tmp_path):
    from cellfluxrl.rewards.moa_classifier import MoAClassifier, save_moa_classifier

    folder = tmp_path / "evaluators"
    folder.mkdir()
    (folder / "reference_stats.json").write_text(json.dumps(
        {"format": "cellfluxrl-reference-stats/1", "split": "train", "n_images": 40, "excluded": "OOD compounds",
         "stats": ["nuc_size"], "segmenter": {"name": "classical"},
         "moas": {"Actin disruptors": {"n": 30, "mean": {}, "std": {}}, "treated": {"n": 40}}}))
    facts = {"n_classes": 2, "n_train": 20, "n_test": 10, "test_accuracy": 0.9, "epochs": 2, "seed": 0}
    (folder / "classifier.json").write_text(json.dumps({**facts, "judge": {**facts, "seed": 1000}, "halves": "by plate"}))
    model = MoAClassifier(n_classes=2, widths=(4, 4, 4), classes=("a", "b"))
    save_moa_classifier(model, folder / "judge.pt", info=facts)
    reference = _json(folder / "reference_stats.json")
    assert reference["what"] == "reference statistics" and reference["moas"] == {"Actin disruptors": 30, "treated": 40}
    report = _json(folder / "classifier.json")
    assert report["judge"]["seed"] == 1000 and report["reward_classifier"]["test_accuracy"] == 0.9
    judge = _json(folder / "judge.pt")
    assert judge["what"] == "MoA classifier" and judge["classes"] == ["a", "b"] and judge["n_train"] == 20
    assert judge["parameters"] == sum(p.numel() for p in model.state_dict().values())
    assert "test accuracy 0.900 on 10 images" in _info(folder / "judge.pt").output


def test_info_reads_a_demo_folder(made, tmp_path):
    _, run, _ = made
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.json").write_text(json.dumps({"n_images": 300, "seed": 0}))
    shutil.copytree(run, demo / "base")
    data = _json(demo)
    assert data["what"] == "demo" and data["settings"] == {"n_images": 300, "seed": 0}
    assert data["stages"] == {"data": False, "base": True, "rl": False, "eval": False}
    assert "stages done: base/; to do: data/, rl/, eval/" in _info(demo).output
    assert _json(demo / "demo.json")["part_of"]["what"] == "demo"

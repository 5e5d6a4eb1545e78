"""Files the project did not write are foreign whatever their name (issue 29 item 3): run folders and
report folders recognise their own ``stats.jsonl``, ``config.json``, ``checkpoint.pt``, ``samples/``
and ``report.md`` by content, not by name."""

from __future__ import annotations

import json

import pytest
import torch

from cellfluxrl.errors import CellfluxError
from cellfluxrl.model.pretrain import train
from cellfluxrl.rundir import check_owned, check_run_folder
from cellfluxrl.rundir.owned import checkpoint_problem, stats_problem
from test_pretrain import MICRO, make_toy_dataset, quick_cfg  # shared toy data (tests/ is on sys.path)

POSTTRAIN_NAMES = ("checkpoint.pt", "config.json", "stats.jsonl", "samples")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ownership")
    ds = make_toy_dataset(root / "ds", n_test=3)
    train(ds.root, root / "run", quick_cfg(steps=2), unet=MICRO)
    return ds, root / "run"


def test_pretrain_refuses_a_folder_holding_only_a_users_stats_jsonl(toy_run, tmp_path):
    ds, _ = toy_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "stats.jsonl").write_text('{"epoch": 1, "acc": 0.5}\n')
    with pytest.raises(CellfluxError) as exc:
        train(ds.root, mine, quick_cfg(steps=1), unet=MICRO)
    assert str(exc.value) == (f"run folder {mine} holds stats.jsonl, which pretrain did not write (line 1 is not a "
                              f"cellfluxrl stats record); choose a new or empty folder")
    assert sorted(p.name for p in mine.iterdir()) == ["stats.jsonl"]
    assert (mine / "stats.jsonl").read_text() == '{"epoch": 1, "acc": 0.5}\n'


def test_a_resumed_run_refuses_a_users_stats_jsonl_beside_its_checkpoint(toy_run, tmp_path):
    ds, run = toy_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    (resumed / "stats.jsonl").write_text("epoch,loss\n1,0.3\n")
    before = (resumed / "checkpoint.pt").read_bytes()
    with pytest.raises(CellfluxError, match=r"holds stats.jsonl, which pretrain did not write \(line 1 is not"):
        train(ds.root, resumed, quick_cfg(steps=3), unet=MICRO)
    assert (resumed / "stats.jsonl").read_text() == "epoch,loss\n1,0.3\n"
    assert (resumed / "checkpoint.pt").read_bytes() == before


def test_a_users_checkpoint_pt_is_foreign(toy_run, tmp_path):
    ds, run = toy_run
    assert checkpoint_problem(run / "checkpoint.pt") is None
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    torch.save({"weights": torch.zeros(2), "epoch": 3}, theirs / "checkpoint.pt")
    assert checkpoint_problem(theirs / "checkpoint.pt") == "not a cellfluxrl run checkpoint"
    with pytest.raises(CellfluxError, match=r"theirs holds checkpoint.pt, which pretrain did not write \(not a "
                                            r"cellfluxrl run checkpoint\)"):
        train(ds.root, theirs, quick_cfg(steps=1), unet=MICRO)
    (theirs / "checkpoint.pt").write_bytes(b"\x80\x02}q\x00.")  # a plain pickle, not a torch zip
    assert checkpoint_problem(theirs / "checkpoint.pt") == "not a torch checkpoint"
    assert sorted(p.name for p in theirs.iterdir()) == ["checkpoint.pt"]


def test_the_projects_own_files_are_recognised(toy_run, tmp_path):
    _, run = toy_run
    assert check_run_folder(run, "pretrain", ("checkpoint.pt", "config.json", "stats.jsonl")) is True
    stats = tmp_path / "stats.jsonl"
    lines = (run / "stats.jsonl").read_text()
    stats.write_text(lines + '{"step": 3, "lo')  # a last line cut short by a kill
    assert stats_problem(stats) is None
    stats.write_text("")  # a resume that dropped every record
    assert stats_problem(stats) is None
    stats.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3, "loss": 0.4}\n')
    assert stats_problem(stats) == "line 2 is not a cellfluxrl stats record"  # cut short, but not the last
    for line in ('{"step": 1, "acc": 0.5}', '{"loss": 0.5, "step": 1}', '{"step": "1", "loss": 0.5}', '[1, 0.5]'):
        stats.write_text(line + "\n")  # no loss or reward; step not first; step not an int; not an object
        assert stats_problem(stats) == "line 1 is not a cellfluxrl stats record", line
    stats.write_text('{"step": 1, "reward": 0.5, "reward/moa": 0.1}\n')  # a posttrain record
    assert stats_problem(stats) is None


def test_posttrain_run_folders_recognise_their_samples_and_stats(toy_run, tmp_path):
    _, run = toy_run
    rl = tmp_path / "rl"
    (rl / "samples").mkdir(parents=True)
    (rl / "samples" / "step_000010.png").write_bytes(b"png")
    (rl / "stats.jsonl").write_text('{"step": 1, "reward": 0.1, "loss": 0.2}\n')
    assert check_run_folder(rl, "posttrain", POSTTRAIN_NAMES) is True
    (rl / "samples" / "holiday.jpg").write_bytes(b"jpg")
    with pytest.raises(CellfluxError, match=r"holds samples, which posttrain did not write \(it holds holiday.jpg\)"):
        check_run_folder(rl, "posttrain", POSTTRAIN_NAMES)
    (rl / "samples" / "holiday.jpg").unlink()
    (rl / "config.json").write_text(json.dumps({"kind": "posttrain"}))
    (rl / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    (rl / "stats.jsonl").write_text('{"mine": true}\n')  # beside a checkpoint: still checked
    with pytest.raises(CellfluxError, match=r"holds stats.jsonl, which posttrain did not write"):
        check_run_folder(rl, "posttrain", POSTTRAIN_NAMES)


def test_a_report_folder_refuses_a_users_report_md(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"settings": {}, "sections": {"id": {}}}))
    (out / "report.md").write_text("# Evaluation on /data/synth\n\nmade by cellfluxrl\n")
    assert check_owned(out, "evaluate", ("report.json", "report.md", "fig*.png"), "--out") is True
    (out / "report.md").write_text("# My notes\n")
    with pytest.raises(CellfluxError, match=r"--out .*eval holds report.md, which evaluate did not write \(not a "
                                            r"cellfluxrl report\)"):
        check_owned(out, "evaluate", ("report.json", "report.md", "fig*.png"), "--out")
    assert check_owned(out, "evaluate", ("report.json", "report.md"), "--out", recognise={}) is True  # names only

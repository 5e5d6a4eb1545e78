"""Held-out (OOD) compounds never reach training, end to end.

A toy dataset where the held-out compound has images in *train* too (the worst case: a source
that forgot to keep it out) goes through pretraining, post-training, the reference statistics and
both MoA classifiers; spies record every image each of them is handed. None of the held-out
compound's images may be among them, while the in-distribution ones are.
"""

from __future__ import annotations

import numpy as np

from cellfluxrl.data.layout import DatasetWriter, load_dataset

SIZE = 16
COMPOUNDS = {"taxol": ("Microtubule stabilizers", False), "cisplatin": ("DNA damage", False),
             "AZ138": ("Eg5 inhibitors", True)}  # AZ138 held out


def _dataset(out) -> object:
    rng = np.random.default_rng(0)
    with DatasetWriter(out, SIZE, ("actin", "tubulin", "dna"), "synthetic") as writer:
        k = 0
        for split in ("train", "test"):
            for plate in ("P1", "P2"):
                for compound in ("DMSO", *COMPOUNDS):
                    moa = "DMSO" if compound == "DMSO" else COMPOUNDS[compound][0]
                    rows = [{"id": f"i{k + i}", "split": split, "batch": plate, "compound": compound,
                             "dose": 0.0 if compound == "DMSO" else 1.0, "moa": moa,
                             "state": "control" if compound == "DMSO" else "treated", "source": "toy",
                             "well": f"{compound}-{i % 3}"} for i in range(8)]
                    writer.add(rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8), rows)
                    k += 8
        conditions = [{"compound": c, "moa": m, "smiles": "", "ood": o, "embedding": "user"}
                      for c, (m, o) in COMPOUNDS.items()]
        return load_dataset(writer.finish(conditions, rng.normal(size=(3, 8)).astype(np.float32)))


def _rows(dataset, images: np.ndarray) -> np.ndarray:
    """Dataset indices of the given uint8 ``(n, H, W, C)`` images (each image is unique here)."""
    lookup = {np.asarray(dataset.images[i]).tobytes(): i for i in range(len(dataset))}
    return np.array([lookup[np.ascontiguousarray(x).tobytes()] for x in images], dtype=np.int64)


def test_held_out_compounds_never_reach_any_training(tmp_path, monkeypatch):
    import cellfluxrl.rewards.evaluators_fit as fit
    import cellfluxrl.rewards.moa_classifier as mc
    from cellfluxrl.data.pairing import PairedDataset
    from cellfluxrl.model.pretrain import train
    from cellfluxrl.rl.loop import posttrain
    from test_posttrain import ChannelSuite, small_cfg  # noqa: E402 (tests/ is on sys.path)
    from test_pretrain import MICRO, quick_cfg

    dataset = _dataset(tmp_path / "ds")
    ood = np.flatnonzero(dataset.table["compound"] == "AZ138")
    assert (dataset.table["split"][ood] == "train").any()  # the held-out compound is in train on purpose
    seen: dict[str, list[int]] = {"loader": [], "reference": [], "classifiers": []}

    getitem = PairedDataset.__getitem__
    monkeypatch.setattr(PairedDataset, "__getitem__",
                        lambda self, i: (lambda item: seen["loader"].append(item["index"]) or item)(getitem(self, i)))
    run = tmp_path / "run"
    train(dataset.root, run, quick_cfg(steps=3, preset="tiny"), unet=MICRO)
    pretrained = list(seen["loader"])
    posttrain(run, tmp_path / "rl", small_cfg(steps=1, grid_every=0), device="cpu", suite=ChannelSuite())
    rl = seen["loader"][len(pretrained):]

    measure = fit.measure_images

    def spy_measure(images, seg, **kw):
        seen["reference"].extend(_rows(dataset, images).tolist())
        return measure(images, seg, **kw)

    trainer = mc.train_moa_classifier

    def spy_train(images, labels, **kw):
        seen["classifiers"].extend(_rows(dataset, images).tolist())
        return trainer(images, labels, **{**kw, "epochs": 1})

    monkeypatch.setattr(fit, "measure_images", spy_measure)
    monkeypatch.setattr(mc, "train_moa_classifier", spy_train)
    fit.fit_reference(dataset)
    fit.fit_classifier(dataset, seed=0, epochs=1)

    for name, indices in (("pretraining loader", pretrained), ("RL pairs", rl), ("reference statistics", seen["reference"]),
                          ("classifiers", seen["classifiers"])):
        assert indices, name
        assert not np.isin(indices, ood).any(), name
        treated = [i for i in indices if dataset.table["state"][i] == "treated"]
        assert {str(c) for c in dataset.table["compound"][treated]} == {"taxol", "cisplatin"}, name
        assert set(dataset.table["split"][indices]) == {"train"}, name

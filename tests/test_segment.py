"""Segmentation: classical backend on hand-made disks, synthetic ground truth (AP floor) and real
crops; the accuracy metric; backend selection and errors."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

from cellfluxrl.errors import CellfluxError
from cellfluxrl.images import to_model
from cellfluxrl.rewards.morphology import measure
from cellfluxrl.rewards.segmentation.accuracy import segmentation_accuracy
from cellfluxrl.rewards.segmentation.factory import make_segmenter

REAL_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "real", "ExampleHuman")


def disks(centres, r_nucleus=7, r_cell=16, size=96, cyto_level=0.8, noise=0.05, seed=0):
    """One model-space image (3, H, W) of bright nuclei inside dimmer round cells, plus the
    ground-truth nucleus labels."""
    yy, xx = np.mgrid[:size, :size]
    dna = np.zeros((size, size))
    cyto = np.zeros((size, size))
    gt = np.zeros((size, size), np.int32)
    for i, (cy, cx) in enumerate(centres):
        d = np.hypot(yy - cy, xx - cx)
        dna[d <= r_nucleus] = 1.0
        gt[d <= r_nucleus] = i + 1
        cyto[d <= r_cell] = cyto_level
    img = np.stack([cyto, cyto, dna]) * 2.0 - 1.0
    img += np.random.default_rng(seed).normal(0.0, noise, img.shape)
    return img.astype(np.float32), gt


CASES = [
    ([(30, 30)], 1),
    ([(25, 25), (65, 70)], 2),
    ([(48, 40), (48, 53)], 2),                               # two touching nuclei: split
    ([(20, 20), (20, 72), (72, 20), (72, 72)], 4),
    ([(3, 48), (48, 93)], 2),                                # cut by the frame
    ([], 0),                                                 # empty image
]


def test_disks_exact_counts_and_accuracy():
    images, gts = zip(*(disks(c, seed=i) for i, (c, _) in enumerate(CASES)))
    nuclei, cells = make_segmenter("classical").segment(np.stack(images))
    assert nuclei.dtype == cells.dtype == np.int32 and nuclei.shape == (len(CASES), 96, 96)
    assert [int(n.max()) for n in nuclei] == [k for _, k in CASES]
    acc = segmentation_accuracy(nuclei, np.stack(gts))
    assert acc["ap50"] == 1.0 and acc["count_error"] == 0.0 and acc["matched_iou"] > 0.8
    m = measure(nuclei, cells)
    # separate disks: one cell per nucleus, containing it; empty image: documented zeros
    np.testing.assert_array_equal(m["cyto_count"], [1, 2, 2, 4, 2, 0])  # two whole touching nuclei: two cells
    np.testing.assert_array_equal(m["nuc_in_cyto"], [1, 1, 1, 1, 1, 0])
    assert m["roundness"][0] == pytest.approx(1.0, abs=0.1)
    for lab in np.concatenate([nuclei, cells]):  # contiguous labels
        assert np.array_equal(np.unique(lab[lab > 0]), np.arange(1, lab.max() + 1))


def test_nucleus_without_cytoplasm_is_not_contained():
    inside, _ = disks([(30, 30)])
    outside, _ = disks([(30, 30)], cyto_level=0.0)  # no cytoplasm signal at all
    half, _ = disks([(30, 30)])
    half[:2, :, 30:] = -1.0  # right half of the cell has no cytoplasm
    nuclei, cells = make_segmenter().segment(np.stack([inside, outside, half]))
    m = measure(nuclei, cells)
    assert m["nuc_count"].tolist() == [1, 1, 1]
    assert m["nuc_in_cyto"][0] == 1.0
    assert m["nuc_in_cyto"][1] == 0.0 and m["cyto_count"][1] == 0
    assert 0.3 < m["nuc_in_cyto"][2] < 0.7


def test_flat_and_noise_images_have_no_objects():
    flat = np.full((2, 3, 64, 64), -1.0, np.float32)
    flat[1] = 0.3
    noise = np.random.default_rng(0).normal(-0.9, 0.01, (1, 3, 64, 64)).astype(np.float32)
    nuclei, cells = make_segmenter().segment(np.concatenate([flat, noise]))
    assert nuclei.max() == 0 and cells.max() == 0
    m = measure(nuclei, cells)
    assert all(np.isfinite(v).all() and (v == 0).all() for v in m.values())


def test_batch_independent_deterministic_and_torch_input():
    images = np.stack([disks(c, seed=i)[0] for i, (c, _) in enumerate(CASES)])
    seg = make_segmenter()
    n_all, c_all = seg.segment(images)
    n_one, c_one = seg.segment(images[2:3])
    assert np.array_equal(n_all[2], n_one[0]) and np.array_equal(c_all[2], c_one[0])
    n_t, c_t = seg.segment(torch.from_numpy(images))
    assert np.array_equal(n_all, n_t) and np.array_equal(c_all, c_t)


def test_synthetic_nucleus_ap_floor():
    synthetic = pytest.importorskip("cellfluxrl.data.synthetic")
    seg = make_segmenter("classical")
    for moa in ("DMSO", "Microtubule destabilizers", "Actin disruptors", "Epithelial", "DNA damage"):
        images, gt_nuclei, gt_cells = synthetic.synthetic_batch(24, moa=moa, seed=11)
        nuclei, cells = seg.segment(to_model(images, dequantize=False).numpy())
        acc = segmentation_accuracy(nuclei, gt_nuclei)
        assert acc["ap50"] >= 0.8, (moa, acc)
        assert acc["count_error"] <= 1.5, (moa, acc)
        if moa in ("Microtubule destabilizers", "Actin disruptors"):  # fragments must share their cell
            cells_acc = segmentation_accuracy(cells, gt_cells)
            assert cells_acc["ap50"] >= 0.75, (moa, cells_acc)  # 0.86 / 0.81; one cell per fragment: 0.45 / 0.71
        m = measure(nuclei, cells)
        assert np.isfinite(np.stack(list(m.values()))).all()


@pytest.mark.skipif(not glob.glob(os.path.join(REAL_DIR, "*d0.tif")), reason="real example images not present")
def test_real_crops_give_finite_statistics():
    import tifffile

    dna = tifffile.imread(glob.glob(os.path.join(REAL_DIR, "*d0.tif"))[0])
    cyto = tifffile.imread(glob.glob(os.path.join(REAL_DIR, "*d2.tif"))[0])
    rgb = np.stack([cyto, cyto, dna], axis=-1)
    crops = np.stack([rgb[y:y + 96, x:x + 96] for y in range(0, 417, 96) for x in range(0, 417, 96)])
    nuclei, cells = make_segmenter().segment(to_model(crops, dequantize=False).numpy())
    m = measure(nuclei, cells)
    for key, value in m.items():
        assert np.isfinite(value).all(), key
    assert (m["nuc_count"] > 0).mean() > 0.8  # a few crops of this field are empty
    has = m["nuc_count"] > 0
    assert np.median(m["nuc_in_cyto"][has]) > 0.9
    assert 0.6 < np.median(m["roundness"][has]) < 1.2


def real_field():
    """ExampleHuman as one model-space image float32 (1, 3, 512, 512): the cytoplasm stain (d2) in the
    actin and tubulin channels, DNA (d0) in the third, as the segmenters expect."""
    import tifffile

    dna = tifffile.imread(glob.glob(os.path.join(REAL_DIR, "*d0.tif"))[0])
    cyto = tifffile.imread(glob.glob(os.path.join(REAL_DIR, "*d2.tif"))[0])
    return to_model(np.stack([cyto, cyto, dna], axis=-1)[None], dequantize=False).numpy()


def nuclei_per_cell(nuclei: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """int64 (K_cells,): how many nuclei have most of their in-cell pixels in each cell."""
    both = (nuclei > 0) & (cells > 0)
    pairs = np.unique(np.stack([nuclei[both], cells[both]]), axis=1, return_counts=True)
    (nuc, cell), count = pairs
    owner = {}
    for n, c, k in zip(nuc, cell, count):
        if k > owner.get(n, (0, 0))[1]:
            owner[n] = (c, k)
    return np.bincount([c for c, _ in owner.values()], minlength=int(cells.max()) + 1)[1:]


@pytest.mark.skipif(not glob.glob(os.path.join(REAL_DIR, "*d0.tif")), reason="real example images not present")
def test_real_dense_field_gives_one_cell_per_nucleus():
    """Dense real tissue: cells follow the nuclei instead of merging clusters of touching nuclei
    (before the fix: 309 nuclei, 186 cells, 12% of them holding 3 to 20 nuclei)."""
    nuclei, cells = make_segmenter().segment(real_field())
    n_nuc, n_cell = int(nuclei.max()), int(cells.max())
    assert n_nuc >= 250, n_nuc  # a few hundred nuclei in this field
    assert abs(n_cell - n_nuc) <= 0.1 * n_nuc, (n_nuc, n_cell)
    per_cell = nuclei_per_cell(nuclei[0], cells[0])
    assert (per_cell > 2).mean() <= 0.05, np.bincount(per_cell)


def test_fragments_share_a_cell_but_whole_nuclei_do_not():
    from cellfluxrl.rewards.segmentation.cell_seeds import group_nuclei

    def image(nuclei_discs, cells_discs, size=96):
        """One model-space image of DNA discs (cy, cx, r) inside cytoplasm discs; nucleus gt."""
        yy, xx = np.mgrid[:size, :size]
        dna, cyto = np.zeros((size, size)), np.zeros((size, size))
        for cy, cx, r in nuclei_discs:
            dna[np.hypot(yy - cy, xx - cx) <= r] = 1.0
        for cy, cx, r in cells_discs:
            cyto[np.hypot(yy - cy, xx - cx) <= r] = 0.8
        return (np.stack([cyto, cyto, dna]) * 2.0 - 1.0).astype(np.float32)

    big = [(40, 30, 7), (40, 45, 7), (40, 60, 7)]  # three whole nuclei in a row, 1 px apart
    micro = [(53, 46, 3)]  # a micronucleus (about 29 px) 2 px below the middle one
    images = np.stack([image(big, [(40, 45, 30)]), image(big + micro, [(45, 45, 30)]), image(micro, [(53, 46, 10)])])
    nuclei, cells = make_segmenter().segment(images)
    assert [int(n.max()) for n in nuclei] == [3, 4, 1]
    assert [int(c.max()) for c in cells] == [3, 3, 1]
    m = measure(nuclei, cells)
    assert (m["nuc_in_cyto"] > 0.9).all()
    # fragment_area 0: one cell per nucleus; a large one: the fragment and its neighbours merge.
    assert int(make_segmenter(cell_fragment_area=0).segment(images[1:2])[1].max()) == 4

    # The grouping itself: a fragment between two whole nuclei joins the closer one, fragments
    # group together, two whole nuclei never share a group.
    labels = np.zeros((20, 40), np.int32)
    labels[5:15, 2:12] = 1     # whole (100 px)
    labels[8:10, 14:16] = 2    # fragment, gap 2 to nucleus 1 and 4 to nucleus 3
    labels[5:15, 20:30] = 3    # whole
    labels[0:2, 36:38] = 4     # fragment
    labels[3:5, 36:38] = 5     # fragment, gap 1 to nucleus 4, 6 to nucleus 3
    group = group_nuclei(labels, 5, 4, 60)
    assert group.tolist() == [0, 1, 1, 3, 4, 4]
    assert group_nuclei(labels, 5, 4, 0).tolist() == [0, 1, 2, 3, 4, 5]
    assert group_nuclei(labels, 5, 0, 60).tolist() == [0, 1, 2, 3, 4, 5]
    assert group_nuclei(labels, 5, 8, 1000).tolist() == [0, 1, 1, 1, 1, 1]  # all fragments: one group


def test_segmentation_accuracy_definition():
    gt = np.zeros((2, 20, 20), np.int32)
    gt[0, 2:8, 2:8] = 1
    gt[0, 12:18, 12:18] = 2
    pred = gt.copy()
    pred[0, 12:18, 12:18] = 0
    pred[0, 12:18, 15:18] = 5          # IoU 0.5 with gt 2: a match at the threshold
    pred[1, 0:3, 0:3] = 1               # image 2: one false positive, no ground truth
    acc = segmentation_accuracy(pred, gt)
    assert acc["ap50"] == pytest.approx((2 / 2 + 0 / 1) / 2)
    assert acc["count_error"] == pytest.approx((0 + 1) / 2)
    assert acc["matched_iou"] == pytest.approx((1.0 + 0.5) / 2)
    assert acc["precision"] == pytest.approx(2 / 3) and acc["recall"] == 1.0
    strict = segmentation_accuracy(pred, gt, iou_threshold=0.6)
    assert strict["ap50"] == pytest.approx((1 / 3 + 0) / 2)


def test_settings_and_errors():
    seg = make_segmenter("classical", declump_h=1.5)
    settings = json.loads(json.dumps(seg.settings))
    assert settings["backend"] == "classical" and settings["declump_h"] == 1.5
    assert settings != make_segmenter().settings
    with pytest.raises(CellfluxError, match="unknown segmentation backend"):
        make_segmenter("watershed9000")
    with pytest.raises(CellfluxError, match="classical segmenter"):
        make_segmenter("classical", thresold=3)
    with pytest.raises(CellfluxError, match="invalid parameters"):
        make_segmenter("classical", cell_fragment_area=-1)
    with pytest.raises(CellfluxError, match="expected float"):
        seg.segment(np.zeros((2, 96, 96, 3), np.uint8))
    with pytest.raises(CellfluxError, match="expected float"):
        seg.segment(np.zeros((2, 1, 96, 96), np.float32))


# --------------------------------------------------------------------------------------------
# Cellpose backend (Cellpose 3.1.x installed; nothing downloads).


@pytest.fixture(scope="module")
def random_cellpose_file(tmp_path_factory):
    """A randomly initialised Cellpose 3 network saved to a file (stands in for trained weights)."""
    models = pytest.importorskip("cellpose.models")
    from cellfluxrl.rewards.segmentation.cellpose_backend import cellpose_version

    if cellpose_version()[0] != 3:
        pytest.skip("needs Cellpose 3.x")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cp") / "random_net"
    models.CellposeModel(gpu=False, pretrained_model=False, nchan=2).net.save_model(str(path))
    return path


def test_cellpose_backend_runs_offline_on_a_local_file(random_cellpose_file):
    seg = make_segmenter("cellpose", nuclei_model=str(random_cellpose_file), cyto_model=str(random_cellpose_file),
                         gpu=False)
    settings = json.loads(json.dumps(seg.settings))
    assert settings["backend"] == "cellpose" and len(settings["nuclei_model_sha256"]) == 64
    images = np.stack([disks([(30, 30), (60, 66)])[0]])
    nuclei, cells = seg.segment(images)
    assert nuclei.shape == cells.shape == (1, 96, 96) and nuclei.dtype == cells.dtype == np.int32
    for lab in np.concatenate([nuclei, cells]):
        assert np.array_equal(np.unique(lab[lab > 0]), np.arange(1, lab.max() + 1))
    m = measure(nuclei, cells)
    assert all(np.isfinite(v).all() for v in m.values())


def test_cellpose_missing_models_are_one_line_errors(tmp_path, monkeypatch):
    pytest.importorskip("cellpose")
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    with pytest.raises(CellfluxError, match="no cached weights.*cellpose-model"):
        make_segmenter("cellpose", nuclei_model="nuclei", cyto_model="cyto3")
    with pytest.raises(CellfluxError, match="not found"):
        make_segmenter("cellpose", nuclei_model=str(tmp_path / "nope" / "weights"), cyto_model="cyto3")


def test_cellpose_names_resolve_to_cached_files(tmp_path, monkeypatch, random_cellpose_file):
    from cellfluxrl.rewards.segmentation.cellpose_backend import resolve_model

    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    (tmp_path / "nucleitorch_0").write_bytes(random_cellpose_file.read_bytes())
    (tmp_path / "cyto3").write_bytes(random_cellpose_file.read_bytes())
    assert resolve_model("nuclei") == tmp_path / "nucleitorch_0"
    seg = make_segmenter("cellpose", nuclei_model="nuclei", cyto_model="cyto3", gpu=False)
    assert seg.settings["nuclei_model"] == "nuclei"
    assert seg.settings["nuclei_model_sha256"] == seg.settings["cyto_model_sha256"]


@pytest.mark.slow
def test_train_cellpose_tiny_run(tmp_path):
    """About 2 minutes on 2 busy CPU cores: 8 crops x 1 epoch, then the model loads and runs."""
    pytest.importorskip("cellpose")
    from cellfluxrl.data.synthetic import prepare_synthetic
    from cellfluxrl.rewards.segmentation.cellpose_backend import train_cellpose

    dataset = prepare_synthetic(tmp_path / "ds", n_images=120, seed=0, n_plates=2, progress=False)
    path = train_cellpose(dataset, tmp_path / "models", target="nuclei", n_images=8, n_epochs=1, seed=0)
    assert path.is_file() and path.name == "cellpose_nuclei"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # temp folder cleaned up
    seg = make_segmenter("cellpose", nuclei_model=str(path), cyto_model=str(path), gpu=False)
    nuclei, _ = seg.segment(np.stack([disks([(30, 30)])[0]]))
    assert nuclei.shape == (1, 96, 96)


def test_cellpose_model_folder_shorthand(tmp_path, random_cellpose_file):
    for name in ("cellpose_nuclei", "cellpose_cyto"):
        (tmp_path / name).write_bytes(random_cellpose_file.read_bytes())
    seg = make_segmenter("cellpose", model=str(tmp_path), gpu=False)
    assert seg.settings["nuclei_model"].endswith("cellpose_nuclei") and seg.settings["cyto_model"].endswith("cellpose_cyto")
    with pytest.raises(CellfluxError, match="cellpose segmenter"):
        make_segmenter("cellpose", model=str(tmp_path), nucleus_model="x")


def test_non_finite_pixels_do_not_crash():
    img, _ = disks([(30, 30), (60, 66)])
    bad = np.stack([img, img])
    bad[0, :, :10, :10] = np.nan
    bad[1, 2, 50:52, 50:52] = np.inf
    nuclei, cells = make_segmenter().segment(bad)
    assert [int(n.max()) for n in nuclei] == [2, 2]
    assert all(np.isfinite(v).all() for v in measure(nuclei, cells).values())


def test_cellpose_model_command_reports_bad_dataset(tmp_path):
    pytest.importorskip("cellpose")
    from click.testing import CliRunner

    from cellfluxrl.commands.cellpose_train import cellpose_model

    result = CliRunner().invoke(cellpose_model, [str(tmp_path / "missing"), str(tmp_path / "out"), "--target", "nuclei"])
    assert isinstance(result.exception, CellfluxError) and "missing" in str(result.exception)
    result = CliRunner().invoke(cellpose_model, [str(tmp_path), str(tmp_path / "out"), "--target", "membrane"])
    assert result.exit_code == 2 and "membrane" in result.output

"""``cellfluxrl measure``: CellProfiler's AreaShape definitions on synthetic masks and the real field,
the tertiary (cytoplasm) rule, the four CSVs, the image sources and the refusals.

Tolerances (docs/measure.md): Area, counts, bounding boxes exact; Perimeter and FormFactor 1e-9
relative (the same border estimator as skimage/CellProfiler >= 4, equal to ~1e-12); centroids,
axis lengths and Orientation 1e-9 absolute (two-pass centred moments vs regionprops' bounding-box
moments: round-off only); Eccentricity 1e-6 absolute, because ``sqrt(1 - l2 / l1)`` turns a 1e-16
round-off of ``l2 / l1`` for a round object into ~1e-8.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from bad_images import bad_image_sources
from click.testing import CliRunner

from cellfluxrl.commands.measure import measure
from cellfluxrl.errors import CellfluxError
from cellfluxrl.evaluation.measurement_tables import IMAGE_HEADER, METADATA_COLUMNS, object_header
from cellfluxrl.evaluation.measurements import cytoplasm_labels, measure_image, shape_features

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "ExampleHuman"
if not REAL.is_dir():
    REAL = Path("/work/shared/data/real/ExampleHuman")
DNA, BODY = REAL / "AS_09125_050116030001_D03f00d0.tif", REAL / "AS_09125_050116030001_D03f00d2.tif"
needs_real = pytest.mark.skipif(not DNA.is_file(), reason="real example images not available")
EXACT = ("Area", "BoundingBoxArea", "BoundingBoxMinimum_X", "BoundingBoxMaximum_X", "BoundingBoxMinimum_Y",
         "BoundingBoxMaximum_Y")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """A ~1 s synthetic dataset (100 crops of 32x32, 35 compounds in conditions.csv)."""
    from cellfluxrl.data.synthetic import prepare_synthetic

    return prepare_synthetic(tmp_path_factory.mktemp("measure") / "ds", n_images=100, size=32, n_plates=2,
                             progress=False)


def regionprops_reference(labels: np.ndarray) -> dict[int, dict[str, float]]:
    """CellProfiler 4's MeasureObjectSizeShape definitions, evaluated with skimage.regionprops (what it calls)."""
    from skimage.measure import regionprops

    out = {}
    for p in regionprops(labels):
        with np.errstate(divide="ignore"):
            ff = 4 * math.pi * p.area / p.perimeter ** 2 if p.perimeter else math.inf
        out[p.label] = {"Area": p.area, "Perimeter": p.perimeter, "FormFactor": ff, "Eccentricity": p.eccentricity,
                        "MajorAxisLength": p.axis_major_length, "MinorAxisLength": p.axis_minor_length,
                        "Orientation": math.degrees(p.orientation), "Center_X": p.centroid[1], "Center_Y": p.centroid[0],
                        "Extent": p.extent, "EquivalentDiameter": p.equivalent_diameter_area,
                        "BoundingBoxArea": p.area_bbox, "BoundingBoxMinimum_Y": p.bbox[0], "BoundingBoxMinimum_X": p.bbox[1],
                        "BoundingBoxMaximum_Y": p.bbox[2], "BoundingBoxMaximum_X": p.bbox[3]}
    return out


def assert_matches_cellprofiler(got: dict[int, dict[str, float]], labels: np.ndarray) -> None:
    """Every object's features within the module docstring's tolerances of the regionprops reference."""
    ref = regionprops_reference(labels)
    assert sorted(got) == sorted(ref)
    for label, want in ref.items():
        for name, value in want.items():
            have = got[label][name]
            if name in EXACT:
                assert have == value, (label, name)
            elif name in ("Perimeter", "FormFactor"):
                assert have == pytest.approx(value, rel=1e-9, abs=0), (label, name)
            elif name == "Eccentricity":
                assert abs(have - value) <= 1e-6, (label, name, have, value)
            elif name == "Orientation":  # skimage: -90..90 from the row axis; +-90 is the same direction
                diff = abs(have - value)
                assert min(diff, abs(diff - 180)) <= 1e-9, (label, have, value)
            else:
                assert abs(have - value) <= 1e-9, (label, name, have, value)


def table_dict(labels: np.ndarray) -> dict[int, dict[str, float]]:
    table = shape_features(labels)
    return {int(k): {f: float(v[i]) for f, v in table.features.items()} for i, k in enumerate(table.labels)}


def synthetic_masks() -> np.ndarray:
    """int32 (64, 64): a disk, an ellipse, touching squares, an object on the frame, a ring, a speck, a line."""
    yy, xx = np.mgrid[:64, :64]
    labels = np.zeros((64, 64), np.int32)
    labels[(yy - 12) ** 2 + (xx - 12) ** 2 <= 25] = 1                                    # disk r=5: 69 px
    labels[((yy - 40) / 6.0) ** 2 + ((xx - 14) / 11.0) ** 2 <= 1] = 2                      # ellipse 12x22
    labels[30:36, 40:46] = 3                                                              # two touching squares
    labels[30:36, 46:52] = 4
    labels[0:5, 55:64] = 5                                                                # on the frame
    ring = ((yy - 52) ** 2 + (xx - 50) ** 2 <= 36) & ((yy - 52) ** 2 + (xx - 50) ** 2 > 4)
    labels[ring] = 7                                                                      # label 6 absent; a hole
    labels[2, 2] = 8                                                                      # a one-pixel speck
    labels[20, 30:37] = 9                                                                 # a 1x7 line
    return labels


def test_shape_features_follow_cellprofiler_on_synthetic_masks():
    labels = synthetic_masks()
    got = table_dict(labels)
    assert_matches_cellprofiler(got, labels)
    assert 6 not in got  # absent labels have no row
    # known answers: the r=5 lattice disk has 81 px and is round; a 6x6 square has the border estimator's
    # perimeter 4 (6 - 1) = 20 (its touching neighbour counts as background), so FormFactor 4 pi 36 / 400
    assert got[1]["Area"] == 81 and got[1]["Eccentricity"] < 1e-6
    assert got[3]["Area"] == 36 and got[3]["Perimeter"] == 20.0
    assert got[3]["FormFactor"] == pytest.approx(4 * math.pi * 36 / 400, rel=1e-12)
    assert got[8]["Perimeter"] == 0 and got[8]["FormFactor"] == math.inf  # CellProfiler does not clip
    assert got[9]["Eccentricity"] == 1.0 and got[9]["MinorAxisLength"] == 0.0
    # the ellipse's eccentricity is near the continuous one, sqrt(1 - (6/11)^2) = 0.838
    assert got[2]["Eccentricity"] == pytest.approx(math.sqrt(1 - (6 / 11) ** 2), abs=0.02)


def test_shape_features_follow_cellprofiler_on_random_label_maps():
    from skimage.measure import label

    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = label(rng.random((48, 48)) < 0.55, connectivity=1).astype(np.int32)
        assert_matches_cellprofiler(table_dict(labels), labels)


def outline_reference(labels: np.ndarray) -> np.ndarray:
    """centrosome.outline.outline as CellProfiler uses it: a pixel whose 8-neighbour differs, or on the frame."""
    padded = np.pad(labels, 1, constant_values=-1)
    h, w = labels.shape
    different = np.zeros(labels.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            different |= padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] != labels
    return np.where(different, labels, 0)


def test_cytoplasm_is_cellprofilers_tertiary_object():
    rng = np.random.default_rng(1)
    cells = np.repeat(np.repeat(rng.integers(0, 5, (8, 8)), 4, 0), 4, 1).astype(np.int32)
    nuclei = np.zeros_like(cells)
    nuclei[2:9, 3:10], nuclei[14:20, 14:22], nuclei[0:4, 26:32] = 1, 2, 3
    # IdentifyTertiaryObjects (shrink primary): secondary where primary == 0 or on the primary outline
    want = np.where((nuclei == 0) | (outline_reference(nuclei) != 0), cells, 0)
    assert np.array_equal(cytoplasm_labels(nuclei, cells), want)
    try:
        from centrosome.outline import outline
    except ImportError:
        return
    assert np.array_equal(outline(nuclei), outline_reference(nuclei))


def test_relations_and_counts():
    nuclei = np.zeros((20, 30), np.int32)
    cells = np.zeros((20, 30), np.int32)
    cells[2:18, 2:14], cells[2:18, 16:28] = 1, 2
    nuclei[6:12, 5:11], nuclei[6:12, 19:25], nuclei[14:16, 20:22] = 1, 2, 3  # nucleus 3: a fragment in cell 2
    m = measure_image(nuclei, cells)
    assert [m.count(c) for c in ("Nuclei", "Cells", "Cytoplasm")] == [3, 2, 2]
    assert m.relations["Cells_Parent_Nuclei"].tolist() == [1, 2]
    assert m.relations["Nuclei_Children_Cells_Count"].tolist() == [1, 1, 0]
    assert m.relations["Cytoplasm_Parent_Nuclei"].tolist() == [1, 2]
    # cytoplasm 1 = cell 1 (192 px) minus nucleus 1's interior (4x4 = 16 px)
    assert m.objects["Cytoplasm"].features["Area"].tolist() == [192 - 16, 192 - 16 - 0]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def write_real_list(folder: Path, compound: str = "DMSO") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "real.csv"
    path.write_text("actin,tubulin,dna,compound,dose,plate,well\n"
                    f"{BODY},{BODY},{DNA},{compound},0.3,22123,D03\n")
    return path


@needs_real
def test_measure_real_field_writes_cellprofiler_columns_that_agree(dataset_dir, tmp_path):
    import tifffile

    from cellfluxrl.images import to_model
    from cellfluxrl.rewards.segmentation.factory import make_segmenter

    out = tmp_path / "out" / "real.csv"
    result = CliRunner().invoke(measure, [str(write_real_list(tmp_path, "taxol")), "--data", str(dataset_dir),
                                          "--out", str(out)])
    assert result.exit_code == 0, result.output
    header, rows = read_csv(out)
    assert tuple(header) == IMAGE_HEADER and len(rows) == 1
    meta = {c: rows[0][c] for c in METADATA_COLUMNS}
    assert meta == {"Metadata_Plate": "22123", "Metadata_Well": "D03", "Metadata_Compound": "taxol",
                    "Metadata_Concentration": "0.3", "Metadata_MoA": "Microtubule stabilizers",
                    "Metadata_Kind": "real", "Metadata_Source": str(DNA)}
    # the same segmentation (the dataset has no evaluators: the classical default), then CellProfiler's definitions
    dna, body = tifffile.imread(DNA), tifffile.imread(BODY)
    nuclei, cells = make_segmenter().segment(to_model(np.stack([body, body, dna], -1)[None], dequantize=False).numpy())
    cyto = cytoplasm_labels(nuclei[0], cells[0])
    counts = {"Nuclei": int(nuclei.max()), "Cells": int(cells.max()), "Cytoplasm": len(np.unique(cyto)) - 1}
    assert counts["Nuclei"] >= 250  # hundreds of nuclei in this field
    for compartment, labels in (("Nuclei", nuclei[0]), ("Cells", cells[0]), ("Cytoplasm", cyto)):
        assert int(rows[0][f"Image_Count_{compartment}"]) == counts[compartment]
        header, objects = read_csv(out.with_name(f"real_{compartment}.csv"))
        assert tuple(header) == object_header(compartment) and len(objects) == counts[compartment]
        assert all(all(o[c] == meta[c] for c in METADATA_COLUMNS) for o in objects)  # text, as written
        prefix = f"{compartment}_AreaShape_"
        got = {int(o["ObjectNumber"]): {k[len(prefix):]: float(v) for k, v in o.items() if k.startswith(prefix)}
               for o in objects}
        assert_matches_cellprofiler(got, labels)
    assert not list(out.parent.glob(".*tmp*"))


@needs_real
def test_real_field_agrees_with_cp_measure_when_installed():
    """CellProfiler's own measurement code as a library (cp-measure, optional: not installable next to
    pillow>=12, so run with it on PYTHONPATH; see docs/measure.md)."""
    cpm = pytest.importorskip("cp_measure.core.measureobjectsizeshape")
    import tifffile

    from cellfluxrl.images import to_model
    from cellfluxrl.rewards.segmentation.factory import make_segmenter

    dna, body = tifffile.imread(DNA), tifffile.imread(BODY)
    nuclei, cells = make_segmenter().segment(to_model(np.stack([body, body, dna], -1)[None], dequantize=False).numpy())
    for labels in (nuclei[0], cells[0]):
        want = cpm.get_sizeshape(labels, None, calculate_advanced=False, new_features=False)
        got = shape_features(labels).features
        assert np.array_equal(got["Area"], want["Area"])
        for name in ("Perimeter", "FormFactor"):
            np.testing.assert_allclose(got[name], want[name], rtol=1e-9, atol=0)
        for name in ("MajorAxisLength", "MinorAxisLength", "Orientation", "Center_X", "Center_Y"):
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-9)
        np.testing.assert_allclose(got["Eccentricity"], want["Eccentricity"], rtol=0, atol=1e-6)


def test_generated_npz_folder_and_dataset_split(dataset_dir, tmp_path):
    import tifffile

    from cellfluxrl.data.layout import load_dataset

    ds = load_dataset(dataset_dir)
    idx = ds.select(split="test", state="treated")[:3]
    images = np.asarray(ds.images[idx])
    npz = tmp_path / "samples.npz"
    np.savez(npz, generated=images, compound=ds.table["compound"][idx], moa=ds.table["moa"][idx],
             target_index=idx, seeds=np.arange(3), extra_key=np.zeros(2))
    folder = tmp_path / "samples"
    folder.mkdir()
    lines = ["pair,file,compound,dose,moa,plate,target_index,some_new_column"]
    for i, k in enumerate(idx):
        name = f"{i:05d}_x.ome.tif"
        tifffile.imwrite(folder / name, np.moveaxis(images[i], 2, 0), ome=True, metadata={"axes": "CYX"})
        lines.append(f"{i},{name},{ds.table['compound'][k]},{ds.table['dose'][k]},{ds.table['moa'][k]},"
                     f"{ds.table['batch'][k]},{k},x")
    (folder / "samples.csv").write_text("\n".join(lines) + "\n")
    outputs = {}
    for name, spec in (("npz", npz), ("folder", folder), ("real", "real:test")):
        out = tmp_path / name / "m.csv"
        result = CliRunner().invoke(measure, [str(spec), "--data", str(dataset_dir), "--out", str(out)])
        assert result.exit_code == 0, result.output
        outputs[name] = read_csv(out)[1]
    for name in ("npz", "folder"):
        rows = outputs[name]
        assert [r["Metadata_Well"] for r in rows] == [str(w) for w in ds.table["well"][idx]]
        assert [r["Metadata_Plate"] for r in rows] == [str(b) for b in ds.table["batch"][idx]]
        assert [float(r["Metadata_Concentration"]) for r in rows] == ds.table["dose"][idx].tolist()
        assert {r["Metadata_Kind"] for r in rows} == {"generated"}
    counts = lambda rows: [(r["Image_Count_Nuclei"], r["Image_Count_Cells"]) for r in rows]  # noqa: E731
    assert counts(outputs["npz"]) == counts(outputs["folder"])  # same pixels, same measurements
    real = outputs["real"]
    assert len(real) == len(ds.select(split="test")) and {r["Metadata_Kind"] for r in real} == {"real"}
    by_source = {r["Metadata_Source"]: r for r in real}
    assert counts([by_source[str(ds.table["id"][k])] for k in idx]) == counts(outputs["npz"])


def test_bad_inputs_exit_2_and_write_nothing(dataset_dir, tmp_path):
    cases = bad_image_sources(tmp_path, 32)
    for spec, message in cases.items():
        out = tmp_path / "out" / "m.csv"
        result = CliRunner().invoke(measure, [str(spec), "--data", str(dataset_dir), "--out", str(out)])
        assert result.exit_code == 2, (spec, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()


def test_never_overwrites_a_file_it_did_not_write(dataset_dir, tmp_path):
    spec = tmp_path / "one.npz"
    np.savez(spec, generated=np.zeros((1, 32, 32, 3), np.uint8), compound=np.array(["DMSO"]))
    out = tmp_path / "m.csv"
    foreign = tmp_path / "m_Cells.csv"
    foreign.write_text("ImageNumber,ObjectNumber,Cells_AreaShape_Area\n1,1,5\n")
    args = [str(spec), "--data", str(dataset_dir), "--out", str(out)]
    result = CliRunner().invoke(measure, args)
    assert result.exit_code == 2 and "m_Cells.csv exists and was not written by" in result.output
    assert foreign.read_text() == "ImageNumber,ObjectNumber,Cells_AreaShape_Area\n1,1,5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_Cells.csv", "one.npz"]
    foreign.unlink()
    for _ in range(2):  # a re-run replaces its own files
        result = CliRunner().invoke(measure, args)
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "m_Cells.csv", "m_Cytoplasm.csv",
                                                          "m_Nuclei.csv", "one.npz"]
    assert read_csv(out)[1][0]["Image_Count_Nuclei"] == "0"  # a blank image: no objects


def test_info_reads_the_tables_measure_wrote(dataset_dir, tmp_path):
    """`cellfluxrl info` names measure's image and object tables (issue 29 item 15: info reads every
    file the project writes); a CSV with another header is still refused in one line."""
    from cellfluxrl.commands.info import describe, format_info

    out = tmp_path / "m" / "real.csv"
    result = CliRunner().invoke(measure, ["real:test", "--data", str(dataset_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    header, rows = read_csv(out)
    image = describe(out)
    assert image["what"] == "measurements" and image["table"] == "Image" and image["rows"] == len(rows)
    assert image["kinds"] == ["real"] and image["compounds"] == len({r["Metadata_Compound"] for r in rows})
    assert "`cellfluxrl measure` image table" in format_info(image)
    nuclei = describe(out.with_name("real_Nuclei.csv"))
    assert nuclei["table"] == "Nuclei" and nuclei["rows"] == len(read_csv(out.with_name("real_Nuclei.csv"))[1])
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(CellfluxError, match="did not write"):
        describe(other)

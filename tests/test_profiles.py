"""Profiles (evaluation.profiles): per-image features from label images, standardisation against the
real targets, per-compound median profiles, their cosine similarity, and the report row built from
the rewards' own segmentation. The ``score`` command's row and ``--measurements`` are in tests/test_score.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellfluxrl.errors import CellfluxError
from cellfluxrl.evaluation.profiles import (MIN_PAIRS, PROFILE_FEATURES, PROFILE_SHAPE_FEATURES, compound_profiles,
                                            cosine_similarity, fit_standardizer, image_features,
                                            mean_sem_over_compounds, profile_similarity, standardize)


def test_standardize_and_median_profile_match_a_hand_computation():
    """Real targets: A = (1, 10, 5), (3, 10, 5); B = (5, 20, 5), (7, 40, 5). Feature 2 is constant (s.d. 0:
    dropped); feature 0 has mean 4 and population s.d. sqrt(5), feature 1 mean 20 and s.d. sqrt(150)."""
    real = np.array([[1, 10, 5], [3, 10, 5], [5, 20, 5], [7, 40, 5]], dtype=np.float64)
    compounds = np.array(["A", "A", "B", "B"])
    mean, sd, kept = fit_standardizer(real)
    np.testing.assert_array_equal(kept, [True, True, False])
    assert mean[:2].tolist() == [4.0, 20.0]
    assert sd[0] == pytest.approx(math.sqrt(5), rel=1e-15) and sd[1] == pytest.approx(math.sqrt(150), rel=1e-15)
    q = compound_profiles(standardize(real, mean, sd, kept), compounds, ["A", "B"])
    np.testing.assert_allclose(q, [[-2 / math.sqrt(5), -10 / math.sqrt(150)], [2 / math.sqrt(5), 10 / math.sqrt(150)]],
                               rtol=1e-14)
    # Generated images of A: z of feature 0 = 0, -2/sqrt5, -4/sqrt5 (median -2/sqrt5); feature 1 = 0, 10/sqrt150, 0
    # (median 0); a NaN is a missing value, left out of the median.
    generated = np.array([[4, 20, 9], [2, 30, 1], [0, 20, 0], [np.nan, np.nan, 3]])
    p = compound_profiles(standardize(generated, mean, sd, kept), np.array(["A"] * 4), ["A"])
    np.testing.assert_allclose(p, [[-2 / math.sqrt(5), 0.0]], rtol=1e-14, atol=1e-15)
    want = (4 / 5) / ((2 / math.sqrt(5)) * math.sqrt(4 / 5 + 100 / 150))
    assert cosine_similarity(p, q[:1])[0] == pytest.approx(want, rel=1e-14)
    assert want == pytest.approx(0.738549, abs=1e-6)


def test_standardizer_ignores_missing_values_and_drops_what_it_cannot_scale():
    real = np.array([[1.0, np.nan, 2.0], [3.0, 7.0, np.inf], [np.nan, np.nan, 2.0]])
    mean, sd, kept = fit_standardizer(real)
    assert mean[0] == 2.0 and sd[0] == 1.0  # NaN left out: (1, 3)
    np.testing.assert_array_equal(kept, [True, False, False])  # one finite value; two equal finite values
    z = standardize(np.array([[4.0, 1.0, 1.0], [np.inf, 1.0, 1.0]]), mean, sd, kept)
    assert z.shape == (2, 1) and z[0, 0] == 2.0 and np.isnan(z[1, 0])
    with pytest.raises(CellfluxError, match="expected reference features"):
        fit_standardizer(np.zeros(3))


def test_cosine_is_one_for_identical_profiles_and_zero_for_orthogonal_ones():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(5, 16))
    np.testing.assert_allclose(cosine_similarity(p, p), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(cosine_similarity(p, 3.5 * p), 1.0, rtol=0, atol=1e-15)  # scale-free
    np.testing.assert_allclose(cosine_similarity(p, -p), -1.0, rtol=0, atol=1e-15)
    a, b = np.array([[1.0, 0.0, 0.0, 2.0]]), np.array([[0.0, 3.0, -1.0, 0.0]])
    assert cosine_similarity(a, b)[0] == 0.0
    # Random directions in 2,000 dimensions: near 0 (s.d. 1/sqrt(2000) = 0.022).
    x, y = rng.normal(size=(50, 2000)), rng.normal(size=(50, 2000))
    assert np.abs(cosine_similarity(x, y)).max() < 0.12
    # Only the features finite in both count; none in common or a zero vector: NaN.
    assert cosine_similarity(np.array([[1.0, np.nan, 5.0]]), np.array([[2.0, 1.0, np.nan]]))[0] == 1.0
    assert np.isnan(cosine_similarity(np.array([[np.nan, 1.0]]), np.array([[1.0, np.nan]]))[0])
    assert np.isnan(cosine_similarity(np.zeros((1, 3)), np.ones((1, 3)))[0])


def test_mean_and_standard_error_over_compounds():
    mean, sem, n = mean_sem_over_compounds(np.array([0.2, 0.4, 0.9, np.nan]))
    assert n == 3 and mean == pytest.approx(0.5)
    assert sem == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1) / math.sqrt(3), rel=1e-14)
    assert mean_sem_over_compounds(np.array([0.7])) == (0.7, None, 1)
    assert mean_sem_over_compounds(np.array([np.nan])) == (None, None, 0)


def test_image_features_of_hand_made_masks():
    """Three square nuclei (2, 4, 6 px) in one 10x10 cell; a second image without any object."""
    nuclei, cells = np.zeros((2, 24, 24), np.int32), np.zeros((2, 24, 24), np.int32)
    for label, (y, side) in enumerate(((2, 2), (6, 4), (12, 6)), start=1):
        nuclei[0, y:y + side, 3:3 + side] = label
    cells[0, 1:21, 2:12] = 4  # labels need not be contiguous
    out = image_features(nuclei, cells)
    assert out.shape == (2, len(PROFILE_FEATURES)) and out.dtype == np.float64
    row = dict(zip(PROFILE_FEATURES, out[0]))
    assert row["Image_Count_Nuclei"] == 3 and row["Image_Count_Cells"] == 1
    assert row["Nuclei_AreaShape_Area"] == 16 and row["Cells_AreaShape_Area"] == 200  # median of 4, 16, 36
    assert row["Nuclei_AreaShape_Extent"] == 1.0 and row["Nuclei_AreaShape_Eccentricity"] == 0.0
    assert row["Nuclei_AreaShape_MajorAxisLength"] == pytest.approx(row["Nuclei_AreaShape_MinorAxisLength"])
    assert row["Cells_AreaShape_MajorAxisLength"] > row["Cells_AreaShape_MinorAxisLength"]  # 20 x 10
    from cellfluxrl.evaluation.measurements import shape_features

    perimeters = shape_features(nuclei[0]).features["Perimeter"]
    assert row["Nuclei_AreaShape_Perimeter"] == np.median(perimeters) == perimeters[1]
    assert out[1, :2].tolist() == [0, 0] and np.isnan(out[1, 2:]).all()
    assert len(PROFILE_FEATURES) == 2 + 2 * len(PROFILE_SHAPE_FEATURES)
    with pytest.raises(CellfluxError, match="of one shape"):
        image_features(nuclei, cells[:1])
    with pytest.raises(CellfluxError, match="integer nucleus and cell labels"):
        image_features(nuclei.astype(np.float32), cells)


def slow_image_features(nuclei: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """The reference: every image measured on its own (measure's shape_features), np.median of the finite values."""
    from cellfluxrl.evaluation.measurements import shape_features

    rows = []
    for n, c in zip(nuclei, cells):
        tables = [shape_features(n), shape_features(c)]
        row = [len(tables[0].labels), len(tables[1].labels)]
        for table in tables:
            for f in PROFILE_SHAPE_FEATURES:
                v = table.features[f][np.isfinite(table.features[f])]
                row.append(np.median(v) if v.size else np.nan)
        rows.append(row)
    return np.asarray(rows, dtype=np.float64)


def test_batched_image_features_equal_each_image_measured_alone():
    """One mosaic per batch (background rows between the images) gives each image's own numbers:
    objects on the frame, a one-pixel object (FormFactor inf, left out), skipped labels, empty images."""
    rng = np.random.default_rng(3)
    nuclei = rng.integers(0, 6, size=(12, 20, 17)).astype(np.int32)  # ragged random objects, touching the frame
    nuclei[nuclei == 3] = 9  # a skipped label range
    nuclei[4] = 0  # an empty image
    nuclei[5] = 0
    nuclei[5, 7, 7] = 2  # a single pixel: perimeter 0, FormFactor inf
    nuclei[5, 0:4, 0:5] = 1
    cells = np.where(rng.random((12, 20, 17)) < 0.8, rng.integers(1, 4, size=(12, 20, 17)), 0).astype(np.uint16)
    cells[7] = 0
    got, want = image_features(nuclei, cells), slow_image_features(nuclei, cells)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.isnan(got[4, 2:2 + len(PROFILE_SHAPE_FEATURES)]).all() and got[4, 0] == 0
    form_factor = 2 + PROFILE_SHAPE_FEATURES.index("FormFactor")
    assert got[5, 0] == 2 and np.isfinite(got[5, form_factor])  # the one-pixel nucleus' inf is left out
    assert image_features(nuclei[:0], cells[:0]).shape == (0, len(PROFILE_FEATURES))
    with pytest.raises(CellfluxError, match="labels must be >= 0"):
        image_features(-nuclei, cells)


def test_profile_similarity_real_reads_one_and_small_compounds_are_left_out():
    rng = np.random.default_rng(1)
    compounds = np.array(["a"] * 4 + ["b"] * 3 + ["c"] * 1)
    real = rng.normal(size=(8, len(PROFILE_FEATURES))) * 10 + 50
    real[:, 5] = 7.0  # zero s.d.: dropped
    close = real + rng.normal(size=real.shape) * 0.1
    found = profile_similarity({"real": real, "same": real.copy(), "close": close, "far": -real}, "real", compounds)
    cells = found["cells"]
    for column in ("real", "same"):  # the real targets themselves: 1 to float precision, for every compound
        assert abs(cells[column]["mean"] - 1.0) <= 1e-15 and cells[column]["n_compounds"] == 2
        assert cells[column]["sem"] <= 1e-15 and cells[column]["sem_kind"] == "over compounds"
    assert 0.99 < cells["close"]["mean"] < 1.0 and cells["far"]["mean"] < 0
    assert found["compounds"] == ["a", "b"] and found["left_out"] == ["c"] and MIN_PAIRS == 2
    assert found["dropped"] == [PROFILE_FEATURES[5]] and len(found["features"]) == len(PROFILE_FEATURES) - 1
    assert set(found["per_compound"]["close"]) == {"a", "b"}
    assert "1 with fewer left out" in found["note"] and "8 real targets" in found["note"]
    per = list(found["per_compound"]["close"].values())
    assert cells["close"]["sem"] == pytest.approx(np.std(per, ddof=1) / math.sqrt(2), rel=1e-12)
    # No compound with two pairs: no value, no error.
    alone = profile_similarity({"real": real[:3], "x": close[:3]}, "real", np.array(["a", "b", "c"]))
    assert alone["cells"]["x"]["mean"] is None and alone["compounds"] == []


def test_matches_pycytominer_standardize_then_median_aggregate():
    """pycytominer's normalize(method="standardize", fitted on the real images) then aggregate(median)
    per compound gives the same profiles (a test-only dependency: docs/evaluate.md says how to run it)."""
    pd = pytest.importorskip("pandas")
    pycytominer = pytest.importorskip("pycytominer")
    rng = np.random.default_rng(2)
    kinds = np.repeat(["real", "generated"], 15)
    compounds = np.tile(np.repeat(["x", "y", "z"], 5), 2)
    values = rng.normal(size=(30, len(PROFILE_FEATURES))) * rng.uniform(1, 20, len(PROFILE_FEATURES))
    values[[2, 17], 3] = np.nan
    df = pd.DataFrame(values, columns=list(PROFILE_FEATURES))
    df.insert(0, "Metadata_Kind", kinds)
    df.insert(1, "Metadata_Compound", compounds)
    meta = ["Metadata_Kind", "Metadata_Compound"]
    normalized = pycytominer.normalize(df, features=list(PROFILE_FEATURES), meta_features=meta,
                                       samples="Metadata_Kind == 'real'", method="standardize", output_file=None)
    theirs = pycytominer.aggregate(normalized, strata=meta, features=list(PROFILE_FEATURES), operation="median",
                                   output_file=None)
    mean, sd, kept = fit_standardizer(values[kinds == "real"])
    assert kept.all()
    for kind in ("real", "generated"):
        ours = compound_profiles(standardize(values[kinds == kind], mean, sd, kept), compounds[kinds == kind],
                                 ["x", "y", "z"])
        want = theirs[theirs["Metadata_Kind"] == kind].set_index("Metadata_Compound").loc[["x", "y", "z"]]
        np.testing.assert_allclose(ours, want[list(PROFILE_FEATURES)].to_numpy(), rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from cellfluxrl.data.synthetic import prepare_synthetic
    from cellfluxrl.rewards.evaluators_fit import fit_evaluators

    root = tmp_path_factory.mktemp("profiles") / "data"
    prepare_synthetic(root, n_images=300, seed=0, size=48, n_plates=2, progress=False)
    fit_evaluators(root, seed=0, classifier_epochs=2, progress=False)
    return root


def test_report_row_for_every_column_from_the_rewards_segmentation(dataset_dir):
    """evaluate's scoring path: a run of the real targets themselves reads exactly 1 (like ``real``), a
    noised run less; the baselines have the row too; and the features are those of the images each
    column shows (candidate 0, and the best of N by the overall reward), measured on the segmenter's labels."""
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.evaluation.baselines import baseline_sources
    from cellfluxrl.evaluation.candidates import MoAFeatures, Pairs, quantize, real_images
    from cellfluxrl.evaluation.report import build_report
    from cellfluxrl.evaluation.metrics import best_of_n
    from cellfluxrl.evaluation.scoring import evaluate_sources
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite

    dataset = load_dataset(dataset_dir)
    pairs = Pairs.from_dataset(dataset, 30, seed=0)
    suite = RewardSuite.from_dataset(dataset, dict(DEFAULT_WEIGHTS))
    judge = suite.evaluators.judge("cpu")

    def noised(pos, k):
        x = real_images(dataset, pairs, pos)
        g = torch.Generator().manual_seed(7 * k + int(pos[0]))
        return (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)

    references, _ = baseline_sources(("copy-control", "train-real"), dataset, pairs, 0)
    results = evaluate_sources(dataset, pairs, {"targets": lambda pos, k: real_images(dataset, pairs, pos),
                                                "noised": noised}, suite=suite, weights=dict(DEFAULT_WEIGHTS),
                               features=MoAFeatures(judge), classifier=suite.evaluators.moa_classifier("cpu"),
                               judge=judge, best_of=(1, 2), batch_size=8, kid_subset_size=5, kid_subsets=2,
                               references=references)
    section = build_report(results, split="id")
    assert section["labels"]["profile_similarity"] == "Profile similarity (cosine)"
    assert section["rows"].index("profile_similarity") == section["rows"].index("texture_hf") + 1
    table = section["table"]
    assert set(section["columns"]) == {"targets", "targets+best-of-2", "noised", "noised+best-of-2", "copy-control",
                                       "train-real", "real"}
    for column in section["columns"]:
        assert table[column]["profile_similarity"]["n_compounds"] >= 2, column
    for column in ("real", "targets", "targets+best-of-2"):
        assert abs(table[column]["profile_similarity"]["mean"] - 1.0) <= 1e-12, column
    assert table["noised"]["profile_similarity"]["mean"] < 1 - 1e-6
    assert table["copy-control"]["profile_similarity"]["mean"] < 1 - 1e-6
    assert section["profile"]["compounds"] and "real reads 1 by construction" in section["profile"]["note"]
    compound = section["profile"]["compounds"][0]
    assert section["per_condition"]["noised"][compound]["profile_similarity"] < 1
    # The stored features are those of the segmenter's labels of the images each column shows.
    order = pairs.order()[:8]
    x = real_images(dataset, pairs, order)
    nuclei, cells = suite.segmenter.segment(x.numpy())
    np.testing.assert_array_equal(results["profiles"]["real"][order], image_features(nuclei, cells))
    candidates = [quantize(noised(order, k)) for k in range(2)]
    pick = best_of_n(results["scores"]["noised"].total[order], 2)
    chosen = torch.stack([candidates[k][i] for i, k in enumerate(pick)])
    np.testing.assert_array_equal(results["profiles"]["noised+best-of-2"][order],
                                  image_features(*suite.segmenter.segment(chosen.numpy())))
    suite.close()

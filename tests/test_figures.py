"""The evaluation figures: Figure 4's rows, labels, captions and channel legend; Figure 5's real level."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest


@pytest.fixture()
def fake_results():
    """Results as :func:`cellfluxrl.evaluation.scoring.evaluate_sources` returns them: 3 pairs, 2 runs, K = 4."""
    from cellfluxrl.evaluation.candidates import Pairs

    pairs = Pairs(target=np.array([10, 11, 12]), control=np.array([0, 1, 2]), condition=np.array([0, 1, 1]),
                  compound=np.array(["taxol", "etoposide", "etoposide"]),
                  moa=np.array(["Microtubule stabilizers", "DNA damage", "DNA damage"]))
    base = np.array([[1.0, 3.0, 2.0, 0.5], [4.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 7.25]])
    scores = {"CellFlux": SimpleNamespace(total=base), "CellFluxRL": SimpleNamespace(total=base[:, ::-1] + 10),
              "real": SimpleNamespace(total=np.array([[20.0], [21.0], [22.0]]))}
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    columns = ["control", "CellFlux", "CellFlux+best-of-4", "CellFluxRL", "CellFluxRL+best-of-4", "real"]
    grid = [(0, {c: image for c in columns}), (2, {c: image for c in columns})]
    return {"pairs": pairs, "sources": ["CellFlux", "CellFluxRL"], "k_max": 4, "scores": scores, "grid": grid,
            "weights": {"moa": 5.0, "nuc_in_cyto": 2.0, "roundness": 1.0}}


def test_fig4_columns_put_each_run_then_the_best_of_k_picks_between_control_and_real(fake_results):
    from cellfluxrl.evaluation.report_figures import grid_columns

    assert grid_columns(["CellFlux", "CellFluxRL"], 4) == ["control", "CellFlux", "CellFluxRL", "CellFlux+best-of-4",
                                                          "CellFluxRL+best-of-4", "real"]
    assert grid_columns(["CellFlux"], 1) == ["control", "CellFlux", "real"]


def test_fig4_rows_name_compound_moa_dose_and_caption_the_shown_candidates_overall_reward(fake_results):
    from cellfluxrl.evaluation.report_figures import grid_rows

    dataset = SimpleNamespace(table={"dose": np.r_[np.zeros(10), [0.3, 1.0, 3.0]]})
    rows = grid_rows(fake_results, dataset)
    assert [r.label.split("\n") for r in rows] == [["taxol", "Microtubule stabilizers", "0.3 µM"],
                                                   ["etoposide", "DNA damage", "3 µM"]]
    first, second = (r.captions for r in rows)
    assert "control" not in first
    assert first["CellFlux"] == "overall 1.00"  # candidate 0 of the plain column
    assert first["CellFlux+best-of-4"] == "overall 3.00"  # the best of the 4 by the overall reward
    assert first["CellFluxRL"] == "overall 10.50" and first["CellFluxRL+best-of-4"] == "overall 13.00"
    assert second["CellFlux+best-of-4"] == "overall 7.25" and second["real"] == "overall 22.00"
    assert grid_rows(fake_results)[0].label == "taxol\nMicrotubule stabilizers"  # no dataset: no dose line


def test_fig4_plot_labels_rows_names_channels_and_prints_captions(fake_results):
    from cellfluxrl.evaluation.figures import image_grid_plot
    from cellfluxrl.evaluation.report_figures import grid_columns, grid_note, grid_rows
    from cellfluxrl.images import CHANNELS_BBBC021

    rows, columns = grid_rows(fake_results), grid_columns(fake_results["sources"], 4)
    fig = image_grid_plot(rows, columns, channels=CHANNELS_BBBC021, note=grid_note(fake_results))
    try:
        axes = np.array(fig.axes[:len(rows) * len(columns)]).reshape(len(rows), len(columns))
        assert [ax.get_ylabel() for ax in axes[:, 0]] == [r.label for r in rows]
        assert [ax.get_title() for ax in axes[0]][-2:] == ["CellFluxRL\n+best-of-4", "real"]
        assert axes[1, 3].get_xlabel() == "overall 7.25" and axes[1, 0].get_xlabel() == ""
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == ["red: actin (phalloidin)", "green: β-tubulin", "blue: DNA (DAPI)"]
        assert any("moa=5" in t.get_text() for t in fig.texts)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_channel_legend_follows_the_dataset_channel_order():
    from cellfluxrl.data.bbbc021 import CHANNELS_BBBC021
    from cellfluxrl.evaluation.figures import channel_caption, channel_legend

    assert CHANNELS_BBBC021 == ("actin", "tubulin", "dna")
    assert channel_caption(CHANNELS_BBBC021) == "red: actin (phalloidin), green: β-tubulin, blue: DNA (DAPI)"
    assert channel_legend(("dna", "actin", "tubulin"))[0] == ("red", "DNA (DAPI)")


def test_fig5_draws_the_real_level_dashed_on_each_panel_and_ticks_at_each_n():
    from cellfluxrl.evaluation.figures import best_of_n_plot

    ns = (1, 2, 4, 8)
    curves = {run: {k: [(n, off + 0.1 * n, 0.01) for n in ns] for k in ("moa", "overall")}
              for run, off in (("CellFlux", 0.0), ("CellFluxRL", 0.5))}
    real = {"moa": 0.93, "overall": 2.5}
    fig = best_of_n_plot(curves, {"moa": "MoA", "overall": "Overall", "roundness": "Roundness"}, real=real)
    try:
        axes = fig.axes
        for ax, key in zip(axes, ("moa", "overall")):
            dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
            assert len(dashed) == 1 and dashed[0].get_label() == "real"
            assert np.allclose(dashed[0].get_ydata(), real[key])
            assert ax.get_xscale() == "log" and list(ax.get_xticks()) == list(ns)
            assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
        assert not [ln for ln in axes[2].get_lines() if ln.get_linestyle() == "--"]  # no real value: no line
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["CellFlux", "CellFluxRL", "real"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_fig5_real_level_is_the_real_columns_mean():
    from cellfluxrl.evaluation.report_figures import real_levels

    section = {"table": {"real": {"moa": {"mean": 0.9, "sem": 0.1}, "overall": {"mean": -1.5, "sem": 0.2},
                                  "roundness": {"mean": None, "sem": None}}}}
    assert real_levels(section, ["moa", "overall", "roundness", "nuc_size"]) == {"moa": 0.9, "overall": -1.5}


def test_fig4_and_fig5_write_pngs(fake_results, tmp_path):
    from cellfluxrl.evaluation.figures import best_of_n_figure, image_grid_figure
    from cellfluxrl.evaluation.report_figures import grid_columns, grid_rows

    grid = image_grid_figure(grid_rows(fake_results), grid_columns(fake_results["sources"], 4), tmp_path / "g.png",
                             channels=("actin", "tubulin", "dna"))
    curve = best_of_n_figure({"a": {"moa": [(1, 0.1, 0.0), (2, 0.2, 0.0)]}}, {"moa": "MoA"}, tmp_path / "c.png",
                             real={"moa": 0.5})
    for path in (grid, curve):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""``cellfluxrl score`` end to end: 1,000 images of 96x96 (BBBC021's size), target under a minute on 2 cores.

Run: python -m pytest benchmarks/bench_score.py --benchmark-enable -p no:cacheprovider -s

Everything a user waits for is timed: the command reads a folder of 1,000 OME-TIFFs with
``samples.csv`` (compounds only: unpaired, so each image gets a real test target of its compound),
segments and measures them, runs both MoA classifiers (reward classifier and judge), streams the
judge's features and computes the distances, with the default baselines (``copy-control``,
``train-real``) and the real column beside it (4,000 images graded in all), and writes the report
and figures. The images are the dataset's own real treated crops, repeated to 1,000.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import pytest
from click.testing import CliRunner

N_IMAGES = 1000


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else platform's), with the cores this process may use."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


@pytest.fixture(scope="module")
def score_inputs(tmp_path_factory):
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.data.synthetic import prepare_synthetic
    from cellfluxrl.export import write_csv, write_ome_tiff
    from cellfluxrl.rewards.evaluators_fit import fit_evaluators

    root = tmp_path_factory.mktemp("bench_score")
    data = root / "data"
    prepare_synthetic(data, n_images=1200, seed=0, size=96, n_plates=2, progress=False)
    fit_evaluators(data, seed=0, classifier_epochs=1, progress=False)
    ds = load_dataset(data)
    test = ds.select(split="test", state="treated")
    compounds = set(ds.table["compound"][test].tolist())
    rows = [r for r in ds.select(state="treated") if ds.table["compound"][r] in compounds]
    rows = np.resize(np.asarray(rows), N_IMAGES)
    folder = root / "images"
    folder.mkdir()
    table = []
    for i, r in enumerate(rows):
        name = f"{i:05d}.ome.tif"
        write_ome_tiff(folder / name, np.asarray(ds.images[r]), ds.channels)
        table.append({"file": name, "compound": str(ds.table["compound"][r])})
    write_csv(folder / "samples.csv", table)
    return data, folder, root


def test_score_1000_images_96px(benchmark, score_inputs):
    from cellfluxrl.cli import cli

    data, folder, root = score_inputs
    outs = iter(range(100))

    def run():
        result = CliRunner().invoke(cli, ["score", "--data", str(data), str(folder), "--device", "cpu",
                                          "--out", str(root / f"report{next(outs)}")])
        assert result.exit_code == 0, result.output
        return result

    began = time.perf_counter()
    benchmark.pedantic(run, rounds=1, iterations=1)
    seconds = time.perf_counter() - began
    benchmark.extra_info.update({"images": N_IMAGES, "seconds": seconds, "images_per_s": N_IMAGES / seconds,
                                 "cpu": cpu_name(), "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0)})
    print(f"\nscore: {N_IMAGES} images of 96x96 in {seconds:.1f} s ({N_IMAGES / seconds:.1f} images/s) on {cpu_name()}")

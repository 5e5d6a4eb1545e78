"""Peak memory of ``prepare_impa`` does not grow with the number of cells (it streams).

Run: ``python -m pytest benchmarks/bench_prepare_impa.py --benchmark-enable -p no:cacheprovider -s``

Each size runs in a fresh child process that reports its peak resident set size (``ru_maxrss``)
and the peak of Python/numpy allocations (``tracemalloc``) after converting an IMPA-layout fixture
of N cells (96x96x3 uint8 crops, 2 plates x 2 splits x DMSO + 3 compounds).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SIZES = (2000, 8000)
COMPOUNDS = (("DMSO", "", "DMSO", "0", "0.0"), ("colchicine", "COc1cc2c(c(OC)c1OC)-c1ccc(OC)c(=O)cc1C(NC(C)=O)CC2",
             "Microtubule destabilizers", "1", "0.03"), ("cisplatin", "N.N.Cl[Pt]Cl", "DNA damage", "1", "10.0"),
             ("taxol", "CC(=O)OC1C(=O)C2(C)C(O)CC3OCC3(OC(C)=O)C2C(OC(=O)c2ccccc2)C2(O)CC(OC(=O)C(O)C(NC(=O)c3ccccc3)c3ccccc3)C(C)=C1C2(C)C",
                       "Microtubule stabilizers", "1", "3.0"))

CHILD = """
import json, resource, sys, time, tracemalloc
from cellfluxrl.data.bbbc021 import prepare_impa
tracemalloc.start()
start = time.perf_counter()
prepare_impa(sys.argv[1], sys.argv[2], progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tracemalloc_peak_mb": tracemalloc.get_traced_memory()[1] / 2**20,
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_fixture(root: Path, n_cells: int, seed: int = 0) -> Path:
    """An IMPA-layout folder with ``n_cells`` random crops."""
    rng = np.random.default_rng(seed)
    (root / "metadata").mkdir(parents=True)
    header = ["", "Unnamed: 0.1", "Unnamed: 0", "SAMPLE_KEY", "BATCH", "TABLE_NUMBER", "IMAGE_NUMBER",
              "OBJECT_NUMBER", "CPD_NAME", "SMILES", "DOSE", "ANNOT", "STATE", "PLATE", "SPLIT"]
    with open(root / "metadata" / "bbbc021_df_all.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(n_cells):
            week, plate = ("Week1", "22123") if i % 2 else ("Week2", "24121")
            name, smiles, moa, state, dose = COMPOUNDS[(i // 2) % len(COMPOUNDS)]
            split = "test" if (i // 8) % 5 == 0 else "train"
            key = f"{week}_{plate}_1_{i}_{float(i % 30)}"
            writer.writerow([i, i, i, key, f"{week}_{plate}", 1, i, float(i % 30), name, smiles, dose, moa,
                             state, plate, split])
            path = root / week / plate / f"1_{i}_{float(i % 30)}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    return root


def run_child(source: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(source), str(out)], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("impa")
    return {n: write_fixture(root / f"n{n}", n) for n in SIZES}


def test_prepare_impa_peak_memory_independent_of_n(benchmark, fixtures, tmp_path):
    small = run_child(fixtures[SIZES[0]], tmp_path / "small")
    large = benchmark.pedantic(run_child, args=(fixtures[SIZES[1]], tmp_path / "large"), rounds=1, iterations=1)
    benchmark.extra_info.update({f"n{SIZES[0]}": small, f"n{SIZES[1]}": large,
                                 "cells_per_s_large": SIZES[1] / large["seconds"]})
    print(f"\nprepare_impa peak memory: N={SIZES[0]}: {small}\nN={SIZES[1]}: {large}")
    assert large["ru_maxrss_mb"] < small["ru_maxrss_mb"] * 1.1 + 10  # 4x the cells, about the same peak
    assert large["tracemalloc_peak_mb"] < small["tracemalloc_peak_mb"] * 1.1 + 5

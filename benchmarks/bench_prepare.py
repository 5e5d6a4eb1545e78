"""Speed of ``prepare synthetic``: target >= 20,000 crops of 96x96 in <= 60 s on 2 cores.

Run: ``python -m pytest benchmarks/bench_prepare.py --benchmark-enable -p no:cacheprovider``.
The numba kernels are compiled (or loaded from the cache) by a warm-up call outside the timing.
"""

from __future__ import annotations

import itertools
import shutil
import time

from cellfluxrl.data.layout import load_dataset
from cellfluxrl.data.synthetic import prepare_synthetic, synthetic_batch

N_IMAGES = 20000


def test_prepare_synthetic_20k(benchmark, tmp_path):
    synthetic_batch(4)  # compile / load the kernels outside the timed region
    counter = itertools.count()

    def run():
        return prepare_synthetic(tmp_path / f"ds{next(counter)}", n_images=N_IMAGES, seed=0, size=96,
                                 progress=False)

    cpu0 = time.process_time()
    out = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["cpu_s"] = time.process_time() - cpu0  # all threads; wall time is shared-load sensitive
    assert len(load_dataset(out)) == N_IMAGES
    benchmark.extra_info["crops_per_s"] = N_IMAGES / benchmark.stats.stats.mean
    shutil.rmtree(out)  # 2 GB (images + int32 masks)

"""Shared test configuration: one torch thread, and CUDA tests skipped on machines without a GPU."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op torch thread per test module.

    The test models are tiny: with two threads on a 2-core CI machine (where numba's kernels also
    use both cores) torch only contends with itself, measured up to 10x slower.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Evaluation speed: the metric kernels at FID size, and end-to-end images/s on CPU.

Run: python -m pytest benchmarks/bench_evaluate.py --benchmark-enable -p no:cacheprovider

``test_evaluate_throughput_*`` report ``images_per_s`` (generation + rewards + features, per
generated candidate) in ``extra_info``; the generation uses the ``tiny`` UNet preset (random
weights: the cost does not depend on them) at 96x96, 5 Heun steps, CFG 0.2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def covariances():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 2048))
    y = rng.normal(0.1, 1.0, size=(3000, 2048))
    return x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False), x, y


def test_frechet_distance_2048(benchmark, covariances):
    from cellfluxrl.evaluation.metrics import frechet_distance

    mu1, c1, mu2, c2, _, _ = covariances
    value = benchmark(frechet_distance, mu1, c1, mu2, c2)
    assert value > 0


def test_running_stats_update_2048(benchmark, covariances):
    from cellfluxrl.evaluation.metrics import RunningStats

    x = covariances[4][:256]
    stats = RunningStats(2048)
    benchmark(stats.update, x)
    assert stats.n >= 256


def test_kid_100_subsets_of_100_2048(benchmark, covariances):
    from cellfluxrl.evaluation.metrics import kid

    x, y = covariances[4][:1000], covariances[5][:1000]
    mean, _ = benchmark.pedantic(kid, args=(x, y), kwargs={"subset_size": 100, "n_subsets": 100}, rounds=3)
    assert mean > 0


@pytest.fixture(scope="module")
def bench_setup(tmp_path_factory):
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.data.synthetic import prepare_synthetic
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite
    from cellfluxrl.rewards.evaluators_fit import fit_evaluators

    root = tmp_path_factory.mktemp("bench") / "data"
    prepare_synthetic(root, n_images=400, seed=0, size=96, n_plates=2, progress=False)
    fit_evaluators(root, seed=0, classifier_epochs=1, progress=False)
    dataset = load_dataset(root)
    suite = RewardSuite.from_dataset(dataset, dict(DEFAULT_WEIGHTS))
    return dataset, suite, (suite.evaluators.moa_classifier("cpu"), suite.evaluators.judge("cpu"))


def _throughput(benchmark, bench_setup, make_source, k: int, n_pairs: int = 16):
    from cellfluxrl.evaluation.candidates import MoAFeatures, Pairs
    from cellfluxrl.evaluation.scoring import evaluate_sources
    from cellfluxrl.rewards import DEFAULT_WEIGHTS

    dataset, suite, (classifier, judge) = bench_setup
    pairs = Pairs.from_dataset(dataset, n_pairs, seed=0)
    source = make_source(dataset, pairs)

    def run():
        return evaluate_sources(dataset, pairs, {"run": source}, suite=suite, weights=dict(DEFAULT_WEIGHTS),
                                features=MoAFeatures(judge), classifier=classifier, judge=judge, best_of=(1, k),
                                batch_size=16, kid_subset_size=8, kid_subsets=10)

    results = benchmark.pedantic(run, rounds=1, iterations=1)
    seconds = results["scores"]["run"].seconds
    benchmark.extra_info["images"] = n_pairs * k
    benchmark.extra_info["images_per_s"] = n_pairs * k / seconds
    benchmark.extra_info["real_images_per_s"] = n_pairs / results["scores"]["real"].seconds
    assert np.isfinite(results["scores"]["run"].total).all()


def test_evaluate_throughput_rewards_and_features_only(benchmark, bench_setup):
    """Candidates that cost nothing to make: the rewards + MoA features + bookkeeping part."""
    from cellfluxrl.evaluation.candidates import real_images

    def make_source(dataset, pairs):
        return lambda pos, k: real_images(dataset, pairs, pos).flip(-1)

    _throughput(benchmark, bench_setup, make_source, k=2)


def test_evaluate_throughput_tiny_unet_5_steps(benchmark, bench_setup):
    from cellfluxrl.evaluation.candidates import run_candidates
    from cellfluxrl.model.unet import build_unet

    def make_source(dataset, pairs):
        torch.manual_seed(0)
        net = build_unet("tiny", int(dataset.embeddings.shape[1])).eval()
        return run_candidates(net, dataset, pairs, seed=0, steps=5, cfg_scale=0.2)

    _throughput(benchmark, bench_setup, make_source, k=2)

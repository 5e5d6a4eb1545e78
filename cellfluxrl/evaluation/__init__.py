"""Evaluation: the paper's Table 1 (rewards, MoA accuracy, FID/KID), best-of-N, Figures 4 and 5.

Owns: the entry point and protocol (``pipeline``: :func:`~cellfluxrl.evaluation.pipeline.evaluate`),
the candidates every run is sampled into on shared pairs and noise (``candidates``), streamed
scoring of the candidates and the real targets (``scoring``), the distances and best-of-N
estimators (``metrics``), the FID InceptionV3 (``inception``), the report (``report``: the
tables; ``report_text``: report.md and report.json; ``report_figures``: what the figures show)
the drawing (``figures``), the baseline columns (``baselines``: copy-control, train-real), the
texture statistic (``texture``), and measuring any images: reading them (``image_sources``: a
sample npz or folder, a CSV of paths, a dataset split), CellProfiler's AreaShape maths
(``measurements``) and its tables (``measurement_tables``); scoring any generator's images
(``image_mapping``: channels, size, intensity; ``external``: images on pairs; ``score_report``),
the candidates ``evaluate --save-images`` writes (``saved_candidates``) and the jackknife-corrected
pooled FD (``debiased``). docs/evaluate.md explains the protocol,
docs/measure.md the measurements.

May import: rewards, model, data and the shared plumbing (runs are read through
``cellfluxrl.checkpoint``); never rl (a post-trained run is just a run) or the commands. This
``__init__`` imports nothing.
"""

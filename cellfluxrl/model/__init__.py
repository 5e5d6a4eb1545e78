"""Model: the CellFlux velocity network, its flow, sampling and pretraining.

Owns: the ADM UNet and its presets and CellFlux checkpoint-name mapping (``unet``), the
source-to-target flow-matching path, time sampling and source noise (``path``), the ODE time grids
and solvers (``sampler``), the flow-matching loss (``losses``), generation with classifier-free
guidance and test pairs (``generate``) and the resumable pretraining loop (``pretrain``).

May import: ``cellfluxrl.data`` and the shared plumbing (``errors``, ``config``, ``distributed``,
``images``, ``progress``, ``checkpoint``); never rewards, rl, evaluation or the commands. (The
top-level ``checkpoint`` module rebuilds this package's network, so it sits at this layer too.)
This ``__init__`` imports nothing (torch loads when a module here is imported).
"""

"""The sample grids a post-training run writes: fixed held-out pairs, control | base | RL | real target."""

from __future__ import annotations

from pathlib import Path

import torch

from cellfluxrl.grids import save_grid
from cellfluxrl.images import to_model, to_uint8
from cellfluxrl.model.generate import generate, test_pairs
from cellfluxrl.rl.config import PosttrainConfig


class SampleGrid:
    """Fixed held-out test pairs drawn every ``grid_every`` steps: control | base | RL | real target.

    The base column and the source noise are fixed at start, so successive grids differ only by the
    weights (a visible guard against reward hacking).
    """

    def __init__(self, dataset, ref: torch.nn.Module, cfg: PosttrainConfig, device: torch.device):
        target, control = test_pairs(dataset, cfg.grid_pairs, cfg.seed)
        self.cfg, self.device = cfg, device
        self.control = to_model(dataset.images[control], dequantize=False).to(device)
        self.target = to_model(dataset.images[target], dequantize=False)
        self.cond = torch.as_tensor(dataset.embeddings[dataset.condition[target]], device=device)
        self.labels = [str(c) for c in dataset.table["compound"][target]]
        self.base = self.sample(ref)

    def sample(self, net: torch.nn.Module) -> torch.Tensor:
        """Samples of ``net`` on the fixed pairs, fixed source noise, CPU float32 ``(n, C, H, W)``."""
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 7919)
        x_1, _ = generate(net, self.control, self.cond, generator=gen, sigma=self.cfg.sigma,
                          num_steps=self.cfg.rollout_steps, grid=self.cfg.rollout_grid, solver=self.cfg.rollout_solver,
                          cfg_scale=self.cfg.guidance)
        return x_1.float().cpu()

    def write(self, path: Path, net: torch.nn.Module, step: int) -> Path:
        """Write the PNG grid for ``net`` (the evaluation EMA) at ``step``; returns its path."""
        columns = [to_uint8(x) for x in (self.control, self.base, self.sample(net), self.target)]
        rows = [[column[i] for column in columns] for i in range(len(self.labels))]
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_grid(path, rows, self.labels, ["control", "base", f"RL step {step}", "real target"],
                         title=f"posttrain step {step} (evaluation EMA)")

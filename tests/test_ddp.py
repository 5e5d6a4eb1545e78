"""DDP: two CPU ranks (gloo) under torchrun train a few steps and end with identical weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import torch

from test_pretrain import MICRO, make_toy_dataset  # shared toy data (tests/ is on sys.path)

WORKER = textwrap.dedent("""
    import os, sys, torch
    from cellfluxrl.config import PretrainConfig
    from cellfluxrl.distributed import all_gather_tensor, cleanup, init_distributed
    from cellfluxrl.model.pretrain import train
    from cellfluxrl.model.unet import UNetConfig

    torch.set_num_threads(1)
    dataset, run, out = sys.argv[1:4]
    dist = init_distributed("cpu")
    unet = UNetConfig(**{micro!r})
    cfg = PretrainConfig(preset="tiny", steps=3, batch_size=2, ckpt_every=3, log_every=1, seed=5)
    result = train(dataset, run, cfg, unet=unet, dist=dist, compile=False)
    torch.save({{"rank": dist.rank, "world": dist.world_size, "model": result.net.state_dict(),
                "ema": result.ema.state_dict(), "ranks": all_gather_tensor(torch.tensor([dist.rank]))}},
               os.path.join(out, f"rank{{dist.rank}}.pt"))
    cleanup()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_ranks_hold_identical_weights(tmp_path):
    ds = make_toy_dataset(tmp_path / "ds")
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(micro=MICRO.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), str(ds.root), str(tmp_path / "run"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["ranks"].tolist() == [0, 1]
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
        assert torch.equal(r0["ema"][key], r1["ema"][key]), key
    # The weights moved away from the (zero-initialised) output layer: training really happened.
    assert r0["model"]["head_conv.weight"].abs().sum() > 0
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3 and all(torch.equal(ckpt["model"][k], r0["model"][k]) for k in ckpt["model"])
    stats = (tmp_path / "run" / "stats.jsonl").read_text().splitlines()
    assert len(stats) == 3  # only rank 0 writes

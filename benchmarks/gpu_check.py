"""One prepared GPU run book: check and time cellfluxrl's hot paths on one accelerator in < 6 minutes.

From the repository root, with no install, dataset or download (docs/performance.md has the budget)::

    python benchmarks/gpu_check.py --out gpu_check.json              # one GPU, about 5.5 minutes
    python benchmarks/gpu_check.py --device cpu --smoke --out s.json  # toy sizes, every code path

The parts (``PARTS``) run in order of value; one is skipped when less of ``--budget-s`` is left than
it is expected to need, and a watchdog writes the JSON and exits 3 at ``--hard-limit-s``. A child
process started first writes a small synthetic dataset and its evaluators on CPU (compiling numba)
while the parts that need no dataset use the GPU. Each part records its seconds, peak memory (CUDA
``max_memory_allocated``; on CPU the process's peak RSS so far) and any ``"error"``; the JSON is
rewritten after every figure, so a killed run keeps what it reached.
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, vendors' datasheets; first match wins.
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
                    ("A100", 312.0), ("L40S", 362.1))
TOL = {"bf16_rel": 0.05, "grad_cos": 0.99, "nft_identity": 0.02, "compile_rel": 0.05}
FULL = dict(preset="paper", size=96, n_images=400, pretrain_batch=32, pretrain_steps=10, sample_batch=32,
            sample_steps=50, posttrain_iters=2, eval_pairs=16, reward_images=1024, backend="inductor")
SMOKE = dict(preset="tiny", size=32, n_images=160, pretrain_batch=2, pretrain_steps=1, sample_batch=2,
             sample_steps=2, posttrain_iters=2, eval_pairs=4, reward_images=16, backend="eager")
SMOKE_RL = dict(group_size=2, groups_per_step=2, rollout_steps=2, rollout_batch=4, train_timesteps=1, train_batch=4)
COND_DIM, N_COND = 1024, 35
# (name, expected GPU seconds, needs the dataset), in order of value.
PARTS = (("setup", 0, False), ("correctness", 15, False), ("data", 10, True), ("posttrain", 60, True),
         ("rewards", 10, True), ("pretrain", 20, False), ("sampling", 25, False), ("evaluate", 40, True),
         ("posttrain_cfg0", 40, True), ("pretrain_compiled", 100, False), ("compile", 90, False))
EARLY_MAX_S = 30  # a part expected to take longer does not run ahead of the parts waiting for the dataset


class Report:
    """The JSON report, rewritten atomically after every change."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.lock = Path(path), threading.RLock()
        self.data = {"meta": meta, "parts": {}, "reached": [], "skipped": [], "targets": {}}

    def set(self, part: str, **values) -> None:
        with self.lock:
            self.data["parts"].setdefault(part, {}).update(values)
            self.flush()

    def target(self, name: str, value, ok) -> None:
        with self.lock:
            self.data["targets"][name] = {"value": value, "ok": ok}
            self.flush()

    def flush(self) -> None:
        with self.lock:
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self.data, indent=2, default=lambda v: v.item() if hasattr(v, "item") else repr(v)))
            os.replace(tmp, self.path)


def now(device: torch.device) -> float:
    """``perf_counter`` once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bf16(device: torch.device, enabled: bool = True):
    """bf16 autocast on any device type (the package itself autocasts only on CUDA)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


@contextmanager
def exact_fp32():
    """TF32 off, so that the fp32 reference is fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """The bf16 peak used for MFU and where it comes from."""
    if override:
        return float(override), "--peak-tflops"
    if device.type != "cuda":
        return None, "none (CPU)"
    name = torch.cuda.get_device_name(device)
    for fragment, value in PEAK_BF16_TFLOPS:
        if fragment in name:
            return value, f"datasheet dense bf16, {fragment} ({name})"
    return None, f"unknown device {name!r}: give --peak-tflops"


def mfu(ctx, flops_per_s: float) -> float | None:
    return flops_per_s / (ctx.peak * 1e12) if ctx.peak else None


def fresh_net(ctx, seed: int = 0) -> torch.nn.Module:
    """A random ``ctx.preset`` UNet on the device with its zero-initialised convs re-drawn (v != 0)."""
    from cellfluxrl.model.unet import build_unet

    torch.manual_seed(seed)
    net = build_unet(ctx.preset, COND_DIM)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)) and not m.weight.detach().any():
            m.reset_parameters()
    return net.to(ctx.device)


def inputs(ctx, batch: int, seed: int = 0, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x in [-1, 1], t in [0, 1), cond)`` on the device, fixed by ``seed``; ``size`` px (``ctx.size``)."""
    g, size = torch.Generator().manual_seed(seed), size or ctx.size
    x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    return x.to(ctx.device), torch.rand(batch, generator=g).to(ctx.device), torch.randn(batch, COND_DIM, generator=g).to(ctx.device)


def count_flops(ctx, backward: bool) -> tuple[int, dict]:
    """FLOPs of one image through the UNet (forward, or forward + backward) by FlopCounterMode,
    and their split by operator (GFLOP)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = fresh_net(ctx)
    x, t, c = inputs(ctx, 1)
    with FlopCounterMode(display=False) as counter, (nullcontext() if backward else torch.no_grad()):
        v = net(x, t, c)
        if backward:
            v.square().mean().backward()
    split = {str(op): n / 1e9 for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), split


# --------------------------------------------------------------------------------------------
# The dataset child process and the reward entry points.

def write_dataset(out: Path, size: int, n_images: int) -> str:
    """The synthetic dataset in ``out``; without rdkit every compound takes its row of the shipped
    CellFlux embeddings table (the same Morgan counts rdkit computes), given as a user CSV."""
    from cellfluxrl.data.synthetic import prepare_synthetic

    try:
        import rdkit  # noqa: F401
        extra, kind = {}, "morgan (rdkit)"
    except ImportError:
        extra, kind = {"embeddings": REPO / "cellfluxrl" / "data" / "bbbc021_emb_fp.csv"}, "CellFlux table (no rdkit)"
    prepare_synthetic(out, n_images=n_images, seed=0, size=size, n_plates=2, progress=False, **extra)
    return kind


def prepare_data(out: Path, size: int, n_images: int) -> None:
    """(Child process, CPU.) Dataset + evaluators in ``out``; status in ``out.json``."""
    from cellfluxrl.rewards.evaluators_fit import fit_evaluators

    start, status = time.perf_counter(), {}
    try:
        status["embeddings"] = write_dataset(out, size, n_images)
        fit_evaluators(out, seed=0, progress=False, classifier_epochs=1, device="cpu")
    except Exception as exc:  # reported by the parent
        status["error"] = f"{type(exc).__name__}: {exc}"
    status["seconds"] = time.perf_counter() - start
    Path(f"{out}.json").write_text(json.dumps(status))


def start_prep(ctx) -> None:
    """Start the dataset child on half the CPU cores; it overlaps the parts that need no dataset."""
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "NUMBA_NUM_THREADS": threads}
    ctx.data_dir, ctx.prep_log = ctx.tmp / "data", open(ctx.tmp / "prep.log", "w")
    command = [sys.executable, str(Path(__file__).resolve()), "--prepare-data", str(ctx.data_dir),
               "--size", str(ctx.size), "--n-images", str(ctx.n_images)]
    ctx.prep = subprocess.Popen(command, env=env, stdout=ctx.prep_log, stderr=subprocess.STDOUT)


def reward_entry_points(tmp: Path) -> str:
    """Make the built-in rewards discoverable when cellfluxrl is not pip-installed: write the
    ``[project.entry-points]`` of ``pyproject.toml`` as a ``.dist-info`` under ``tmp`` and put
    ``tmp/site`` on ``sys.path``, as an editable install would."""
    import importlib

    from cellfluxrl import __version__
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, available_rewards

    if set(DEFAULT_WEIGHTS) <= set(available_rewards()):
        return "installed package metadata"
    import tomllib  # Python >= 3.11 (the GPU image has 3.12)
    group = "cellfluxrl.rewards"
    entries = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][group]
    info = tmp / "site" / f"cellfluxrl-{__version__}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: cellfluxrl\nVersion: {__version__}\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    sys.path.append(str(tmp / "site"))
    importlib.invalidate_caches()
    return "declared from pyproject.toml (package not installed)"


# --------------------------------------------------------------------------------------------
# The parts: each gets the context and ``rec(**figures)``; an exception becomes the part's error.

def part_setup(ctx, rec) -> None:
    dev = ctx.device
    rec(device=str(dev), device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        torch=torch.__version__, peak_bf16_tflops=ctx.peak, peak_source=ctx.peak_source, cpu_count=os.cpu_count())
    if dev.type == "cuda":  # what bf16 matmuls reach here (8192^3, 10 products after 3 warm-ups)
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        t0 = now(dev)
        for _ in range(10):
            a @ a
        rec(matmul_bf16_tflops=10 * 2 * 8192 ** 3 / (now(dev) - t0) / 1e12)
    (ctx.flops, split), (train, _) = count_flops(ctx, backward=False), count_flops(ctx, backward=True)
    rec(forward_gflops_per_image=ctx.flops / 1e9, forward_gflops_by_op=split, train_gflops_per_image=train / 1e9,
        train_over_forward=train / ctx.flops,
        summary=f"{ctx.preset} at {ctx.size} px: forward {ctx.flops / 1e9:.1f} GFLOP/img, training {train / ctx.flops:.2f}x")


def part_correctness(ctx, rec) -> None:
    from cellfluxrl.model.generate import generate
    from cellfluxrl.model.losses import fm_loss
    from cellfluxrl.model.path import interpolate

    dev, checks = ctx.device, {}
    net = fresh_net(ctx).eval()  # dropout off: fp32 and bf16 see the same network
    size = 16 if ctx.smoke else ctx.size  # bf16 convolutions are slow on CPUs
    x, t, c = inputs(ctx, 1 if ctx.smoke else 4, size=size)
    x1 = inputs(ctx, len(x), seed=1, size=size)[0]
    with torch.no_grad():
        with exact_fp32():
            v32 = net(x, t, c)
        with bf16(dev):
            checks["velocity_bf16_rel_err"] = (rel_err(net(x, t, c), v32), TOL["bf16_rel"])

    def loss_grad(half: bool) -> tuple[float, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        with bf16(dev, half), (nullcontext() if half else exact_fp32()):
            loss = fm_loss(net(interpolate(x, x1, t), t, c), x, x1).mean()
        loss.backward()
        return float(loss.detach()), torch.cat([p.grad.flatten().float() for p in net.parameters()])

    (l32, g32), (l16, g16) = loss_grad(False), loss_grad(True)
    cos = float(torch.nn.functional.cosine_similarity(g16, g32, dim=0))
    checks["pretrain_loss_bf16_rel_err"] = (abs(l16 - l32) / abs(l32), TOL["bf16_rel"])
    checks["pretrain_grad_bf16_cosine_gap"] = (1.0 - cos, 1.0 - TOL["grad_cos"])
    del g32, g16
    net.zero_grad(set_to_none=True)
    x_gen, _ = generate(net, x, c, generator=torch.Generator(device=dev).manual_seed(0), num_steps=2, cfg_scale=0.2)
    nft = nft_step(ctx, net)
    checks["nft_onpolicy_identity_rel_err"] = (nft.pop("identity_rel_err"), TOL["nft_identity"])
    gen_finite = bool(torch.isfinite(x_gen).all())
    ok = gen_finite and nft["finite"] and all(v <= tol for v, tol in checks.values())
    rec(pretrain_loss_fp32=l32, pretrain_loss_bf16=l16, pretrain_grad_cosine=cos, generate_finite=gen_finite,
        nft=nft, checks={k: {"value": v, "tol": tol, "ok": v <= tol} for k, (v, tol) in checks.items()},
        summary=f"bf16: v {checks['velocity_bf16_rel_err'][0]:.1e}, loss {checks['pretrain_loss_bf16_rel_err'][0]:.1e}, "
                f"grad cos {cos:.4f}; NFT {nft['loss']:.4g}: {'ok' if ok else 'OUT OF TOLERANCE'}")
    ctx.report.target("correctness_within_tolerance", ok, ok)


def nft_step(ctx, net) -> dict:
    """One ``nft_backward`` (bf16 on CUDA) with theta = old = ref: the policy loss must equal
    ``adv_clip / nft_beta * fm_old`` and the KL term 0."""
    from cellfluxrl.rl.config import PosttrainConfig
    from cellfluxrl.rl.rollouts import Rollouts
    from cellfluxrl.rl.step import build_policies, nft_backward

    cfg = PosttrainConfig(group_size=2, groups_per_step=2, rollout_steps=2, train_timesteps=1, train_batch=4, cfg_scale=0.2)
    policies = build_policies(copy.deepcopy(net), ctx.device, 1)
    x_ctrl, _, cond = inputs(ctx, 4, seed=2)
    ro = Rollouts(x_0=x_ctrl + torch.randn_like(x_ctrl), x_ctrl=x_ctrl, x_1=inputs(ctx, 4, seed=3)[0], cond=cond,
                  moa=["DMSO"] * 4, futures=[])
    r = torch.rand(4, generator=torch.Generator().manual_seed(0)).to(ctx.device)
    out = nft_backward(policies, ro, r, cfg, np.random.default_rng(0), ctx.device)
    expected = cfg.adv_clip / cfg.nft_beta * out["fm_old"]
    grads = [p.grad for p in policies.theta.parameters() if p.grad is not None]
    finite = all(map(math.isfinite, out.values())) and bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads)
    return {**out, "finite": finite, "identity_rel_err": abs(out["policy_loss"] - expected) / max(abs(expected), 1e-12)}


def part_data(ctx, rec) -> None:
    from cellfluxrl.config import PretrainConfig
    from cellfluxrl.distributed import DistInfo
    from cellfluxrl.model.pretrain import train

    t0 = time.perf_counter()
    try:
        ctx.prep.wait(timeout=max(1.0, ctx.left() - 60))
    except subprocess.TimeoutExpired:
        ctx.prep.kill()
        raise RuntimeError("the dataset child did not finish within the budget") from None
    status_file = Path(f"{ctx.data_dir}.json")
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    if ctx.prep.returncode or "error" in status or not status:
        tail = (ctx.tmp / "prep.log").read_text()[-600:]
        raise RuntimeError(f"dataset child failed (rc {ctx.prep.returncode}): {status.get('error', '')} {tail}")
    rec(prep_wait_s=time.perf_counter() - t0, prep_s=status["seconds"], embeddings=status["embeddings"],
        images=ctx.n_images, reward_entry_points=reward_entry_points(ctx.tmp))
    t0 = time.perf_counter()
    cfg = PretrainConfig(preset=ctx.preset, steps=1, batch_size=2, ckpt_every=1, log_every=1)
    train(ctx.data_dir, ctx.tmp / "base", cfg, dist=DistInfo(device=ctx.device), compile=False)
    ctx.base_run = ctx.tmp / "base"
    rec(base_run_s=time.perf_counter() - t0,
        summary=f"dataset {status['seconds']:.0f} s in the child, base run {time.perf_counter() - t0:.1f} s")


class _Enough(Exception):
    """Raised from ``on_step`` to stop ``posttrain`` after the measured iterations."""


def posttrain_speed(ctx, rec, cfg_scale: float | None) -> None:
    """Iterations of ``posttrain.posttrain`` at the CLI defaults (``cfg_scale=None``: the base run's
    sampling CFG, guided training) or at a given CFG scale; the first iteration is the warm-up."""
    from cellfluxrl.rl.config import PosttrainConfig
    from cellfluxrl.rl.loop import posttrain

    cfg = replace(PosttrainConfig(**SMOKE_RL) if ctx.smoke else PosttrainConfig(), grid_every=0,
                  **({} if cfg_scale is None else {"cfg_scale": cfg_scale}))
    tag, out = ("posttrain", "rl") if cfg_scale is None else (f"posttrain_w{cfg_scale:g}", f"rl_w{cfg_scale:g}")
    records = []

    def on_step(stats: dict) -> None:
        records.append(stats)
        if len(records) >= ctx.posttrain_iters or ctx.left() < 1.5 * stats["t_step"] + 5:
            raise _Enough

    try:
        posttrain(ctx.base_run, ctx.tmp / out, cfg, device=str(ctx.device), on_step=on_step)
    except _Enough:
        pass
    timed = records[1:] or records
    keys = ("t_step", "t_rollout", "t_reward_wait", "t_train", "t_reward_busy", "reward_wait_share", "images_per_s")
    m = {k: float(np.mean([r[k] for r in timed])) for k in keys}
    finite = all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    rec(iterations=len(records), warmup_t_step=records[0]["t_step"], **m, hours_for_1200_steps=1200 * m["t_step"] / 3600,
        finite=finite, loss=[r["loss"] for r in records],
        summary=f"{m['t_step']:.2f} s/it (rollout {m['t_rollout']:.2f} / reward wait {m['t_reward_wait']:.3f} / "
                f"train {m['t_train']:.2f}); 1,200 steps {1200 * m['t_step'] / 3600:.2f} h")
    ctx.report.target(f"{tag}_step_s<=9.6", m["t_step"], m["t_step"] <= 9.6)
    ctx.report.target(f"{tag}_reward_wait_share<=0.10", m["reward_wait_share"], m["reward_wait_share"] <= 0.10)
    # The FLOP model (docs/performance.md): UNet passes of the rollouts (Heun evaluates twice per step,
    # the last included) and per training item (theta forward + backward = 3, old, ref); guidance doubles each.
    stored = json.loads((ctx.tmp / out / "config.json").read_text()).get("posttrain", {})
    w = float(stored.get("cfg_scale") or 0.0)  # None in the CLI defaults = the base run's sampling CFG
    n = cfg.groups_per_step * cfg.group_size
    items, nfe, per_velocity = n * cfg.n_train_timesteps, 2 * cfg.rollout_steps, 2 if w else 1
    rollout_f, train_f = ctx.flops * n * nfe * per_velocity, ctx.flops * items * 5 * per_velocity
    ctx.rollout_rate = getattr(ctx, "rollout_rate", None) or n / m["t_rollout"]  # the CLI defaults' if measured
    rec(cfg_scale=w, rollouts=n, rollout_nfe=nfe, train_items=items, tflop_per_iteration=(rollout_f + train_f) / 1e12,
        rollout_mfu=mfu(ctx, rollout_f / m["t_rollout"]), train_mfu=mfu(ctx, train_f / m["t_train"]),
        iteration_mfu=mfu(ctx, (rollout_f + train_f) / m["t_step"]), rollout_images_per_s=n / m["t_rollout"])


part_posttrain = functools.partial(posttrain_speed, cfg_scale=None)
part_posttrain_cfg0 = functools.partial(posttrain_speed, cfg_scale=0.0)


def part_rewards(ctx, rec) -> None:
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.images import to_model
    from cellfluxrl.rewards import DEFAULT_WEIGHTS, RewardSuite
    from cellfluxrl.rl.config import PosttrainConfig

    suite = RewardSuite.from_dataset(str(ctx.data_dir), dict(DEFAULT_WEIGHTS), device=str(ctx.device))
    ds = load_dataset(ctx.data_dir)
    idx = np.arange(ctx.reward_images) % len(ds)
    images, moa = to_model(np.asarray(ds.images[idx]), dequantize=False), ds.table["moa"][idx].astype(str)
    chunk = 8 if ctx.smoke else PosttrainConfig().rollout_batch  # what the reward worker gets per job
    suite.score(images[:chunk], list(moa[:chunk]))  # warm-up (numba cache, cuDNN)
    seg = rewards = moa_s = 0.0
    for lo in range(0, len(idx), chunk):
        t0 = time.perf_counter()
        batch = suite.make_batch(images[lo:lo + chunk], list(moa[lo:lo + chunk]))
        t1 = time.perf_counter()
        suite.rewards["moa"](batch)  # the classifier runs once per batch (cached for score_batch)
        t2 = time.perf_counter()
        result = suite.score_batch(batch)
        seg, moa_s, rewards = seg + t1 - t0, moa_s + t2 - t1, rewards + time.perf_counter() - t1
    import numba

    n, rollout = len(idx), getattr(ctx, "rollout_rate", None)
    rate = n / (seg + rewards)
    # numba's OpenMP pool can starve torch's CPU work afterwards (docs/performance.md): record the setting
    rec(numba_threading_layer=numba.threading_layer(), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    rec(images=n, chunk=chunk, segment_and_stats_per_s=n / seg, seven_rewards_per_s=n / rewards, moa_per_s=n / moa_s,
        total_per_s=rate, finite=bool(np.isfinite(result.total).all()), rollout_images_per_s=rollout,
        headroom_over_rollouts=rate / rollout if rollout else None,
        summary=f"{rate:,.0f} img/s scored" + (f", {rate / rollout:.0f}x the rollout rate" if rollout else ""))


def pretrain_speed(ctx, rec, compiled: bool) -> None:
    """The train loop's step (``fm_batch_loss``, AdamW, EMA) on device-resident synthetic batches."""
    from cellfluxrl.config import PretrainConfig
    from cellfluxrl.model.pretrain import ema_decay_at, ema_update, fm_batch_loss

    dev, b = ctx.device, ctx.pretrain_batch
    cfg = PretrainConfig(preset=ctx.preset, batch_size=b)
    batch = {"x_0": inputs(ctx, b, seed=4)[0], "x_1": inputs(ctx, b, seed=5)[0],
             "cond": torch.randint(0, N_COND, (b,), device=dev)}
    emb = torch.randn(N_COND, COND_DIM, device=dev)
    net = fresh_net(ctx).train()
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    model = torch.compile(net, backend=ctx.backend) if compiled else net
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)

    def step(i: int) -> float:
        loss = fm_batch_loss(model, batch, emb, cfg, gen, dev)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema_update(ema, net, ema_decay_at(i, cfg.ema_decay))
        return float(loss.detach())

    t0 = now(dev)
    losses = [step(0), step(1)]
    first, t0, n = now(dev) - t0, now(dev), 0
    while n < ctx.pretrain_steps and (n == 0 or ctx.left() > 30):
        losses.append(step(2 + n))
        n += 1
    dt = (now(dev) - t0) / n
    rate, util = b / dt, mfu(ctx, 3 * ctx.flops * b / dt)
    rec(batch=b, first_two_steps_s=first, timed_steps=n, step_s=dt, images_per_s=rate, mfu=util,
        finite=all(map(math.isfinite, losses)), summary=f"batch {b}: {rate:.1f} img/s, MFU {util if util is None else f'{util:.3f}'}"
        + (f", first two steps (compile) {first:.0f} s" if compiled else ""))
    best = max(util or 0.0, ctx.report.data["targets"].get("pretrain_mfu>=0.35", {}).get("value") or 0.0)
    ctx.report.target("pretrain_mfu>=0.35", best if ctx.peak else None, best >= 0.35 if ctx.peak else None)


part_pretrain = functools.partial(pretrain_speed, compiled=False)
part_pretrain_compiled = functools.partial(pretrain_speed, compiled=True)


def timed_sampling(ctx, net, batch: int) -> dict:
    """images/s of ``generate``: ``ctx.sample_steps`` Heun steps with batched CFG 0.2."""
    from cellfluxrl.model.generate import generate

    x, _, c = inputs(ctx, batch, seed=6)
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    with torch.no_grad():
        generate(net, x, c, generator=gen, num_steps=1, cfg_scale=0.2)  # warm-up (and compilation)
        t0 = now(ctx.device)
        out, _ = generate(net, x, c, generator=gen, num_steps=ctx.sample_steps, cfg_scale=0.2)
        dt = now(ctx.device) - t0
    passes = batch * 2 * 2 * ctx.sample_steps  # Heun: 2 evaluations per step; CFG: 2 UNet passes each
    return {"batch": batch, "steps": ctx.sample_steps, "seconds": dt, "images_per_s": batch / dt, "unet_passes": passes,
            "mfu": mfu(ctx, passes * ctx.flops / dt), "finite": bool(torch.isfinite(out).all())}


def part_sampling(ctx, rec) -> None:
    res = timed_sampling(ctx, fresh_net(ctx).eval(), ctx.sample_batch)
    ctx.sample_rate = res["images_per_s"]
    per_image_50 = 50 / ctx.sample_steps / res["images_per_s"]  # seconds per image at 50 steps
    rec(**res, generation_hours_5120_pairs_best_of_4=5120 * 4 * per_image_50 / 3600,
        summary=f"{res['images_per_s']:.2f} img/s ({1 / per_image_50:.2f} at 50 steps), MFU "
                f"{res['mfu'] if res['mfu'] is None else round(res['mfu'], 3)}")


def part_evaluate(ctx, rec) -> None:
    from cellfluxrl.evaluation.pipeline import evaluate

    n, k = ctx.eval_pairs, 4
    # One section of n pairs, as CellFlux's first 5,120 test rows (the CLI default "both" does n per split).
    split = {"split": "all"} if "split" in inspect.signature(evaluate).parameters else {}
    t0 = time.perf_counter()
    report = evaluate(str(ctx.data_dir), [str(ctx.base_run)], n=n, best_of=(1, 2, k), batch_size=n, steps=ctx.sample_steps,
                      cfg_scale=0.2, device=str(ctx.device), kid_subset_size=max(2, n // 2), kid_subsets=10, **split)
    wall = time.perf_counter() - t0
    hours = wall * 50 / ctx.sample_steps * 5120 / n / 3600  # generation dominates; smoke runs fewer steps
    rec(pairs=n, best_of=k, steps=ctx.sample_steps, seconds=wall, generated_per_s=n * k / wall,
        report_keys=sorted(report)[:12], hours_5120_pairs_best_of_4=hours,
        summary=f"{n * k / wall:.2f} generated img/s incl. scoring; 5,120 pairs x best-of-4 ~ {hours:.2f} h")


def part_compile(ctx, rec) -> None:
    net = fresh_net(ctx).eval()
    compiled = torch.compile(net, backend=ctx.backend, dynamic=False)
    b = 2 * ctx.sample_batch  # the batched-CFG shape the sampler uses
    x, t, c = inputs(ctx, b, seed=7)
    keep = torch.cat([torch.ones(b // 2), torch.zeros(b // 2)]).to(ctx.device)
    with torch.no_grad(), bf16(ctx.device, ctx.device.type == "cuda"):
        t0 = now(ctx.device)
        v_c = compiled(x, t, c, cond_keep=keep)
        compile_s = now(ctx.device) - t0
        err = rel_err(v_c, net(x, t, c, cond_keep=keep))
    rec(compile_s=compile_s, compiled_vs_eager_rel_err=err, tol=TOL["compile_rel"], ok=err <= TOL["compile_rel"])
    res, eager = timed_sampling(ctx, compiled, ctx.sample_batch), getattr(ctx, "sample_rate", None)
    rec(sampling=res, speedup_vs_eager=res["images_per_s"] / eager if eager else None,
        summary=f"compile {compile_s:.0f} s, rel err {err:.1e}, sampling {res['images_per_s']:.2f} img/s compiled")


# --------------------------------------------------------------------------------------------
# Running the parts under the budget.

def run_part(ctx, name: str) -> None:
    """One part, with its seconds, peak memory and any error recorded."""
    report, dev = ctx.report, ctx.device
    ctx.current = name
    report.set(name, started_at_s=round(ctx.elapsed(), 1))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    try:
        globals()[f"part_{name}"](ctx, lambda **kv: report.set(name, **kv))
    except Exception as exc:
        report.set(name, error=f"{type(exc).__name__}: {exc}"[:800])
    if dev.type == "cuda":
        mem = torch.cuda.max_memory_allocated(dev) / 2**30, "cuda max_memory_allocated"
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS so far"
    report.data["reached"].append(name)
    report.set(name, seconds=time.perf_counter() - t0, peak_mem_gb=mem[0], peak_mem_kind=mem[1])


def schedule(ctx) -> None:
    """Parts in order of value; while the dataset child runs, short parts that need no dataset go first."""
    pending = list(PARTS)
    while pending:
        part = pending[0]
        if part[2] and ctx.prep.poll() is None:  # only short parts may overtake the wait for the dataset
            part = next((p for p in pending if not p[2] and p[1] <= EARLY_MAX_S), part)
        name, est, needs = part
        pending.remove(part)
        no_data = needs and name != "data" and not hasattr(ctx, "base_run")
        if no_data or (not ctx.smoke and ctx.left() < est):
            why = "no dataset (see part data)" if no_data else f"{ctx.left():.0f} s left < {est} s expected"
            ctx.report.data["skipped"].append({"part": name, "why": why})
            ctx.report.flush()
        else:
            run_part(ctx, name)


def print_table(report: dict) -> None:
    print(f"\n{'part':<18}{'s':>7}{'peak GB':>9}  key figures")
    for name, part in report["parts"].items():
        what = f"ERROR {part['error']}" if "error" in part else part.get("summary", "")
        print(f"{name:<18}{part.get('seconds', math.nan):>7.1f}{part.get('peak_mem_gb', math.nan):>9.2f}  {what}")
    for s in report["skipped"]:
        print(f"{s['part']:<18}{'skipped':>7}{'':>9}  {s['why']}")
    for name, t in report["targets"].items():
        print(f"target {name}: {t['value'] if not isinstance(t['value'], float) else round(t['value'], 4)} -> "
              f"{'met' if t['ok'] else 'n/a' if t['ok'] is None else 'NOT MET'}")


def watchdog(ctx) -> threading.Timer:
    """At the hard limit: note where the run was, write the JSON, print the table, exit 3."""
    def fire():
        ctx.report.set(ctx.current, error=f"stopped by the watchdog at {ctx.elapsed():.0f} s (part unfinished)")
        ctx.report.data["meta"]["watchdog"] = True
        ctx.report.flush()
        print_table(ctx.report.data)
        shutil.rmtree(ctx.tmp, ignore_errors=True)
        os._exit(3)

    timer = threading.Timer(max(1.0, ctx.hard_limit - ctx.elapsed()), fire)
    timer.daemon = True
    timer.start()
    return timer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON report (rewritten as it goes)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu")
    p.add_argument("--smoke", action="store_true", help="toy sizes (tiny preset, 32 px, 1-2 steps): every code path")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip parts expected not to fit in what is left")
    p.add_argument("--hard-limit-s", type=float, default=345.0, help="watchdog: write the JSON and exit 3")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by device name)")
    for key, value in FULL.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None,
                       help=f"default {value} ({SMOKE[key]} with --smoke)")
    p.add_argument("--prepare-data", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = {k: (SMOKE if args.smoke else FULL)[k] if getattr(args, k) is None else getattr(args, k) for k in FULL}
    if args.prepare_data is not None:
        prepare_data(args.prepare_data, sizes["size"], sizes["n_images"])
        return 0
    from cellfluxrl.distributed import resolve_device

    start, device = time.perf_counter(), resolve_device(args.device)
    if device.type == "cpu":  # leave half the cores to the dataset child (oversubscribed torch crawls)
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    tmp = tempfile.TemporaryDirectory(prefix="gpu_check-")
    ctx = SimpleNamespace(**sizes, device=device, smoke=args.smoke, tmp=Path(tmp.name), current="setup",
                          hard_limit=args.hard_limit_s, elapsed=lambda: time.perf_counter() - start,
                          left=lambda: args.budget_s - (time.perf_counter() - start))
    ctx.peak, ctx.peak_source = peak_tflops(device, args.peak_tflops)
    ctx.report = Report(args.out, {"argv": sys.argv[1:], "smoke": args.smoke, "budget_s": args.budget_s, "sizes": sizes,
                                   "tolerances": TOL, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    start_prep(ctx)
    timer = watchdog(ctx)
    try:
        schedule(ctx)
    finally:
        timer.cancel()
        if ctx.prep.poll() is None:
            ctx.prep.kill()
        ctx.prep_log.close()
        ctx.report.data["meta"]["total_s"] = ctx.elapsed()
        ctx.report.flush()
        tmp.cleanup()
    print_table(ctx.report.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CellFlux velocity network: an ADM-style UNet ``v_theta(x_t, t, c)``.

Same architecture as the guided-diffusion UNet CellFlux configures for BBBC021 (preset ``paper``):
GroupNorm(32) in fp32, SiLU, ResBlocks with scale-shift norm (FiLM) driven by the time + condition
embedding, dropout before the last conv of each ResBlock, single-head self-attention at the chosen
downsampling factors and in the middle, 2x2 average-pool down / nearest x2 up (no resampling conv),
and zero-initialised last convs / attention projections, so a fresh network outputs zero velocity.

Time: the sinusoidal embedding of the raw ``t in [0, 1]`` (not scaled by 1000), width
``model_channels``, then Linear -> SiLU -> Linear to ``4 * model_channels``. Condition: the frozen
compound embedding ``c`` (B, D) through one Linear to the same width, *added* to the time
embedding; ``cond=None`` is the unconditional branch (nothing added, no learned null token).

Parameter names differ from guided-diffusion's; :func:`map_cellflux_state_dict` converts a
CellFlux checkpoint's names to ours.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from cellfluxrl.errors import CellfluxError


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of :class:`VelocityUNet` (defaults = CellFlux's BBBC021 config).

    Attributes:
        in_channels: image channels (3: actin, tubulin, DNA).
        model_channels: base width; the time-embedding width is 4x this.
        channel_mult: width multiplier per resolution level (one avg-pool between levels).
        num_res_blocks: ResBlocks per level in the encoder (the decoder has one more).
        attention_resolutions: downsampling factors with self-attention (2 = 48x48 at 96 px).
        num_heads: attention heads.
        dropout: dropout probability inside each ResBlock.
        mid_attention: self-attention in the middle block.
    """

    in_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    num_res_blocks: int = 4
    attention_resolutions: tuple[int, ...] = (2,)
    num_heads: int = 1
    dropout: float = 0.3
    mid_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        if self.model_channels < 1 or self.num_res_blocks < 1 or not self.channel_mult:
            raise CellfluxError(f"invalid UNet config {self}")
        for mult in self.channel_mult:
            if (mult * self.model_channels) % 32:
                raise CellfluxError(f"UNet width {mult * self.model_channels} is not a multiple of 32 (GroupNorm)")
        if not 0.0 <= self.dropout < 1.0:
            raise CellfluxError(f"UNet dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        """Plain JSON/torch-safe dict (lists instead of tuples)."""
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CellfluxError(f"unknown UNet config key {unknown[0]!r}")
        return cls(**d)


PRESETS: dict[str, UNetConfig] = {
    # CellFlux models/model_configs.py "bbbc021": 56,201,219 parameters with condition_dim=1024.
    "paper": UNetConfig(),
    # CPU-sized: 32/64/64 channels, 2 ResBlocks per level, attention only in the middle (about 1.5M).
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                       attention_resolutions=(), dropout=0.1),
    # The demo's: "tiny" with 1 ResBlock per level (about 1.15M): 1.8x the training images/s of
    # "tiny" on 2 CPU cores, and at lr 1e-3 a better base per minute (experiments/RESULTS.md, "A base that renders each MoA").
    "micro": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(), dropout=0.1),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``cat(cos(t f), sin(t f))``, ``f_i = exp(-ln(max_period) i / (dim/2))``.

    Args:
        t: float ``(B,)``, raw flow time in ``[0, 1]``.
        dim: embedding width (even).

    Returns:
        float32 ``(B, dim)``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 whatever the autocast dtype (as ADM)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-Conv, then scale-shift by the embedding, GN-SiLU-Dropout-Conv(zero); + skip."""

    def __init__(self, ch_in: int, ch_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm32(32, ch_in)
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * ch_out)
        self.norm2 = GroupNorm32(32, ch_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(ch_out, ch_out, 3, padding=1))
        self.skip = nn.Identity() if ch_in == ch_out else nn.Conv2d(ch_in, ch_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb)).type(h.dtype)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions (QKV split before heads), zero-initialised output."""

    def __init__(self, ch: int, num_heads: int):
        super().__init__()
        if ch % num_heads:
            raise CellfluxError(f"attention width {ch} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.norm = GroupNorm32(32, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv1d(ch, ch, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, hh * ww))
        q, k, v = (z.reshape(b, self.num_heads, c // self.num_heads, hh * ww).transpose(-1, -2)
                   for z in qkv.chunk(3, dim=1))  # (B, heads, T, c/heads)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(b, c, hh * ww)
        return x + self.proj(h).reshape(b, c, hh, ww)


class Level(nn.Module):
    """One encoder/decoder entry: a ResBlock, optionally followed by attention and/or resampling."""

    def __init__(self, res: ResBlock | None, attn: AttentionBlock | None, resample: str | None):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.res is not None:
            x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x


class VelocityUNet(nn.Module):
    """``v_theta(x_t, t, c)``: the CellFlux velocity field.

    Args:
        config: the architecture.
        condition_dim: width D of the compound embedding (1024 for Morgan counts); 0 = no condition.
    """

    def __init__(self, config: UNetConfig, condition_dim: int):
        super().__init__()
        self.config, self.condition_dim = config, int(condition_dim)
        mc, emb_dim = config.model_channels, 4 * config.model_channels
        self.time_mlp = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_proj = nn.Linear(self.condition_dim, emb_dim) if self.condition_dim > 0 else None

        ch = config.channel_mult[0] * mc
        self.stem = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        skip_chans, ds = [ch], 1
        self.down = nn.ModuleList()
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                res = ResBlock(ch, mult * mc, emb_dim, config.dropout)
                ch = mult * mc
                attn = AttentionBlock(ch, config.num_heads) if ds in config.attention_resolutions else None
                self.down.append(Level(res, attn, None))
                skip_chans.append(ch)
            if level != len(config.channel_mult) - 1:
                self.down.append(Level(None, None, "down"))
                skip_chans.append(ch)
                ds *= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, config.dropout),
                                  AttentionBlock(ch, config.num_heads) if config.mid_attention else nn.Identity(),
                                  ResBlock(ch, ch, emb_dim, config.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                res = ResBlock(ch + skip_chans.pop(), mult * mc, emb_dim, config.dropout)
                ch = mult * mc
                attn = AttentionBlock(ch, config.num_heads) if ds in config.attention_resolutions else None
                resample = "up" if level and i == config.num_res_blocks else None
                self.up.append(Level(res, attn, resample))
                if resample:
                    ds //= 2
        self.head_norm = GroupNorm32(32, ch)
        self.head_conv = _zero(nn.Conv2d(ch, config.in_channels, 3, padding=1))
        self.downsample_factor = 2 ** (len(config.channel_mult) - 1)

    def embed(self, t: torch.Tensor, cond: torch.Tensor | None,
              cond_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Time embedding plus (optionally) the projected condition, float ``(B, 4 * model_channels)``."""
        emb = self.time_mlp(timestep_embedding(t, self.config.model_channels))
        if cond is not None:
            if self.cond_proj is None:
                raise ValueError("this network was built without a condition (condition_dim=0)")
            c = self.cond_proj(cond.to(emb.dtype))
            if cond_keep is not None:
                c = c * cond_keep.to(c.dtype)[:, None]
            emb = emb + c
        return emb

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                cond_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity at ``(x_t, t)`` for condition ``cond``.

        Args:
            x_t: float ``(B, C, H, W)``; H and W divisible by ``2 ** (len(channel_mult) - 1)``.
            t: float ``(B,)`` (or a scalar) flow time in ``[0, 1]``.
            cond: float ``(B, D)`` compound embeddings, or ``None`` for the unconditional branch.
            cond_keep: optional bool/float ``(B,)``; 0 drops the condition of that sample (mixing
                conditional and unconditional samples in one batch, e.g. for CFG).

        Returns:
            ``v`` with the shape and dtype of ``x_t``.
        """
        if x_t.shape[-1] % self.downsample_factor or x_t.shape[-2] % self.downsample_factor:
            raise ValueError(f"image size {tuple(x_t.shape[-2:])} not divisible by {self.downsample_factor}")
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        emb = self.embed(t, cond, cond_keep)
        h = self.stem(x_t)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop().type(h.dtype)], dim=1), emb)
        return self.head_conv(F.silu(self.head_norm(h))).type(x_t.dtype)


def build_unet(preset_or_config: str | UNetConfig | dict, condition_dim: int) -> VelocityUNet:
    """A fresh :class:`VelocityUNet` from a preset name (``"paper"``, ``"tiny"``, ``"micro"``), config or dict."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise CellfluxError(f"unknown UNet preset {preset_or_config!r}; choose one of {', '.join(PRESETS)}")
        config = PRESETS[preset_or_config]
    elif isinstance(preset_or_config, dict):
        config = UNetConfig.from_dict(preset_or_config)
    else:
        config = preset_or_config
    return VelocityUNet(config, condition_dim)


def count_parameters(net: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------------------------
# CellFlux (guided-diffusion ADM UNet) parameter names -> ours.

_RES_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "skip"}
_ATTN_NAMES = {"norm": "norm", "qkv": "qkv", "proj_out": "proj"}
_STRIP = ("module.", "_orig_mod.", "model.", "net.")


def _map_block(rest: str, is_attn: bool) -> str | None:
    table = _ATTN_NAMES if is_attn else _RES_NAMES
    for theirs, ours in table.items():
        if rest.startswith(theirs + "."):
            return ours + rest[len(theirs):]
    return None


def cellflux_key_to_ours(key: str) -> str | None:
    """Map one guided-diffusion/CellFlux UNet parameter name to ours (``None``: not a UNet weight).

    ``time_embed.{0,2}`` -> ``time_mlp.{0,2}``, ``mol_embed_transform`` -> ``cond_proj``,
    ``input_blocks.0.0`` -> ``stem``, ``input_blocks.{k}.0/.1`` -> ``down.{k-1}.res/.attn``,
    ``middle_block.{0,1,2}`` -> ``mid.{0,1,2}``, ``output_blocks.{k}.0/.1`` -> ``up.{k}.res/.attn``,
    ``out.0`` / ``out.2`` -> ``head_norm`` / ``head_conv``; inside ResBlocks ``in_layers.0/.2``,
    ``emb_layers.1``, ``out_layers.0/.3``, ``skip_connection`` -> ``norm1, conv1, emb_proj, norm2,
    conv2, skip``; inside attention ``proj_out`` -> ``proj``.
    """
    for prefix in ("time_embed.", "mol_embed_transform.", "out."):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if prefix == "time_embed.":
                return "time_mlp." + rest
            if prefix == "mol_embed_transform.":
                return "cond_proj." + rest
            return {"0": "head_norm", "2": "head_conv"}.get(rest.split(".")[0], "?") + rest[1:]
    if key.startswith("input_blocks.0.0."):
        return "stem." + key[len("input_blocks.0.0."):]
    m = re.match(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.*)$", key)
    if m:
        group, k, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        ours = f"down.{k - 1}" if group == "input_blocks" else f"up.{k}"
        is_attn = j == 1
        inner = _map_block(rest, is_attn)
        return None if inner is None else f"{ours}.{'attn' if is_attn else 'res'}.{inner}"
    m = re.match(r"middle_block\.(\d)\.(.*)$", key)
    if m:
        inner = _map_block(m.group(2), m.group(1) == "1")
        return None if inner is None else f"mid.{m.group(1)}.{inner}"
    return None


def map_cellflux_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a CellFlux UNet state dict to :class:`VelocityUNet` names.

    Wrapper prefixes (``module.``, ``_orig_mod.``, ``model.``, ``net.``) are stripped first.

    Raises:
        CellfluxError: a key that is not a known UNet parameter name.
    """
    out = {}
    for key, value in state.items():
        stripped = key
        changed = True
        while changed:
            changed = False
            for p in _STRIP:
                if stripped.startswith(p):
                    stripped, changed = stripped[len(p):], True
        ours = cellflux_key_to_ours(stripped)
        if ours is None or "?" in ours:
            raise CellfluxError(f"unknown CellFlux UNet parameter {key!r}")
        out[ours] = value
    return out


def ours_to_cellflux_key(key: str) -> str:
    """Inverse of :func:`cellflux_key_to_ours` (used by tests and for exporting)."""
    inv_res = {v: k for k, v in _RES_NAMES.items()}
    inv_attn = {v: k for k, v in _ATTN_NAMES.items()}
    simple = {"time_mlp.": "time_embed.", "cond_proj.": "mol_embed_transform.", "stem.": "input_blocks.0.0.",
              "head_norm.": "out.0.", "head_conv.": "out.2."}
    for ours, theirs in simple.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    m = re.match(r"(down|up|mid)\.(\d+)\.(?:(res|attn)\.)?(\w+)\.(.*)$", key)
    if not m:
        raise KeyError(key)
    group, k, kind, name, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
    if group == "mid":
        kind = "attn" if k == 1 else "res"
        table = inv_attn if kind == "attn" else inv_res
        return f"middle_block.{k}.{table[name]}.{rest}"
    table = inv_attn if kind == "attn" else inv_res
    block = f"input_blocks.{k + 1}" if group == "down" else f"output_blocks.{k}"
    return f"{block}.{1 if kind == 'attn' else 0}.{table[name]}.{rest}"


__all__ = ["UNetConfig", "PRESETS", "VelocityUNet", "build_unet", "count_parameters", "timestep_embedding",
           "map_cellflux_state_dict", "cellflux_key_to_ours", "ours_to_cellflux_key"]

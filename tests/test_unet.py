"""The velocity UNet: presets, parameter count, shapes, zero init, time and condition embedding."""

from __future__ import annotations

import pytest
import torch

from cellfluxrl.errors import CellfluxError
from cellfluxrl.model.unet import (PRESETS, UNetConfig, VelocityUNet, build_unet, cellflux_key_to_ours,
                                   count_parameters, map_cellflux_state_dict, ours_to_cellflux_key, timestep_embedding)

MICRO = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), dropout=0.0)




def perturbed(config: UNetConfig = MICRO, condition_dim: int = 8, seed: int = 0) -> VelocityUNet:
    """A network whose zero-initialised layers have been given random weights."""
    torch.manual_seed(seed)
    net = VelocityUNet(config, condition_dim).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_paper_preset_has_cellflux_parameter_count():
    with torch.device("meta"):  # no memory allocated
        net = build_unet("paper", condition_dim=1024)
    assert count_parameters(net) == 56_201_219
    resblocks = [m for m in net.modules() if type(m).__name__ == "ResBlock"]
    attention = [m for m in net.modules() if type(m).__name__ == "AttentionBlock"]
    assert (len(resblocks), len(attention)) == (29, 10)


def test_tiny_preset_size():
    with torch.device("meta"):
        n = count_parameters(build_unet("tiny", condition_dim=1024))
    assert 1_000_000 <= n <= 3_000_000


def test_unknown_preset_and_bad_config():
    with pytest.raises(CellfluxError, match="unknown UNet preset 'huge'"):
        build_unet("huge", 8)
    with pytest.raises(CellfluxError, match="multiple of 32"):
        UNetConfig(model_channels=20)
    with pytest.raises(CellfluxError, match="unknown UNet config key 'width'"):
        UNetConfig.from_dict({"width": 3})
    assert UNetConfig.from_dict(PRESETS["tiny"].to_dict()) == PRESETS["tiny"]


def test_zero_init_gives_zero_velocity_and_shapes():
    net = VelocityUNet(MICRO, 8)
    x = torch.randn(3, 3, 16, 16)
    v = net(x, torch.rand(3), torch.randn(3, 8))
    assert v.shape == x.shape and v.dtype == x.dtype
    assert torch.count_nonzero(v) == 0
    with pytest.raises(ValueError, match="not divisible"):
        net(torch.randn(1, 3, 15, 15), torch.rand(1), None)


def test_condition_changes_output_and_unconditional_branch():
    net = perturbed()
    x, t, c = torch.randn(4, 3, 16, 16), torch.rand(4), torch.randn(4, 8)
    v_c, v_u = net(x, t, c), net(x, t, None)
    assert (v_c - v_u).abs().max() > 1e-4
    # cond_keep = 0 is exactly the unconditional branch (nothing added), 1 is the conditional one.
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    v_mixed = net(x, t, c, cond_keep=keep)
    torch.testing.assert_close(v_mixed[[0, 2]], v_c[[0, 2]], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v_mixed[[1, 3]], v_u[[1, 3]], atol=1e-6, rtol=1e-5)
    # Samples do not interact: a batch of one gives the same velocity.
    torch.testing.assert_close(net(x[:1], t[:1], c[:1]), v_c[:1], atol=1e-5, rtol=1e-4)


def test_time_embedding_uses_raw_t():
    emb = timestep_embedding(torch.tensor([0.0, 1.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    freqs = torch.exp(-torch.log(torch.tensor(1e4)) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(freqs), torch.sin(freqs)]))
    net = perturbed()
    x, c = torch.randn(1, 3, 16, 16), torch.randn(1, 8)
    assert (net(x, torch.tensor([0.2]), c) - net(x, torch.tensor([0.8]), c)).abs().max() > 1e-4


def test_cellflux_names_map_to_ours():
    # guided-diffusion's layout for the paper config: input block 5 is the first avg-pool,
    # blocks 6-9 are ResBlock + attention at 48x48, output block 4 ends in the first upsample.
    assert cellflux_key_to_ours("input_blocks.0.0.weight") == "stem.weight"
    assert cellflux_key_to_ours("input_blocks.6.1.qkv.weight") == "down.5.attn.qkv.weight"
    assert cellflux_key_to_ours("input_blocks.6.0.emb_layers.1.bias") == "down.5.res.emb_proj.bias"
    assert cellflux_key_to_ours("output_blocks.0.0.skip_connection.weight") == "up.0.res.skip.weight"
    assert cellflux_key_to_ours("output_blocks.7.1.proj_out.bias") == "up.7.attn.proj.bias"
    assert cellflux_key_to_ours("middle_block.1.norm.weight") == "mid.1.norm.weight"
    assert cellflux_key_to_ours("middle_block.2.out_layers.3.weight") == "mid.2.conv2.weight"
    assert cellflux_key_to_ours("time_embed.2.weight") == "time_mlp.2.weight"
    assert cellflux_key_to_ours("mol_embed_transform.bias") == "cond_proj.bias"
    assert cellflux_key_to_ours("out.2.weight") == "head_conv.weight"
    with torch.device("meta"):
        paper = build_unet("paper", 1024)
    ours = paper.state_dict()
    assert "down.5.attn.qkv.weight" in ours and "up.7.attn.proj.bias" in ours and "down.4.res.conv1.weight" not in ours
    theirs = {"module." + ours_to_cellflux_key(k): v for k, v in ours.items()}
    assert set(map_cellflux_state_dict(theirs)) == set(ours)
    with pytest.raises(CellfluxError, match="unknown CellFlux UNet parameter 'label_emb.weight'"):
        map_cellflux_state_dict({"label_emb.weight": torch.zeros(1)})


def _reference_state_dict() -> dict[str, tuple[int, ...]]:
    """CellFlux's BBBC021 UNet state dict as listed in tests/data (names and shapes from their code)."""
    from pathlib import Path

    shapes = {}
    for line in (Path(__file__).parent / "data" / "cellflux-bbbc021-state-dict.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split(" ", 1)
            shapes[name] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return shapes


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_cellflux_checkpoint_maps_onto_the_paper_preset_exactly(prefix):
    """Every tensor of CellFlux's own BBBC021 UNet (392, read from their code, not from ours) maps
    through the import mapping to a tensor of the ``paper`` preset with the same shape, and every
    tensor of the preset is covered: a CellFlux checkpoint loads strictly."""
    reference = _reference_state_dict()
    assert len(reference) == 392
    assert sum(int(torch.Size(s).numel()) for s in reference.values()) == 56_201_219  # the file's own header
    with torch.device("meta"):
        net = build_unet("paper", condition_dim=1024)
        theirs = {prefix + name: torch.empty(shape) for name, shape in reference.items()}
    mapped = map_cellflux_state_dict(theirs)
    assert len(mapped) == len(theirs)  # no two of their names land on one of ours
    ours = {name: tuple(t.shape) for name, t in net.state_dict().items()}
    assert set(mapped) - set(ours) == set(), "mapped to names the model does not have"
    assert set(ours) - set(mapped) == set(), "model tensors no CellFlux tensor fills"
    mismatched = {k: (tuple(v.shape), ours[k]) for k, v in mapped.items() if tuple(v.shape) != ours[k]}
    assert not mismatched
    assert {name for name, _ in net.named_parameters()} <= set(mapped)  # every parameter is covered

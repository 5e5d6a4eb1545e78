"""The FID InceptionV3 defined in our code: architecture, and loading every local weight format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cellfluxrl.errors import CellfluxError
from cellfluxrl.evaluation.inception import (FIDInceptionV3, InceptionFeatures, load_inception,
                                             to_pytorch_fid_wrapper_names)


@pytest.fixture(scope="module")
def random_net():
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    # He-initialised convolutions (so the signal survives 94 layers) and non-trivial BatchNorm
    # statistics, so that any key mix-up on loading would change the features.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    noise = torch.rand((1, 3, 96, 96), generator=g) * 2 - 1
    ramp = torch.linspace(-1, 1, 96).expand(1, 3, 96, 96)  # a smooth image, very unlike the noise
    return torch.cat([noise, ramp])


@pytest.fixture(scope="module")
def reference_features(random_net, images):
    return InceptionFeatures(random_net)(images)


def test_architecture_matches_the_standard_weight_file_layout(random_net):
    state = random_net.state_dict()
    # pt_inception-2015-12-05-6726825d.pth: 566 keys (94 conv+BN layers x 6, fc weight and bias).
    assert len(state) == 566
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["Mixed_5b.branch_pool.conv.weight"].shape == (32, 192, 1, 1)
    assert sum(p.numel() for p in random_net.parameters()) == 23_850_960


def test_features_shape_and_determinism(random_net, images, reference_features):
    assert reference_features.shape == (2, 2048) and reference_features.dtype == np.float64
    assert np.isfinite(reference_features).all()
    assert (reference_features >= 0).all()  # average of ReLU outputs
    f0, f1 = reference_features
    assert np.abs(f0 - f1).max() > 0.1 * np.abs(f0).max()  # random init: tiny scale, but image-dependent
    np.testing.assert_array_equal(InceptionFeatures(random_net)(images), reference_features)


@pytest.mark.parametrize("layout", ["torchvision", "wrapper", "module-prefix", "nested"])
def test_state_dict_formats_load_to_identical_features(tmp_path, random_net, images, reference_features, layout):
    state = random_net.state_dict()
    if layout == "wrapper":  # pytorch-fid's InceptionV3 (blocks.i.j...), no fc
        state = to_pytorch_fid_wrapper_names(state)
        assert "blocks.3.2.branch_pool.conv.weight" in state
    elif layout == "module-prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    elif layout == "nested":
        state = {"state_dict": state}
    path = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(state, path)
    loaded = load_inception(path)
    assert loaded.name == "FID" and not loaded.torchscript
    np.testing.assert_allclose(loaded(images), reference_features, rtol=1e-6, atol=0)


class _TinyScripted(nn.Module):
    """Stands in for clean-fid's TorchScript Inception: [0, 255] input, return_features keyword."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2048)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3)) / 255.0
        out = self.proj(pooled)
        return out if return_features else out[:, :1008]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, still the format
def test_torchscript_file_is_called_like_clean_fid(tmp_path, images):
    torch.manual_seed(0)
    module = _TinyScripted().eval()
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    loaded = load_inception(path)
    assert loaded.torchscript
    quantised = torch.floor(torch.clamp(images * 0.5 + 0.5, 0, 1) * 255)
    with torch.no_grad():
        expected = module(quantised, return_features=True).double().numpy()
    np.testing.assert_allclose(loaded(images), expected, rtol=1e-6, atol=1e-6)


def test_bad_files_are_one_line_errors(tmp_path, random_net):
    with pytest.raises(CellfluxError, match="no such file"):
        load_inception(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CellfluxError, match="junk.pth"):
        load_inception(junk)
    state = random_net.state_dict()
    del state["Mixed_6b.branch1x1.conv.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CellfluxError, match="Mixed_6b.branch1x1.conv.weight"):
        load_inception(tmp_path / "partial.pth")
    state = random_net.state_dict()
    state["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 1, 3, 3)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(CellfluxError, match="shape"):
        load_inception(tmp_path / "wrong.pth")

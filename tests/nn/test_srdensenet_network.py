"""SRDenseNet's network layer pair (srkernels/reference/srdensenet.py, srkernels/nn/srdensenet.py): the model's
layers stay under upstream's top-level keys, the layer adds none, ``nn.fuse`` swaps the reference for the fused
twin like any layer, and copies keep the layer pointing at the copy's own modules."""
import copy

import pytest
import torch

import srkernels
from srkernels.models import build

CFG = dict(num_features=16, num_blocks=2, num_layers=3, growth=4, bottleneck=8)


def test_network_layer_adds_no_key_and_fuse_swaps_it():
    pytest.importorskip("srkernels._C")
    torch.manual_seed(0)
    ref = build("srdensenet", 2, fused=False, **CFG)
    assert type(ref.network) is srkernels.reference.SRDenseNetNetwork
    keys = list(ref.state_dict())
    assert keys[0] == "conv1.0.weight" and keys[-1] == "conv3.bias"
    assert not any(k.startswith("network") for k in keys) and not list(ref.network.parameters(recurse=False))
    fused = srkernels.nn.fuse(copy.deepcopy(ref))
    assert type(fused.network) is srkernels.nn.SRDenseNetNetwork
    assert list(fused.state_dict()) == keys
    conv1, blocks, conv2, upsampling, conv3 = fused.network.layers
    assert (conv1, conv2, upsampling, conv3) == (fused.conv1, fused.conv2, fused.upsampling, fused.conv3)
    assert [b for b in blocks] == [fused.dcb1, fused.dcb2]
    built = build("srdensenet", 2, fused=True, **CFG)
    built.load_state_dict(ref.state_dict())
    x = torch.rand(1, 1, 6, 5)
    with torch.no_grad():
        want = ref(x)
        for m in (fused, built):
            assert torch.allclose(m(x), want, rtol=1e-4, atol=1e-5)
        # a changed weight in the fused model reaches its network (same module objects after the copy)
        fused.conv3.bias.add_(1.0)
        assert torch.allclose(fused(x), want + 1.0, rtol=1e-4, atol=1e-5)

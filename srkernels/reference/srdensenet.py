"""SRDenseNet's network as published (Lornatang/SRDenseNet-PyTorch, docs/architectures.md §3): conv1 -> dense
blocks whose outputs are concatenated new-first, ``cat(block_b(X), X)`` -> 1x1 bottleneck -> deconv stages ->
conv3. ``srkernels.nn.SRDenseNetNetwork`` (its fused twin) runs the same network with the dense part and the
bottleneck as one op.

The layers belong to the model, under upstream's top-level keys (``conv1``, ``dcb{b}``, ``conv2``,
``upsampling``, ``conv3``); a module that owned them would put its own name in front of every key. So this
layer holds the model's layers without registering them: it adds no state_dict key, and ``nn.fuse`` swaps it
like any other layer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SRDenseNetNetwork"]


class SRDenseNetNetwork(nn.Module):
    """``conv3(upsampling(conv2(X_B)))`` with ``X_0 = conv1(x)``, ``X_b = cat(blocks[b](X_{b-1}), X_{b-1})``.

    ``conv1``: Sequential(conv, ReLU); ``blocks``: each a Sequential holding one ``SRDenseBlock`` (upstream's
    ``dcb{b}.0`` keys); ``conv2``: the 1x1 bottleneck; ``upsampling``: deconv stages
    (``upsample_block`` = ConvTranspose2d, ReLU); ``conv3``: a conv.
    """

    def __init__(self, conv1: nn.Module, blocks: Sequence[nn.Module], conv2: nn.Conv2d, upsampling: nn.Sequential,
                 conv3: nn.Conv2d) -> None:
        super().__init__()
        # a tuple is not registered: the model owns these (see the module docstring)
        self.layers = (conv1, tuple(blocks), conv2, upsampling, conv3)

    def forward(self, x: Tensor) -> Tensor:
        conv1, blocks, conv2, upsampling, conv3 = self.layers
        out = conv1(x)
        for block in blocks:
            out = torch.cat((block(out), out), 1)
        return conv3(upsampling(conv2(out)))

    def extra_repr(self) -> str:
        return f"blocks={len(self.layers[1])} (the model's layers, not registered here)"

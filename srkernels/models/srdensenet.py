"""SRDenseNet "All" (Tong et al. 2017), keys of Lornatang/SRDenseNet-PyTorch (docs/architectures.md §3).

Input: Y of the LR image in [0, 1]. conv1 (+ReLU) -> 8 dense blocks whose outputs are concatenated new-first,
cat(block_b(X), X), so all of them reach the 1x1 bottleneck (no activation) -> deconv stages (+ReLU) -> conv3.
Deconvs: stride 2 x log2(s) for x2/x4/x8, one stride-3 for x3. ``deconv_kernel=None`` is Lornatang's (kernel
= stride); 3 and 4 give the yjn870 and Caffe ports' stride-2 shapes (output exactly s * input in every case).
Init is PyTorch's default, as upstream (its kaiming init is defined but never called).

The network's forward is a layer (``layer(fused, "SRDenseNetNetwork")``: ``srkernels.reference`` /
``srkernels.nn``), which runs the model's layers; ``fused=True`` runs the dense part and the bottleneck as one
``ops.dense_block`` call (srkernels/nn/srdensenet.py).
"""
from __future__ import annotations

from torch import Tensor, nn

from ._common import SRModel, conv, layer


def _deconv_padding(kernel: int, stride: int) -> tuple[int, int]:
    # (in-1)*stride - 2*pad + kernel + out_pad == stride*in  <=>  kernel + out_pad - 2*pad == stride
    pad = max(0, -(-(kernel - stride) // 2))
    out_pad = stride + 2 * pad - kernel
    if not 0 <= out_pad < stride:
        raise ValueError(f"deconv_kernel {kernel} cannot upsample exactly by {stride}")
    return pad, out_pad


class DeconvStage(nn.Module):
    """Keys ``upsample_block.0`` (ConvTranspose2d, output exactly ``stride`` times the input) and a ReLU, as
    Lornatang's ``_UpsampleBlock``."""

    def __init__(self, channels: int, stride: int, kernel: int) -> None:
        super().__init__()
        pad, out_pad = _deconv_padding(kernel, stride)
        self.upsample_block = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, kernel, stride, pad, output_padding=out_pad),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.upsample_block(x)


class SRDenseNet(SRModel):
    arch = "srdensenet"
    scales = (2, 3, 4, 8)

    def __init__(
        self,
        scale: int = 4,
        *,
        fused: bool = True,
        in_channels: int = 1,
        num_features: int = 128,
        num_blocks: int = 8,
        num_layers: int = 8,
        growth: int = 16,
        bottleneck: int = 256,
        deconv_kernel: int | None = None,
    ) -> None:
        config = self.options(locals())
        super().__init__(scale, fused, config, in_channels=in_channels, input_range=1.0)
        cin, f, nb, nl, g, bott = in_channels, num_features, num_blocks, num_layers, growth, bottleneck
        Block = layer(fused, "SRDenseBlock")
        self.num_blocks = nb
        self.conv1 = nn.Sequential(conv(cin, f), nn.ReLU(inplace=True))
        width = f
        for b in range(1, nb + 1):
            # the Sequential wrapper reproduces upstream's ``dcb{b}.0.conv{k}`` keys
            self.add_module(f"dcb{b}", nn.Sequential(Block(width, g, nl)))
            width += g * nl
        self.conv2 = nn.Conv2d(width, bott, 1)
        strides = [3] if self.scale == 3 else [2] * (self.scale.bit_length() - 1)
        self.upsampling = nn.Sequential(
            *[DeconvStage(bott, s, s if deconv_kernel is None else deconv_kernel) for s in strides]
        )
        self.conv3 = conv(bott, cin)
        blocks = [getattr(self, f"dcb{b}") for b in range(1, nb + 1)]
        self.network = layer(fused, "SRDenseNetNetwork")(self.conv1, blocks, self.conv2, self.upsampling, self.conv3)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.output_like(self.network(x), x)

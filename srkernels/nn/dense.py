"""Fused dense blocks: same constructors, parameters and state_dict keys as ``srkernels.reference.dense`` (they
subclass those layers); only ``forward`` differs. Each block runs as one ``ops.dense_block`` call on a single
feature buffer: no ``torch.cat``, and backward keeps only that buffer (memory linear in depth).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..dense_plan import fdirb_plan, rdb_plan, split_plan, srdense_plan
from ..ops.dense_block import cpu_layout
from ..reference import dense as R
from . import _amp
from ._cache import _module_cache

__all__ = ["ResidualDenseBlock", "RDCAB", "SRDenseBlock", "SplitBlock", "FDIRB"]


def _bias(conv) -> Tensor | None:
    return conv.bias


def _inference_cache(module, x: Tensor, params: list[Tensor], build):
    """``build()`` cached on ``module`` for CPU inference: the weights in the kernel's own layout
    (``ops.dense_block.cpu_layout``), so no call copies them again. Rebuilt when any of ``params`` changes
    (version, dtype, device, storage, shape); ``None`` (use the parameters) when a gradient is wanted for
    them, off CPU, for dtypes the packing kernel does not take (float64/float16 run generic convs, which may
    sum in another order for another weight layout) and under torch.compile."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and any(p.requires_grad for p in params))):
        return None
    key = tuple((p._version, p.dtype, p.device, p.data_ptr(), tuple(p.shape)) for p in params)
    return _module_cache(module, "_srk_dense_cache", key, build)


def _dense_weights(module, x: Tensor, weights: list[Tensor], fuse_weight: Tensor | None = None,
                   extra: list[Tensor] = ()) -> tuple[list[Tensor], Tensor | None]:
    """``weights`` and ``fuse_weight`` as ``ops.dense_block`` should get them: cached in the kernel's layout in
    CPU inference, the parameters themselves otherwise. ``extra``: further parameters ``fuse_weight`` is
    computed from (FD-IRB's folded fusion)."""
    params = [*weights, *([fuse_weight] if fuse_weight is not None else []), *extra]
    packed = _inference_cache(module, x, params, lambda: cpu_layout(weights, fuse_weight))
    return (weights, fuse_weight) if packed is None else packed


def _amp_block(module, x: Tensor, params: list, build, inputs: tuple = ()):
    """CPU autocast inference (nn/_amp.py): (x in the autocast dtype, ``build()`` -- the weights in the kernel's
    layout (``cpu_layout``) and the other tensors the block passes -- cast once and cached), or None."""
    return _amp.cached(module, x, params, build, "_srk_amp_dense", inputs)


def _gate(conv_du) -> tuple:
    fc1, fc2 = conv_du[0], conv_du[2]
    return fc1.weight, fc1.bias, fc2.weight, fc2.bias


class ResidualDenseBlock(R.ResidualDenseBlock):
    """RDN's RDB (keys ``convs.{c}.conv.0``, ``LFF``): dense layers, 1x1 LFF and the local residual, one op."""

    def forward(self, x: Tensor) -> Tensor:
        convs = [m.conv[0] for m in self.convs]
        c0 = convs[0]
        plan = rdb_plan(c0.in_channels, c0.out_channels, len(convs), c0.kernel_size[0])
        ws, bs, fw, fb = [c.weight for c in convs], [_bias(c) for c in convs], self.LFF.weight, self.LFF.bias
        amp = _amp_block(self, x, [*ws, *bs, fw, fb], lambda: (*cpu_layout(ws, fw), bs, fb))
        if amp is None:
            ws, fw = _dense_weights(self, x, ws, fw)
        else:
            x, (ws, fw, bs, fb) = amp
        return ops.dense_block(x, ws, bs, plan, fuse_weight=fw, fuse_bias=fb, residual=x)


class RDCAB(R.RDCAB):
    """RDCAB (keys ``layers.{c}.conv``, ``conv_du``, ``lff``): the channel attention on the concat is folded
    into the fusion (``lff(x * g) = (lff.weight * g) x`` per sample), so the attended concat never exists."""

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        convs = [m.conv for m in self.layers]
        c0 = convs[0]
        plan = rdb_plan(c0.in_channels, c0.out_channels, len(convs), c0.kernel_size[0])
        ws, bs, fw, fb = [c.weight for c in convs], [_bias(c) for c in convs], self.lff.weight, self.lff.bias
        gate = _gate(self.conv_du)
        amp = _amp_block(self, x, [*ws, *bs, fw, fb, *gate], lambda: (*cpu_layout(ws, fw), bs, fb, gate),
                         (residual,))
        if amp is None:
            ws, fw = _dense_weights(self, x, ws, fw)
        else:
            x, (ws, fw, bs, fb, gate) = amp
        res = x if residual is None else x + residual
        return ops.dense_block(x, ws, bs, plan, fuse_weight=fw, fuse_bias=fb, gate=gate, residual=res)


class SRDenseBlock(R.SRDenseBlock):
    """SRDenseNet block (keys ``conv1`` .. ``conv{L}``): returns cat(out_1..out_L), read off the buffer once.
    The new-first concat with the block input stays at model level (``SRDenseNet.forward``)."""

    def forward(self, x: Tensor) -> Tensor:
        convs = [getattr(self, f"conv{i}") for i in range(1, self.num_layers + 1)]
        c0 = convs[0]
        plan = srdense_plan(c0.in_channels, c0.out_channels, self.num_layers, c0.kernel_size[0])
        ws, bs = [c.weight for c in convs], [_bias(c) for c in convs]
        amp = _amp_block(self, x, [*ws, *bs], lambda: (cpu_layout(ws)[0], bs))
        if amp is None:
            ws, _ = _dense_weights(self, x, ws)
        else:
            x, (ws, bs) = amp
        return ops.dense_block(x, ws, bs, plan)


class SplitBlock(R.SplitBlock):
    """Split-version block (keys ``layer{k}.0``, ``lff``, ``conv_du``): distilled and remaining halves of each
    layer land in their own buffer ranges; the last layer computes only its distilled part (upstream drops the
    rest). The contrast-aware attention + residual is the fused ``channel_attention`` op."""

    def forward(self, x: Tensor) -> Tensor:
        L, d = self.num_layers, self.distilled
        convs = [getattr(self, f"layer{i}")[0] for i in range(1, L + 1)]
        ws = [c.weight for c in convs]
        bs = [_bias(c) for c in convs]
        ws[-1] = ws[-1][:d]
        bs[-1] = None if bs[-1] is None else bs[-1][:d]
        plan = split_plan(convs[0].in_channels, L, d, convs[0].kernel_size[0])
        fw, fb, gate = self.lff.weight, self.lff.bias, _gate(self.conv_du)
        params = [*(c.weight for c in convs), *(_bias(c) for c in convs), fw, fb, *gate]
        amp = _amp_block(self, x, params, lambda: (*cpu_layout(ws, fw), bs, fb, gate))
        if amp is None:
            ws, fw = _dense_weights(self, x, ws, fw)
        else:
            x, (ws, fw, bs, fb, gate) = amp
        y = ops.dense_block(x, ws, bs, plan, fuse_weight=fw, fuse_bias=fb)
        fc1, b1, fc2, b2 = gate
        return ops.channel_attention(y, fc1, b1, fc2, b2, residual=x, pool="avg+std")


class FDIRB(R.FDIRB):
    """FD & IRB block (keys ``layer{k}``, ``layer{k}_sub``, ``lff``, ``conv_du``).

    The retain path (1x1 ``layer{k}_sub`` C->S, concat, 1x1 ``lff``) is linear, so it is folded into ONE 1x1
    fusion over the buffer [x | l_1 .. l_{L-1} | layer_L]: block k of the fused weight is
    ``lff_k @ sub_k`` (x's block uses ``layer1_sub``, upstream's quirk; l_1's block is zero) and the last is
    ``lff_L``; the sub biases fold into the fusion bias. Autograd maps the fused weight's gradient back onto
    the keys. Then contrast-aware attention + residual (the fused ``channel_attention`` op).
    """

    def _fused_fusion(self) -> tuple[Tensor, Tensor | None]:
        L = self.num_layers
        lff_w = self.lff.weight.flatten(1)  # [C, S*L]
        S = lff_w.shape[1] // L
        blocks, bias = [], self.lff.bias
        for k in range(1, L):
            sub = getattr(self, f"layer{k}_sub")
            lk = lff_w[:, (k - 1) * S:k * S]
            blocks.append(lk @ sub.weight.flatten(1))
            if sub.bias is not None:
                b = lk @ sub.bias
                bias = b if bias is None else bias + b
        # buffer order: x (layer1_sub), l_1 (unused by the retain path), l_2 .. l_{L-1}, layer_L
        zero = torch.zeros_like(blocks[0])
        w = torch.cat([blocks[0], zero, *blocks[1:], lff_w[:, (L - 1) * S:]], 1)
        return w, bias

    def forward(self, x: Tensor) -> Tensor:
        L = self.num_layers
        convs = [getattr(self, f"layer{i}") for i in range(1, L + 1)]
        plan = fdirb_plan(convs[0].in_channels, L, convs[-1].out_channels, convs[0].kernel_size[0])
        ws = [c.weight for c in convs]
        params = [*ws, self.lff.weight, *(p for k in range(1, L) for p in getattr(self, f"layer{k}_sub").parameters()),
                  *([self.lff.bias] if self.lff.bias is not None else [])]

        def build():  # the folded fusion too: two small matmuls per layer, per call otherwise
            fw, fb = self._fused_fusion()
            pws, pfw = cpu_layout(ws, fw)
            return pws, pfw, None if fb is None else fb.detach()

        bs, gate = [_bias(c) for c in convs], _gate(self.conv_du)
        amp = _amp_block(self, x, [*params, *bs, *gate], lambda: (*build(), bs, gate))
        packed = _inference_cache(self, x, params, build) if amp is None else None
        if amp is not None:
            x, (ws, fw, fb, bs, gate) = amp
        elif packed is None:
            fw, fb = self._fused_fusion()
        else:
            ws, fw, fb = packed
        y = ops.dense_block(x, ws, bs, plan, fuse_weight=fw, fuse_bias=fb)
        fc1, b1, fc2, b2 = gate
        return ops.channel_attention(y, fc1, b1, fc2, b2, residual=x, pool="avg+std")

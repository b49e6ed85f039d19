"""Fused SRDenseNet network (same layers and keys as ``srkernels.reference.SRDenseNetNetwork``, which it
subclasses; only ``forward`` differs).

The 8 dense blocks and the bottleneck run as ONE ``ops.dense_block`` call over one buffer that holds every
feature of the network, ordered [conv1 | block1 | ... | block8] (``network_plan``): block b's first conv reads
the buffer prefix [conv1 | block1 .. block(b-1)], its layer k >= 2 the block's own earlier outputs, and the
plan's fusion conv is ``conv2`` over the whole buffer. Upstream concatenates new-first
(X_b = cat(block_b, X_{b-1}) = [block_b .. block1 | conv1]), so the input channels of each block's first conv
and of ``conv2`` are permuted (``index_select`` on the parameters: differentiable, gradients land on the
original keys). No ``torch.cat``; backward keeps the one buffer instead of every concatenation. The
deconvolution stages and conv3 run as GEMMs on [pixels, channels] matrices in training (``_tail_gemm``) and as
prepacked oneDNN calls in CPU inference (``_tail_onednn``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..dense_plan import DenseLayer, DensePlan, cached_plan
from ..ops.dense_block import cpu_layout
from ..reference import srdensenet as R
from . import _amp
from ._cache import _module_cache
from .conv import conv2d, conv_transpose2d
from .dense import _inference_cache

__all__ = ["SRDenseNetNetwork"]


@cached_plan
def network_plan(num_features: int, growth: int, num_layers: int, num_blocks: int, kernel_size: int = 3):
    """The ``DensePlan`` of SRDenseNet's whole dense part + bottleneck over the buffer
    [conv1 (F) | block1 (G*L) | ... | block B (G*L)] (F = num_features, G = growth, L = num_layers).

    Block b (1-based) owns channels [F + (b-1)*G*L, F + b*G*L); its layer 1 reads the prefix [0, F + (b-1)*G*L),
    its layer k >= 2 reads the block's outputs 1..k-1; the fusion (``conv2``) reads the whole buffer.
    """
    f, g, nl = num_features, growth, num_layers
    layers = []
    for b in range(num_blocks):
        base = f + b * g * nl
        layers.append(DenseLayer(0, base, base, g))
        layers += [DenseLayer(base, j * g, base + j * g, g) for j in range(1, nl)]
    width = f + num_blocks * g * nl
    return DensePlan(width, f, kernel_size, tuple(layers), 0, width)


def upstream_index(num_features: int, block_channels: int, num_blocks: int) -> Tensor:
    """For buffer channel c of the prefix [conv1 | block1 .. block_n] (n = num_blocks), the channel of
    upstream's new-first concatenation X_n = [block_n, ..., block1, conv1] that holds the same feature."""
    f, c, n = num_features, block_channels, num_blocks
    blocks = [i for j in range(1, n + 1) for i in range((n - j) * c, (n - j + 1) * c)]
    return torch.tensor([*range(n * c, n * c + f), *blocks])  # from a list: no aten::cat in the forward


class _GemmTail(torch.autograd.Function):
    """``z = relu(...relu(u @ W_1 + b_1)... @ W_m + b_m) @ W_z`` on [pixels, channels] matrices, stage i's output
    [P, s*s*Cout] read as [P*s*s, Cout] by the next (``SRDenseNetNetwork._tail_gemm``). Backward is the same
    GEMMs autograd would run, but the ReLU masks are applied in place to gradients allocated here: autograd's
    ReLU backward would hold a second copy of the largest gradient (4x resolution, 256 channels at x4)."""

    @staticmethod
    def forward(ctx, u, wz, couts, *stages):
        ins = []
        for w, b, co in zip(stages[0::2], stages[1::2], couts):
            ins.append(u)
            u = (torch.mm(u, w) if b is None else torch.addmm(b, u, w)).relu_().view(-1, co)
        ctx.has_bias = [b is not None for b in stages[1::2]]
        ctx.save_for_backward(u, wz, *ins, *stages[0::2])
        return torch.mm(u, wz)

    @staticmethod
    def backward(ctx, dz):
        m = len(ctx.has_bias)
        saved = ctx.saved_tensors
        u, wz, ins, ws = saved[0], saved[1], saved[2:2 + m], saved[2 + m:]
        outs = [*ins[1:], u]
        dwz = torch.mm(u.t(), dz)
        g = torch.mm(dz, wz.t())  # gradient of the last stage's output
        grads = [None] * (2 * m)
        for i in reversed(range(m)):
            w = ws[i]
            g = g.view(-1, w.shape[1])
            torch.ops.aten.threshold_backward.grad_input(g, outs[i].view(-1, w.shape[1]), 0, grad_input=g)
            grads[2 * i] = torch.mm(ins[i].t(), g)
            grads[2 * i + 1] = g.sum(0) if ctx.has_bias[i] else None
            g = torch.mm(g, w.t()) if i > 0 or ctx.needs_input_grad[0] else None
        return (g, dwz, None, *grads)


class SRDenseNetNetwork(R.SRDenseNetNetwork):
    """SRDenseNet with its dense part + bottleneck as one ``ops.dense_block`` call (module docstring)."""

    def _dims(self) -> tuple[int, int, int, int]:
        conv1, blocks = self.layers[:2]
        first = blocks[0][0]
        return conv1[0].out_channels, first.conv1.out_channels, first.num_layers, len(blocks)

    def _perms(self, device: torch.device) -> list[Tensor]:
        """Per block b >= 2 and for conv2: the input-channel permutation from upstream's order to the buffer's
        (derived from the sizes, so built once per device, outside the state_dict)."""
        f, g, nl, nb = dims = self._dims()
        return _module_cache(self, "_srk_perms", (dims, device),
                             lambda: [upstream_index(f, g * nl, b - 1).to(device) for b in range(2, nb + 2)])

    def forward(self, x: Tensor) -> Tensor:
        conv1, blocks, conv2 = self.layers[:3]
        f, g, nl, nb = self._dims()
        convs = [(b, k, getattr(block[0], f"conv{k}")) for b, block in enumerate(blocks, 1) for k in range(1, nl + 1)]
        biases = [c.bias for _, _, c in convs]

        def permuted():
            perms = self._perms(conv2.weight.device)
            ws = [c.weight.index_select(1, perms[b - 2]) if k == 1 and b > 1 else c.weight for b, k, c in convs]
            return ws, conv2.weight.index_select(1, perms[-1])

        # channels_last: the op copies x0 into its buffer and writes its output without a transpose, and the
        # tail reads that output as a [pixels, channels] matrix
        x0 = conv2d(conv1[0], x, "relu").contiguous(memory_format=torch.channels_last)
        # CPU inference: the permuted weights, in the kernel's layout, built once (ops.dense_block.cpu_layout)
        params = [c.weight for _, _, c in convs] + [conv2.weight]
        fuse_b = conv2.bias
        # CPU autocast inference: the same, cast once to the autocast dtype with the biases (nn/_amp.py)
        amp = _amp.cached(self, x0, [*params, *biases, fuse_b], lambda: (*cpu_layout(*permuted()), biases, fuse_b),
                          "_srk_amp_dense")
        if amp is not None:
            packed, (weights, fuse_w, biases, fuse_b) = True, amp[1]
        else:
            packed = _inference_cache(self, x0, params, lambda: cpu_layout(*permuted()))
            weights, fuse_w = permuted() if packed is None else packed
        plan = network_plan(f, g, nl, nb, weights[0].shape[-1])
        y = ops.dense_block(x0, weights, biases, plan, fuse_weight=fuse_w, fuse_bias=fuse_b)
        if packed is not None:  # CPU inference
            return self._tail_onednn(y)
        return self._tail_gemm(y)

    def _tail_onednn(self, y: Tensor) -> Tensor:
        """CPU inference tail: each deconv stage one prepacked oneDNN deconvolution with its ReLU as post-op, then
        conv3 prepacked: 1.6x faster than the GEMM tail (``_tail_gemm``, built for the training step) at LR 32-48
        (1 thread, CPU time). The dense part stays one ``ops.dense_block`` call: with this tail it measured 1.05-1.1x
        faster than the same network as upstream's concatenations with prepacked oneDNN convs."""
        upsampling, conv3 = self.layers[3:]
        for st in upsampling:
            y = conv_transpose2d(st.upsample_block[0], y, "relu")
        return conv2d(conv3, y)

    def _tail_gemm(self, y: Tensor) -> Tensor:
        """deconv stages (+ReLU) and conv3, same maths as ``conv3(upsampling(y))``.

        With kernel == stride (Lornatang's deconvs, every scale) a stage is a per-pixel GEMM: row (n, h, w) of
        ``relu(Y @ W + b)``, W = weight [Cin, (i, j, Cout)], holds the s x s output pixels (s*h + i, s*w + j), so
        the stages chain as GEMMs on [pixels, channels] matrices whose rows stay in sub-pixel order
        (n, h, w, i1, j1, i2, j2, ...), and conv3 (k x k, C -> Cout) becomes ``Z = U @ W3`` [pixels, (o, tap)]
        (the only pass over the high-resolution features), rearranged to image order (Cout*k*k channels: small)
        and summed tap by tap by a grouped conv with a one-hot kernel. Backward is GEMMs again (``_GemmTail``).
        On CPU this is ~2x faster than oneDNN's channels_last deconvolutions in a training step, whose backward
        is slow mostly through the bias gradient (asking oneDNN for it alone costs more than for the weight
        gradient). Other deconv shapes run oneDNN with the bias added in place afterwards for that reason.
        """
        upsampling, c3 = self.layers[3:]
        stages = [st.upsample_block[0] for st in upsampling]
        if not all(d.kernel_size == d.stride and d.padding == (0, 0) and d.output_padding == (0, 0)
                   and d.stride[0] == d.stride[1] and d.groups == 1 and d.dilation == (1, 1) for d in stages):
            for d in stages:
                y = F.conv_transpose2d(y, d.weight, None, d.stride, d.padding, d.output_padding)
                if d.bias is not None:
                    y = y.add_(d.bias.view(1, -1, 1, 1))
                y = y.relu_()
            return conv2d(c3, y)
        n, c, h, w = y.shape
        u = y.permute(0, 2, 3, 1).reshape(-1, c)  # a view when y is channels_last (the compiled op's output)
        subs, couts, wb = [], [], []
        for d in stages:
            s, co = d.stride[0], d.out_channels
            wb.append(d.weight.permute(0, 2, 3, 1).reshape(c, s * s * co))
            wb.append(None if d.bias is None else d.bias.expand(s * s, co).reshape(-1))
            subs.append(s)
            couts.append(co)
            c = co
        k, cout = c3.kernel_size[0], c3.out_channels
        wz = c3.weight.reshape(cout, c, k * k).transpose(0, 1).reshape(c, cout * k * k)
        if torch.is_autocast_enabled(u.device.type):  # the GEMMs' autocast casts, made before the Function: its
            dt = torch.get_autocast_dtype(u.device.type)  # backward then gets one dtype (autograd casts back)
            u, wz, wb = u.to(dt), wz.to(dt), [None if t is None else t.to(dt) for t in wb]
        z = _GemmTail.apply(u, wz, tuple(couts), *wb)
        m = len(subs)
        z = z.view(n, h, w, *[v for s in subs for v in (s, s)], cout * k * k)
        z = z.permute(0, 3 + 2 * m, 1, *range(3, 3 + 2 * m, 2), 2, *range(4, 4 + 2 * m, 2))
        sc = math.prod(subs)
        z = z.reshape(n, cout * k * k, h * sc, w * sc)
        return conv2d(self._tap_sum(c3, z), z)

    def _tap_sum(self, c3: nn.Conv2d, z: Tensor) -> nn.Conv2d:
        """The grouped conv with a one-hot kernel that sums conv3's k*k taps (bias: conv3's own parameter), kept
        outside the module tree (not in the state_dict) and built once per dtype/device, so ``conv2d`` reuses its
        prepacked weight in CPU inference."""
        k, cout = c3.kernel_size[0], c3.out_channels

        def build() -> nn.Conv2d:
            tap = nn.Conv2d(cout * k * k, cout, k, padding=c3.padding, groups=cout, bias=False, device=z.device,
                            dtype=z.dtype)
            onehot = torch.eye(k * k, dtype=z.dtype, device=z.device).view(1, k * k, k, k).expand(cout, -1, -1, -1)
            tap.weight = nn.Parameter(onehot.contiguous(), requires_grad=False)
            return tap

        tap = _module_cache(self, "_srk_tap_sum", (z.dtype, z.device, k, cout, tuple(c3.padding)), build)
        tap.bias = c3.bias  # the very parameter: its gradient lands on conv3.bias
        return tap

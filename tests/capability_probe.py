"""Run every CPU op forward and backward on fixed inputs and save the results (tests/test_cpu_capability.py
runs it once per CPU capability, in a subprocess, and compares). usage: python capability_probe.py OUT.pt"""
from __future__ import annotations

import sys

import torch

import srkernels
from srkernels import ops


class _Shuffle(torch.nn.Module):
    """ops.pixel_shuffle with a learnable bias and PReLU slopes (r = 3)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(channels * 9))
        self.slope = torch.nn.Parameter(torch.full((channels,), 0.25))

    def forward(self, x):
        return ops.pixel_shuffle(x, 3, bias=self.bias, act="prelu", act_weight=self.slope)


def _cases():
    """name -> (module or function, input shape, channels_last?). Odd sizes, C not a multiple of 8."""
    torch.manual_seed(0)
    nn = srkernels.nn
    ca_std = nn.ChannelAttention(20, 4, pool="avg+std")
    return {
        "channel_attention": (nn.ChannelAttention(20, 4), (2, 20, 37, 41)),
        "channel_attention_std": (ca_std, (2, 20, 37, 41)),
        "balanced_attention": (nn.BalancedAttention(20, 4), (2, 20, 23, 29)),
        "pixel_shuffle": (_Shuffle(5), (2, 45, 9, 11)),
        "pixel_unshuffle": (lambda x: ops.pixel_unshuffle(x, 2) * 1.0, (2, 5, 10, 14)),
        "dense_block": (nn.ResidualDenseBlock(16, 8, 3), (2, 16, 13, 15)),
        "dense_block_rdcab": (nn.RDCAB(16, 8, 3, reduction=4), (1, 16, 11, 9)),
        # float32 layers by Winograd on avx2/avx512 (>= 16 channels, >= 64 pixels), brgemm on default
        "dense_wino": (nn.ResidualDenseBlock(16, 16, 2), (1, 16, 9, 10)),
    }


def run() -> dict[str, torch.Tensor]:
    results = {}
    for name, (fn, shape) in _cases().items():
        params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
        for dtype in (torch.float32, torch.bfloat16):
            for cl in (False, True):
                torch.manual_seed(1)
                x = torch.randn(shape).to(dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_(True)
                m = fn.to(dtype) if params else fn
                for p in params:
                    p.grad = None
                y = m(x)
                g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
                y.backward(g)
                key = f"{name}/{str(dtype)[6:]}/{'channels_last' if cl else 'contiguous'}"
                results[key + "/out"] = y.detach().clone()
                results[key + "/grad_x"] = x.grad.clone()
                for i, p in enumerate(params):
                    if p.grad is not None:
                        results[f"{key}/grad_p{i}"] = p.grad.clone()  # .to() later converts grads in place
    return results


if __name__ == "__main__":
    out = run()
    out["_capability"] = srkernels.build_info()["cpu_capability"]
    torch.save(out, sys.argv[1])

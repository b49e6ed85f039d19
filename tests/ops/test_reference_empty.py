"""Found by tests/ops/test_fuzz.py: the reference pixel_unshuffle of an empty batch kept the input's shape
(``F.pixel_unshuffle`` returns an empty input unchanged) instead of ``[0, C*r*r, H/r, W/r]``."""
import pytest
import torch

from srkernels import ops, use_backend


@pytest.mark.parametrize("backend", ["compiled", "reference"])
def test_pixel_unshuffle_empty_batch_shape(backend):
    with use_backend(backend):
        assert ops.pixel_unshuffle(torch.randn(0, 1, 2, 2), 2).shape == (0, 4, 1, 1)
        assert ops.pixel_unshuffle(torch.randn(0, 3, 6, 4), 2).shape == (0, 12, 3, 2)

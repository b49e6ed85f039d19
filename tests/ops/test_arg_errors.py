"""Issue 16: argument errors that used to surface as IndexError / "cannot reshape tensor of 0 elements" /
a traceback are a ValueError naming the argument (CLI: one line on stderr, non-zero exit)."""
import pytest
import torch

from srkernels import cli, ops, use_backend
from srkernels.ops.dense_block import rdb_plan

BACKENDS = ["compiled", "reference"]


def _x():
    return torch.randn(1, 8, 4, 4)


@pytest.mark.parametrize("w_sa", [torch.tensor(1.0), torch.randn(7)], ids=["0d", "1d"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_balanced_attention_bad_w_sa_rank(backend, w_sa):
    with use_backend(backend), pytest.raises(ValueError, match="w_sa must be"):
        ops.balanced_attention(_x(), torch.randn(2, 8), torch.ones(2), torch.randn(8, 2), w_sa)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_d_w1(backend):
    with use_backend(backend), pytest.raises(ValueError, match="w1 must be"):
        ops.channel_attention(_x(), torch.tensor(1.0), None, torch.randn(8, 2), None)


# reduction > C: a layer building its MLP as C // reduction gets 0 hidden units
@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_attention_zero_hidden(backend):
    with use_backend(backend), pytest.raises(ValueError, match="w1 has 0 rows.*reduction"):
        ops.channel_attention(_x(), torch.randn(0, 8), None, torch.randn(8, 0), None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_balanced_attention_zero_hidden(backend):
    with use_backend(backend), pytest.raises(ValueError, match="w1 has 0 rows"):
        ops.balanced_attention(_x(), torch.randn(0, 8), torch.ones(1), torch.randn(8, 0), torch.randn(3, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_block_gate_zero_hidden(backend):
    gate = (torch.randn(0, 12), None, torch.randn(12, 0), None)
    with use_backend(backend), pytest.raises(ValueError, match="gate w1 has 0 rows"):
        ops.dense_block(_x(), [torch.randn(4, 8, 3, 3)], [None], rdb_plan(8, 4, 1), fuse_weight=torch.randn(8, 12),
                        gate=gate)


def test_dense_block_zero_d_fuse_weight():
    with pytest.raises(ValueError, match="fuse_weight must be"):
        ops.dense_block(_x(), [torch.randn(4, 8, 3, 3)], [None], rdb_plan(8, 4, 1), fuse_weight=torch.tensor(1.0))


@pytest.mark.parametrize("shape", [["0", "8", "4", "4"], ["2", "8", "-1", "4"]])
def test_cli_bench_non_positive_shape(capsys, shape):
    rc = cli.main(["bench", "--shape", *shape, "--models", "none", "--rounds", "1"])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.strip().count("\n") == 0 and "--shape" in err, err

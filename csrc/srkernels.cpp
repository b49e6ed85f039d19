// Every srkernels op schema on one screen. Kernels live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu;
// fake kernels and autograd are registered beside each op in srkernels/ops/<op>.py.
// The contracts (math, shapes, saved statistics) are in docs/ops.md.
#include <torch/library.h>

TORCH_LIBRARY(srkernels, m) {
  m.def(
      "channel_attention(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? residual, "
      "Tensor? act_weight, str pool) -> (Tensor, Tensor)");
  m.def(
      "channel_attention_backward(Tensor grad_out, Tensor x, Tensor stats, Tensor w1, Tensor? b1, "
      "Tensor w2, Tensor? b2, Tensor? act_weight, str pool) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Inference into a caller-owned buffer (no autograd): out must match x's shape, dtype and device.
  m.def(
      "channel_attention_out(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? residual, "
      "Tensor? act_weight, str pool, Tensor(a!) out) -> ()");
  m.def(
      "balanced_attention(Tensor x, Tensor w1, Tensor prelu_w, Tensor w2, Tensor w_sa, Tensor? residual) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "balanced_attention_backward(Tensor grad_out, Tensor x, Tensor mean, Tensor maxmap, Tensor w1, "
      "Tensor prelu_w, Tensor w2, Tensor w_sa) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "balanced_attention_out(Tensor x, Tensor w1, Tensor prelu_w, Tensor w2, Tensor w_sa, Tensor? residual, "
      "Tensor(a!) out) -> ()");
  m.def(
      "pixel_shuffle(Tensor x, int r, Tensor? bias, Tensor? act_weight, str act, Tensor? residual) -> Tensor");
  m.def(
      "pixel_shuffle_backward(Tensor grad_out, Tensor? x, int r, Tensor? bias, Tensor? act_weight, str act) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "pixel_shuffle_out(Tensor x, int r, Tensor? bias, Tensor? act_weight, str act, Tensor? residual, "
      "Tensor(a!) out) -> ()");
  m.def("pixel_unshuffle(Tensor x, int r) -> Tensor");
  // Residual-dense block from one feature buffer (plan: srkernels/ops/dense_block.py). Returns the block output,
  // the buffer (x and every layer output; all backward needs) and the fusion gate's [N, 2, K] stats.
  m.def(
      "dense_block(Tensor x, Tensor[] weights, Tensor[] biases, int[] plan, Tensor? fuse_weight, "
      "Tensor? fuse_bias, Tensor? gate_w1, Tensor? gate_b1, Tensor? gate_w2, Tensor? gate_b2, Tensor? residual) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "dense_block_backward(Tensor grad_out, Tensor buffer, Tensor stats, Tensor[] weights, Tensor[] biases, "
      "int[] plan, Tensor? fuse_weight, Tensor? gate_w1, Tensor? gate_b1, Tensor? gate_w2, Tensor? gate_b2) "
      "-> (Tensor, Tensor[], Tensor[], Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}


// Sampled dense-dense product over token-major operands, for the gradient of a sparse weight delta.
//
//   out[j] = sum_t gy[t, r_j] * x[t, cols[j]]      j = 0 .. k-1, entries (r_j, cols[j]) of a CSR pattern
//
// gy (T x O) and x (T x I) are the output gradient and the input of a Linear layer, row-major as
// autograd hands them over. torch.sparse.sampled_addmm computes the same numbers but needs both
// operands transposed (the dot products run over T), and those transposes cost more than the
// product itself. Here the tokens are split across threads in blocks of 8 rows; for each block a thread
// gathers every entry from rows that stay in cache into its own partial sums (k floats), which are
// added at the end: no transpose, each row of gy and x read once. Blocks whose gy is all zero are
// skipped: padding tokens get exactly zero gradient (their keys are masked out, nothing pools them).
#include <torch/extension.h>
#include <ATen/Parallel.h>

torch::Tensor sddmm_tokens(const torch::Tensor& gy, const torch::Tensor& x, const torch::Tensor& crow,
                           const torch::Tensor& cols) {
  TORCH_CHECK(gy.dim() == 2 && x.dim() == 2 && gy.size(0) == x.size(0), "gy and x must be (T, O) and (T, I)");
  TORCH_CHECK(gy.scalar_type() == torch::kFloat && x.scalar_type() == torch::kFloat, "float32 operands only");
  TORCH_CHECK(gy.is_contiguous() && x.is_contiguous(), "gy and x must be contiguous");
  TORCH_CHECK(crow.scalar_type() == torch::kLong && cols.scalar_type() == torch::kLong, "int64 coordinates");
  TORCH_CHECK(crow.numel() == gy.size(1) + 1, "crow must have O + 1 entries");
  const int64_t T = gy.size(0), O = gy.size(1), I = x.size(1), k = cols.numel();
  const float* g = gy.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t* row_start = crow.data_ptr<int64_t>();
  const int64_t* c = cols.data_ptr<int64_t>();
  constexpr int64_t B = 8;  // tokens per block
  const int64_t blocks = (T + B - 1) / B;
  // one row of partial sums per thread: each thread reads its own token blocks once, all entries
  auto partial = torch::zeros({at::get_num_threads(), k}, gy.options());
  float* parts = partial.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    float* acc = parts + at::get_thread_num() * k;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t = b * B;
      if (t + B <= T) {
        const float* gb = g + t * O;
        const float* xb = xp + t * I;
        int64_t first_nonzero = 0;  // padding tokens (and, in the last layer, all but the pooled ones)
        while (first_nonzero < B * O && gb[first_nonzero] == 0.f) ++first_nonzero;  // have gy = 0 exactly
        if (first_nonzero == B * O) continue;
        for (int64_t r = 0; r < O; ++r) {
          const int64_t start = row_start[r], stop = row_start[r + 1];
          if (start == stop) continue;
          float gr[B];  // gy[t .. t+B, r], read once for all of row r's entries
          for (int64_t u = 0; u < B; ++u) gr[u] = gb[u * O + r];
          for (int64_t j = start; j < stop; ++j) {
            const float* xj = xb + c[j];
            float s0 = 0.f, s1 = 0.f;
#pragma GCC unroll 4
            for (int64_t u = 0; u < B; u += 2) {
              s0 += gr[u] * xj[u * I];
              s1 += gr[u + 1] * xj[(u + 1) * I];
            }
            acc[j] += s0 + s1;
          }
        }
      } else {
        for (int64_t u = t; u < T; ++u) {
          const float* gt = g + u * O;
          const float* xt = xp + u * I;
          for (int64_t r = 0; r < O; ++r)
            for (int64_t j = row_start[r]; j < row_start[r + 1]; ++j) acc[j] += gt[r] * xt[c[j]];
        }
      }
    }
  });
  return partial.sum(0);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sddmm_tokens", &sddmm_tokens, "out[j] = sum_t gy[t, r(j)] * x[t, cols[j]] over a CSR pattern (float32, CPU)");
}

// The fused lm-head kernels on CPU: per-row log-probabilities of counted rows, and their
// gradients, without ever holding [rows, V] logits beyond a fixed workspace.
//
// Work split: the vocabulary is cut into `parts` contiguous ranges (one per thread); each part
// walks its range in tiles of `vocab_tile` columns, for a block of at most `row_tile` rows at a
// time. Owning a vocabulary range makes dweight/dbias writes race-free without per-thread
// [V, H] copies; per-row results are merged across parts in a fixed order, so a run is
// bit-for-bit repeatable for a given number of parts. Matrix products go to BLAS through ATen
// (single-threaded inside the parallel region); the exp / log-sum-exp / softmax-gradient work
// is in row_math.h.
//
// Optional `store`: a caller-owned fp32 buffer that keeps the transformed logits of the
// first columns of every part (as many whole tiles as fit) between the forward and the
// backward of the same rows, so the backward recomputes only the rest. The SPIN path uses it
// to compute the gradients of a tile of whole pairs from one logits computation (6·N·H·V).
// Optional `row_index`: hidden is then all N rows and the counted ones are read through it,
// block by block, so the caller needs no gathered [M, H] copy.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "row_math.h"

// MKL (what the x86 torch wheels use for fp32 matmuls) is told by torch not to adapt its thread
// count, so a matmul issued inside our parallel region would start a nested team of its own:
// oversubscription, and on a busy machine a 4x slowdown. Each part therefore runs its matmuls
// single-threaded. The Fortran-convention entry point (argument by pointer) is the one the wheels
// export. Weak: absent when torch uses another BLAS, which then runs as it would anyway.
extern "C" int mkl_set_num_threads_local_(const int*) __attribute__((weak));

namespace spin_kernels {
namespace {

using at::Tensor;

// Single-threaded BLAS on this thread while alive (see mkl_set_num_threads_local_ above).
class SerialBlas {
 public:
  SerialBlas() : active_(mkl_set_num_threads_local_ != nullptr) {
    const int one = 1;
    if (active_) previous_ = mkl_set_num_threads_local_(&one);
  }
  ~SerialBlas() {
    if (active_) mkl_set_num_threads_local_(&previous_);
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  bool active_;
  int previous_ = 0;
};

bool is_kernel_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_fp32_vector(const Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Shape/dtype/device/value checks shared by forward and backward; returns the fp32 bias.
std::optional<Tensor> check_inputs(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                                   const Tensor& targets, const std::optional<Tensor>& row_index,
                                   double temperature, double softcap, int64_t parts, int64_t row_tile,
                                   int64_t vocab_tile) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "spin_kernels_cpu: hidden, weight and targets must be CPU tensors");
  TORCH_CHECK(hidden.dim() == 2, "hidden must be 2-D [rows, H], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D [V, H], got shape ", weight.sizes());
  TORCH_CHECK(is_kernel_float(hidden.scalar_type()), "hidden must be float32/bfloat16/float16, got ",
              hidden.scalar_type());
  TORCH_CHECK(is_kernel_float(weight.scalar_type()), "weight must be float32/bfloat16/float16, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.size(1) == hidden.size(1), "weight must be [V, H] with H = hidden.size(1) = ", hidden.size(1),
              ", got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1, "weight must have at least one row (V >= 1)");
  TORCH_CHECK(hidden.is_contiguous(), "hidden must be contiguous");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  TORCH_CHECK(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 1, "targets must be 1-D [M], got shape ", targets.sizes());
  TORCH_CHECK(targets.is_contiguous(), "targets must be contiguous");
  const int64_t m = targets.size(0);
  if (row_index.has_value()) {
    TORCH_CHECK(row_index->device().is_cpu() && row_index->scalar_type() == at::kLong && row_index->dim() == 1 &&
                    row_index->size(0) == m && row_index->is_contiguous(),
                "row_index must be a contiguous int64 CPU tensor of shape [M] = [", m, "], got ",
                row_index->scalar_type(), " ", row_index->sizes());
    const int64_t* idx = row_index->const_data_ptr<int64_t>();
    for (int64_t i = 0; i < m; ++i) {
      TORCH_CHECK(idx[i] >= 0 && idx[i] < hidden.size(0), "row_index must be in [0, hidden.size(0)=", hidden.size(0),
                  "), got ", idx[i], " at ", i);
    }
  } else {
    TORCH_CHECK(hidden.size(0) == m, "targets must have shape [M] = [hidden.size(0)] = [", hidden.size(0), "], got ",
                targets.sizes());
  }
  // Counted rows only: every target must name a vocabulary entry (ignore_index rows are
  // removed before the kernel). Checked here so that no value can make the kernel misbehave.
  const int64_t vocab = weight.size(0);
  const int64_t* y = targets.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < targets.size(0); ++i) {
    TORCH_CHECK(y[i] >= 0 && y[i] < vocab, "targets must be in [0, V=", vocab, "), got ", y[i], " at row ", i);
  }
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap must be finite and >= 0 (0: none), got ", softcap);
  TORCH_CHECK(parts >= 1, "parts must be >= 1, got ", parts);
  TORCH_CHECK(row_tile >= 1, "row_tile must be >= 1, got ", row_tile);
  TORCH_CHECK(vocab_tile >= 1, "vocab_tile must be >= 1, got ", vocab_tile);
  if (!bias.has_value()) return std::nullopt;
  TORCH_CHECK(bias->device().is_cpu(), "bias must be a CPU tensor");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == vocab, "bias must have shape [V] = [", vocab, "], got ",
              bias->sizes());
  TORCH_CHECK(at::isFloatingType(bias->scalar_type()), "bias must be floating, got ", bias->scalar_type());
  return bias->to(at::kFloat).contiguous();
}

// The vocabulary partition and the stored-column layout, identical for forward and backward.
struct Plan {
  int64_t rows, vocab, hidden, row_tile, vocab_tile, parts;
  std::vector<int64_t> begin, end, stored;  // per part: columns [begin, end), first `stored` kept
  int64_t store_stride = 0;                 // floats per part in the store

  Plan(int64_t rows_, int64_t vocab_, int64_t hidden_, int64_t parts_, int64_t row_tile_, int64_t vocab_tile_,
       int64_t store_floats)
      : rows(rows_), vocab(vocab_), hidden(hidden_), row_tile(std::min(row_tile_, std::max<int64_t>(rows_, 1))),
        vocab_tile(std::min(vocab_tile_, vocab_)) {
    const int64_t tiles = (vocab + vocab_tile - 1) / vocab_tile;
    parts = std::min(parts_, tiles);  // every part gets at least one tile
    store_stride = parts > 0 ? store_floats / parts : 0;
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t b = tiles * p / parts * vocab_tile;
      const int64_t e = std::min(tiles * (p + 1) / parts * vocab_tile, vocab);
      begin.push_back(b);
      end.push_back(e);
      int64_t keep = 0;
      if (rows > 0 && store_stride > 0) {
        const int64_t fit = store_stride / rows;  // columns of all rows that fit in this part's share
        keep = fit >= e - b ? e - b : fit / vocab_tile * vocab_tile;
      }
      stored.push_back(keep);
    }
  }
};

// scratch[i, :] = float(src[row(i), :]) for i < n, row(i) = index[i] if given, else r0 + i.
// A plain loop rather than Tensor::copy_, which inside a parallel region ran ~50x slower.
Tensor rows_to_fp32(const Tensor& src, const int64_t* index, int64_t r0, int64_t n, Tensor& scratch) {
  const int64_t h = src.size(1);
  float* dst = scratch.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "rows_to_fp32", [&] {
    const scalar_t* base = src.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t* row = base + (index != nullptr ? index[i] : r0 + i) * h;
      float* out = dst + i * h;
      for (int64_t j = 0; j < h; ++j) out[j] = static_cast<float>(row[j]);
    }
  });
  return scratch.narrow(0, 0, n);
}

// fp32 rows [r0, r0 + n) of `src` ([*, H]): a view when already fp32, else converted into
// `scratch`.
Tensor fp32_rows(const Tensor& src, int64_t r0, int64_t n, Tensor& scratch) {
  if (src.scalar_type() == at::kFloat) return src.narrow(0, r0, n);
  return rows_to_fp32(src, nullptr, r0, n, scratch);
}

// The counted rows of hidden, by blocks of fp32 [n, H]: hidden itself, or hidden[row_index]
// when an index is given (the caller then need not gather an [M, H] copy first).
class RowSource {
 public:
  RowSource(const Tensor& hidden, const std::optional<Tensor>& row_index, int64_t row_tile)
      : hidden_(hidden), index_(row_index) {
    if (index_.has_value() || hidden.scalar_type() != at::kFloat)
      scratch_ = at::empty({row_tile, hidden.size(1)}, hidden.options().dtype(at::kFloat));
  }

  Tensor block(int64_t r0, int64_t n) {
    if (!index_.has_value()) return fp32_rows(hidden_, r0, n, scratch_);
    return rows_to_fp32(hidden_, index_->const_data_ptr<int64_t>() + r0, 0, n, scratch_);
  }

 private:
  const Tensor& hidden_;
  const std::optional<Tensor>& index_;
  Tensor scratch_;
};

// [n, cols] fp32 view of part p's stored logits for rows [r0, r0 + n), columns starting at
// `col` (relative to the part's first column).
Tensor stored_tile(Tensor& store, const Plan& plan, int64_t p, int64_t r0, int64_t n, int64_t col, int64_t cols) {
  const int64_t ld = plan.stored[p];
  return store.as_strided({n, cols}, {ld, 1}, store.storage_offset() + p * plan.store_stride + r0 * ld + col);
}

// With an fp32 weight (a view, no conversion buffer) the kept columns of a part go through
// BLAS as one product each instead of one per tile: large products run nearer the machine's
// matmul rate and read the hidden rows once.
bool kept_in_one_product(const Plan& plan, int64_t p, const Tensor& weight) {
  return plan.stored[p] > 0 && weight.scalar_type() == at::kFloat;
}

HeadOptions head_options(const std::optional<Tensor>& bias32, double temperature, double softcap) {
  HeadOptions o;
  o.bias = bias32.has_value() ? bias32->const_data_ptr<float>() : nullptr;
  o.inv_temperature = static_cast<float>(1.0 / temperature);
  o.softcap = static_cast<float>(softcap);
  return o;
}

Tensor check_store(const std::optional<Tensor>& store) {
  if (!store.has_value()) return Tensor();
  TORCH_CHECK(store->device().is_cpu() && store->scalar_type() == at::kFloat && store->dim() == 1 &&
                  store->is_contiguous(),
              "store must be a contiguous 1-D float32 CPU tensor");
  return *store;
}

// Per-part scratch that outlives one row block: the logits tile and converted weight tile.
struct PartScratch {
  Tensor logits;  // [row_tile, vocab_tile]
  Tensor weight;  // [vocab_tile, H] when weight is not fp32
};

std::vector<PartScratch> make_scratch(const Plan& plan, const Tensor& weight, bool need_logits) {
  std::vector<PartScratch> s(plan.parts);
  const auto f32 = weight.options().dtype(at::kFloat);
  for (auto& part : s) {
    if (need_logits) part.logits = at::empty({plan.row_tile, plan.vocab_tile}, f32);
    if (weight.scalar_type() != at::kFloat) part.weight = at::empty({plan.vocab_tile, plan.hidden}, f32);
  }
  return s;
}

Tensor weight_tile(const Tensor& weight, int64_t v0, int64_t n, PartScratch& s) {
  return fp32_rows(weight, v0, n, s.weight);
}

std::tuple<Tensor, Tensor> rows_forward(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                                        const Tensor& targets, double temperature, double softcap,
                                        const std::optional<Tensor>& store_opt, int64_t parts, int64_t row_tile,
                                        int64_t vocab_tile, const std::optional<Tensor>& row_index) {
  const auto bias32 =
      check_inputs(hidden, weight, bias, targets, row_index, temperature, softcap, parts, row_tile, vocab_tile);
  Tensor store = check_store(store_opt);
  const int64_t m = targets.size(0), h = hidden.size(1), v = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor logp = at::empty({m}, f32), lse = at::empty({m}, f32);
  if (m == 0) return {logp, lse};
  const Plan plan(m, v, h, parts, row_tile, vocab_tile, store.defined() ? store.numel() : 0);
  const HeadOptions opts = head_options(bias32, temperature, softcap);
  bool all_stored = true;
  for (int64_t p = 0; p < plan.parts; ++p) all_stored &= plan.stored[p] == plan.end[p] - plan.begin[p];
  auto scratch = make_scratch(plan, weight, !all_stored);
  RowSource rows(hidden, row_index, plan.row_tile);
  // Running (max, sum) per part and row of the block; z[target] written by the owning part.
  Tensor run_max = at::empty({plan.parts, plan.row_tile}, f32), run_sum = at::empty({plan.parts, plan.row_tile}, f32);
  Tensor target_logit = at::empty({plan.row_tile}, f32);
  const int64_t* y = targets.const_data_ptr<int64_t>();

  for (int64_t r0 = 0; r0 < m; r0 += plan.row_tile) {
    const int64_t n = std::min(plan.row_tile, m - r0);
    const Tensor h_rows = rows.block(r0, n);
    run_max.fill_(-std::numeric_limits<float>::infinity());
    run_sum.zero_();
    at::parallel_for(0, plan.parts, 1, [&](int64_t pb, int64_t pe) {
      // OpenMP workers do not inherit the caller's dispatch state: keep autograd out of the
      // matmuls (weight may require grad; these are plain computations on views).
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      const SerialBlas serial_blas;
      for (int64_t p = pb; p < pe; ++p) {
        PartScratch& s = scratch[p];
        const int64_t kept = plan.stored[p];
        const bool one_product = kept_in_one_product(plan, p, weight);
        if (one_product) {
          Tensor logits = stored_tile(store, plan, p, r0, n, 0, kept);
          at::mm_out(logits, h_rows, weight.narrow(0, plan.begin[p], kept).t());
        }
        for (int64_t v0 = plan.begin[p]; v0 < plan.end[p]; v0 += plan.vocab_tile) {
          const int64_t cols = std::min(plan.vocab_tile, plan.end[p] - v0);
          const int64_t col = v0 - plan.begin[p];
          Tensor tile = col < kept ? stored_tile(store, plan, p, r0, n, col, cols)
                                   : s.logits.narrow(0, 0, n).narrow(1, 0, cols);
          if (!(one_product && col < kept)) at::mm_out(tile, h_rows, weight_tile(weight, v0, cols, s).t());
          forward_tile(tile.data_ptr<float>(), tile.stride(0), n, cols, v0, opts, y + r0,
                       run_max.data_ptr<float>() + p * plan.row_tile, run_sum.data_ptr<float>() + p * plan.row_tile,
                       target_logit.data_ptr<float>());
        }
      }
    });
    // Merge the parts' (max, sum) in part order: the same result for the same `parts`.
    const float* mx = run_max.const_data_ptr<float>();
    const float* sm = run_sum.const_data_ptr<float>();
    const float* zt = target_logit.const_data_ptr<float>();
    float* lse_out = lse.data_ptr<float>() + r0;
    float* logp_out = logp.data_ptr<float>() + r0;
    for (int64_t i = 0; i < n; ++i) {
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t p = 0; p < plan.parts; ++p) top = std::max(top, mx[p * plan.row_tile + i]);
      double total = 0.0;
      for (int64_t p = 0; p < plan.parts; ++p)
        total += static_cast<double>(sm[p * plan.row_tile + i]) * std::exp(static_cast<double>(mx[p * plan.row_tile + i]) - top);
      lse_out[i] = top + static_cast<float>(std::log(total));
      logp_out[i] = zt[i] - lse_out[i];
    }
  }
  return {logp, lse};
}

void check_grad_output(const std::optional<Tensor>& t, const char* name, int64_t rows, int64_t cols) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t->is_contiguous(), name, " must be contiguous");
  if (cols < 0) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == rows, name, " must have shape [", rows, "], got ", t->sizes());
  } else {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == rows && t->size(1) == cols, name, " must have shape [", rows, ", ",
                cols, "], got ", t->sizes());
  }
}

// dhidden is overwritten; dweight and dbias are accumulated into (the caller zeroes them once),
// so that tiles of rows can be added up call after call.
void rows_backward(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                   const Tensor& targets, const Tensor& lse, const Tensor& grad, double temperature, double softcap,
                   const std::optional<Tensor>& store_opt, int64_t parts, int64_t row_tile, int64_t vocab_tile,
                   const std::optional<Tensor>& dhidden, const std::optional<Tensor>& dweight,
                   const std::optional<Tensor>& dbias, const std::optional<Tensor>& row_index) {
  const auto bias32 =
      check_inputs(hidden, weight, bias, targets, row_index, temperature, softcap, parts, row_tile, vocab_tile);
  Tensor store = check_store(store_opt);
  const int64_t m = targets.size(0), h = hidden.size(1), v = weight.size(0);
  check_fp32_vector(lse, "lse", m);
  check_fp32_vector(grad, "grad", m);
  check_grad_output(dhidden, "dhidden", m, h);
  check_grad_output(dweight, "dweight", v, h);
  check_grad_output(dbias, "dbias", v, -1);
  if (m == 0 || !(dhidden.has_value() || dweight.has_value() || dbias.has_value())) {
    if (dhidden.has_value()) dhidden->zero_();
    return;
  }
  const Plan plan(m, v, h, parts, row_tile, vocab_tile, store.defined() ? store.numel() : 0);
  const HeadOptions opts = head_options(bias32, temperature, softcap);
  auto scratch = make_scratch(plan, weight, true);
  const auto f32 = hidden.options().dtype(at::kFloat);
  RowSource rows(hidden, row_index, plan.row_tile);
  // Parts other than the first add their dhidden into their own buffer; summed in part order.
  std::vector<Tensor> dh_partial(plan.parts);
  if (dhidden.has_value())
    for (int64_t p = 1; p < plan.parts; ++p) dh_partial[p] = at::empty({plan.row_tile, h}, f32);
  const int64_t* y = targets.const_data_ptr<int64_t>();

  for (int64_t r0 = 0; r0 < m; r0 += plan.row_tile) {
    const int64_t n = std::min(plan.row_tile, m - r0);
    const Tensor h_rows = rows.block(r0, n);
    at::parallel_for(0, plan.parts, 1, [&](int64_t pb, int64_t pe) {
      // OpenMP workers do not inherit the caller's dispatch state: keep autograd out of the
      // matmuls (weight may require grad; these are plain computations on views).
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      const SerialBlas serial_blas;
      for (int64_t p = pb; p < pe; ++p) {
        PartScratch& s = scratch[p];
        Tensor dh;
        if (dhidden.has_value()) {
          dh = p == 0 ? dhidden->narrow(0, r0, n) : dh_partial[p].narrow(0, 0, n);
          std::fill_n(dh.data_ptr<float>(), dh.numel(), 0.0f);  // rows of a contiguous buffer
        }
        const int64_t kept = plan.stored[p];
        const bool one_product = kept_in_one_product(plan, p, weight);
        for (int64_t v0 = plan.begin[p]; v0 < plan.end[p]; v0 += plan.vocab_tile) {
          const int64_t cols = std::min(plan.vocab_tile, plan.end[p] - v0);
          const int64_t col = v0 - plan.begin[p];
          const bool deferred = one_product && col < kept;  // its products come after the loop
          const Tensor w = deferred ? Tensor() : weight_tile(weight, v0, cols, s);
          Tensor tile;
          if (col < kept) {
            tile = stored_tile(store, plan, p, r0, n, col, cols);
          } else {
            tile = s.logits.narrow(0, 0, n).narrow(1, 0, cols);
            at::mm_out(tile, h_rows, w.t());
            transform_tile(tile.data_ptr<float>(), tile.stride(0), n, cols, v0, opts);
          }
          backward_tile(tile.data_ptr<float>(), tile.stride(0), n, cols, v0, opts, y + r0,
                        lse.const_data_ptr<float>() + r0, grad.const_data_ptr<float>() + r0);
          if (dbias.has_value())
            add_column_sums(tile.data_ptr<float>(), tile.stride(0), n, cols, dbias->data_ptr<float>() + v0);
          if (deferred) continue;
          if (dh.defined()) dh.addmm_(tile, w);
          if (dweight.has_value()) dweight->narrow(0, v0, cols).addmm_(tile.t(), h_rows);
        }
        if (one_product) {
          const Tensor grads = stored_tile(store, plan, p, r0, n, 0, kept);
          if (dh.defined()) dh.addmm_(grads, weight.narrow(0, plan.begin[p], kept));
          if (dweight.has_value()) dweight->narrow(0, plan.begin[p], kept).addmm_(grads.t(), h_rows);
        }
      }
    });
    if (dhidden.has_value()) {
      Tensor dh = dhidden->narrow(0, r0, n);
      for (int64_t p = 1; p < plan.parts; ++p) dh.add_(dh_partial[p].narrow(0, 0, n));
    }
  }
}

}  // namespace
}  // namespace spin_kernels

TORCH_LIBRARY(spin_kernels_cpu, m) {
  m.def(
      "rows_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, float softcap, "
      "Tensor(a!)? store, int parts, int row_tile, int vocab_tile, Tensor? row_index=None) -> (Tensor logp, Tensor lse)");
  m.def(
      "rows_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, Tensor grad, "
      "float temperature, float softcap, Tensor(a!)? store, int parts, int row_tile, int vocab_tile, "
      "Tensor(b!)? dhidden, Tensor(c!)? dweight, Tensor(d!)? dbias, Tensor? row_index=None) -> ()");
}

TORCH_LIBRARY_IMPL(spin_kernels_cpu, CPU, m) {
  m.impl("rows_forward", &spin_kernels::rows_forward);
  m.impl("rows_backward", &spin_kernels::rows_backward);
}

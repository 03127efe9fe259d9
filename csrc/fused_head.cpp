// The fused lm-head kernels on CPU: per-row log-probabilities of counted rows, and their
// gradients, without ever holding [rows, V] logits beyond a fixed workspace.
//
// Work split: the vocabulary is cut into `parts` contiguous ranges (one per thread); each part
// walks its range in tiles of `vocab_tile` columns, for a block of at most `row_tile` rows at a
// time. Owning a vocabulary range makes dweight/dbias writes race-free without per-thread
// [V, H] copies; per-row results (log-sum-exp pieces, dhidden partials) are merged across parts
// in a fixed order, so a run is bit-for-bit repeatable for a given number of parts. Matrix
// products go to oneDNN or BLAS one tile at a time (tile_gemm.h); the exp / log-sum-exp /
// softmax-gradient work is in row_math.h.
//
// Optional `store`: a caller-owned fp32 buffer of at least M x V floats. The forward leaves the
// transformed logits of every row there and the backward of the same rows reads them instead of
// recomputing them: the SPIN path uses it for tiles of whole pairs that fit a memory budget
// (6·N·H·V flops instead of 8). Its layout, row block by row block and tile by tile, depends
// on row_tile and vocab_tile, so forward and backward must use the same ones.
// Optional `row_index`: hidden is then all N rows and the counted ones are read through it,
// block by block, so the caller needs no gathered [M, H] copy; dhidden then has hidden's shape
// too and the counted rows' gradients are written at the same positions.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "row_math.h"
#include "tile_gemm.h"

namespace spin_kernels {
namespace {

using at::Tensor;

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

// The vocabulary partition, identical for forward and backward.
struct Plan {
  int64_t rows, vocab, hidden, row_tile, vocab_tile, parts;
  std::vector<int64_t> begin, end;  // per part: columns [begin, end), whole tiles but the last

  Plan(int64_t rows_, int64_t vocab_, int64_t hidden_, int64_t parts_, int64_t row_tile_, int64_t vocab_tile_)
      : rows(rows_), vocab(vocab_), hidden(hidden_), row_tile(std::min(row_tile_, std::max<int64_t>(rows_, 1))),
        vocab_tile(std::min(vocab_tile_, vocab_)) {
    const int64_t tiles = (vocab + vocab_tile - 1) / vocab_tile;
    parts = std::min(parts_, tiles);  // every part gets at least one tile
    for (int64_t p = 0; p < parts; ++p) {
      begin.push_back(tiles * p / parts * vocab_tile);
      end.push_back(std::min(tiles * (p + 1) / parts * vocab_tile, vocab));
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
      : hidden_(hidden), index_(row_index.has_value() ? row_index->const_data_ptr<int64_t>() : nullptr) {
    if (index_ != nullptr || hidden.scalar_type() != at::kFloat)
      scratch_ = at::empty({row_tile, hidden.size(1)}, hidden.options().dtype(at::kFloat));
  }

  Tensor block(int64_t r0, int64_t n) {
    if (index_ == nullptr) return fp32_rows(hidden_, r0, n, scratch_);
    return rows_to_fp32(hidden_, index_ + r0, 0, n, scratch_);
  }

  // The row of hidden (and of a dhidden shaped like it) that counted row i is.
  int64_t position(int64_t i) const { return index_ != nullptr ? index_[i] : i; }

 private:
  const Tensor& hidden_;
  const int64_t* index_;
  Tensor scratch_;
};

HeadOptions head_options(const std::optional<Tensor>& bias32, double temperature, double softcap) {
  HeadOptions o;
  o.bias = bias32.has_value() ? bias32->const_data_ptr<float>() : nullptr;
  o.inv_temperature = static_cast<float>(1.0 / temperature);
  o.softcap = static_cast<float>(softcap);
  return o;
}

Tensor check_store(const std::optional<Tensor>& store, int64_t rows, int64_t vocab) {
  if (!store.has_value()) return Tensor();
  TORCH_CHECK(store->device().is_cpu() && store->scalar_type() == at::kFloat && store->dim() == 1 &&
                  store->is_contiguous(),
              "store must be a contiguous 1-D float32 CPU tensor");
  TORCH_CHECK(store->numel() >= rows * vocab, "store must hold the logits of all rows: M x V = ", rows, " x ",
              vocab, " floats, got ", store->numel());
  return *store;
}

// Per-part workspace that outlives one row block.
struct PartScratch {
  Tensor logits;  // [row_tile * vocab_tile]: one logits tile (unused with a store)
  Tensor weight;  // [vocab_tile, H] fp32 copy of a weight tile when weight is not fp32
  Tensor dh;      // [row_tile * H]: this part's share of the block's dhidden (backward)
};

std::vector<PartScratch> make_scratch(const Plan& plan, const Tensor& weight, bool need_logits, bool need_dh) {
  std::vector<PartScratch> s(plan.parts);
  const auto f32 = weight.options().dtype(at::kFloat);
  for (auto& part : s) {
    if (need_logits) part.logits = at::empty({plan.row_tile * plan.vocab_tile}, f32);
    if (weight.scalar_type() != at::kFloat) part.weight = at::empty({plan.vocab_tile, plan.hidden}, f32);
    if (need_dh) part.dh = at::empty({plan.row_tile * plan.hidden}, f32);
  }
  return s;
}

// The [n, cols] contiguous logits tile of rows [r0, r0 + n) and columns [v0, v0 + cols): its
// place in the store, or the part's scratch.
Tensor logits_tile(const Tensor& store, PartScratch& s, const Plan& plan, int64_t r0, int64_t n, int64_t v0,
                   int64_t cols) {
  if (store.defined())
    return store.as_strided({n, cols}, {cols, 1}, store.storage_offset() + r0 * plan.vocab + n * v0);
  return s.logits.narrow(0, 0, n * cols).view({n, cols});
}

Tensor weight_tile(const Tensor& weight, int64_t v0, int64_t n, PartScratch& s) {
  return fp32_rows(weight, v0, n, s.weight);
}

// Runs body(p) for every part on the ATen thread pool, each thread with autograd out of the way
// and its BLAS single-threaded.
template <typename F>
void for_each_part(const Plan& plan, const F& body) {
  at::parallel_for(0, plan.parts, 1, [&](int64_t pb, int64_t pe) {
    // OpenMP workers do not inherit the caller's dispatch state: keep autograd out of the
    // products (weight may require grad; these are plain computations on views).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const SerialBlas serial_blas;
    for (int64_t p = pb; p < pe; ++p) body(p);
  });
}

// Per part and row of a block: the running statistics of forward_tile (empty unless asked for).
struct StatsScratch {
  Tensor centered, zsum, before;  // [parts, row_tile]: fp32, fp64, fp32

  StatsScratch(bool wanted, int64_t parts, int64_t row_tile, const at::TensorOptions& f32) {
    if (!wanted) return;
    centered = at::empty({parts, row_tile}, f32);
    zsum = at::empty({parts, row_tile}, f32.dtype(at::kDouble));
    before = at::empty({parts, row_tile}, f32);
  }
  bool wanted() const { return centered.defined(); }
  void reset() {
    if (!wanted()) return;
    centered.zero_();
    zsum.zero_();
    before.fill_(-std::numeric_limits<float>::infinity());
  }
  RowStats part(int64_t p, int64_t row_tile) {
    if (!wanted()) return RowStats{};
    return RowStats{centered.data_ptr<float>() + p * row_tile, zsum.data_ptr<double>() + p * row_tile,
                    before.data_ptr<float>() + p * row_tile};
  }
};

// stats_out[:, r0 + i] for the block's rows from the parts' running statistics, merged in part
// order like lse: the entropy log T - C / T with T = Σ_p sum_p e^(max_p - top) and C = Σ_p
// e^(max_p - top) (centered_p + (max_p - top) sum_p); the mean logit Σ_p zsum_p / V; the top-1
// hit z[target] > max_p before_p and z[target] = top.
void merge_stats(StatsScratch& run, const float* mx, const float* sm, const float* zt, const Plan& plan, int64_t r0,
                 int64_t n, Tensor& stats_out) {
  const float* centered = run.centered.const_data_ptr<float>();
  const double* zsum = run.zsum.const_data_ptr<double>();
  const float* before = run.before.const_data_ptr<float>();
  float* entropy = stats_out.data_ptr<float>() + r0;
  float* mean_logit = entropy + stats_out.size(1);
  float* top1 = mean_logit + stats_out.size(1);
  for (int64_t i = 0; i < n; ++i) {
    float top = -std::numeric_limits<float>::infinity(), first_max = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < plan.parts; ++p) {
      top = std::max(top, mx[p * plan.row_tile + i]);
      first_max = std::max(first_max, before[p * plan.row_tile + i]);
    }
    double total = 0.0, c = 0.0, z_total = 0.0;
    for (int64_t p = 0; p < plan.parts; ++p) {
      const int64_t k = p * plan.row_tile + i;
      const double shift = static_cast<double>(mx[k]) - top, scale = std::exp(shift);
      total += scale * sm[k];
      c += scale * (centered[k] + shift * sm[k]);
      z_total += zsum[k];
    }
    entropy[i] = static_cast<float>(std::log(total) - c / total);
    mean_logit[i] = static_cast<float>(z_total / static_cast<double>(plan.vocab));
    top1[i] = (zt[i] > first_max && zt[i] >= top) ? 1.0f : 0.0f;
  }
}

// Returns (logp [M], lse [M], stats): stats is [3, M] fp32 when asked for (rows: entropy, mean
// logit, whether argmax = target as 0/1, see RowStats), else an empty [0] tensor.
std::tuple<Tensor, Tensor, Tensor> rows_forward(const Tensor& hidden, const Tensor& weight,
                                                const std::optional<Tensor>& bias, const Tensor& targets,
                                                double temperature, double softcap,
                                                const std::optional<Tensor>& store_opt, int64_t parts,
                                                int64_t row_tile, int64_t vocab_tile,
                                                const std::optional<Tensor>& row_index, c10::string_view gemm_name,
                                                bool with_stats) {
  const auto bias32 =
      check_inputs(hidden, weight, bias, targets, row_index, temperature, softcap, parts, row_tile, vocab_tile);
  const Gemm gemm = resolve_gemm(gemm_name);
  const int64_t m = targets.size(0), h = hidden.size(1), v = weight.size(0);
  const Tensor store = check_store(store_opt, m, v);
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor logp = at::empty({m}, f32), lse = at::empty({m}, f32);
  Tensor stats_out = with_stats ? at::empty({3, m}, f32) : at::empty({0}, f32);
  if (m == 0) return {logp, lse, stats_out};
  const Plan plan(m, v, h, parts, row_tile, vocab_tile);
  const HeadOptions opts = head_options(bias32, temperature, softcap);
  auto scratch = make_scratch(plan, weight, !store.defined(), false);
  RowSource rows(hidden, row_index, plan.row_tile);
  // Running (max, sum) per part and row of the block; z[target] written by the owning part.
  Tensor run_max = at::empty({plan.parts, plan.row_tile}, f32), run_sum = at::empty({plan.parts, plan.row_tile}, f32);
  Tensor target_logit = at::empty({plan.row_tile}, f32);
  StatsScratch run_stats(with_stats, plan.parts, plan.row_tile, f32);
  const int64_t* y = targets.const_data_ptr<int64_t>();

  for (int64_t r0 = 0; r0 < m; r0 += plan.row_tile) {
    const int64_t n = std::min(plan.row_tile, m - r0);
    const Tensor h_rows = rows.block(r0, n);
    run_max.fill_(-std::numeric_limits<float>::infinity());
    run_sum.zero_();
    run_stats.reset();
    for_each_part(plan, [&](int64_t p) {
      PartScratch& s = scratch[p];
      const RowStats part_stats = run_stats.part(p, plan.row_tile);
      for (int64_t v0 = plan.begin[p]; v0 < plan.end[p]; v0 += plan.vocab_tile) {
        const int64_t cols = std::min(plan.vocab_tile, plan.end[p] - v0);
        Tensor tile = logits_tile(store, s, plan, r0, n, v0, cols);
        tile_mm(h_rows, weight_tile(weight, v0, cols, s).t(), tile, false, gemm);
        forward_tile(tile.data_ptr<float>(), cols, n, cols, v0, opts, y + r0,
                     run_max.data_ptr<float>() + p * plan.row_tile, run_sum.data_ptr<float>() + p * plan.row_tile,
                     target_logit.data_ptr<float>(), part_stats);
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
        total += static_cast<double>(sm[p * plan.row_tile + i]) *
                 std::exp(static_cast<double>(mx[p * plan.row_tile + i]) - top);
      lse_out[i] = top + static_cast<float>(std::log(total));
      logp_out[i] = zt[i] - lse_out[i];
    }
    if (with_stats) merge_stats(run_stats, mx, sm, zt, plan, r0, n, stats_out);
  }
  return {logp, lse, stats_out};
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

// dhidden (shaped like hidden) has its counted rows overwritten; dweight and dbias are
// accumulated into (the caller zeroes them once), so that tiles of rows can be added up call
// after call.
// With `entropy` and `grad_entropy` ([M] fp32, both or neither) the rows' entropies have an
// upstream gradient too (backward_tile).
void rows_backward(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                   const Tensor& targets, const Tensor& lse, const Tensor& grad, double temperature, double softcap,
                   const std::optional<Tensor>& store_opt, int64_t parts, int64_t row_tile, int64_t vocab_tile,
                   const std::optional<Tensor>& dhidden, const std::optional<Tensor>& dweight,
                   const std::optional<Tensor>& dbias, const std::optional<Tensor>& row_index,
                   c10::string_view gemm_name, const std::optional<Tensor>& entropy,
                   const std::optional<Tensor>& grad_entropy) {
  const auto bias32 =
      check_inputs(hidden, weight, bias, targets, row_index, temperature, softcap, parts, row_tile, vocab_tile);
  const Gemm gemm = resolve_gemm(gemm_name);
  const int64_t m = targets.size(0), h = hidden.size(1), v = weight.size(0);
  const Tensor store = check_store(store_opt, m, v);
  check_fp32_vector(lse, "lse", m);
  check_fp32_vector(grad, "grad", m);
  TORCH_CHECK(entropy.has_value() == grad_entropy.has_value(), "entropy and grad_entropy go together");
  if (entropy.has_value()) {
    check_fp32_vector(*entropy, "entropy", m);
    check_fp32_vector(*grad_entropy, "grad_entropy", m);
  }
  const float* ent = entropy.has_value() ? entropy->const_data_ptr<float>() : nullptr;
  const float* grad_ent = grad_entropy.has_value() ? grad_entropy->const_data_ptr<float>() : nullptr;
  check_grad_output(dhidden, "dhidden", hidden.size(0), h);
  check_grad_output(dweight, "dweight", v, h);
  check_grad_output(dbias, "dbias", v, -1);
  if (m == 0 || !(dhidden.has_value() || dweight.has_value() || dbias.has_value())) return;
  const Plan plan(m, v, h, parts, row_tile, vocab_tile);
  const HeadOptions opts = head_options(bias32, temperature, softcap);
  auto scratch = make_scratch(plan, weight, !store.defined(), dhidden.has_value());
  RowSource rows(hidden, row_index, plan.row_tile);
  const int64_t* y = targets.const_data_ptr<int64_t>();

  for (int64_t r0 = 0; r0 < m; r0 += plan.row_tile) {
    const int64_t n = std::min(plan.row_tile, m - r0);
    const Tensor h_rows = rows.block(r0, n);
    for_each_part(plan, [&](int64_t p) {
      PartScratch& s = scratch[p];
      const Tensor dh = dhidden.has_value() ? s.dh.narrow(0, 0, n * h).view({n, h}) : Tensor();
      for (int64_t v0 = plan.begin[p]; v0 < plan.end[p]; v0 += plan.vocab_tile) {
        const int64_t cols = std::min(plan.vocab_tile, plan.end[p] - v0);
        const Tensor w = weight_tile(weight, v0, cols, s);
        Tensor tile = logits_tile(store, s, plan, r0, n, v0, cols);
        if (!store.defined()) {
          tile_mm(h_rows, w.t(), tile, false, gemm);
          transform_tile(tile.data_ptr<float>(), cols, n, cols, v0, opts);
        }
        backward_tile(tile.data_ptr<float>(), cols, n, cols, v0, opts, y + r0, lse.const_data_ptr<float>() + r0,
                      grad.const_data_ptr<float>() + r0, ent == nullptr ? nullptr : ent + r0,
                      grad_ent == nullptr ? nullptr : grad_ent + r0);  // tile = dL/du
        if (dbias.has_value()) add_column_sums(tile.data_ptr<float>(), cols, n, cols, dbias->data_ptr<float>() + v0);
        if (dh.defined()) tile_mm(tile, w, dh, v0 != plan.begin[p], gemm);
        if (dweight.has_value()) tile_mm(tile.t(), h_rows, dweight->narrow(0, v0, cols), true, gemm);
      }
    });
    if (!dhidden.has_value()) continue;
    // dhidden rows = the parts' partials summed in part order (repeatable for a given `parts`).
    float* out = dhidden->data_ptr<float>();
    at::parallel_for(0, n, 16, [&](int64_t ib, int64_t ie) {
      for (int64_t i = ib; i < ie; ++i) {
        float* dst = out + rows.position(r0 + i) * h;
        std::copy_n(scratch[0].dh.const_data_ptr<float>() + i * h, h, dst);
        for (int64_t p = 1; p < plan.parts; ++p) {
          const float* src = scratch[p].dh.const_data_ptr<float>() + i * h;
          for (int64_t j = 0; j < h; ++j) dst[j] += src[j];
        }
      }
    });
  }
}

// a [M, K] @ b [K, N] -> fp32 [M, N] with the kernels' engine, on all threads: what the
// benchmarks time as the matrix-product rate that engine reaches on this machine.
Tensor matmul(const Tensor& a, const Tensor& b, c10::string_view gemm_name) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "a and b must be CPU tensors");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, "a and b must be float32");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "a [M, K] and b [K, N] expected, got ",
              a.sizes(), " and ", b.sizes());
  const Gemm gemm = resolve_gemm(gemm_name);
  Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  tile_mm(a, b, out, false, gemm);
  return out;
}

}  // namespace
}  // namespace spin_kernels

TORCH_LIBRARY(spin_kernels_cpu, m) {
  m.def(
      "rows_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, float temperature, float softcap, "
      "Tensor(a!)? store, int parts, int row_tile, int vocab_tile, Tensor? row_index=None, str gemm=\"auto\", "
      "bool stats=False) -> (Tensor logp, Tensor lse, Tensor stats)");
  m.def(
      "rows_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, Tensor grad, "
      "float temperature, float softcap, Tensor(a!)? store, int parts, int row_tile, int vocab_tile, "
      "Tensor(b!)? dhidden, Tensor(c!)? dweight, Tensor(d!)? dbias, Tensor? row_index=None, str gemm=\"auto\", "
      "Tensor? entropy=None, Tensor? grad_entropy=None) -> ()");
  m.def("matmul(Tensor a, Tensor b, str gemm=\"auto\") -> Tensor");
  // Which matrix-product engine the kernels use for gemm="auto": "onednn" or "blas".
  m.def("default_gemm() -> str", [] { return std::string(spin_kernels::onednn_available() ? "onednn" : "blas"); });
}

TORCH_LIBRARY_IMPL(spin_kernels_cpu, CPU, m) {
  m.impl("rows_forward", &spin_kernels::rows_forward);
  m.impl("rows_backward", &spin_kernels::rows_backward);
  m.impl("matmul", &spin_kernels::matmul);
}


// Per-row elementwise math of the fused lm-head kernels, on fp32 tiles of logits.
//
// A tile is `rows` x `cols` floats with leading dimension `ld`; its columns are vocabulary
// entries [v0, v0 + cols). The functions are written as plain loops (with `omp simd`
// pragmas: without them GCC does not vectorise some of these loops) so that the compiler
// vectorises them; on x86-64 with GCC they are compiled for AVX-512, AVX2 and baseline and the
// best one is picked at load time, so one wheel runs everywhere.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SPIN_KERNELS_NO_CLONES)
#define SPIN_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPIN_TARGET_CLONES
#endif

namespace spin_kernels {

// How logits are formed from u = W h: z = softcap * tanh(((u + b) / temperature) / softcap).
struct HeadOptions {
  const float* bias = nullptr;  // [V] fp32 or null
  float inv_temperature = 1.0f;
  float softcap = 0.0f;  // 0: no softcap
};

// exp(x) to ~2 ulp for x <= 88 (Cephes polynomial on [-ln2/2, ln2/2] times 2^k set in the
// exponent bits). Unlike std::exp it inlines into vectorised loops; k is rounded with the
// 1.5 * 2^23 trick because a float -> int conversion keeps GCC from vectorising loops that
// also store. Inputs below -87.3 give ~0 (they only occur as exp(z - max), below fp32
// resolution anyway).
static inline float fast_exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.0f ? 88.0f : x);
  const float shifted = x * 1.44269504088896341f + 12582912.0f;  // the low bits hold round(x / ln2)
  const float k = shifted - 12582912.0f;
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // x - k ln2, split for precision
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (__builtin_bit_cast(int32_t, shifted) - 0x4B400000 + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

// tanh through fast_exp: 1 - 2 / (exp(2x) + 1), odd-symmetric so that small |x| keeps its sign;
// absolute error ~1e-7, which is what the softcapped logit c * tanh(u / c) needs.
static inline float fast_tanh(float x) {
  const float a = std::fabs(x);
  const float t = 1.0f - 2.0f / (fast_exp(2.0f * (a < 44.0f ? a : 44.0f)) + 1.0f);
  return std::copysign(t, x);
}

// u -> z in place for one row: bias, temperature, softcap.
SPIN_TARGET_CLONES
static void transform_row(float* z, int64_t cols, int64_t v0, const HeadOptions& o) {
  if (o.bias != nullptr) {
    const float* b = o.bias + v0;
    for (int64_t j = 0; j < cols; ++j) z[j] += b[j];
  }
  if (o.inv_temperature != 1.0f) {
    const float s = o.inv_temperature;
    for (int64_t j = 0; j < cols; ++j) z[j] *= s;
  }
  if (o.softcap > 0.0f) {
    const float c = o.softcap, inv_c = 1.0f / o.softcap;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) z[j] = c * fast_tanh(z[j] * inv_c);
  }
}

SPIN_TARGET_CLONES
static void transform_tile(float* tile, int64_t ld, int64_t rows, int64_t cols, int64_t v0, const HeadOptions& o) {
  if (o.bias == nullptr && o.inv_temperature == 1.0f && o.softcap == 0.0f) return;
  for (int64_t i = 0; i < rows; ++i) transform_row(tile + i * ld, cols, v0, o);
}

// Optional running per-row statistics of the forward (all three null: none computed, no extra
// work; or all three set):
//   centered: Σ exp(z - max) (z - max), rescaled with the running (max, sum) -> the entropy
//             H = log Σ exp(z - max) - centered / Σ exp(z - max) (no cancellation: both >= 0);
//   zsum:     Σ z, in double -> the mean logit;
//   before:   max of z over the columns before the target -> whether argmax (its first maximal
//             index, as torch.argmax) is the target: z[target] > before and z[target] = max.
struct RowStats {
  float* centered = nullptr;
  double* zsum = nullptr;
  float* before = nullptr;
};

// Forward on a tile: transform u -> z, fold the tile into each row's running (max, sum of
// exp) and record z[target] for rows whose target lies in this tile; the statistics too when
// `stats` has them.
SPIN_TARGET_CLONES
static void forward_tile(float* tile, int64_t ld, int64_t rows, int64_t cols, int64_t v0, const HeadOptions& o,
                         const int64_t* targets, float* run_max, float* run_sum, float* target_logit,
                         const RowStats& stats) {
  for (int64_t i = 0; i < rows; ++i) {
    float* z = tile + i * ld;
    transform_row(z, cols, v0, o);
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < cols; ++j) mx = z[j] > mx ? z[j] : mx;
    const float m_old = run_max[i];
    const float m_new = m_old > mx ? m_old : mx;
    // The first tile of a row starts from (-inf, 0): no rescale (exp(-inf - -inf) would be NaN).
    const bool first = m_old == -std::numeric_limits<float>::infinity();
    const float rescale = first ? 0.0f : std::exp(m_old - m_new);
    float s = 0.0f;
    if (stats.centered == nullptr) {
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < cols; ++j) s += fast_exp(z[j] - m_new);
    } else {  // one pass for the sum of exp and the statistics' sums
      float c = 0.0f, t = 0.0f;
#pragma omp simd reduction(+ : s, c, t)
      for (int64_t j = 0; j < cols; ++j) {
        const float d = z[j] - m_new;
        const float e = fast_exp(d);
        s += e;
        c += e * d;
        t += z[j];
      }
      // Σ e_old (z - m_old) -> Σ e_new (z - m_new) = rescale (Σ e_old (z - m_old) + (m_old - m_new) Σ e_old).
      stats.centered[i] = first ? c : rescale * (stats.centered[i] + (m_old - m_new) * run_sum[i]) + c;
      stats.zsum[i] += t;
    }
    run_sum[i] = run_sum[i] * rescale + s;
    run_max[i] = m_new;
    const int64_t y = targets[i] - v0;
    if (y >= 0 && y < cols) target_logit[i] = z[y];
    if (stats.before != nullptr && y >= 0) {
      // A tile wholly before the target adds its max; the target's own tile its columns before it.
      float b = stats.before[i];
      if (y >= cols) {
        b = mx > b ? mx : b;
      } else {
#pragma omp simd reduction(max : b)
        for (int64_t j = 0; j < y; ++j) b = z[j] > b ? z[j] : b;
      }
      stats.before[i] = b;
    }
  }
}

// Backward on a tile of transformed logits z, overwritten with dL/du (u = W h + b):
//   dz = g (onehot(y) - p) + g_H p (mu - z),  p = exp(z - lse),  du = dz * (1 - (z / c)^2) / temperature,
// the second term when the entropy H of the row has an upstream gradient g_H (grad_entropy and
// entropy non-null, g_H != 0): dH/dz = p (mu - z) with mu = Σ p z = lse - H.
SPIN_TARGET_CLONES
static void backward_tile(float* tile, int64_t ld, int64_t rows, int64_t cols, int64_t v0, const HeadOptions& o,
                          const int64_t* targets, const float* lse, const float* grad, const float* entropy,
                          const float* grad_entropy) {
  const float inv_t = o.inv_temperature;
  const float inv_c = o.softcap > 0.0f ? 1.0f / o.softcap : 0.0f;
  for (int64_t i = 0; i < rows; ++i) {
    float* z = tile + i * ld;
    const float g = grad[i], l = lse[i];
    const int64_t y = targets[i] - v0;
    const bool has_target = y >= 0 && y < cols;
    const float z_target = has_target ? z[y] : 0.0f;
    const float g_h = grad_entropy != nullptr ? grad_entropy[i] : 0.0f;
    if (g_h != 0.0f) {
      // dz_j = p_j (a + b z_j) (+ g at the target), a = -g + g_H mu, b = -g_H.
      const float a = -g + g_h * (l - entropy[i]), b = -g_h;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const float q = z[j] * inv_c;  // 0 without a softcap
        z[j] = fast_exp(z[j] - l) * (a + b * z[j]) * ((1.0f - q * q) * inv_t);
      }
      if (has_target) z[y] += g * ((1.0f - (z_target * inv_c) * (z_target * inv_c)) * inv_t);
    } else if (inv_c > 0.0f) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        const float q = z[j] * inv_c;
        z[j] = -g * fast_exp(z[j] - l) * ((1.0f - q * q) * inv_t);
      }
      if (has_target) z[y] += g * ((1.0f - (z_target * inv_c) * (z_target * inv_c)) * inv_t);
    } else {
      const float s = -g * inv_t;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) z[j] = s * fast_exp(z[j] - l);
      if (has_target) z[y] += g * inv_t;
    }
  }
}

// db[j] += sum_i tile[i, j] (the bias gradient of this tile's columns).
SPIN_TARGET_CLONES
static void add_column_sums(const float* tile, int64_t ld, int64_t rows, int64_t cols, float* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* z = tile + i * ld;
    for (int64_t j = 0; j < cols; ++j) out[j] += z[j];
  }
}

}  // namespace spin_kernels

// lmforge's decoding matvecs: y = x W^T for a few activation rows x and a quantised weight W, on CPU.
//
// Why our own kernels: at batch 1 a decode step is bound by the bytes it streams. PyTorch's CPU int4 kernel
// (_weight_int4pack_mm_for_cpu) decodes slower than its int8 one on SmolLM2 shapes (95 vs 116-133 tok/s), so
// fewer bytes did not pay until the arithmetic kept up with memory; and its int8 one (_weight_int8pack_mm)
// streams SmolLM2's 28 MB output projection at ~12 GB/s, well under this machine's bandwidth.
//
// Both round the activations to int8 per block of 32, x_j ~= d_b xq_j with d_b = max_j |x_j| / 127 (error
// <= d_b / 2 per element), as llama.cpp's Q8 blocks do, and take the inner sums as exact int32 dot products
// (AVX-512 VNNI vpdpbusd: 32 unsigned-by-signed byte products per instruction; on AVX2, vpmaddubsw then vpmaddwd
// with ones, llama.cpp's AVX2 route: the same four adjacent products in each int32 lane, so the same sums).
//
// lmforge::int4_matvec (llama.cpp's Q4_1 x Q8 dot product, done the same way): a group of G inputs of output
// row n holds codes q in [0, 15] with an fp16 scale s and an fp16 minimum m, w_j = s q_j + m, so
//
//   sum_j w_j x_j = s sum_b d_b (sum_{j in b} q_j xq_j) + m sum_j x_j,
//
// with sum_j x_j taken in float from the unrounded x. Layout of the codes (N, K/2) uint8: per 64 inputs,
// 32 bytes; byte i holds input i in its low nibble and input 32 + i in its high one, so one 32-byte load
// masks into two 32-input blocks in input order.
//
// lmforge::int8_matvec (QuantizedLinear's weights as they are): codes q (N, K) int8 with one fp32 scale s_n per
// output row, w_nj = s_n q_nj, so sum_j w_nj x_j = s_n sum_b d_b (sum_{j in b} q_nj xq_j). vpdpbusd takes one
// unsigned operand: the pairs are fed as |q| (unsigned, 128 fits) and xq with q's sign, |q| (sign(q) xq) = q xq.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__F16C__)
#define LMFORGE_VNNI 1
#endif
// AVX2 with FMA and F16C (Haswell and later, every AMD Zen): 8 lanes where AVX-512 has 16. Each kernel below has an
// AVX-512 path and an AVX2 one; the plain loops remain for other CPUs, where callers keep PyTorch's kernels.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LMFORGE_AVX2 1
#endif
#if defined(LMFORGE_VNNI) || defined(LMFORGE_AVX2)
#define LMFORGE_INT8_DOT 1
#endif

namespace {

constexpr int64_t kBlock = 32;

#ifdef LMFORGE_INT8_DOT
// int32 lane i = sum over bytes 4i..4i+3 of u_b s_b, u unsigned and s signed. AVX2's vpmaddubsw sums byte pairs
// into int16 (|u s| <= 128 * 127, so a pair's sum fits), vpmaddwd with ones sums int16 pairs into int32.
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#ifdef LMFORGE_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
#endif

#if defined(LMFORGE_INT8_DOT) || defined(LMFORGE_AVX2)
inline float hsum8(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
}
#endif

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// x (rows, K) -> xq int8 (rows, K) with d (rows, K/32) per block, and gsum (rows, K/G): the sum of each group of
// G inputs, from the unrounded x. Rounding is to nearest, ties to even (the CPU's default mode).
template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t K, int64_t G, int8_t* xq, float* d, float* gsum) {
  const int64_t nb = K / kBlock, ng = K / G;
  float block[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * K;
    for (int64_t g = 0; g < ng; ++g) gsum[r * ng + g] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      float amax = 0.f, sum = 0.f;
      for (int64_t i = 0; i < kBlock; ++i) {
        block[i] = to_float(xr[b * kBlock + i]);
        amax = std::max(amax, std::abs(block[i]));
        sum += block[i];
      }
      gsum[r * ng + (b * kBlock) / G] += sum;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      d[r * nb + b] = amax / 127.f;
      int8_t* q = xq + r * K + b * kBlock;
#ifdef LMFORGE_VNNI
      for (int64_t i = 0; i < kBlock; i += 16) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(block + i), _mm512_set1_ps(inv)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtsepi32_epi8(v));
      }
#else
      for (int64_t i = 0; i < kBlock; ++i) q[i] = static_cast<int8_t>(std::nearbyint(block[i] * inv));
#endif
    }
  }
}

// One output: the dot product of a weight row with one quantised activation row. `factor` holds d_b s_g(b) for
// each block b of 32 inputs (the activation's block scale times the weight's group scale).
inline float int4_row_dot(const uint8_t* codes, const float* factor, const int8_t* xq, int64_t K) {
  const int64_t chunks = K / 64;
  float acc = 0.f;
#ifdef LMFORGE_INT8_DOT
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 acc_lo = _mm256_setzero_ps(), acc_hi = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 32 * c));
    const __m256i lo = _mm256_and_si256(v, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * c));
    const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64 * c + 32));
    const __m256i dl = dot_u8s8(lo, xl);
    const __m256i dh = dot_u8s8(hi, xh);
    acc_lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dl), _mm256_broadcast_ss(factor + 2 * c), acc_lo);
    acc_hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dh), _mm256_broadcast_ss(factor + 2 * c + 1), acc_hi);
  }
  acc = hsum8(_mm256_add_ps(acc_lo, acc_hi));
#else
  for (int64_t c = 0; c < chunks; ++c) {
    int32_t dl = 0, dh = 0;
    for (int64_t i = 0; i < 32; ++i) {
      dl += static_cast<int32_t>(codes[32 * c + i] & 0x0F) * xq[64 * c + i];
      dh += static_cast<int32_t>(codes[32 * c + i] >> 4) * xq[64 * c + 32 + i];
    }
    acc += static_cast<float>(dl) * factor[2 * c] + static_cast<float>(dh) * factor[2 * c + 1];
  }
#endif
  return acc;
}

// fp16 -> fp32 for a row's scales: F16C converts 8 at a time (c10::Half's scalar conversion is a bit-twiddling
// routine, which costs more than the row's dot product on short rows).
inline void halves_to_floats(const c10::Half* h, float* f, int64_t n) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < n; ++i) f[i] = static_cast<float>(h[i]);
}

template <typename T>
void run(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minimum,
         int64_t G, at::Tensor& out) {
  const int64_t rows = x.size(0), K = x.size(1), N = codes.size(0), nb = K / kBlock, ng = K / G;
  int shift = 0;
  while ((kBlock << shift) < G) ++shift;
  std::vector<int8_t> xq(rows * K);
  std::vector<float> d(rows * nb), gsum(rows * ng);
  quantize_rows(x.data_ptr<T>(), rows, K, G, xq.data(), d.data(), gsum.data());
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const c10::Half* s = scale.data_ptr<c10::Half>();
  const c10::Half* m = minimum.data_ptr<c10::Half>();
  T* y = out.data_ptr<T>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> factor(nb), sf(ng), mf(ng);
    for (int64_t n = begin; n < end; ++n) {
      halves_to_floats(s + n * ng, sf.data(), ng);
      halves_to_floats(m + n * ng, mf.data(), ng);
      for (int64_t r = 0; r < rows; ++r) {
        const float* dr = d.data() + r * nb;
        const float* gs = gsum.data() + r * ng;
        for (int64_t b = 0; b < nb; ++b) factor[b] = dr[b] * sf[b >> shift];
        float acc = int4_row_dot(c + n * (K / 2), factor.data(), xq.data() + r * K, K);
        for (int64_t g = 0; g < ng; ++g) acc += mf[g] * gs[g];
        y[r * N + n] = static_cast<T>(acc);
      }
    }
  });
}

// sum_j q_j xq_j d_b over the K inputs of one int8 weight row (see the header).
inline float int8_row_dot(const int8_t* q, const float* d, const int8_t* xq, int64_t K) {
  const int64_t nb = K / kBlock;
  float acc = 0.f;
#ifdef LMFORGE_INT8_DOT
  __m256 acc8 = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + kBlock * b));
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + kBlock * b));
    const __m256i dot = dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    acc8 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(d + b), acc8);
  }
  acc = hsum8(acc8);
#else
  for (int64_t b = 0; b < nb; ++b) {
    int32_t dot = 0;
    for (int64_t i = 0; i < kBlock; ++i) dot += static_cast<int32_t>(q[kBlock * b + i]) * xq[kBlock * b + i];
    acc += static_cast<float>(dot) * d[b];
  }
#endif
  return acc;
}

template <typename T>
void run_int8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, at::Tensor& out) {
  const int64_t rows = x.size(0), K = x.size(1), N = codes.size(0), nb = K / kBlock;
  std::vector<int8_t> xq(rows * K);
  std::vector<float> d(rows * nb), gsum(rows * nb);
  quantize_rows(x.data_ptr<T>(), rows, K, kBlock, xq.data(), d.data(), gsum.data());
  const int8_t* q = codes.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  T* y = out.data_ptr<T>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t r = 0; r < rows; ++r)
        y[r * N + n] = static_cast<T>(s[n] * int8_row_dot(q + n * K, d.data() + r * nb, xq.data() + r * K, K));
  });
}

at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int8_matvec: x must be a contiguous (rows, K) matrix");
  const int64_t K = x.size(1), N = codes.size(0);
  TORCH_CHECK(K % kBlock == 0, "int8_matvec: K must be a multiple of 32, got ", K);
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.dim() == 2 && codes.size(1) == K,
              "int8_matvec: codes must be contiguous int8 (N, K)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N,
              "int8_matvec: scale must be contiguous fp32 (N,)");
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    run_int8<float>(x, codes, scale, out);
  } else if (x.scalar_type() == at::kBFloat16) {
    run_int8<c10::BFloat16>(x, codes, scale, out);
  } else {
    TORCH_CHECK(false, "int8_matvec: x must be float32 or bfloat16, got ", x.scalar_type());
  }
  return out;
}

// The weight of int4_matvec's layout in bf16, (N, K): for a prefill, whose many rows make the product
// compute-bound, so a dense bf16 GEMM on the weight dequantised for the call is the fast way (the tensor ops
// that did the same, unpack, cast, scale and shift, took ~120 of a 128-token SmolLM2 prefill's ~230 ms).
at::Tensor int4_dequantize(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& minimum,
                           int64_t group_size) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.dim() == 2 &&
                  (codes.size(1) * 2) % 64 == 0,
              "int4_dequantize: codes must be contiguous uint8 (N, K/2), K a multiple of 64");
  const int64_t N = codes.size(0), K = codes.size(1) * 2, G = group_size, ng = K / G;
  TORCH_CHECK(G >= kBlock && K % G == 0 && scale.scalar_type() == at::kHalf && minimum.scalar_type() == at::kHalf &&
                  scale.is_contiguous() && minimum.is_contiguous() && scale.numel() == N * ng &&
                  minimum.numel() == N * ng,
              "int4_dequantize: scale and minimum must be contiguous fp16 (N, K/group_size)");
  at::Tensor out = at::empty({N, K}, codes.options().dtype(at::kBFloat16));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const c10::Half* s = scale.data_ptr<c10::Half>();
  const c10::Half* m = minimum.data_ptr<c10::Half>();
  c10::BFloat16* w = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> sf(ng), mf(ng);
    for (int64_t n = begin; n < end; ++n) {
      halves_to_floats(s + n * ng, sf.data(), ng);
      halves_to_floats(m + n * ng, mf.data(), ng);
      const uint8_t* cn = c + n * (K / 2);
      c10::BFloat16* wn = w + n * K;
      for (int64_t base = 0; base < K; base += 64) {
        const float s0 = sf[base / G], m0 = mf[base / G], s1 = sf[(base + 32) / G], m1 = mf[(base + 32) / G];
        for (int64_t i = 0; i < 32; ++i) {
          const uint8_t byte = cn[base / 2 + i];
          wn[base + i] = static_cast<c10::BFloat16>(static_cast<float>(byte & 0x0F) * s0 + m0);
          wn[base + 32 + i] = static_cast<c10::BFloat16>(static_cast<float>(byte >> 4) * s1 + m1);
        }
      }
    }
  });
  return out;
}

// Decoding attention: the few query rows R of each K/V head (a GQA group, or one row) against the cache,
// out = softmax(q k^T scale + mask) v, computed in fp32 for fp32 or bf16 tensors. q (B, H, R, D), k and v
// (B, H, S, D) with a dense last dim, mask additive (B, 1, 1, S) shared by the heads and rows, or absent; all of
// one dtype. Each key row is loaded once for all R query rows (scores), and each value row once for all R output
// rows (weighted sum), 16 numbers a register. Why: PyTorch's flash kernel costs ~30-55 us a call at SmolLM2's
// decoding shapes (3 heads x 3 rows x 256 slots x 64), most of it set-up; 30 layers make that ~1.7 ms a token.
constexpr int64_t kMaxRows = 8;

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the top half of an fp32: widen and shift
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif
#ifdef LMFORGE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
#endif

// q and out: R x D fp32 rows; k, v, mask in T.
template <typename T>
void attend_head(const float* q, const T* k, int64_t k_row, const T* v, int64_t v_row, const T* mask, int64_t R,
                 int64_t S, int64_t D, float scale, float* scores, float* out) {
  float top[kMaxRows], total[kMaxRows];
  for (int64_t r = 0; r < R; ++r) top[r] = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < S; ++t) {
    const T* kt = k + t * k_row;
    const float bias = mask ? static_cast<float>(mask[t]) : 0.f;
    for (int64_t r = 0; r < R; ++r) {
      const float* qr = q + r * D;
#ifdef __AVX512F__
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qr + i), load16(kt + i), acc);
      float dot = _mm512_reduce_add_ps(acc);
#elif defined(LMFORGE_AVX2)
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (int64_t i = 0; i < D; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i), load8(kt + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + i + 8), load8(kt + i + 8), acc1);
      }
      float dot = hsum8(_mm256_add_ps(acc0, acc1));
#else
      float dot = 0.f;
      for (int64_t i = 0; i < D; ++i) dot += qr[i] * static_cast<float>(kt[i]);
#endif
      const float score = dot * scale + bias;
      scores[r * S + t] = score;
      top[r] = std::max(top[r], score);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    total[r] = 0.f;
    for (int64_t t = 0; t < S; ++t) total[r] += (scores[r * S + t] = std::exp(scores[r * S + t] - top[r]));
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < D; ++i) out[r * D + i] = 0.f;
  for (int64_t t = 0; t < S; ++t) {
    const T* vt = v + t * v_row;
    for (int64_t r = 0; r < R; ++r) {
      const float p = scores[r * S + t];
      float* o = out + r * D;
#ifdef __AVX512F__
      const __m512 pv = _mm512_set1_ps(p);
      for (int64_t i = 0; i < D; i += 16) _mm512_storeu_ps(o + i, _mm512_fmadd_ps(pv, load16(vt + i), _mm512_loadu_ps(o + i)));
#elif defined(LMFORGE_AVX2)
      const __m256 pv = _mm256_set1_ps(p);
      for (int64_t i = 0; i < D; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(pv, load8(vt + i), _mm256_loadu_ps(o + i)));
#else
      for (int64_t i = 0; i < D; ++i) o[i] += p * static_cast<float>(vt[i]);
#endif
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const float inv = 1.f / total[r];
    for (int64_t i = 0; i < D; ++i) out[r * D + i] *= inv;
  }
}

template <typename T>
void run_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const T* mp, int64_t mask_batch,
                   float scale, at::Tensor& out) {
  const int64_t H = q.size(1), R = q.size(2), D = q.size(3), S = k.size(2);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, q.size(0) * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(R * S), rows(R * D), result(R * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T* qh = qp + b * q.stride(0) + h * q.stride(1);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t i = 0; i < D; ++i) rows[r * D + i] = static_cast<float>(qh[r * q.stride(2) + i]);
      attend_head(rows.data(), kp + b * k.stride(0) + h * k.stride(1), k.stride(2), vp + b * v.stride(0) + h * v.stride(1),
                  v.stride(2), mp ? mp + b * mask_batch : nullptr, R, S, D, scale, scores.data(), result.data());
      for (int64_t i = 0; i < R * D; ++i) op[bh * R * D + i] = static_cast<T>(result[i]);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes() && q.size(0) == k.size(0) &&
                  q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "decode_attention: q (B, H, R, D), k and v (B, H, S, D)");
  const int64_t B = q.size(0), R = q.size(2), D = q.size(3), S = k.size(2);
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && k.scalar_type() == dtype && v.scalar_type() == dtype,
              "decode_attention: q, k and v must all be float32 or all bfloat16");
  TORCH_CHECK(R <= kMaxRows && D % 16 == 0 && q.stride(3) == 1 && k.stride(3) == 1 &&
                  v.stride(3) == 1,
              "decode_attention: at most 8 rows, a head size that is a multiple of 16, dense last dims");
  int64_t mask_batch = 0;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == dtype && mask->dim() == 4 && mask->size(0) == B && mask->size(1) == 1 &&
                    mask->size(2) == 1 && mask->size(3) == S && mask->stride(3) == 1,
                "decode_attention: mask must be (B, 1, 1, S) in q's dtype");
    mask_batch = mask->stride(0);
  }
  at::Tensor out = at::empty({B, q.size(1), R, D}, q.options());
  const float s = static_cast<float>(scale);
  if (dtype == at::kFloat)
    run_attention<float>(q, k, v, mask ? mask->data_ptr<float>() : nullptr, mask_batch, s, out);
  else
    run_attention<c10::BFloat16>(q, k, v, mask ? mask->data_ptr<c10::BFloat16>() : nullptr, mask_batch, s, out);
  return out;
}

at::Tensor int4_matvec(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const at::Tensor& minimum, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "int4_matvec: x must be a contiguous (rows, K) matrix");
  const int64_t K = x.size(1), N = codes.size(0);
  TORCH_CHECK(K % 64 == 0, "int4_matvec: K must be a multiple of 64, got ", K);
  TORCH_CHECK(group_size >= kBlock && group_size % kBlock == 0 && (group_size & (group_size - 1)) == 0,
              "int4_matvec: group_size must be a power of two >= 32, got ", group_size);
  TORCH_CHECK(K % group_size == 0, "int4_matvec: group_size ", group_size, " does not divide K = ", K);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.size(1) * 2 == K,
              "int4_matvec: codes must be contiguous uint8 (N, K/2)");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && minimum.scalar_type() == at::kHalf && scale.is_contiguous() &&
                  minimum.is_contiguous() && scale.numel() == N * (K / group_size) &&
                  minimum.numel() == N * (K / group_size),
              "int4_matvec: scale and minimum must be contiguous fp16 (N, K/group_size)");
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    run<float>(x, codes, scale, minimum, group_size, out);
  } else if (x.scalar_type() == at::kBFloat16) {
    run<c10::BFloat16>(x, codes, scale, minimum, group_size, out);
  } else {
    TORCH_CHECK(false, "int4_matvec: x must be float32 or bfloat16, got ", x.scalar_type());
  }
  return out;
}


// lmforge::matvec: y = x W^T (+ b) for a few activation rows x (rows, K) and a weight W (N, K) as nn.Linear
// stores it, both fp32 or both bf16. bf16: every product of two bf16 numbers is exact in fp32 and summed in fp32
// (AVX512-BF16's vdpbf16ps, 32 pairs an instruction), rounded to bf16 once at the end, which is what oneDNN's
// bf16 GEMM computes; fp32: fused multiply-adds, 16 an instruction. The order of the fp32 sums differs from
// MKL's and oneDNN's, so results agree to rounding. The weight is read one row at a time, front to back, so each
// thread streams one sequential run of memory: walking 2, 4 or 8 rows side by side (to share the activation
// loads) measured ~20 GB/s on this Zen 4 against ~35-40 GB/s for one row (SmolLM2's 1536 x 576 and 49152 x 576
// bf16 matrices, cache-cold, 2 threads). Several activation rows pass each weight row while it is in L1.
// Why: at one row oneDNN streams SmolLM2's bf16 weights at ~12-20 GB/s, and MKL fp32 ones at 11-22 GB/s.
// sums[i] = x_i . w for the RB activation rows x_i = x + i K: the weight row is loaded once for all of them, and
// their RB sums are independent chains (one chain would wait on each instruction's latency). fp32: 16 products
// an instruction; bf16: 32 (vdpbf16ps, each bf16 product exact in fp32).
#ifdef LMFORGE_AVX2
// dot_rows' AVX2 form for fp32 or bf16 (load8 widens a bf16 to fp32): 8 products an instruction, two accumulators
// a row where registers allow, so that one row is not one chain of FMA latencies. Returns how far it got (the
// caller finishes the tail of fewer than 8 U inputs).
template <int RB, typename T>
inline int64_t dot_rows_avx2(const T* x, const T* w, int64_t K, float* sums) {
  constexpr int U = RB <= 4 ? 2 : 1;
  __m256 acc[RB][U];
  for (int i = 0; i < RB; ++i)
    for (int u = 0; u < U; ++u) acc[i][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U)
    for (int u = 0; u < U; ++u) {
      const __m256 wv = load8(w + k + 8 * u);
      for (int i = 0; i < RB; ++i) acc[i][u] = _mm256_fmadd_ps(load8(x + i * K + k + 8 * u), wv, acc[i][u]);
    }
  for (int i = 0; i < RB; ++i) {
    __m256 total = acc[i][0];
    for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[i][u]);
    sums[i] = hsum8(total);
  }
  return k;
}
#endif

template <int RB>
inline void dot_rows(const float* x, const float* w, int64_t K, float* sums) {
  int64_t k = 0;
  for (int i = 0; i < RB; ++i) sums[i] = 0.f;
#ifdef __AVX512F__
  __m512 acc[RB];
  for (int i = 0; i < RB; ++i) acc[i] = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    const __m512 wv = _mm512_loadu_ps(w + k);
    for (int i = 0; i < RB; ++i) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * K + k), wv, acc[i]);
  }
  if (k < K) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 wv = _mm512_maskz_loadu_ps(tail, w + k);
    for (int i = 0; i < RB; ++i) acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x + i * K + k), wv, acc[i]);
    k = K;
  }
  for (int i = 0; i < RB; ++i) sums[i] = _mm512_reduce_add_ps(acc[i]);
#elif defined(LMFORGE_AVX2)
  k = dot_rows_avx2<RB>(x, w, K, sums);
#endif
  for (; k < K; ++k)
    for (int i = 0; i < RB; ++i) sums[i] += x[i * K + k] * w[k];
}

template <int RB>
inline void dot_rows(const c10::BFloat16* x, const c10::BFloat16* w, int64_t K, float* sums) {
  int64_t k = 0;
  for (int i = 0; i < RB; ++i) sums[i] = 0.f;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  __m512 acc[RB];
  for (int i = 0; i < RB; ++i) acc[i] = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + k));
    for (int i = 0; i < RB; ++i)
      acc[i] = _mm512_dpbf16_ps(acc[i], reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + i * K + k)), wv);
  }
  if (k < K) {
    const __mmask32 tail = static_cast<__mmask32>((1ull << (K - k)) - 1);
    const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(tail, w + k));
    for (int i = 0; i < RB; ++i)
      acc[i] = _mm512_dpbf16_ps(acc[i], reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(tail, x + i * K + k)), wv);
    k = K;
  }
  for (int i = 0; i < RB; ++i) sums[i] = _mm512_reduce_add_ps(acc[i]);
#elif defined(LMFORGE_AVX2)
  k = dot_rows_avx2<RB>(x, w, K, sums);  // widened to fp32, each product exact there, as vdpbf16ps's
#endif
  for (; k < K; ++k)  // the tail, and CPUs without AVX2
    for (int i = 0; i < RB; ++i) sums[i] += static_cast<float>(x[i * K + k]) * static_cast<float>(w[k]);
}

template <typename T>
void run_matvec(const at::Tensor& x, const at::Tensor& weight, const T* bias, at::Tensor& out) {
  const int64_t rows = x.size(0), K = x.size(1), N = weight.size(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* yp = out.data_ptr<T>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    float sums[8];
    for (int64_t n = begin; n < end; ++n) {
      const float b = bias ? static_cast<float>(bias[n]) : 0.f;
      const T* wn = wp + n * K;
      int64_t r = 0;
      for (; r + 8 <= rows; r += 8) {
        dot_rows<8>(xp + r * K, wn, K, sums);
        for (int i = 0; i < 8; ++i) yp[(r + i) * N + n] = static_cast<T>(sums[i] + b);
      }
      for (; r + 4 <= rows; r += 4) {
        dot_rows<4>(xp + r * K, wn, K, sums);
        for (int i = 0; i < 4; ++i) yp[(r + i) * N + n] = static_cast<T>(sums[i] + b);
      }
      for (; r < rows; ++r) {
        dot_rows<1>(xp + r * K, wn, K, sums);
        yp[r * N + n] = static_cast<T>(sums[0] + b);
      }
    }
  });
}

at::Tensor matvec(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (dtype == at::kFloat || dtype == at::kBFloat16),
              "matvec: x must be a contiguous float32 or bf16 (rows, K) matrix");
  const int64_t K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K && weight.is_contiguous() && weight.scalar_type() == dtype,
              "matvec: weight must be contiguous (N, K) in x's dtype");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == dtype && bias->is_contiguous() && bias->numel() == N),
              "matvec: bias must be contiguous (N,) in x's dtype");
  at::Tensor out = at::empty({x.size(0), N}, x.options());
  if (dtype == at::kFloat)
    run_matvec<float>(x, weight, bias ? bias->data_ptr<float>() : nullptr, out);
  else
    run_matvec<c10::BFloat16>(x, weight, bias ? bias->data_ptr<c10::BFloat16>() : nullptr, out);
  return out;
}

// lmforge::pairs_pack and lmforge::pairs_linear: y = x W^T (+ b) for bf16 x (rows, K) and W (N, K) held in a
// second, pair-interleaved copy made once (the layout oneDNN calls VNNI for bf16), for a server's steps of
// 4-64 rows. Layout: P[nb][p][j][e] = W[16 nb + j][2 p + e], zero past N and K: per output block of 16 and
// input pair (2p, 2p + 1), 64 contiguous bytes. Then
//
//   y[r][16 nb + j] = sum_p (x[r][2p] W[16nb+j][2p] + x[r][2p+1] W[16nb+j][2p+1])
//
// is, for 16 outputs at once, one vdpbf16ps of those 64 bytes against x[r]'s pair broadcast to every lane:
// products exact in fp32, fp32 sums, one rounding to bf16 at the end (as matvec and oneDNN). No horizontal sums,
// and each 64-byte line of the weight serves every row of the block (up to 16 accumulators in registers), so
// the arithmetic, not the weight, sets the pace from a few rows on. The weight lines of a block are prefetched
// kPrefetch bytes ahead: with 16 rows each line is used for 16 instructions, too slowly for the hardware
// prefetcher to run ahead (1536 x 576, 16 rows, cache-cold, 2 threads: 96 us with it, 175 us without; oneDNN's
// own packed GEMM 200 us).
constexpr int64_t kPrefetch = 4096;

at::Tensor pairs_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "pairs_pack: weight must be bf16 (N, K)");
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), NB = (N + 15) / 16, KP = (K + 1) / 2;
  at::Tensor packed = at::zeros({NB, KP, 16, 2}, w.options());
  const c10::BFloat16* wp = w.data_ptr<c10::BFloat16>();
  c10::BFloat16* pp = packed.data_ptr<c10::BFloat16>();
  at::parallel_for(0, NB, 16, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb)
      for (int64_t j = 0; j < 16 && 16 * nb + j < N; ++j) {
        const c10::BFloat16* row = wp + (16 * nb + j) * K;
        c10::BFloat16* out = pp + nb * KP * 32 + 2 * j;
        for (int64_t k = 0; k < K; ++k) out[(k / 2) * 32 + (k % 2)] = row[k];
      }
  });
  return packed;
}

// y[i][n0 + j] = bias[j] + sum_q x_i(pair q) . P(pair q, output j), j < width (<= 16), for the RB activation rows
// x_i = x + i stride (KP int32 pairs each) and one output block p (KP x 32 bf16), rounded to bf16 once.
template <int RB>
inline void pairs_rows(const int32_t* x, int64_t stride, const c10::BFloat16* p, int64_t KP, const float* bias,
                       int64_t width, c10::BFloat16* y, int64_t N) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  __m512 acc[RB];
  for (int i = 0; i < RB; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t q = 0; q < KP; ++q) {
    _mm_prefetch(reinterpret_cast<const char*>(p + q * 32) + kPrefetch, _MM_HINT_T0);
    const __m512bh wv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(p + q * 32));
    for (int i = 0; i < RB; ++i)
      acc[i] = _mm512_dpbf16_ps(acc[i], reinterpret_cast<__m512bh>(_mm512_set1_epi32(x[i * stride + q])), wv);
  }
  const __m512 b = _mm512_loadu_ps(bias);
  const __mmask16 keep = static_cast<__mmask16>((1u << width) - 1);
  for (int i = 0; i < RB; ++i) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(acc[i], b));  // round to nearest even
    _mm256_mask_storeu_epi16(y + i * N, keep, reinterpret_cast<__m256i>(v));
  }
#else  // CPUs without AVX512-BF16
  float out[16];
  for (int i = 0; i < RB; ++i) {
    const c10::BFloat16* xi = reinterpret_cast<const c10::BFloat16*>(x + i * stride);
    for (int j = 0; j < 16; ++j) out[j] = 0.f;
    for (int64_t q = 0; q < KP; ++q)
      for (int j = 0; j < 16; ++j)
        out[j] += static_cast<float>(xi[2 * q]) * static_cast<float>(p[q * 32 + 2 * j]) +
                  static_cast<float>(xi[2 * q + 1]) * static_cast<float>(p[q * 32 + 2 * j + 1]);
    for (int64_t j = 0; j < width; ++j) y[i * N + j] = static_cast<c10::BFloat16>(out[j] + bias[j]);
  }
#endif
}

at::Tensor pairs_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                        int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16,
              "pairs_linear: x must be a contiguous bf16 (rows, K) matrix");
  const int64_t rows = x.size(0), K = x.size(1), NB = (N + 15) / 16, KP = (K + 1) / 2;
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.scalar_type() == at::kBFloat16 &&
                  packed.size(0) == NB && packed.size(1) == KP && packed.size(2) == 16 && packed.size(3) == 2,
              "pairs_linear: packed must be pairs_pack's copy of an (N, K) weight, K = x's columns");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kBFloat16 && bias->numel() == N),
              "pairs_linear: bias must be bf16 (N,)");
  // x as pairs (an odd K gets a zero partner for its last input), the bias as fp32 padded to whole blocks
  at::Tensor xs = x;
  if (K % 2) xs = at::constant_pad_nd(x, {0, 1});
  std::vector<float> b(NB * 16, 0.f);
  if (bias.has_value()) {
    const at::Tensor bc = bias->contiguous();
    const c10::BFloat16* bp = bc.data_ptr<c10::BFloat16>();
    for (int64_t n = 0; n < N; ++n) b[n] = static_cast<float>(bp[n]);
  }
  at::Tensor out = at::empty({rows, N}, x.options());
  const int32_t* xp = reinterpret_cast<const int32_t*>(xs.data_ptr<c10::BFloat16>());
  const c10::BFloat16* pp = packed.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, NB, 4, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const c10::BFloat16* pb = pp + nb * KP * 32;
      const float* bb = b.data() + nb * 16;
      const int64_t width = std::min<int64_t>(16, N - 16 * nb);
      c10::BFloat16* yb = yp + 16 * nb;
      int64_t r = 0;
      for (; r + 16 <= rows; r += 16) pairs_rows<16>(xp + r * KP, KP, pb, KP, bb, width, yb + r * N, N);
      for (; r + 8 <= rows; r += 8) pairs_rows<8>(xp + r * KP, KP, pb, KP, bb, width, yb + r * N, N);
      for (; r + 4 <= rows; r += 4) pairs_rows<4>(xp + r * KP, KP, pb, KP, bb, width, yb + r * N, N);
      for (; r + 2 <= rows; r += 2) pairs_rows<2>(xp + r * KP, KP, pb, KP, bb, width, yb + r * N, N);
      for (; r < rows; ++r) pairs_rows<1>(xp + r * KP, KP, pb, KP, bb, width, yb + r * N, N);
    }
  });
  return out;
}

// Which fast paths this build has (it is compiled for the machine it runs on, -march=native): bit 0 fp32 matvec
// and attention (AVX-512 or AVX2), bit 1 bf16 matvec (AVX512-BF16 or AVX2), bit 2 int8 and int4 (AVX-512 VNNI or
// AVX2), bit 3 pairs_linear (AVX512-BF16 only). Without one, the kernel falls back to plain loops, slower than
// PyTorch's own kernels, so callers keep PyTorch's there.
int64_t capabilities() {
  int64_t bits = 0;
#if defined(__AVX512F__) || defined(LMFORGE_AVX2)
  bits |= 1;
#endif
#if (defined(__AVX512BF16__) && defined(__AVX512BW__)) || defined(LMFORGE_AVX2)
  bits |= 2;
#endif
#ifdef LMFORGE_INT8_DOT
  bits |= 4;
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  bits |= 8;
#endif
  return bits;
}

}  // namespace

TORCH_LIBRARY(lmforge, m) {
  m.def("int4_matvec(Tensor x, Tensor codes, Tensor scale, Tensor minimum, int group_size) -> Tensor");
  m.def("int8_matvec(Tensor x, Tensor codes, Tensor scale) -> Tensor");
  m.def("int4_dequantize(Tensor codes, Tensor scale, Tensor minimum, int group_size) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def("matvec(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("pairs_pack(Tensor weight) -> Tensor");
  m.def("pairs_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  m.def("capabilities() -> int", &capabilities);
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("int4_matvec", &int4_matvec);
  m.impl("int8_matvec", &int8_matvec);
  m.impl("int4_dequantize", &int4_dequantize);
  m.impl("decode_attention", &decode_attention);
  m.impl("matvec", &matvec);
  m.impl("pairs_pack", &pairs_pack);
  m.impl("pairs_linear", &pairs_linear);
}

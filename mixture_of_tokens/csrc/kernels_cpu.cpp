// MoT's merge and emit, the experts' batched products, and their gradients, for CPUs with AVX512-BF16 (loaded by
// mixture_of_tokens/cpu_kernels.py).
//
// For each position p (one group's G tokens at one sequence position), with w[g, e] the mixing weights:
//   merge: rows[e, p]   = sum_g w[g, e] tokens[p, g]      weights [p, G, E], tokens [p, G, d] -> rows [E, p, d]
//   emit:  tokens[p, g] = sum_e w[g, e] rows[e, p]        weights, rows [E, p, d] -> tokens [p, G, d]
//   dots:  out[p, g, e] = tokens[p, g] . rows[e, p]       (the weights' gradient of either)
// The rows are in the experts' layout, [E, p, d]: these kernels read and write it directly, where batched matmuls
// over positions would need a layout copy of the E/G-times-larger rows on every side. Each position is one task;
// its products run on vdpbf16ps, which multiplies pairs of bf16 and adds both products to one fp32 lane, so one
// operand of each product is packed into pairs along the summed dimension, and the other is broadcast pair by pair.
//
// The experts' products, out[e] = a[e] @ b[e] for each expert e (`[E, M, K] @ [E, K, N]`, either operand a plain or
// transposed view), are small (the granular variants' experts have 128-256 rows of 128-512 features) and read each
// expert's weights once: oneDNN's batched matmuls run them at 85-90% of its speed on the dense FFN's. Here each
// expert is one task on the same register tiles, and while it computes, the next expert's operands are asked for
// from memory.
//
// All sums are in fp32 and rounded to bf16 once, as oneDNN's batched matmuls do.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "the MoT mixing kernels need AVX512-BF16 (cpu_kernels.py builds them only on such CPUs)"
#endif
#include <immintrin.h>

namespace {

using u16 = uint16_t;
using u32 = uint32_t;

// Register tiles: outputs per tile (rows x 16-lane vectors), chosen by timing MoT/32E/16 on a 2-core AVX512-BF16 EPYC.
constexpr int kMergeRows = 6, kMergeVectors = 4;  // experts x 64 features
constexpr int64_t kMergeColumns = 16 * kMergeVectors;  // a merge tile's features: its token pairs are packed by these
constexpr int kEmitRows = 8, kEmitVectors = 2;    // tokens x 32 features
constexpr int kDotRows = 8;                       // experts x all G tokens
constexpr int kProductRows = 6, kProductVectors = 4;  // rows x 64 columns of an expert's product
constexpr int64_t kProductColumns = 16 * kProductVectors;  // a product tile's columns: b is packed by these
constexpr int kTailRows = 2;                      // for the last rows when a count is not a multiple of a tile's
constexpr int64_t kPrefetchPairs = 2;             // row pairs ahead that emit's packing asks the memory for

inline __m512bh broadcast_pair(const u16* pair) {
  int32_t bits;
  std::memcpy(&bits, pair, 4);
  return (__m512bh)_mm512_set1_epi32(bits);
}

// dst[2k] = a[k], dst[2k + 1] = b[k] for k < n: two rows as pairs, the layout vdpbf16ps reads.
class Interleave {
 public:
  Interleave() {
    alignas(64) u16 low[32], high[32];
    for (int j = 0; j < 16; ++j) {
      low[2 * j] = j, low[2 * j + 1] = 32 + j;
      high[2 * j] = 16 + j, high[2 * j + 1] = 48 + j;
    }
    low_ = _mm512_load_si512(low);
    high_ = _mm512_load_si512(high);
  }
  void operator()(const u16* a, const u16* b, u16* dst, int64_t n) const {
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
      const __m512i va = _mm512_loadu_si512(a + k), vb = _mm512_loadu_si512(b + k);
      _mm512_storeu_si512(dst + 2 * k, _mm512_permutex2var_epi16(va, low_, vb));
      _mm512_storeu_si512(dst + 2 * k + 32, _mm512_permutex2var_epi16(va, high_, vb));
    }
    for (; k < n; ++k) dst[2 * k] = a[k], dst[2 * k + 1] = b[k];  // the weights of an E that is not a multiple of 32
  }

 private:
  __m512i low_, high_;
};

// Two fp32 vectors as 32 bf16. A streaming store skips reading the line into the cache first: for the rows, written
// once here and read only by the next operation.
inline void store_bf16(u16* dst, __m512 low, __m512 high, bool streaming) {
  const __m512i line = (__m512i)_mm512_cvtne2ps_pbh(high, low);
  if (streaming && reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), line);
  } else {
    _mm512_storeu_si512(dst, line);
  }
}

inline u16 to_bf16(float value) {
  u32 bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN stays NaN
  return u16((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // round to nearest even
}

// The register tile of every product here: out[i][16j + l] = sum_h a_pair(i, h) . b_pairs[h][16j + l] for MR rows of
// out (row stride out_stride) and NR vectors of its columns, b_pairs [K/2][N] (pair row stride pair_stride). Row i's
// pairs are read from a row-major a (row stride a_stride) or, APacked, from pairs [K/2][M] (a_stride pairs per row of
// pairs). Streaming: the output is written past the cache (merge's rows, read only by the next operation).
template <int MR, int NR, bool APacked, bool Streaming>
void tile(const u16* a, int64_t a_stride, const u16* b_pairs, int64_t pair_stride, int64_t num_pairs, u16* out,
          int64_t out_stride) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t h = 0; h < num_pairs; ++h) {
    __m512bh b[NR];
    for (int j = 0; j < NR; ++j) b[j] = (__m512bh)_mm512_loadu_si512(b_pairs + h * pair_stride + 32 * j);
    for (int i = 0; i < MR; ++i) {
      const u16* pair_at = APacked ? a + 2 * (h * a_stride + i) : a + i * a_stride + 2 * h;
      const __m512bh pair = broadcast_pair(pair_at);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], pair, b[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; j += 2) store_bf16(out + i * out_stride + 16 * j, acc[i][j], acc[i][j + 1], Streaming);
}

// sums[i][g] = sum_k rows[i][k] tokens[g][k] for MR rows (row stride row_stride) and all G = 16 * NG tokens, the
// tokens packed as token_pairs [d/2][G] (features 2h, 2h+1 of token g in one u32). Computed transposed, with the
// rows broadcast pair by pair, so that the large operand is read as it lies.
template <int MR, int NG>
void dot_tile(const u16* rows, int64_t row_stride, const u32* token_pairs, int64_t hidden_size, float* sums) {
  __m512 acc[MR][NG];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NG; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < hidden_size; k += 2) {
    __m512bh tokens[NG];
    for (int j = 0; j < NG; ++j) tokens[j] = (__m512bh)_mm512_loadu_si512(token_pairs + (k / 2) * 16 * NG + 16 * j);
    for (int i = 0; i < MR; ++i) {
      const __m512bh row = broadcast_pair(rows + i * row_stride + k);
      for (int j = 0; j < NG; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], row, tokens[j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NG; ++j) _mm512_storeu_ps(sums + (i * NG + j) * 16, acc[i][j]);
}

// dst[c][r] = src[r][c] for a 16 x 16 block of 32-bit values (row strides in elements).
inline void transpose_16x16(const u32* src, int64_t src_stride, u32* dst, int64_t dst_stride) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * src_stride);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // r[4b + q], 128-bit lane L: column 4L + q of rows 4b .. 4b + 3. Gather the lanes of one column across the blocks.
  for (int q = 0; q < 4; ++q) {
    const __m512i even01 = _mm512_shuffle_i32x4(r[q], r[4 + q], 0x88);
    const __m512i odd01 = _mm512_shuffle_i32x4(r[q], r[4 + q], 0xDD);
    const __m512i even23 = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0x88);
    const __m512i odd23 = _mm512_shuffle_i32x4(r[8 + q], r[12 + q], 0xDD);
    t[q] = _mm512_shuffle_i32x4(even01, even23, 0x88);
    t[8 + q] = _mm512_shuffle_i32x4(even01, even23, 0xDD);
    t[4 + q] = _mm512_shuffle_i32x4(odd01, odd23, 0x88);
    t[12 + q] = _mm512_shuffle_i32x4(odd01, odd23, 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * dst_stride, t[i]);
}

// Asks the memory for a block of bytes a piece at a time, spread over the tiles of one expert's product.
class Prefetch {
 public:
  void start(const void* first, int64_t first_bytes, const void* second, int64_t second_bytes, int64_t pieces) {
    next_[0] = static_cast<const char*>(first), next_[1] = static_cast<const char*>(second);
    end_[0] = first_bytes, end_[1] = second_bytes, done_[0] = done_[1] = 0;
    piece_ = ((std::max(first_bytes, second_bytes) / pieces) / 64 + 1) * 64;
  }
  void stop() { end_[0] = end_[1] = 0; }
  void piece() {
    for (int s = 0; s < 2; ++s)
      for (const int64_t end = std::min(end_[s], done_[s] + piece_); done_[s] < end; done_[s] += 64)
        _mm_prefetch(next_[s] + done_[s], _MM_HINT_T1);
  }

 private:
  const char* next_[2] = {nullptr, nullptr};
  int64_t end_[2] = {0, 0}, done_[2] = {0, 0}, piece_ = 0;
};

// One operand of a product, [E, rows, columns] with any expert stride: row-major (columns adjacent) or a transposed
// view (rows adjacent).
struct Operand {
  const u16* data;
  int64_t expert_stride, row_stride, column_stride;
  bool transposed() const { return row_stride == 1 && column_stride != 1; }
  const u16* expert(int64_t e) const { return data + e * expert_stride; }
};

struct ProductWorkspace {
  Interleave interleave;
  std::vector<u16> a_pairs, b_pairs;
  Prefetch prefetch;
};

// Rows [m0, m1) of one expert's product, MR at a time, column block by column block.
template <int MR, bool APacked>
void product_rows(const u16* a, int64_t a_stride, int64_t a_row_step, const u16* b_pairs, int64_t N, int64_t K,
                  u16* out, int64_t m0, int64_t m1, Prefetch& prefetch) {
  for (int64_t j0 = 0; j0 < N; j0 += kProductColumns)
    for (int64_t m = m0; m + MR <= m1; m += MR) {
      tile<MR, kProductVectors, APacked, false>(a + m * a_row_step, a_stride, b_pairs + j0 * K, 2 * kProductColumns,
                                                K / 2, out + m * N + j0, N);
      prefetch.piece();
    }
}

template <bool APacked>
void product_all_rows(const u16* a, int64_t a_stride, int64_t a_row_step, const u16* b_pairs, int64_t N, int64_t K,
                      u16* out, int64_t M, Prefetch& prefetch) {
  const int64_t full = M - M % kProductRows;
  product_rows<kProductRows, APacked>(a, a_stride, a_row_step, b_pairs, N, K, out, 0, full, prefetch);
  switch (M - full) {  // the last rows, in one tile
    case 1: product_rows<1, APacked>(a, a_stride, a_row_step, b_pairs, N, K, out, full, M, prefetch); break;
    case 2: product_rows<2, APacked>(a, a_stride, a_row_step, b_pairs, N, K, out, full, M, prefetch); break;
    case 3: product_rows<3, APacked>(a, a_stride, a_row_step, b_pairs, N, K, out, full, M, prefetch); break;
    case 4: product_rows<4, APacked>(a, a_stride, a_row_step, b_pairs, N, K, out, full, M, prefetch); break;
    case 5: product_rows<5, APacked>(a, a_stride, a_row_step, b_pairs, N, K, out, full, M, prefetch); break;
    default: break;
  }
}

// out[e] = a[e] @ b[e] for one expert: b (and a transposed a) packed into pairs along K, then the tiles.
void expert_product(const Operand& a, const Operand& b, int64_t e, int64_t M, int64_t K, int64_t N, u16* out,
                    ProductWorkspace& ws) {
  const u16 *ae = a.expert(e), *be = b.expert(e);
  ws.b_pairs.resize(K * N);
  // b's pairs one tile's columns after another, [N/64][K/2][64 pairs]: a tile reads its columns as one run, where
  // the rows of [K/2][N] pairs, a power of two apart, would share a few of the L1 cache's sets.
  constexpr int64_t C = kProductColumns;
  if (!b.transposed()) {
    for (int64_t j0 = 0; j0 < N; j0 += C)
      for (int64_t h = 0; h < K / 2; ++h)
        ws.interleave(be + 2 * h * b.row_stride + j0, be + (2 * h + 1) * b.row_stride + j0,
                      ws.b_pairs.data() + j0 * K + h * 2 * C, C);
  } else {  // b[k][n] at be[n * column_stride + k]: the pairs along K are 32-bit values there; transpose those
    const u32* columns = reinterpret_cast<const u32*>(be);
    u32* pairs = reinterpret_cast<u32*>(ws.b_pairs.data());
    for (int64_t n = 0; n < N; n += 16)
      for (int64_t h = 0; h < K / 2; h += 16)
        transpose_16x16(columns + n * (b.column_stride / 2) + h, b.column_stride / 2,
                        pairs + (n / C) * C * (K / 2) + h * C + n % C, C);
  }
  if (a.transposed()) {  // a[m][k] at ae[k * column_stride + m]: interleave rows k, k + 1 of that into pairs [K/2][M]
    ws.a_pairs.resize(K * M);
    for (int64_t h = 0; h < K / 2; ++h)
      ws.interleave(ae + 2 * h * a.column_stride, ae + (2 * h + 1) * a.column_stride, ws.a_pairs.data() + h * 2 * M, M);
    product_all_rows<true>(ws.a_pairs.data(), M, 2, ws.b_pairs.data(), N, K, out, M, ws.prefetch);
  } else {
    product_all_rows<false>(ae, a.row_stride, a.row_stride, ws.b_pairs.data(), N, K, out, M, ws.prefetch);
  }
}

struct Sizes {
  int64_t positions, group_size, num_experts, hidden_size;
  int64_t row_stride() const { return positions * hidden_size; }  // between experts' rows of one position
};

// Per-thread buffers for one position's packed operands.
struct Workspace {
  Interleave interleave;
  std::vector<u16> weight_pairs;  // merge: [G/2][E] pairs
  std::vector<u16> pairs;         // merge: token pairs [G/2][2d]; emit: row pairs [E/2][2d]
  std::vector<u32> token_pairs;   // dots: [d/2][G]
  std::vector<float> sums;        // dots: [E][G]
};

void merge_position(const Sizes& s, const u16* weights, const u16* tokens, u16* rows, Workspace& ws) {
  const int64_t G = s.group_size, E = s.num_experts, d = s.hidden_size;
  constexpr int64_t C = kMergeColumns;
  // Pair rows of the weights E + 16 pairs apart and the tokens' pairs one tile's features after another,
  // [d/64][G/2][64 pairs]: rows a power of two apart would share a few of the L1 cache's sets.
  const int64_t weight_stride = E + 16;
  ws.weight_pairs.resize(G * weight_stride);
  ws.pairs.resize(G / 2 * 2 * d);
  for (int64_t h = 0; h < G / 2; ++h) {
    ws.interleave(weights + 2 * h * E, weights + (2 * h + 1) * E, ws.weight_pairs.data() + h * 2 * weight_stride, E);
    for (int64_t j0 = 0; j0 < d; j0 += C)
      ws.interleave(tokens + 2 * h * d + j0, tokens + (2 * h + 1) * d + j0, ws.pairs.data() + j0 * G + h * 2 * C, C);
  }
  for (int64_t j0 = 0; j0 < d; j0 += C) {
    const u16* token_pairs = ws.pairs.data() + j0 * G;
    int64_t e = 0;
    for (; e + kMergeRows <= E; e += kMergeRows)
      tile<kMergeRows, kMergeVectors, true, true>(ws.weight_pairs.data() + 2 * e, weight_stride, token_pairs, 2 * C,
                                                  G / 2, rows + e * s.row_stride() + j0, s.row_stride());
    for (; e < E; e += kTailRows)
      tile<kTailRows, kMergeVectors, true, true>(ws.weight_pairs.data() + 2 * e, weight_stride, token_pairs, 2 * C,
                                                 G / 2, rows + e * s.row_stride() + j0, s.row_stride());
  }
}

void emit_position(const Sizes& s, const u16* weights, const u16* rows, u16* tokens, Workspace& ws) {
  const int64_t G = s.group_size, E = s.num_experts, d = s.hidden_size, stride = s.row_stride();
  ws.pairs.resize(E / 2 * 2 * d);
  // The rows lie E/G times the input apart: ask for the next pairs while packing these (the hardware prefetchers do
  // not follow 1 KiB rows 32 KiB-256 KiB apart).
  for (int64_t h = 0; h < E / 2; ++h) {
    if (h + kPrefetchPairs < E / 2) {
      for (int64_t k = 0; k < d; k += 32) {
        __builtin_prefetch(rows + 2 * (h + kPrefetchPairs) * stride + k);
        __builtin_prefetch(rows + (2 * (h + kPrefetchPairs) + 1) * stride + k);
      }
    }
    ws.interleave(rows + 2 * h * stride, rows + (2 * h + 1) * stride, ws.pairs.data() + h * 2 * d, d);
  }
  for (int64_t j0 = 0; j0 < d; j0 += 16 * kEmitVectors) {
    int64_t g = 0;
    for (; g + kEmitRows <= G; g += kEmitRows)
      tile<kEmitRows, kEmitVectors, false, false>(weights + g * E, E, ws.pairs.data() + 2 * j0, 2 * d, E / 2,
                                                  tokens + g * d + j0, d);
    for (; g < G; g += kTailRows)
      tile<kTailRows, kEmitVectors, false, false>(weights + g * E, E, ws.pairs.data() + 2 * j0, 2 * d, E / 2,
                                                  tokens + g * d + j0, d);
  }
}

template <int NG>
void dot_rows(const Sizes& s, const u16* rows, Workspace& ws) {
  const int64_t E = s.num_experts, G = s.group_size;
  int64_t e = 0;
  for (; e + kDotRows <= E; e += kDotRows)
    dot_tile<kDotRows, NG>(rows + e * s.row_stride(), s.row_stride(), ws.token_pairs.data(), s.hidden_size,
                           ws.sums.data() + e * G);
  for (; e < E; e += kTailRows)
    dot_tile<kTailRows, NG>(rows + e * s.row_stride(), s.row_stride(), ws.token_pairs.data(), s.hidden_size,
                            ws.sums.data() + e * G);
}

void dots_position(const Sizes& s, const u16* tokens, const u16* rows, u16* out, Workspace& ws) {
  const int64_t G = s.group_size, E = s.num_experts, d = s.hidden_size;
  ws.token_pairs.resize(d / 2 * G);
  ws.sums.resize(E * G);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t h = 0; h < d / 2; ++h) std::memcpy(&ws.token_pairs[h * G + g], tokens + g * d + 2 * h, 4);
  switch (G / 16) {
    case 1: dot_rows<1>(s, rows, ws); break;
    case 2: dot_rows<2>(s, rows, ws); break;
    case 3: dot_rows<3>(s, rows, ws); break;
    default: dot_rows<4>(s, rows, ws); break;
  }
  // out [G][E] from sums [E][G]: 16 x 16 blocks transposed, rounded to bf16 16 at a time.
  alignas(64) u32 block[16 * 16];
  const u32* sums = reinterpret_cast<const u32*>(ws.sums.data());
  int64_t e0 = 0;
  for (; e0 + 16 <= E; e0 += 16)
    for (int64_t g0 = 0; g0 < G; g0 += 16) {
      transpose_16x16(sums + e0 * G + g0, G, block, 16);
      for (int64_t g = 0; g < 16; ++g) {
        const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(_mm512_load_si512(block + 16 * g)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (g0 + g) * E + e0), rounded);
      }
    }
  for (; e0 < E; ++e0)  // an E that is not a multiple of 16
    for (int64_t g = 0; g < G; ++g) out[g * E + e0] = to_bf16(ws.sums[e0 * G + g]);
}

const u16* data(const at::Tensor& tensor) { return reinterpret_cast<const u16*>(tensor.data_ptr<at::BFloat16>()); }
u16* mutable_data(at::Tensor& tensor) { return reinterpret_cast<u16*>(tensor.data_ptr<at::BFloat16>()); }

void check(const at::Tensor& tensor, const char* name, int64_t a, int64_t b, int64_t c) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == at::kBFloat16 && tensor.is_contiguous(),
              "the MoT mixing kernels take contiguous bfloat16 CPU tensors; ", name, " is not");
  TORCH_CHECK(tensor.dim() == 3 && tensor.size(0) == a && tensor.size(1) == b && tensor.size(2) == c, name,
              " has shape ", tensor.sizes(), ", expected [", a, ", ", b, ", ", c, "]");
}

// The sizes of weights [p, G, E] and rows [E, p, d], checked against what the tiles need.
Sizes sizes_of(const at::Tensor& weights, int64_t num_experts, int64_t hidden_size) {
  TORCH_CHECK(weights.dim() == 3, "the mixing weights must be [positions, group_size, num_experts]");
  const Sizes s{weights.size(0), weights.size(1), num_experts, hidden_size};
  check(weights, "the mixing weights", s.positions, s.group_size, s.num_experts);
  TORCH_CHECK(s.group_size % 16 == 0 && s.group_size <= 64 && s.num_experts % 2 == 0 && s.hidden_size % 64 == 0,
              "the MoT mixing kernels need group_size in {16, 32, 48, 64}, an even num_experts and hidden_size a "
              "multiple of 64; got ", s.group_size, ", ", s.num_experts, ", ", s.hidden_size);
  return s;
}

template <typename Fn>
void for_each_position(int64_t positions, const Fn& fn) {
  at::parallel_for(0, positions, 1, [&](int64_t begin, int64_t end) {
    Workspace ws;
    for (int64_t p = begin; p < end; ++p) fn(p, ws);
    _mm_sfence();  // the streaming stores are visible to other threads once this chunk returns
  });
}

}  // namespace

at::Tensor merge(const at::Tensor& weights, const at::Tensor& tokens) {
  const Sizes s = sizes_of(weights, weights.size(2), tokens.size(2));
  check(tokens, "tokens", s.positions, s.group_size, s.hidden_size);
  at::Tensor rows = at::empty({s.num_experts, s.positions, s.hidden_size}, tokens.options());
  const u16 *w = data(weights), *x = data(tokens);
  u16* r = mutable_data(rows);
  const int64_t G = s.group_size, E = s.num_experts, d = s.hidden_size;
  for_each_position(s.positions, [&](int64_t p, Workspace& ws) { merge_position(s, w + p * G * E, x + p * G * d, r + p * d, ws); });
  return rows;
}

at::Tensor emit(const at::Tensor& weights, const at::Tensor& rows) {
  const Sizes s = sizes_of(weights, rows.size(0), rows.size(2));
  check(rows, "rows", s.num_experts, s.positions, s.hidden_size);
  at::Tensor tokens = at::empty({s.positions, s.group_size, s.hidden_size}, rows.options());
  const u16 *w = data(weights), *r = data(rows);
  u16* x = mutable_data(tokens);
  const int64_t G = s.group_size, E = s.num_experts, d = s.hidden_size;
  for_each_position(s.positions, [&](int64_t p, Workspace& ws) { emit_position(s, w + p * G * E, r + p * d, x + p * G * d, ws); });
  return tokens;
}

// The weights' gradient of the emit: dots of the output's gradient (tokens) with the rows.
at::Tensor dots(const at::Tensor& weights, const at::Tensor& tokens, const at::Tensor& rows) {
  const Sizes s = sizes_of(weights, rows.size(0), rows.size(2));
  check(tokens, "tokens", s.positions, s.group_size, s.hidden_size);
  check(rows, "rows", s.num_experts, s.positions, s.hidden_size);
  at::Tensor out = at::empty_like(weights);
  const u16 *x = data(tokens), *r = data(rows);
  u16* o = mutable_data(out);
  const int64_t G = s.group_size, E = s.num_experts, d = s.hidden_size;
  for_each_position(s.positions, [&](int64_t p, Workspace& ws) { dots_position(s, x + p * G * d, r + p * d, o + p * G * E, ws); });
  return out;
}

// The merge's backward, position by position so that the rows' gradient is read from cache the second time: its
// emit (the tokens' gradient) and its dots with the tokens (the weights' gradient).
std::vector<at::Tensor> emit_and_dots(const at::Tensor& weights, const at::Tensor& rows, const at::Tensor& tokens) {
  const Sizes s = sizes_of(weights, rows.size(0), rows.size(2));
  check(rows, "rows", s.num_experts, s.positions, s.hidden_size);
  check(tokens, "tokens", s.positions, s.group_size, s.hidden_size);
  at::Tensor emitted = at::empty_like(tokens), out = at::empty_like(weights);
  const u16 *w = data(weights), *r = data(rows), *x = data(tokens);
  u16 *t = mutable_data(emitted), *o = mutable_data(out);
  const int64_t G = s.group_size, E = s.num_experts, d = s.hidden_size;
  for_each_position(s.positions, [&](int64_t p, Workspace& ws) {
    emit_position(s, w + p * G * E, r + p * d, t + p * G * d, ws);
    dots_position(s, x + p * G * d, r + p * d, o + p * G * E, ws);
  });
  return {emitted, out};
}

namespace {

Operand operand_of(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu() && tensor.scalar_type() == at::kBFloat16 && tensor.dim() == 3,
              "the MoT expert products take 3-d bfloat16 CPU tensors; ", name, " is not");
  const Operand operand{data(tensor), tensor.stride(0), tensor.stride(1), tensor.stride(2)};
  TORCH_CHECK(operand.column_stride == 1 || operand.row_stride == 1, name,
              " must be row-major or a transposed view per expert; its strides are ", tensor.strides());
  return operand;
}

}  // namespace

// out[e] = a[e] @ b[e]: a [E, M, K], b [E, K, N], each row-major per expert or a transposed view of such a tensor.
at::Tensor expert_products(const at::Tensor& a, const at::Tensor& b) {
  const Operand left = operand_of(a, "a"), right = operand_of(b, "b");
  const int64_t E = a.size(0), M = a.size(1), K = a.size(2), N = b.size(2);
  TORCH_CHECK(b.size(0) == E && b.size(1) == K, "a ", a.sizes(), " and b ", b.sizes(), " do not multiply");
  TORCH_CHECK(!right.transposed() || right.column_stride % 2 == 0, "b as a transposed view needs an even stride "
              "between its columns (its pairs along K are read as 32-bit values); its strides are ", b.strides());
  TORCH_CHECK(K % (right.transposed() ? 32 : 2) == 0 && N % 64 == 0, "the MoT expert products need N a multiple of 64 "
              "and K even (a multiple of 32 with b a transposed view); got K = ", K, ", N = ", N);
  at::Tensor out = at::empty({E, M, N}, a.options());
  u16* o = mutable_data(out);
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    ProductWorkspace ws;
    for (int64_t e = begin; e < end; ++e) {
      if (e + 1 < end) {  // this thread's next expert: its operands, while this one computes (M/6 + 1 tiles)
        ws.prefetch.start(left.expert(e + 1), 2 * M * K, right.expert(e + 1), 2 * K * N,
                          (M / kProductRows + 1) * (N / (16 * kProductVectors)));
      } else {
        ws.prefetch.stop();
      }
      expert_product(left, right, e, M, K, N, o + e * M * N, ws);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("expert_products", &expert_products, "a [E, M, K], b [E, K, N] (either a transposed view) -> [E, M, N]");
  module.def("merge", &merge, "weights [p, G, E], tokens [p, G, d] -> rows [E, p, d]");
  module.def("emit", &emit, "weights [p, G, E], rows [E, p, d] -> tokens [p, G, d]");
  module.def("dots", &dots, "weights [p, G, E] (for the shape), tokens [p, G, d], rows [E, p, d] -> [p, G, E]");
  module.def("emit_and_dots", &emit_and_dots, "weights, rows' gradient, tokens -> (emit, dots)");
}

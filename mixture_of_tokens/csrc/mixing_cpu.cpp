// Fused CPU kernels for the Mixture of Tokens mixing (see mixture_of_tokens/cpu_mixing.py).
//
// The layer's activations are token-major, [n, G, S, d] (group n, token g of the group, position s, feature),
// while the experts want expert-major rows, [E, n*S, d]. With batched matmuls the merge and the emit each need
// a layout copy on both sides of a small [32 x 32] @ [32 x d] product, forward and backward; these kernels read
// and write both layouts directly, one (group, position) block at a time, so each activation crosses memory once.
//
// A block is p = (n, s). For it, with w[g, e] the mixing weights (softmax over g):
//   merge: expert_rows[e, p] = sum_g w[g, e] tokens[n, g, s]
//   emit:  tokens[n, g, s]   = sum_e w[g, e] expert_rows[e, p]
//   dots:  out[n, g, s, e]   = tokens[n, g, s] . expert_rows[e, p]    (the gradient of the weights)
// Merge and emit are the same operation, "mix": out_row[o] = sum_r coef[o, r] in_row[r], with rows addressed by
// a base pointer and a stride. Rows are accumulated in fp32. With AVX512-BF16 the products use vdpbf16ps on
// pairs of rows; elsewhere (and for float32) portable 16-lane vectors (GCC/Clang vector extensions).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MOT_AVX512_BF16 1
#endif

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Portable fp32 path.

typedef float Lanes16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 4;  // outputs (and k-vectors) per register tile: 4 x 4 accumulators

inline Lanes16 load_lanes(const float* ptr) {
  Lanes16 value;
  std::memcpy(&value, ptr, sizeof(value));
  return value;
}

inline void store_lanes(float* ptr, Lanes16 value) { std::memcpy(ptr, &value, sizeof(value)); }

// Keeps a loaded vector in a register: otherwise the compiler re-reads it from memory as an operand of every
// multiply-add that uses it, and the loop becomes bound by loads instead of multiply-adds.
// Only where one register holds all 16 lanes (AVX-512); elsewhere the vector spans several and is left alone.
inline void keep_in_register(Lanes16& value) {
#if defined(__AVX512F__)
  __asm__("" : "+v"(value));
#else
  (void)value;
#endif
}

inline float bf16_to_float(uint16_t bits) {
  uint32_t widened = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &widened, 4);
  return value;
}

inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN stays NaN
  return uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // round to nearest even
}

inline void load_row(const at::BFloat16* src, float* dst, int64_t width) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t k = 0; k < width; ++k) dst[k] = bf16_to_float(bits[k]);
}
inline void load_row(const float* src, float* dst, int64_t width) { std::memcpy(dst, src, width * 4); }

inline void store_row(const float* src, at::BFloat16* dst, int64_t width) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
  for (int64_t k = 0; k < width; ++k) bits[k] = float_to_bf16(src[k]);
}
inline void store_row(const float* src, float* dst, int64_t width) { std::memcpy(dst, src, width * 4); }

// Rows of one block, addressed as base + index * stride (in elements).
template <typename scalar_t>
struct Rows {
  scalar_t* base;
  int64_t stride;
  scalar_t* operator[](int64_t index) const { return base + index * stride; }
};

// Prefetches the next block's input rows a few cache lines at a time from inside the compute loops, so that memory
// transfers overlap the arithmetic: the hardware prefetchers do not follow 32-64 strided row streams, and a burst
// of hundreds of prefetches at once only stalls the core until they land.
class Prefetcher {
 public:
  void clear() { num_streams_ = stream_ = row_ = offset_ = 0; }
  template <typename scalar_t>
  void add(Rows<scalar_t> rows, int64_t num_rows, int64_t width) {
    streams_[num_streams_++] = {reinterpret_cast<const char*>(rows.base), rows.stride * int64_t(sizeof(scalar_t)),
                                num_rows, width * int64_t(sizeof(scalar_t))};
  }
  // Called once per register tile of the compute loops.
  void step() {
    for (int line = 0; line < kLinesPerStep && stream_ < num_streams_; ++line) {
      const Stream& stream = streams_[stream_];
      __builtin_prefetch(stream.base + row_ * stream.stride_bytes + offset_);
      offset_ += 64;
      if (offset_ >= stream.row_bytes) {
        offset_ = 0;
        if (++row_ == stream.num_rows) row_ = 0, ++stream_;
      }
    }
  }

 private:
  static constexpr int kLinesPerStep = 8;  // 64 tiles per block and 512 lines (32 KiB) per input tensor
  struct Stream {
    const char* base;
    int64_t stride_bytes, num_rows, row_bytes;
  };
  Stream streams_[3];
  int num_streams_ = 0, stream_ = 0;
  int64_t row_ = 0, offset_ = 0;
};

// out[o, :] = sum_r coef[o, r] rows[r, :] for rows [R, width] and coef [O, R] in fp32; O % 4 == 0, width % 64 == 0.
void mix_block_fp32(const float* rows, int64_t num_rows, const float* coef, int64_t num_out, int64_t width,
                    float* out, Prefetcher& prefetch) {
  for (int64_t o0 = 0; o0 < num_out; o0 += kBlock) {
    for (int64_t k0 = 0; k0 < width; k0 += kBlock * kLanes) {
      prefetch.step();
      Lanes16 acc[kBlock][kBlock] = {};
      for (int64_t r = 0; r < num_rows; ++r) {
        Lanes16 x[kBlock];
        for (int j = 0; j < kBlock; ++j) {
          x[j] = load_lanes(rows + r * width + k0 + j * kLanes);
          keep_in_register(x[j]);
        }
        for (int i = 0; i < kBlock; ++i) {
          const float c = coef[(o0 + i) * num_rows + r];
          for (int j = 0; j < kBlock; ++j) acc[i][j] += c * x[j];
        }
      }
      for (int i = 0; i < kBlock; ++i)
        for (int j = 0; j < kBlock; ++j) store_lanes(out + (o0 + i) * width + k0 + j * kLanes, acc[i][j]);
    }
  }
}

// out[a, b] = rows_a[a, :] . rows_b[b, :] in fp32; A % 4 == 0, B % 4 == 0, width % 16 == 0.
void dot_block_fp32(const float* rows_a, int64_t num_a, const float* rows_b, int64_t num_b, int64_t width,
                    float* out, Prefetcher& prefetch) {
  for (int64_t a0 = 0; a0 < num_a; a0 += kBlock) {
    for (int64_t b0 = 0; b0 < num_b; b0 += kBlock) {
      prefetch.step();
      Lanes16 acc[kBlock][kBlock] = {};
      for (int64_t k = 0; k < width; k += kLanes) {
        Lanes16 a[kBlock], b[kBlock];
        for (int i = 0; i < kBlock; ++i) {
          a[i] = load_lanes(rows_a + (a0 + i) * width + k);
          keep_in_register(a[i]);
        }
        for (int j = 0; j < kBlock; ++j) {
          b[j] = load_lanes(rows_b + (b0 + j) * width + k);
          keep_in_register(b[j]);
        }
        for (int i = 0; i < kBlock; ++i)
          for (int j = 0; j < kBlock; ++j) acc[i][j] += a[i] * b[j];
      }
      for (int i = 0; i < kBlock; ++i)
        for (int j = 0; j < kBlock; ++j) {
          float total = 0.f;
          for (int l = 0; l < kLanes; ++l) total += acc[i][j][l];
          out[(a0 + i) * num_b + b0 + j] = total;
        }
    }
  }
}


// One block of mix through fp32 buffers: load the input rows, combine, store. `weights` are the block's G rows of
// E mixing weights; with to_experts the inputs are its G tokens and the outputs its E expert rows, else the reverse.
template <typename scalar_t>
struct MixFp32 {
  std::vector<float> rows, out, coef;
  void operator()(Rows<const scalar_t> in, int64_t num_in, Rows<const float> weights, bool to_experts,
                  Rows<scalar_t> dst, int64_t num_out, int64_t width, Prefetcher& prefetch) {
    rows.resize(num_in * width);
    out.resize(num_out * width);
    coef.resize(num_out * num_in);
    // coef [out, in]: [E, G] (expert e takes sum_g w[g, e] token g) or [G, E] (token g takes sum_e w[g, e] row e)
    for (int64_t o = 0; o < num_out; ++o)
      for (int64_t r = 0; r < num_in; ++r) coef[o * num_in + r] = to_experts ? weights[r][o] : weights[o][r];
    for (int64_t r = 0; r < num_in; ++r) load_row(in[r], rows.data() + r * width, width);
    mix_block_fp32(rows.data(), num_in, coef.data(), num_out, width, out.data(), prefetch);
    for (int64_t o = 0; o < num_out; ++o) store_row(out.data() + o * width, dst[o], width);
  }
};

template <typename scalar_t>
struct DotFp32 {
  std::vector<float> rows_a, rows_b;
  void operator()(Rows<const scalar_t> a, int64_t num_a, Rows<const scalar_t> b, int64_t num_b, int64_t width,
                  float* out, Prefetcher& prefetch) {
    rows_a.resize(num_a * width);
    rows_b.resize(num_b * width);
    for (int64_t i = 0; i < num_a; ++i) load_row(a[i], rows_a.data() + i * width, width);
    for (int64_t j = 0; j < num_b; ++j) load_row(b[j], rows_b.data() + j * width, width);
    dot_block_fp32(rows_a.data(), num_a, rows_b.data(), num_b, width, out, prefetch);
  }
};

#ifdef MOT_AVX512_BF16
// ---------------------------------------------------------------------------------------------------------------
// AVX512-BF16 path: vdpbf16ps multiplies pairs of bf16 and adds both products to one fp32 lane, so the rows being
// combined are interleaved in pairs, (row 2h, row 2h+1) element by element, and the coefficients likewise.

struct InterleaveIndex {
  __m512i low, high;
  InterleaveIndex() {
    alignas(64) uint16_t low_index[32], high_index[32];
    for (int j = 0; j < 16; ++j) {
      low_index[2 * j] = j;            // a[j]
      low_index[2 * j + 1] = 32 + j;   // b[j]
      high_index[2 * j] = 16 + j;
      high_index[2 * j + 1] = 48 + j;
    }
    low = _mm512_load_si512(low_index);
    high = _mm512_load_si512(high_index);
  }
};

// dst[2k] = a[k], dst[2k + 1] = b[k]; width % 32 == 0.
inline void interleave_rows(const uint16_t* a, const uint16_t* b, uint16_t* dst, int64_t width,
                            const InterleaveIndex& index) {
  for (int64_t k = 0; k < width; k += 32) {
    const __m512i va = _mm512_loadu_si512(a + k), vb = _mm512_loadu_si512(b + k);
    _mm512_storeu_si512(dst + 2 * k, _mm512_permutex2var_epi16(va, index.low, vb));
    _mm512_storeu_si512(dst + 2 * k + 32, _mm512_permutex2var_epi16(va, index.high, vb));
  }
}

struct MixBf16 {
  InterleaveIndex index;
  std::vector<uint16_t> pairs;       // [num_in / 2, 2 * width]: input rows 2h and 2h+1 interleaved
  std::vector<uint16_t> weights_bf16;  // [G, E]
  std::vector<uint32_t> coef_pairs;  // [num_in / 2, num_out]: (coef[o, 2h], coef[o, 2h+1]) as two bf16
  void operator()(Rows<const at::BFloat16> in, int64_t num_in, Rows<const float> weights, bool to_experts,
                  Rows<at::BFloat16> dst, int64_t num_out, int64_t width, Prefetcher& prefetch) {
    const int64_t num_pairs = num_in / 2;
    const int64_t group_size = to_experts ? num_in : num_out, num_experts = to_experts ? num_out : num_in;
    pairs.resize(num_pairs * 2 * width);
    weights_bf16.resize(group_size * num_experts);
    coef_pairs.resize(num_pairs * num_out);
    for (int64_t g = 0; g < group_size; ++g) {
      const float* row = weights[g];
      for (int64_t e = 0; e < num_experts; ++e) weights_bf16[g * num_experts + e] = float_to_bf16(row[e]);
    }
    for (int64_t h = 0; h < num_pairs; ++h)
      for (int64_t o = 0; o < num_out; ++o) {
        // merge: (w[2h, e], w[2h+1, e]); emit: (w[g, 2h], w[g, 2h+1])
        const uint32_t first = to_experts ? weights_bf16[2 * h * num_experts + o] : weights_bf16[o * num_experts + 2 * h];
        const uint32_t second =
            to_experts ? weights_bf16[(2 * h + 1) * num_experts + o] : weights_bf16[o * num_experts + 2 * h + 1];
        coef_pairs[h * num_out + o] = first | (second << 16);
      }
    for (int64_t h = 0; h < num_pairs; ++h)
      interleave_rows(reinterpret_cast<const uint16_t*>(in[2 * h]), reinterpret_cast<const uint16_t*>(in[2 * h + 1]),
                      pairs.data() + h * 2 * width, width, index);

    for (int64_t o0 = 0; o0 < num_out; o0 += kBlock) {
      for (int64_t k0 = 0; k0 < width; k0 += kBlock * kLanes) {
        prefetch.step();
        __m512 acc[kBlock][kBlock];
        for (int i = 0; i < kBlock; ++i)
          for (int j = 0; j < kBlock; ++j) acc[i][j] = _mm512_setzero_ps();
        for (int64_t h = 0; h < num_pairs; ++h) {
          const uint16_t* pair_row = pairs.data() + h * 2 * width + 2 * k0;
          __m512bh x[kBlock];
          for (int j = 0; j < kBlock; ++j) x[j] = (__m512bh)_mm512_loadu_si512(pair_row + j * 2 * kLanes);
          for (int i = 0; i < kBlock; ++i) {
            const __m512bh c = (__m512bh)_mm512_set1_epi32(int(coef_pairs[h * num_out + o0 + i]));
            for (int j = 0; j < kBlock; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], c, x[j]);
          }
        }
        for (int i = 0; i < kBlock; ++i) {
          uint16_t* out_row = reinterpret_cast<uint16_t*>(dst[o0 + i]) + k0;
          for (int j = 0; j < kBlock; j += 2) {
            // Two accumulators make one 64-byte line of bf16. The outputs are written once and read only by the
            // next operation: a streaming store saves reading each line into the cache before overwriting it.
            const __m512i line = (__m512i)_mm512_cvtne2ps_pbh(acc[i][j + 1], acc[i][j]);
            uint16_t* target = out_row + j * kLanes;
            if (reinterpret_cast<uintptr_t>(target) % 64 == 0) _mm512_stream_si512(reinterpret_cast<__m512i*>(target), line);
            else _mm512_storeu_si512(target, line);
          }
        }
      }
    }
  }
};

struct DotBf16 {
  void operator()(Rows<const at::BFloat16> a, int64_t num_a, Rows<const at::BFloat16> b, int64_t num_b,
                  int64_t width, float* out, Prefetcher& prefetch) {
    // Here the pairs are consecutive features of each row: the rows need no interleaving.
    for (int64_t a0 = 0; a0 < num_a; a0 += kBlock) {
      for (int64_t b0 = 0; b0 < num_b; b0 += kBlock) {
        prefetch.step();
        __m512 acc[kBlock][kBlock];
        for (int i = 0; i < kBlock; ++i)
          for (int j = 0; j < kBlock; ++j) acc[i][j] = _mm512_setzero_ps();
        for (int64_t k = 0; k < width; k += 2 * kLanes) {
          __m512bh va[kBlock], vb[kBlock];
          for (int i = 0; i < kBlock; ++i) va[i] = (__m512bh)_mm512_loadu_si512(a[a0 + i] + k);
          for (int j = 0; j < kBlock; ++j) vb[j] = (__m512bh)_mm512_loadu_si512(b[b0 + j] + k);
          for (int i = 0; i < kBlock; ++i)
            for (int j = 0; j < kBlock; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], va[i], vb[j]);
        }
        for (int i = 0; i < kBlock; ++i)
          for (int j = 0; j < kBlock; ++j) out[(a0 + i) * num_b + b0 + j] = _mm512_reduce_add_ps(acc[i][j]);
      }
    }
  }
};

template <typename scalar_t>
struct Kernels {
  using Mix = MixFp32<scalar_t>;
  using Dot = DotFp32<scalar_t>;
};
template <>
struct Kernels<at::BFloat16> {
  using Mix = MixBf16;
  using Dot = DotBf16;
};
#else
template <typename scalar_t>
struct Kernels {
  using Mix = MixFp32<scalar_t>;
  using Dot = DotFp32<scalar_t>;
};
#endif

template <typename Fn>
void dispatch(const at::Tensor& tensor, Fn&& fn) {
  if (tensor.scalar_type() == at::kBFloat16) {
    fn(at::BFloat16());
  } else if (tensor.scalar_type() == at::kFloat) {
    fn(float());
  } else {
    TORCH_CHECK(false, "the MoT mixing kernels take bfloat16 or float32 activations, got ", tensor.scalar_type());
  }
}

void check_shapes(const at::Tensor& tokens, const at::Tensor& expert_rows, const at::Tensor& weights) {
  TORCH_CHECK(tokens.dim() == 4 && expert_rows.dim() == 3 && weights.dim() == 4,
              "expected tokens [n, G, S, d], expert rows [E, n*S, d] and weights [n, G, S, E]");
  TORCH_CHECK(tokens.is_contiguous() && expert_rows.is_contiguous() && weights.is_contiguous(),
              "the MoT mixing kernels take contiguous tensors");
  TORCH_CHECK(weights.scalar_type() == at::kFloat, "the mixing weights must be float32");
  TORCH_CHECK(tokens.scalar_type() == expert_rows.scalar_type(), "tokens and expert rows must share a dtype");
  const int64_t n = weights.size(0), G = weights.size(1), S = weights.size(2), E = weights.size(3);
  TORCH_CHECK(tokens.size(0) == n && tokens.size(1) == G && tokens.size(2) == S, "tokens do not match the weights");
  TORCH_CHECK(expert_rows.size(0) == E && expert_rows.size(1) == n * S && expert_rows.size(2) == tokens.size(3),
              "expert rows do not match the tokens and weights");
  TORCH_CHECK(G % kBlock == 0 && E % kBlock == 0 && tokens.size(3) % (kBlock * kLanes) == 0,
              "the MoT mixing kernels need group_size and num_experts divisible by 4 and hidden_size by 64");
}

}  // namespace

// One pass over the blocks, each block on one thread (so the results do not depend on the thread count).
//  - with do_mix: merge (to_experts: tokens -> expert_rows) or emit (expert_rows -> tokens), into the preallocated
//    output;
//  - with dot_out: dot_out[n, g, s, e] = dot_tokens[n, g, s] . dot_rows[e, p] (the mixing weights' gradient),
//    computed while the block is in cache: in a backward pass one of the two is the mix's input.
void mixing_pass(const at::Tensor& tokens, const at::Tensor& expert_rows, const at::Tensor& weights, bool do_mix,
                 bool to_experts, const at::Tensor* dot_tokens, const at::Tensor* dot_rows, const at::Tensor* dot_out) {
  check_shapes(tokens, expert_rows, weights);
  if (dot_out != nullptr) check_shapes(*dot_tokens, *dot_rows, *dot_out);
  const int64_t n = weights.size(0), G = weights.size(1), S = weights.size(2), E = weights.size(3);
  const int64_t d = tokens.size(3), num_blocks = n * S;
  TORCH_CHECK(dot_out == nullptr || dot_tokens->scalar_type() == tokens.scalar_type(), "dtypes differ");
  const float* w = weights.data_ptr<float>();
  dispatch(tokens, [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    scalar_t* token_data = tokens.data_ptr<scalar_t>();
    scalar_t* expert_data = expert_rows.data_ptr<scalar_t>();
    const scalar_t* dot_token_data = dot_out ? dot_tokens->data_ptr<scalar_t>() : nullptr;
    const scalar_t* dot_row_data = dot_out ? dot_rows->data_ptr<scalar_t>() : nullptr;
    float* dot_result = dot_out ? dot_out->data_ptr<float>() : nullptr;
    at::parallel_for(0, num_blocks, 4, [&](int64_t begin, int64_t end) {
      typename Kernels<scalar_t>::Mix mix_block;
      typename Kernels<scalar_t>::Dot dot_block;
      Prefetcher prefetch;
      std::vector<float> products(G * E);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t group = block / S, position = block % S;
        const int64_t first_token = group * G * S + position;  // token g of the block is first_token + g * S
        // Rows of this block in the token-major and the expert-major layout.
        auto token_rows = [&](auto* data, int64_t offset) { return Rows{data + (first_token + offset) * d, S * d}; };
        auto expert_block = [&](auto* data, int64_t offset) { return Rows{data + (block + offset) * d, num_blocks * d}; };
        prefetch.clear();
        if (block + 1 < end) {  // the next block's inputs
          if (do_mix && to_experts) prefetch.add(token_rows(token_data, 1), G, d);
          if (do_mix && !to_experts) prefetch.add(expert_block(expert_data, 1), E, d);
          if (dot_out) {  // in a backward pass one of these is the mix's input, queued already
            const void* mix_input = !do_mix ? nullptr : to_experts ? static_cast<const void*>(token_data) : expert_data;
            if (dot_token_data != mix_input) prefetch.add(token_rows(dot_token_data, 1), G, d);
            if (dot_row_data != mix_input) prefetch.add(expert_block(dot_row_data, 1), E, d);
          }
        }
        const Rows<const float> block_weights{w + first_token * E, S * E};
        if (do_mix && to_experts) {
          mix_block(token_rows(static_cast<const scalar_t*>(token_data), 0), G, block_weights, true,
                    expert_block(expert_data, 0), E, d, prefetch);
        } else if (do_mix) {
          mix_block(expert_block(static_cast<const scalar_t*>(expert_data), 0), E, block_weights, false,
                    token_rows(token_data, 0), G, d, prefetch);
        }
        if (dot_out) {
          dot_block(token_rows(dot_token_data, 0), G, expert_block(dot_row_data, 0), E, d, products.data(), prefetch);
          for (int64_t g = 0; g < G; ++g)
            std::memcpy(dot_result + (first_token + g * S) * E, products.data() + g * E, E * sizeof(float));
        }
      }
#ifdef MOT_AVX512_BF16
      _mm_sfence();  // the streaming stores are visible to the other threads once this thread's chunk returns
#endif
    });
  });
}

// Merge (to_experts: tokens [n, G, S, d] -> expert_rows [E, n*S, d]) or emit (the reverse), into the preallocated
// output. Given dot_out, also the dot products of dot_tokens and dot_rows (see mixing_pass).
void mix(const at::Tensor& tokens, const at::Tensor& expert_rows, const at::Tensor& weights, bool to_experts,
         const c10::optional<at::Tensor>& dot_tokens, const c10::optional<at::Tensor>& dot_rows,
         const c10::optional<at::Tensor>& dot_out) {
  const bool with_dots = dot_out.has_value();
  TORCH_CHECK(!with_dots || (dot_tokens.has_value() && dot_rows.has_value()), "dot_out needs dot_tokens and dot_rows");
  mixing_pass(tokens, expert_rows, weights, true, to_experts, with_dots ? &*dot_tokens : nullptr,
              with_dots ? &*dot_rows : nullptr, with_dots ? &*dot_out : nullptr);
}

// out [n, G, S, E] (float32) = tokens [n, G, S, d] . expert_rows [E, n*S, d] of the same block.
void dots(const at::Tensor& tokens, const at::Tensor& expert_rows, const at::Tensor& out) {
  mixing_pass(tokens, expert_rows, out, false, false, &tokens, &expert_rows, &out);
}

bool uses_avx512_bf16() {
#ifdef MOT_AVX512_BF16
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("mix", &mix, "merge (to_experts=True) or emit (False), writing into the other layout's tensor",
             pybind11::arg("tokens"), pybind11::arg("expert_rows"), pybind11::arg("weights"), pybind11::arg("to_experts"),
             pybind11::arg("dot_tokens") = pybind11::none(), pybind11::arg("dot_rows") = pybind11::none(),
             pybind11::arg("dot_out") = pybind11::none());
  module.def("dots", &dots, "the mixing weights' gradient: token . expert row of the same block");
  module.def("uses_avx512_bf16", &uses_avx512_bf16);
}

// Fused causal attention for XLA:CPU (forward and backward), called through the XLA FFI.
//
// Why this exists: on a CPU, XLA runs attention as separate whole-array ops (or, in
// prefjax.models.cpu.flash_attention, as a loop of small batched dots), so at 1024+ tokens
// the step time of small models is spent moving [block, block] score tiles through main
// memory and in per-op overhead. Here one call computes a whole query block against
// every key block it may see, with the score tile, its softmax and its product with V
// kept in the core's caches, and the two cores share the work through XLA's own
// intra-op thread pool. The math is flash attention's (online softmax forward, a
// backward that recomputes the probabilities from the saved log-sum-exp):
//
//   S = (Q scale) K^T,  P = exp(S - lse),  O = P V / rowsum,
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
//   dQ = dS K scale,  dK = dS^T (Q scale).
//
// Layouts (row-major): q [B, T, N, H], k and v [B, T, KV, H] (GQA: query head n uses
// kv head n / (N / KV)), out [B, T, N, H], lse [B, N, T]. float32 only; H a multiple of
// 16 up to 256. Which keys a query sees comes either as a mask [B, T, T] bool (true = may
// attend; it must exclude keys later than the query, which lets whole tiles above the
// diagonal be skipped), or, in the "layout" handlers, as per-token positions, segment ids
// and branches [B, T] int32 plus a sliding window (prefjax.models.attention.attention_mask
// and index_causal, computed here): then no [B, T, T] array exists anywhere, and each work
// item builds only the mask tiles it reads. Fully masked query rows (padding) get output 0
// and gradient 0.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <climits>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 64;   // query and key tile size
constexpr int kLanes = 16;   // floats per vector register (split by the compiler without AVX-512)

typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint8_t vb __attribute__((vector_size(kLanes)));

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// Horizontal sum and max by halving (two 8-lane halves, then four lanes), not a 16-step scalar chain:
// they run once per row of every score tile.
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
inline void halves(vf v, vf8& lo, vf8& hi) { std::memcpy(&lo, &v, sizeof lo); std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi); }
inline float hsum(vf v) {
  vf8 lo, hi; halves(v, lo, hi);
  const vf8 s = lo + hi;
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}
inline float hmax(vf v) {
  vf8 lo, hi; halves(v, lo, hi);
  const vf8 m = lo > hi ? lo : hi;
  return std::max(std::max(std::max(m[0], m[4]), std::max(m[1], m[5])), std::max(std::max(m[2], m[6]), std::max(m[3], m[7])));
}

// exp(x) for a vector: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor
// polynomial (relative error ~2e-7, below float32's rounding of the inputs), 2^n built in
// the exponent bits. Inputs are clamped to the normal range, so exp(-inf) gives ~1e-38;
// callers zero masked entries explicitly.
inline vf vexp(vf x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  x = x > splat(88.0f) ? splat(88.0f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// 16 mask bytes (0 or 1) as a vector comparison result: -1 where the key may be attended.
inline vi visible(const uint8_t* m) {
  vb b;
  std::memcpy(&b, m, sizeof b);
  return __builtin_convertvector(b, vi) != 0;
}

// c[64 x 64] = a[64 x H] b[H x 64]: the score tile (a = scaled queries or dO, b = K^T or V^T).
template <int H>
void tile_abt(const float* a, const float* bt, float* c) {
  for (int r = 0; r < kBlock; r += 4) {
    vf acc[4][4] = {};
    for (int h = 0; h < H; ++h) {
      const vf b0 = load(bt + h * kBlock), b1 = load(bt + h * kBlock + 16);
      const vf b2 = load(bt + h * kBlock + 32), b3 = load(bt + h * kBlock + 48);
      for (int i = 0; i < 4; ++i) {
        const vf x = splat(a[(r + i) * H + h]);
        acc[i][0] += x * b0; acc[i][1] += x * b1; acc[i][2] += x * b2; acc[i][3] += x * b3;
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) store(c + (r + i) * kBlock + j * 16, acc[i][j]);
  }
}

// c[64 x H] += a[64 x 64] m[64 x H], or a^T m with kTransposed (m and c rows contiguous, H floats each).
template <int H, bool kTransposed = false>
void tile_accumulate(const float* a, const float* m, float* c) {
  constexpr int V = H / kLanes;
  constexpr int R = std::max(1, std::min(8, 16 / V));
  for (int r = 0; r < kBlock; r += R) {
    vf acc[R][V];
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < V; ++v) acc[i][v] = load(c + (r + i) * H + v * kLanes);
    for (int j = 0; j < kBlock; ++j) {
      vf mv[V];
      for (int v = 0; v < V; ++v) mv[v] = load(m + j * H + v * kLanes);
      for (int i = 0; i < R; ++i) {
        const vf x = splat(kTransposed ? a[j * kBlock + r + i] : a[(r + i) * kBlock + j]);
        for (int v = 0; v < V; ++v) acc[i][v] += x * mv[v];
      }
    }
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < V; ++v) store(c + (r + i) * H + v * kLanes, acc[i][v]);
  }
}

struct Dims {
  int64_t batch, length, heads, kv_heads, head_dim, blocks;
  int64_t group() const { return heads / kv_heads; }
};

enum class Visibility { kNone, kPartial, kAll };

// Where the kernel learns which keys each query sees: a dense [B, T, T] mask, or the
// per-token layout the mask is made of (see the file comment). Key k is visible to query
// q when k <= q, both are in the same segment (not 0), 0 <= pos[q] - pos[k] < window, and
// the key's branch is 0 (shared prefix) or the query's.
struct MaskSource {
  const uint8_t* dense = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* segments = nullptr;
  const int32_t* branches = nullptr;
  int64_t window = 0;  // > 0: a key at most window - 1 positions back
};

// A view of mask bytes: row q, key k at base[(q - q_origin) * stride + (k - k_origin)].
struct MaskRef {
  const uint8_t* base;
  int64_t stride, q_origin, k_origin;
  const uint8_t* row(int64_t q, int64_t k0) const { return base + (q - q_origin) * stride + (k0 - k_origin); }
};

// The view of batch row b's mask over queries [q_lo, q_hi) and keys [k_lo, k_hi): the dense
// mask itself, or those bytes computed from the layout into `local` (0 past the sequence end).
MaskRef mask_view(const MaskSource& src, const Dims& d, int64_t b, int64_t q_lo, int64_t q_hi, int64_t k_lo,
                  int64_t k_hi, std::vector<uint8_t>& local) {
  if (src.dense != nullptr) return {src.dense + b * d.length * d.length, d.length, 0, 0};
  const int64_t cols = k_hi - k_lo;
  local.assign((q_hi - q_lo) * cols, 0);
  const int32_t* pos = src.positions + b * d.length;
  const int32_t* seg = src.segments + b * d.length;
  const int32_t* br = src.branches + b * d.length;
  const int32_t window = src.window > 0 ? static_cast<int32_t>(std::min<int64_t>(src.window, INT32_MAX)) : INT32_MAX;
  for (int64_t q = q_lo; q < std::min(q_hi, d.length); ++q) {
    const int32_t sq = seg[q], pq = pos[q], bq = br[q];
    if (sq == 0) continue;  // a padding query sees nothing
    uint8_t* out = local.data() + (q - q_lo) * cols;
    const int64_t end = std::min({k_hi, d.length, q + 1});
    // Branch-free, so that the compiler vectorises it: the rule in MaskSource's comment.
    for (int64_t k = k_lo; k < end; ++k) {
      const int32_t delta = pq - pos[k];
      out[k - k_lo] = (seg[k] == sq) & (delta >= 0) & (delta < window) & ((br[k] == 0) | (br[k] == bq));
    }
  }
  return {local.data(), cols, q_lo, k_lo};
}

// Rows [q0, q0 + 64) against keys [k0, k0 + 64): may no pair attend, some, or every (real)
// query every key? Fully visible tiles skip the per-element mask; a tile reaching past the
// sequence's end is never fully visible (its padding keys must be masked).
Visibility tile_visibility(const MaskRef& mask, const Dims& d, int64_t q0, int64_t k0) {
  const int64_t rows = std::min<int64_t>(kBlock, d.length - q0), cols = std::min<int64_t>(kBlock, d.length - k0);
  int any = 0, all = cols == kBlock;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = mask.row(q0 + r, k0);
    for (int64_t c = 0; c < cols; ++c) { any |= row[c]; all &= row[c]; }
  }
  return !any ? Visibility::kNone : all ? Visibility::kAll : Visibility::kPartial;
}

// The tile's mask transposed (out[j * 64 + r] = may query q0 + r see key k0 + j), 0 past the end.
void mask_tile_transposed(const MaskRef& mask, const Dims& d, int64_t q0, int64_t k0, uint8_t* out) {
  std::memset(out, 0, kBlock * kBlock);
  const int64_t rows = std::min<int64_t>(kBlock, d.length - q0), cols = std::min<int64_t>(kBlock, d.length - k0);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = mask.row(q0 + r, k0);
    for (int64_t c = 0; c < cols; ++c) out[c * kBlock + r] = row[c];
  }
}

// One mask row of a tile, padded with "masked" past the end of the sequence.
void mask_row(const MaskRef& mask, const Dims& d, int64_t q, int64_t k0, uint8_t* out) {
  const int64_t cols = std::min<int64_t>(kBlock, d.length - k0);
  std::memcpy(out, mask.row(q, k0), cols);
  std::memset(out + cols, 0, kBlock - cols);
}

// Copies rows [0, T) of head `head` of x [B, T, heads, H] (batch row b) into a zero-padded
// [blocks * 64, H] buffer, times `scale`.
void gather_head(const float* x, const Dims& d, int64_t heads, int64_t b, int64_t head, float scale, float* out) {
  const int64_t h = d.head_dim;
  for (int64_t t = 0; t < d.blocks * kBlock; ++t) {
    float* dst = out + t * h;
    if (t >= d.length) { std::memset(dst, 0, h * sizeof(float)); continue; }
    const float* src = x + ((b * d.length + t) * heads + head) * h;
    for (int64_t i = 0; i < h; ++i) dst[i] = src[i] * scale;
  }
}

// [blocks * 64, H] rows -> per block [H, 64] (the transposed tiles tile_abt reads).
void transpose_blocks(const float* rows, const Dims& d, float* out) {
  const int64_t h = d.head_dim;
  for (int64_t kb = 0; kb < d.blocks; ++kb)
    for (int64_t j = 0; j < kBlock; ++j)
      for (int64_t i = 0; i < h; ++i) out[(kb * h + i) * kBlock + j] = rows[(kb * kBlock + j) * h + i];
}

// Runs fn(0..n-1) on the calling thread and on XLA's intra-op pool. The caller never waits
// for a helper that has not started (both pool threads may be busy with other ops), only
// for helpers that took an item; late helpers find no items and touch nothing of this call.
void parallel_for(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};
    int64_t n = 0;
    const std::function<void(int64_t)>* fn = nullptr;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = &fn;
  auto work = [](State& s) {
    s.active.fetch_add(1);
    for (int64_t i = s.next.fetch_add(1); i < s.n; i = s.next.fetch_add(1)) (*s.fn)(i);
    s.active.fetch_sub(1);
  };
  const int64_t helpers = std::min<int64_t>(std::max<int64_t>(pool.num_threads(), 1), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, work] { work(*state); });
  work(*state);
  while (state->active.load() != 0) std::this_thread::yield();
}

template <int H>
void forward_item(const float* q, const float* k, const float* v, const MaskSource& source, float scale,
                  const Dims& d, int64_t item, float* out, float* lse) {
  const int64_t qb = item % d.blocks, kh = (item / d.blocks) % d.kv_heads, b = item / (d.blocks * d.kv_heads);
  const int64_t q0 = qb * kBlock, rows = std::min<int64_t>(kBlock, d.length - q0);
  std::vector<uint8_t> local;
  const MaskRef mask = mask_view(source, d, b, q0, q0 + kBlock, 0, (qb + 1) * kBlock, local);
  Dims visible_dims = d;
  visible_dims.blocks = qb + 1;  // causal: only key blocks up to this query block
  std::vector<float> k_rows((qb + 1) * kBlock * H), kt((qb + 1) * kBlock * H), v_rows((qb + 1) * kBlock * H);
  gather_head(k, visible_dims, d.kv_heads, b, kh, 1.0f, k_rows.data());
  transpose_blocks(k_rows.data(), visible_dims, kt.data());
  gather_head(v, visible_dims, d.kv_heads, b, kh, 1.0f, v_rows.data());
  alignas(64) float qs[kBlock * H], acc[kBlock * H], s[kBlock * kBlock];
  alignas(64) float m[kBlock], l[kBlock], m_new[kBlock], corr[kBlock];
  alignas(64) uint8_t mtile[kBlock * kBlock];
  // Which key tiles this query block sees: the same for every query head of the group.
  std::vector<Visibility> seen_tiles(qb + 1);
  for (int64_t kb = 0; kb <= qb; ++kb) seen_tiles[kb] = tile_visibility(mask, d, q0, kb * kBlock);
  for (int64_t g = 0; g < d.group(); ++g) {
    const int64_t n = kh * d.group() + g;
    for (int64_t r = 0; r < kBlock; ++r) {
      float* dst = qs + r * H;
      if (r >= rows) { std::memset(dst, 0, H * sizeof(float)); continue; }
      const float* src = q + ((b * d.length + q0 + r) * d.heads + n) * H;
      for (int i = 0; i < H; ++i) dst[i] = src[i] * scale;
    }
    std::fill(m, m + kBlock, kNegInf);
    std::fill(l, l + kBlock, 0.0f);
    std::memset(acc, 0, sizeof acc);
    for (int64_t kb = 0; kb <= qb; ++kb) {
      const int64_t k0 = kb * kBlock;
      const Visibility seen = seen_tiles[kb];
      if (seen == Visibility::kNone) continue;
      tile_abt<H>(qs, kt.data() + kb * kBlock * H, s);
      // Pass 1: each row's new running max (rows past the sequence end see nothing).
      for (int64_t r = 0; r < kBlock; ++r) {
        uint8_t* mrow = mtile + r * kBlock;
        if (r >= rows) { std::memset(mrow, 0, kBlock); m_new[r] = kNegInf; continue; }
        if (seen == Visibility::kAll) std::memset(mrow, 1, kBlock);
        else mask_row(mask, d, q0 + r, k0, mrow);
        const float* srow = s + r * kBlock;
        vf tile_max = splat(kNegInf);
        for (int c = 0; c < kBlock; c += kLanes) {
          const vf x = load(srow + c);
          tile_max = visible(mrow + c) ? (x > tile_max ? x : tile_max) : tile_max;
        }
        m_new[r] = std::max(m[r], hmax(tile_max));
      }
      // The rescaling of the rows' sums and outputs, exp(m - m_new), 16 rows at a time rather
      // than one scalar exp per row (at small head_dim that cost as much as the tile product).
      // A row that has seen no key yet keeps factor 1 (its sums are 0; -inf - -inf is NaN).
      for (int r = 0; r < kBlock; r += kLanes) {
        const vf now = load(m_new + r);
        store(corr + r, now == splat(kNegInf) ? splat(1.0f) : vexp(load(m + r) - now));
      }
      // Pass 2: probabilities, row sums, rescaled outputs.
      for (int64_t r = 0; r < kBlock; ++r) {
        float* srow = s + r * kBlock;
        const uint8_t* mrow = mtile + r * kBlock;
        if (m_new[r] == kNegInf) { std::memset(srow, 0, kBlock * sizeof(float)); continue; }
        vf total = {};
        for (int c = 0; c < kBlock; c += kLanes) {
          const vf p = visible(mrow + c) ? vexp(load(srow + c) - m_new[r]) : splat(0.0f);
          total += p;
          store(srow + c, p);
        }
        l[r] = l[r] * corr[r] + hsum(total);
        m[r] = m_new[r];
        if (corr[r] != 1.0f)
          for (int i = 0; i < H; ++i) acc[r * H + i] *= corr[r];
      }
      tile_accumulate<H>(s, v_rows.data() + k0 * H, acc);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = out + ((b * d.length + q0 + r) * d.heads + n) * H;
      const float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
      for (int i = 0; i < H; ++i) dst[i] = acc[r * H + i] * inv;
      lse[(b * d.heads + n) * d.length + q0 + r] = l[r] > 0 ? m[r] + std::log(l[r]) : 0.0f;
    }
  }
}

template <int H>
void backward_item(const float* q, const float* k, const float* v, const MaskSource& source, const float* out,
                   const float* lse, const float* d_out, float scale, const Dims& d, int64_t item,
                   float* dq, float* dk, float* dv) {
  // Works on transposed tiles (keys down, queries across: S^T = K (Q scale)^T, dP^T = V dO^T)
  // so that dV, dK and dQ are all plain tile products with no tile transposes.
  const int64_t kh = item % d.kv_heads, b = item / d.kv_heads;
  const int64_t padded = d.blocks * kBlock;
  std::vector<float> k_rows(padded * H), v_rows(padded * H), o_rows(padded * H);
  std::vector<float> qs(padded * H), qst(padded * H), dos(padded * H), dot(padded * H), dq_rows(padded * H);
  std::vector<float> dk_rows(padded * H, 0.0f), dv_rows(padded * H, 0.0f);
  std::vector<float> lse_rows(padded, 0.0f), delta(padded, 0.0f);
  gather_head(k, d, d.kv_heads, b, kh, 1.0f, k_rows.data());
  gather_head(v, d, d.kv_heads, b, kh, 1.0f, v_rows.data());
  alignas(64) float pt[kBlock * kBlock], dst[kBlock * kBlock];
  alignas(64) uint8_t mt[kBlock * kBlock];
  // Per key block, the mask column [queries from k0 on, keys k0 .. k0 + 63], built once for all heads.
  std::vector<std::vector<uint8_t>> local(d.blocks);
  std::vector<MaskRef> masks;
  // and which of its tiles (key block kb, query block qb >= kb) any query sees, also shared by the heads.
  std::vector<Visibility> seen_tiles(d.blocks * d.blocks, Visibility::kNone);
  for (int64_t kb = 0; kb < d.blocks; ++kb) {
    masks.push_back(mask_view(source, d, b, kb * kBlock, padded, kb * kBlock, (kb + 1) * kBlock, local[kb]));
    for (int64_t qb = kb; qb < d.blocks; ++qb)
      seen_tiles[kb * d.blocks + qb] = tile_visibility(masks[kb], d, qb * kBlock, kb * kBlock);
  }
  for (int64_t g = 0; g < d.group(); ++g) {
    const int64_t n = kh * d.group() + g;
    gather_head(q, d, d.heads, b, n, scale, qs.data());
    transpose_blocks(qs.data(), d, qst.data());
    gather_head(d_out, d, d.heads, b, n, 1.0f, dos.data());
    transpose_blocks(dos.data(), d, dot.data());
    gather_head(out, d, d.heads, b, n, 1.0f, o_rows.data());
    for (int64_t t = 0; t < d.length; ++t) {
      lse_rows[t] = lse[(b * d.heads + n) * d.length + t];
      float s = 0;
      for (int i = 0; i < H; ++i) s += dos[t * H + i] * o_rows[t * H + i];
      delta[t] = s;  // rowsum(dO * O); padding rows keep lse = delta = 0 and have dO = 0
    }
    std::fill(dq_rows.begin(), dq_rows.end(), 0.0f);
    for (int64_t kb = 0; kb < d.blocks; ++kb) {
      const int64_t k0 = kb * kBlock;
      const MaskRef& mask = masks[kb];
      for (int64_t qb = kb; qb < d.blocks; ++qb) {
        const int64_t q0 = qb * kBlock;
        const Visibility seen = seen_tiles[kb * d.blocks + qb];
        if (seen == Visibility::kNone) continue;
        tile_abt<H>(k_rows.data() + k0 * H, qst.data() + q0 * H, pt);
        tile_abt<H>(v_rows.data() + k0 * H, dot.data() + q0 * H, dst);
        if (seen == Visibility::kPartial) mask_tile_transposed(mask, d, q0, k0, mt);
        for (int64_t j = 0; j < kBlock; ++j) {
          float* prow = pt + j * kBlock;
          float* dsrow = dst + j * kBlock;
          for (int c = 0; c < kBlock; c += kLanes) {
            vf p = vexp(load(prow + c) - load(lse_rows.data() + q0 + c));
            if (seen == Visibility::kPartial) p = visible(mt + j * kBlock + c) ? p : splat(0.0f);
            store(prow + c, p);
            store(dsrow + c, p * (load(dsrow + c) - load(delta.data() + q0 + c)));  // dS^T over dP^T
          }
        }
        tile_accumulate<H>(pt, dos.data() + q0 * H, dv_rows.data() + k0 * H);
        tile_accumulate<H>(dst, qs.data() + q0 * H, dk_rows.data() + k0 * H);
        tile_accumulate<H, true>(dst, k_rows.data() + k0 * H, dq_rows.data() + q0 * H);
      }
    }
    for (int64_t t = 0; t < d.length; ++t) {
      float* dst_row = dq + ((b * d.length + t) * d.heads + n) * H;
      for (int i = 0; i < H; ++i) dst_row[i] = dq_rows[t * H + i] * scale;
    }
  }
  for (int64_t t = 0; t < d.length; ++t) {
    const int64_t at = ((b * d.length + t) * d.kv_heads + kh) * H;
    std::memcpy(dk + at, dk_rows.data() + t * H, H * sizeof(float));
    std::memcpy(dv + at, dv_rows.data() + t * H, H * sizeof(float));
  }
}

// Calls body.template operator()<H>() for the supported head sizes.
template <typename Body>
bool with_head_dim(int64_t h, Body&& body) {
  switch (h) {
    case 16: body.template operator()<16>(); return true;
    case 32: body.template operator()<32>(); return true;
    case 48: body.template operator()<48>(); return true;
    case 64: body.template operator()<64>(); return true;
    case 80: body.template operator()<80>(); return true;
    case 96: body.template operator()<96>(); return true;
    case 128: body.template operator()<128>(); return true;
    case 256: body.template operator()<256>(); return true;
    default: return false;
  }
}

ffi::Error check_dims(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k, ffi::Span<const int64_t> v,
                      ffi::Span<const int64_t> mask, Dims* d) {
  if (q.size() != 4 || k.size() != 4 || v.size() != 4)
    return ffi::Error::InvalidArgument("prefjax fused attention: expected q, k, v of rank 4");
  d->batch = q[0]; d->length = q[1]; d->heads = q[2]; d->head_dim = q[3]; d->kv_heads = k[2];
  d->blocks = (d->length + kBlock - 1) / kBlock;
  for (int i = 0; i < 4; ++i)
    if (k[i] != v[i] || (i != 2 && k[i] != q[i]))
      return ffi::Error::InvalidArgument("prefjax fused attention: q, k, v shapes disagree");
  if (d->kv_heads <= 0 || d->heads % d->kv_heads)
    return ffi::Error::InvalidArgument("prefjax fused attention: query heads not a multiple of kv heads");
  if (mask.size() == 3 && (mask[0] != d->batch || mask[1] != d->length || mask[2] != d->length))
    return ffi::Error::InvalidArgument("prefjax fused attention: mask must be [B, T, T]");
  if (mask.size() == 2 && (mask[0] != d->batch || mask[1] != d->length))
    return ffi::Error::InvalidArgument("prefjax fused attention: positions, segments, branches must be [B, T]");
  if (mask.size() != 2 && mask.size() != 3)
    return ffi::Error::InvalidArgument("prefjax fused attention: expected a [B, T, T] mask or a [B, T] layout");
  return ffi::Error::Success();
}

ffi::Error RunForward(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                      ffi::Buffer<ffi::F32>& v, ffi::Span<const int64_t> mask_dims, const MaskSource& source,
                      float scale, ffi::ResultBuffer<ffi::F32>& out, ffi::ResultBuffer<ffi::F32>& lse) {
  Dims d;
  if (ffi::Error e = check_dims(q.dimensions(), k.dimensions(), v.dimensions(), mask_dims, &d); e.failure())
    return e;
  bool ok = with_head_dim(d.head_dim, [&]<int H>() {
    parallel_for(pool, d.batch * d.kv_heads * d.blocks, [&](int64_t item) {
      // Largest query blocks first (they see the most keys), so the last items are short.
      const int64_t qb = d.blocks - 1 - item % d.blocks, rest = item / d.blocks;
      forward_item<H>(q.typed_data(), k.typed_data(), v.typed_data(), source, scale, d, rest * d.blocks + qb,
                      out->typed_data(), lse->typed_data());
    });
  });
  if (!ok) return ffi::Error::InvalidArgument("prefjax fused attention: unsupported head_dim " + std::to_string(d.head_dim));
  return ffi::Error::Success();
}

ffi::Error RunBackward(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                       ffi::Buffer<ffi::F32>& v, ffi::Span<const int64_t> mask_dims, const MaskSource& source,
                       ffi::Buffer<ffi::F32>& out, ffi::Buffer<ffi::F32>& lse, ffi::Buffer<ffi::F32>& d_out,
                       float scale, ffi::ResultBuffer<ffi::F32>& dq, ffi::ResultBuffer<ffi::F32>& dk,
                       ffi::ResultBuffer<ffi::F32>& dv) {
  Dims d;
  if (ffi::Error e = check_dims(q.dimensions(), k.dimensions(), v.dimensions(), mask_dims, &d); e.failure())
    return e;
  bool ok = with_head_dim(d.head_dim, [&]<int H>() {
    parallel_for(pool, d.batch * d.kv_heads, [&](int64_t item) {
      backward_item<H>(q.typed_data(), k.typed_data(), v.typed_data(), source, out.typed_data(), lse.typed_data(),
                       d_out.typed_data(), scale, d, item, dq->typed_data(), dk->typed_data(), dv->typed_data());
    });
  });
  if (!ok) return ffi::Error::InvalidArgument("prefjax fused attention: unsupported head_dim " + std::to_string(d.head_dim));
  return ffi::Error::Success();
}

MaskSource dense_source(ffi::Buffer<ffi::PRED>& mask) {
  MaskSource source;
  source.dense = reinterpret_cast<const uint8_t*>(mask.typed_data());
  return source;
}

MaskSource layout_source(ffi::Buffer<ffi::S32>& positions, ffi::Buffer<ffi::S32>& segments,
                         ffi::Buffer<ffi::S32>& branches, int64_t window) {
  MaskSource source;
  source.positions = positions.typed_data();
  source.segments = segments.typed_data();
  source.branches = branches.typed_data();
  source.window = window;
  return source;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::PRED> mask, float scale, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse) {
  return RunForward(pool, q, k, v, mask.dimensions(), dense_source(mask), scale, out, lse);
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> d_out, float scale, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  return RunBackward(pool, q, k, v, mask.dimensions(), dense_source(mask), out, lse, d_out, scale, dq, dk, dv);
}

ffi::Error LayoutForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> segments,
                         ffi::Buffer<ffi::S32> branches, float scale, int64_t window,
                         ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  if (segments.dimensions() != positions.dimensions() || branches.dimensions() != positions.dimensions())
    return ffi::Error::InvalidArgument("prefjax fused attention: positions, segments, branches shapes differ");
  return RunForward(pool, q, k, v, positions.dimensions(), layout_source(positions, segments, branches, window),
                    scale, out, lse);
}

ffi::Error LayoutBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> segments,
                          ffi::Buffer<ffi::S32> branches, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                          ffi::Buffer<ffi::F32> d_out, float scale, int64_t window, ffi::ResultBuffer<ffi::F32> dq,
                          ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  if (segments.dimensions() != positions.dimensions() || branches.dimensions() != positions.dimensions())
    return ffi::Error::InvalidArgument("prefjax fused attention: positions, segments, branches shapes differ");
  return RunBackward(pool, q, k, v, positions.dimensions(), layout_source(positions, segments, branches, window),
                     out, lse, d_out, scale, dq, dk, dv);
}

}  // namespace

// The four handlers' bindings share their parts: q, k, v (with the thread pool) first, then
// the mask (a [B, T, T] bool array, or the layout's positions, segments, branches), then,
// for the backward, out, lse and d_out; the attributes and results close each chain.
namespace {

using F32Buffer = ffi::Buffer<ffi::F32>;
using S32Buffer = ffi::Buffer<ffi::S32>;

auto BindQkv() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32Buffer>().Arg<F32Buffer>().Arg<F32Buffer>(); }

template <typename Binding>
auto WithLayout(Binding binding) {
  return std::move(binding).template Arg<S32Buffer>().template Arg<S32Buffer>().template Arg<S32Buffer>();
}

template <typename Binding>
auto WithOutLseDout(Binding binding) {
  return std::move(binding).template Arg<F32Buffer>().template Arg<F32Buffer>().template Arg<F32Buffer>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrefjaxAttentionForward, Forward,
                              BindQkv()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrefjaxAttentionBackward, Backward,
                              WithOutLseDout(BindQkv().Arg<ffi::Buffer<ffi::PRED>>())
                                  .Attr<float>("scale")
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrefjaxAttentionLayoutForward, LayoutForward,
                              WithLayout(BindQkv())
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrefjaxAttentionLayoutBackward, LayoutBackward,
                              WithOutLseDout(WithLayout(BindQkv()))
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>());

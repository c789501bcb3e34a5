// Ragged paged attention for CPUs, as an XLA FFI custom call (built and registered by cpu.py).
//
// Same contract as `attend` in reference.py: every new token attends causally to its sequence's
// context from before this step (read from the paged cache, which is never written here) and to the
// step's own tokens (read from `k` / `v`), with an optional sliding window and logit soft-cap. Tokens
// past cu_q_lens[num_seqs] get zero rows.
//
// Why a native kernel on CPU: XLA:CPU has to gather every page into a dense block before its batched
// dots, and its dots with 1-8 query rows per KV head run at a few GFLOP/s; here each KV page is read
// once, in place, by the (query block, KV head) that needs it, and the online softmax runs on it while
// it is still in L1.
//
// Work is split into items (sequence, block of up to kQueryBlock of its new tokens, KV head), spread
// over threads by an atomic counter, largest first. Keys come in chunks of 16, transposed (`kT[d][j]`),
// so a query row's 16 scores are one vector accumulated over d with no horizontal sums, and chunks are
// folded a block of up to 64 keys at a time (flash-attention style, in registers through GCC / Clang
// vector extensions: zmm with AVX-512, else 8-float vectors): Q.K^T for 8 (AVX2: 4) query rows per key
// load, one online-softmax rescale per row per block, masks only in blocks that some row does not see
// whole (the diagonal, a window's edge, a partial page), and P.V with 4 rows x 64 outputs held in
// registers across the block's keys. The serving layout (`kLayoutHeadMajorKT`) stores K pages
// transposed, so they are read in place; the step's own keys are transposed once per call, other
// layouts chunk by chunk into a small buffer. All indices read from the metadata are clamped: bad
// metadata can give wrong numbers, never an out-of-bounds read.

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "native_vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kQueryBlock = 16;       // new tokens of one sequence per work item
constexpr int64_t kLanes = 16;            // keys per chunk: one score vector
constexpr int64_t kThreadWork = 1 << 15;  // (query row x key) pairs below which one thread is enough

// Cache layouts (the `layout` attribute), [layers, pages, ...] then:
constexpr int64_t kLayoutTokenMajor = 0;   // [page_size, 2 * kv_heads, head_dim]
constexpr int64_t kLayoutHeadMajor = 1;    // [2 * kv_heads, page_size, head_dim]
constexpr int64_t kLayoutHeadMajorKT = 2;  // [2 * kv_heads, page_size * head_dim], K as [head_dim, page_size]

struct Problem {
  const float* q;        // [T, Hq, D]
  const float* k_new;    // [T, Hkv, D]
  const float* v_new;    // [T, Hkv, D]
  const void* cache;     // [L, P, ...] in `layout`, float32 or bfloat16
  const int32_t* kv_lens;
  const int32_t* page_indices;  // [S, pages_per_seq]
  const int32_t* cu_q_lens;     // [S + 1]
  float* out;                   // [T, Hq, D]
  int64_t layer, num_layers, num_pages, page_size, num_tokens, q_heads, kv_heads, group, head_dim;
  int64_t pages_per_seq, layout;
  float sm_scale, soft_cap;
  int64_t window;  // 0: none
};

struct Item {
  int64_t seq, t0, t1, head;  // tokens [t0, t1) of sequence `seq`, KV head `head`
  int64_t seq_start, prior;   // the sequence's first new token, its cached context length
};

// Native vectors (kernels/native_vectors.h): one zmm with AVX-512, else 8 floats (two ymm halves of a
// chunk's 16 lanes with AVX2, two q registers on ARM).
using native::ivec;
using native::load;
using native::splat;
using native::store;
using native::vec;
using native::widen;
constexpr int kVL = native::kVectorLanes;
constexpr int kScoreVecs = kLanes / kVL;  // vectors per row of a chunk's scores
constexpr int kScoreRows = kVL == 16 ? 8 : 4;  // query rows per pass of Q.K^T: 8 accumulators
constexpr int kValueRows = 4;                  // query rows per pass of P.V
constexpr int kValueVecs = kVL == 16 ? 4 : 2;  // output vectors per row per pass of P.V

inline float hmax(vec v) {
  float m = v[0];
  for (int i = 1; i < kVL; ++i) m = std::max(m, v[i]);
  return m;
}
inline float hsum(vec v) {
  float s = 0.0f;
  for (int i = 0; i < kVL; ++i) s += v[i];
  return s;
}
inline vec vmax(vec a, vec b) { return a > b ? a : b; }

// exp for x <= 0 (softmax arguments), on a vector: 2^n * p(r) with a degree-6 polynomial on
// |r| <= ln(2)/2, relative error below 2e-7. n = round(x / ln 2) by truncating 0.5 - x / ln 2 >= 0
// (float-to-int conversion truncates; the 1.5 * 2^23 trick is folded away under -fassociative-math).
inline vec vexp_nonpositive(vec x) {
  x = vmax(x, splat(-87.0f));
  const ivec neg_n = __builtin_convertvector(0.5f - x * 1.4426950408889634f, ivec);
  const vec n = -__builtin_convertvector(neg_n, vec);
  const vec r = x - n * 0.693145751953125f - n * 1.4286068203094172e-06f;
  vec p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const ivec bits = (127 - neg_n) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Keys are folded a block at a time: up to kBlockChunks chunks of up to 16 keys at consecutive
// positions (whole pages of the cache, or runs of the step's own keys), one softmax rescale per row
// per block. A chunk: K transposed (`kt[d * kt_stride + j]`, 16 readable lanes per row; lanes >= nk
// are masked) and V rows `v_stride` elements apart, float or bfloat16 bits widened as loaded.
constexpr int kBlockChunks = 4;
constexpr int64_t kBlockKeys = kBlockChunks * kLanes;

template <typename KT, typename VT>
struct Chunk {
  const KT* kt;
  int64_t kt_stride;
  const VT* v;
  int64_t v_stride, nk, kpos0;
};

template <typename KT, typename VT>
struct Block {
  Chunk<KT, VT> c[kBlockChunks];
  int n = 0;
};

// Online-softmax state and scratch of one work item.
struct State {
  std::vector<float> q, m, l, corr, acc, s, kt;
  explicit State(const Problem& p)
      : q(kQueryBlock * p.group * p.head_dim), m(kQueryBlock * p.group), l(kQueryBlock * p.group),
        corr(kQueryBlock * p.group), acc(kQueryBlock * p.group * p.head_dim), s(kQueryBlock * p.group * kBlockKeys),
        kt(kBlockChunks * p.head_dim * kLanes) {}
};

// Scores of `R` query rows (`q`, D apart) against one chunk, into `s` (rows `W` apart).
template <int64_t kD, int R, typename KT>
inline void chunk_scores(const float* q, int64_t D, const KT* kt, int64_t kt_stride, float* s, int64_t W) {
  vec acc[R][kScoreVecs] = {};
  for (int64_t d = 0; d < (kD > 0 ? kD : D); ++d) {
    vec k[kScoreVecs];
    for (int n = 0; n < kScoreVecs; ++n) k[n] = load(kt + d * kt_stride + n * kVL);
    for (int i = 0; i < R; ++i) {
      const vec qd = splat(q[i * D + d]);
      for (int n = 0; n < kScoreVecs; ++n) acc[i][n] += qd * k[n];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int n = 0; n < kScoreVecs; ++n) store(s + i * W + n * kVL, acc[i][n]);
}

template <int64_t kD, typename KT, typename VT>
void block_scores(const float* q, int64_t D, const Block<KT, VT>& b, float* s, int64_t rows) {
  const int64_t W = kBlockKeys;
  for (int ci = 0; ci < b.n; ++ci) {
    const Chunk<KT, VT>& c = b.c[ci];
    int64_t r = 0;
    for (; r + kScoreRows <= rows; r += kScoreRows)
      chunk_scores<kD, kScoreRows>(q + r * D, D, c.kt, c.kt_stride, s + r * W + ci * kLanes, W);
    const float* qr = q + r * D;
    float* sr = s + r * W + ci * kLanes;
    switch (rows - r) {  // the rows left over: a decode step's `group` rows, say
      case 7: chunk_scores<kD, 7>(qr, D, c.kt, c.kt_stride, sr, W); break;
      case 6: chunk_scores<kD, 6>(qr, D, c.kt, c.kt_stride, sr, W); break;
      case 5: chunk_scores<kD, 5>(qr, D, c.kt, c.kt_stride, sr, W); break;
      case 4: chunk_scores<kD, 4>(qr, D, c.kt, c.kt_stride, sr, W); break;
      case 3: chunk_scores<kD, 3>(qr, D, c.kt, c.kt_stride, sr, W); break;
      case 2: chunk_scores<kD, 2>(qr, D, c.kt, c.kt_stride, sr, W); break;
      case 1: chunk_scores<kD, 1>(qr, D, c.kt, c.kt_stride, sr, W); break;
      default: break;
    }
  }
}

// acc[R rows][d0, d0 + V * kVL) = acc * corr + P.V over the block's keys.
template <int R, int V, typename KT, typename VT>
inline void block_values(const float* s, const Block<KT, VT>& b, float* acc, int64_t D, const float* corr,
                         int64_t d0) {
  vec a[R][V];
  for (int i = 0; i < R; ++i) {
    const vec ci = splat(corr[i]);
    for (int t = 0; t < V; ++t) a[i][t] = load(acc + i * D + d0 + t * kVL) * ci;
  }
  for (int cn = 0; cn < b.n; ++cn) {
    const Chunk<KT, VT>& c = b.c[cn];
    for (int64_t j = 0; j < c.nk; ++j) {
      const VT* v = c.v + j * c.v_stride + d0;
      vec vv[V];
      for (int t = 0; t < V; ++t) vv[t] = load(v + t * kVL);
      for (int i = 0; i < R; ++i) {
        const vec pj = splat(s[i * kBlockKeys + cn * kLanes + j]);
        for (int t = 0; t < V; ++t) a[i][t] += pj * vv[t];
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int t = 0; t < V; ++t) store(acc + i * D + d0 + t * kVL, a[i][t]);
}

template <int R, typename KT, typename VT>
void rows_values(const float* s, const Block<KT, VT>& b, float* acc, int64_t D, const float* corr) {
  int64_t d0 = 0;
  for (; d0 + kValueVecs * kVL <= D; d0 += kValueVecs * kVL) block_values<R, kValueVecs>(s, b, acc, D, corr, d0);
  for (; d0 + kVL <= D; d0 += kVL) block_values<R, 1>(s, b, acc, D, corr, d0);
  for (; d0 < D; ++d0)  // a head_dim that is not a multiple of the vector width
    for (int i = 0; i < R; ++i) {
      float a = acc[i * D + d0] * corr[i];
      for (int cn = 0; cn < b.n; ++cn)
        for (int64_t j = 0; j < b.c[cn].nk; ++j)
          a += s[i * kBlockKeys + cn * kLanes + j] * widen(b.c[cn].v[j * b.c[cn].v_stride + d0]);
      acc[i * D + d0] = a;
    }
}

// Fold a block of keys into every query row of the item.
template <int64_t kD, typename KT, typename VT>
void fold_block(const Problem& p, const Item& it, State& st, const Block<KT, VT>& b) {
  const int64_t D = kD > 0 ? kD : p.head_dim, G = p.group, rows = (it.t1 - it.t0) * G;
  const int64_t q_first = it.prior + (it.t0 - it.seq_start), q_last = q_first + (it.t1 - it.t0) - 1;
  const Chunk<KT, VT>& tail = b.c[b.n - 1];
  const int64_t k_first = b.c[0].kpos0, k_last = tail.kpos0 + tail.nk - 1;
  if (k_first > q_last || (p.window > 0 && k_last <= q_first - p.window)) return;  // no row sees a key
  // Every row sees every key: no mask at all (most blocks of a long prompt).
  bool full = k_last <= q_first && (p.window == 0 || k_first > q_last - p.window);
  for (int i = 0; i < b.n; ++i) full &= b.c[i].nk == kLanes;

  float* s = st.s.data();
  block_scores<kD>(st.q.data(), D, b, s, rows);

  ivec lane;
  for (int j = 0; j < kVL; ++j) lane[j] = j;
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = s + r * kBlockKeys;
    if (p.soft_cap > 0.0f)
      for (int64_t j = 0; j < b.n * kLanes; ++j) sr[j] = p.soft_cap * std::tanh(sr[j] / p.soft_cap);
    const int64_t qpos = q_first + r / G;
    vec mx = splat(-INFINITY);
    if (full) {
      for (int64_t j = 0; j < b.n * kLanes; j += kVL) mx = vmax(mx, load(sr + j));
    } else {
      // Visible keys: lane < nk, kpos <= qpos and kpos > qpos - window. Masked lanes may hold NaN
      // (scores of slots past a sequence's end): selects, never arithmetic.
      for (int ci = 0; ci < b.n; ++ci) {
        const Chunk<KT, VT>& c = b.c[ci];
        const int64_t hi = std::min<int64_t>(c.nk, qpos - c.kpos0 + 1);
        const int64_t lo = p.window > 0 ? std::max<int64_t>(0, qpos - p.window + 1 - c.kpos0) : 0;
        for (int n = 0; n < kScoreVecs; ++n) {
          float* x = sr + ci * kLanes + n * kVL;
          const ivec j = lane + n * kVL;
          const vec masked = (j >= static_cast<int32_t>(lo) && j < static_cast<int32_t>(std::max<int64_t>(hi, -1)))
                                 ? load(x)
                                 : splat(-INFINITY);
          store(x, masked);
          mx = vmax(mx, masked);
        }
      }
    }
    const float block_max = hmax(mx);
    if (block_max == -INFINITY) {  // this row sees none of the block's keys
      for (int64_t j = 0; j < b.n * kLanes; j += kVL) store(sr + j, splat(0.0f));
      st.corr[r] = 1.0f;
      continue;
    }
    const float m_old = st.m[r], m_new = std::max(m_old, block_max);
    const vec m_vec = splat(m_new);
    vec sum = splat(0.0f);
    for (int64_t j = 0; j < b.n * kLanes; j += kVL) {
      const vec x = load(sr + j);
      vec e = vexp_nonpositive(x - m_vec);
      if (!full) e = x == splat(-INFINITY) ? splat(0.0f) : e;
      store(sr + j, e);
      sum += e;
    }
    const float correction = m_old == -INFINITY ? 0.0f : vexp_nonpositive(splat(m_old - m_new))[0];
    st.l[r] = st.l[r] * correction + hsum(sum);
    st.m[r] = m_new;
    st.corr[r] = correction;
  }

  float* acc = st.acc.data();
  int64_t r = 0;
  for (; r + kValueRows <= rows; r += kValueRows)
    rows_values<kValueRows>(s + r * kBlockKeys, b, acc + r * D, D, st.corr.data() + r);
  switch (rows - r) {
    case 3: rows_values<3>(s + r * kBlockKeys, b, acc + r * D, D, st.corr.data() + r); break;
    case 2: rows_values<2>(s + r * kBlockKeys, b, acc + r * D, D, st.corr.data() + r); break;
    case 1: rows_values<1>(s + r * kBlockKeys, b, acc + r * D, D, st.corr.data() + r); break;
    default: break;
  }
}

// Copy (and widen) `nk` keys' rows of K as a transposed chunk into `kt` (16 lanes, unused lanes zero).
template <typename T>
void transpose_keys(float* kt, int64_t D, const T* k, int64_t stride, int64_t nk) {
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = 0; j < kLanes; ++j) kt[d * kLanes + j] = j < nk ? widen(k[j * stride + d]) : 0.0f;
}

template <int64_t kD, typename CacheT>
void run_item(const Problem& p, const Item& it, State& st, const float* kt_new, int64_t kt_new_stride) {
  const int64_t D = kD > 0 ? kD : p.head_dim, G = p.group, H2 = 2 * p.kv_heads, ps = p.page_size;
  const int64_t nt = it.t1 - it.t0, rows = nt * G;
  for (int64_t i = 0; i < nt; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const float* src = p.q + ((it.t0 + i) * p.q_heads + it.head * G + g) * D;
      float* dst = st.q.data() + (i * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * p.sm_scale;
    }
  std::fill(st.m.begin(), st.m.begin() + rows, -INFINITY);
  std::fill(st.l.begin(), st.l.begin() + rows, 0.0f);
  std::fill(st.acc.begin(), st.acc.begin() + rows * D, 0.0f);

  // 1. The cached context [0, prior), page by page; keys before every row's window are skipped.
  const int64_t first_pos = it.prior + (it.t0 - it.seq_start);
  int64_t start = 0;
  if (p.window > 0) start = std::max<int64_t>(0, first_pos - p.window + 1);
  const int32_t* table = p.page_indices + it.seq * p.pages_per_seq;
  const int64_t page_floats = ps * H2 * D;
  auto page_base = [&](int64_t page_no) {
    const int64_t page = std::clamp<int64_t>(table[page_no], 0, p.num_pages - 1);
    return static_cast<const CacheT*>(p.cache) + (p.layer * p.num_pages + page) * page_floats;
  };
  const bool in_place = p.layout == kLayoutHeadMajorKT && ps % kLanes == 0;
  const int64_t pages = (it.prior + ps - 1) / ps;
  Block<CacheT, CacheT> in_place_block;
  Block<float, CacheT> copied_block;
  auto flush = [&] {
    if (in_place_block.n) fold_block<kD>(p, it, st, in_place_block);
    if (copied_block.n) fold_block<kD>(p, it, st, copied_block);
    in_place_block.n = copied_block.n = 0;
  };
  for (int64_t page_no = start / ps; page_no < pages; ++page_no) {
    const CacheT* base = page_base(page_no);
    const CacheT *k, *v;
    int64_t k_stride, v_stride;
    if (p.layout == kLayoutTokenMajor) {
      k = base + 2 * it.head * D;
      v = k + D;
      k_stride = v_stride = H2 * D;
    } else {
      k = base + 2 * it.head * ps * D;
      v = k + ps * D;
      k_stride = v_stride = D;
    }
    if (page_no + 1 < pages && p.layout != kLayoutTokenMajor) {
      // Pages are scattered in memory, so the hardware prefetcher cannot see the next one coming.
      const CacheT* next = page_base(page_no + 1) + 2 * it.head * ps * D;
      for (int64_t i = 0; i < 2 * ps * D; i += 64 / sizeof(CacheT)) __builtin_prefetch(next + i);  // a line each
    }
    const int64_t page_keys = std::min<int64_t>(ps, it.prior - page_no * ps);
    for (int64_t j0 = 0; j0 < page_keys; j0 += kLanes) {
      const int64_t nk = std::min(kLanes, page_keys - j0), kpos0 = page_no * ps + j0;
      const CacheT* v_rows = v + j0 * v_stride;
      if (in_place) {  // K^T rows are page_size elements apart
        in_place_block.c[in_place_block.n++] = {k + j0, ps, v_rows, v_stride, nk, kpos0};
        if (in_place_block.n == kBlockChunks || nk < kLanes) flush();
        continue;
      }
      float* kt = st.kt.data() + copied_block.n * D * kLanes;
      if (p.layout == kLayoutHeadMajorKT) {
        // K^T [D, ps] with pages narrower than a chunk: copy (and widen) this chunk's lanes.
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = 0; j < kLanes; ++j) kt[d * kLanes + j] = j < nk ? widen(k[d * ps + j0 + j]) : 0.0f;
      } else {
        transpose_keys(kt, D, k + j0 * k_stride, k_stride, nk);
      }
      copied_block.c[copied_block.n++] = {kt, kLanes, v_rows, v_stride, nk, kpos0};
      if (copied_block.n == kBlockChunks || nk < kLanes) flush();
    }
  }
  flush();

  // 2. The step's own tokens of this sequence, up to the block's last token: K^T from `kt_new`
  // (transposed once per call, [kv_heads][D][tokens]), V from `v_new`.
  const int64_t own_end = it.t1 - it.seq_start;  // keys [0, own_end) of this sequence's new tokens
  int64_t own_start = 0;
  if (p.window > 0) own_start = std::max<int64_t>(0, first_pos - p.window + 1 - it.prior);
  const int64_t stride = p.kv_heads * D;
  Block<float, float> own;
  for (int64_t j0 = own_start; j0 < own_end; j0 += kLanes) {
    const int64_t nk = std::min(kLanes, own_end - j0), t = it.seq_start + j0;
    own.c[own.n++] = {kt_new + it.head * D * kt_new_stride + t, kt_new_stride, p.v_new + (t * p.kv_heads + it.head) * D,
                      stride, nk, it.prior + j0};
    if (own.n == kBlockChunks || j0 + kLanes >= own_end) {
      fold_block<kD>(p, it, st, own);
      own.n = 0;
    }
  }

  for (int64_t i = 0; i < nt; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = i * G + g;
      const float inv = st.l[r] > 0.0f ? 1.0f / st.l[r] : 0.0f;
      const float* acc = st.acc.data() + r * D;
      float* dst = p.out + ((it.t0 + i) * p.q_heads + it.head * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = acc[d] * inv;
    }
}

ffi::Error PagedAttentionImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                              ffi::AnyBuffer cache, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> kv_lens,
                              ffi::Buffer<ffi::S32> page_indices, ffi::Buffer<ffi::S32> cu_q_lens,
                              ffi::Buffer<ffi::S32> num_seqs, ffi::ResultBuffer<ffi::F32> out, float sm_scale,
                              int64_t sliding_window, float soft_cap, int64_t layout) {
  const auto qd = q.dimensions(), kd = k.dimensions(), cd = cache.dimensions(), pd = page_indices.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || cd.size() != 5 || pd.size() != 2)
    return ffi::Error::InvalidArgument("paged attention: q, k [T, heads, D], cache rank 5, page_indices rank 2");
  // A uint16 cache holds bfloat16 bit patterns (the CPU serving path's storage, see reference.py).
  if (cache.element_type() != ffi::F32 && cache.element_type() != ffi::BF16 && cache.element_type() != ffi::U16)
    return ffi::Error::InvalidArgument("paged attention: the CPU kernel takes a float32 or bfloat16 cache");
  if (layout < kLayoutTokenMajor || layout > kLayoutHeadMajorKT)
    return ffi::Error::InvalidArgument("paged attention: unknown cache layout");
  Problem p{};
  p.q = q.typed_data();
  p.k_new = k.typed_data();
  p.v_new = v.typed_data();
  p.cache = cache.untyped_data();
  const bool bf16 = cache.element_type() != ffi::F32;
  p.kv_lens = kv_lens.typed_data();
  p.page_indices = page_indices.typed_data();
  p.cu_q_lens = cu_q_lens.typed_data();
  p.out = out->typed_data();
  p.num_tokens = qd[0];
  p.q_heads = qd[1];
  p.head_dim = qd[2];
  p.kv_heads = kd[1];
  p.num_layers = cd[0];
  p.num_pages = cd[1];
  p.layout = layout;
  const bool token_major = layout == kLayoutTokenMajor;
  p.page_size = token_major ? cd[2] : cd[3];
  p.pages_per_seq = pd[1];
  p.sm_scale = sm_scale;
  p.soft_cap = soft_cap;
  p.window = sliding_window;
  if (p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0 || (token_major ? cd[3] : cd[2]) != 2 * p.kv_heads ||
      cd[4] != p.head_dim || kd[0] != p.num_tokens || kd[2] != p.head_dim)
    return ffi::Error::InvalidArgument("paged attention: inconsistent shapes");
  p.group = p.q_heads / p.kv_heads;
  p.layer = std::clamp<int64_t>(layer.typed_data()[0], 0, p.num_layers - 1);

  std::fill(p.out, p.out + p.num_tokens * p.q_heads * p.head_dim, 0.0f);
  const int64_t seqs_padded = pd[0];
  const int64_t live = std::clamp<int64_t>(num_seqs.typed_data()[0], 0, seqs_padded);
  std::vector<Item> items;
  int64_t work = 0;
  for (int64_t s = 0; s < live; ++s) {
    const int64_t t0 = std::clamp<int64_t>(p.cu_q_lens[s], 0, p.num_tokens);
    const int64_t t1 = std::clamp<int64_t>(p.cu_q_lens[s + 1], t0, p.num_tokens);
    const int64_t prior = std::clamp<int64_t>(int64_t{p.kv_lens[s]} - (t1 - t0), 0, p.pages_per_seq * p.page_size);
    for (int64_t b = t0; b < t1; b += kQueryBlock)
      for (int64_t h = 0; h < p.kv_heads; ++h)
        items.push_back({s, b, std::min(b + kQueryBlock, t1), h, t0, prior});
    work += (t1 - t0) * p.group * p.kv_heads * (prior + (t1 - t0));
  }

  // Largest items first, so the threads finish together.
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return (a.t1 - a.t0) * (a.prior + a.t1 - a.seq_start) > (b.t1 - b.t0) * (b.prior + b.t1 - b.seq_start);
  });
  // The step's own keys, transposed once: [kv_heads][head_dim][tokens + 16], zero past the last token.
  const int64_t kt_new_stride = p.num_tokens + kLanes;
  std::vector<float> kt_new(p.kv_heads * p.head_dim * kt_new_stride, 0.0f);
  for (int64_t t = 0; t < p.num_tokens; ++t)
    for (int64_t h = 0; h < p.kv_heads; ++h)
      for (int64_t d = 0; d < p.head_dim; ++d)
        kt_new[(h * p.head_dim + d) * kt_new_stride + t] = p.k_new[(t * p.kv_heads + h) * p.head_dim + d];

  std::atomic<size_t> next{0};
  auto worker = [&] {
    State st(p);
    auto run = bf16 ? (p.head_dim == 64    ? run_item<64, uint16_t>
                       : p.head_dim == 128 ? run_item<128, uint16_t>
                                           : run_item<0, uint16_t>)
                    : (p.head_dim == 64    ? run_item<64, float>
                       : p.head_dim == 128 ? run_item<128, float>
                                           : run_item<0, float>);
    for (size_t i = next++; i < items.size(); i = next++) run(p, items[i], st, kt_new.data(), kt_new_stride);
  };
  cpu_set_t affinity;
  const int64_t cores = sched_getaffinity(0, sizeof affinity, &affinity) == 0
                            ? std::max(1, CPU_COUNT(&affinity))
                            : std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t threads = std::min<int64_t>({cores, static_cast<int64_t>(items.size()), 1 + work / kThreadWork});
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PagedAttentionF32, PagedAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap")
                                  .Attr<int64_t>("layout"));

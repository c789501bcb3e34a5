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
// over threads by an atomic counter. Keys are taken 16 at a time, transposed (`kT[d][j]`), so a query
// row's 16 scores are one vector accumulated over d with no horizontal sums; four query rows share each
// load. The serving layout (`kLayoutHeadMajorKT`) stores K pages transposed, so they are read in place;
// other layouts and the step's own keys are transposed into a small buffer first. All indices read from
// the metadata are clamped: bad metadata can give wrong numbers, never an out-of-bounds read.

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kQueryBlock = 16;       // new tokens of one sequence per work item
constexpr int64_t kLanes = 16;            // keys per chunk: one score vector
constexpr int64_t kRowGroup = 4;          // query rows that share each key load
constexpr int64_t kThreadWork = 1 << 15;  // (query row x key) pairs below which one thread is enough

// Cache layouts (the `layout` attribute), [layers, pages, ...] then:
constexpr int64_t kLayoutTokenMajor = 0;   // [page_size, 2 * kv_heads, head_dim]
constexpr int64_t kLayoutHeadMajor = 1;    // [2 * kv_heads, page_size, head_dim]
constexpr int64_t kLayoutHeadMajorKT = 2;  // [2 * kv_heads, page_size * head_dim], K as [head_dim, page_size]

// exp for x <= 0 (softmax arguments), vectorizable: 2^n * p(r) with a degree-6 polynomial on
// |r| <= ln(2)/2, relative error below 2e-7.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.4426950408889634f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.4286068203094172e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

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

// Online-softmax state and scratch of one work item.
struct State {
  std::vector<float> q, m, l, acc, kt;
  explicit State(const Problem& p)
      : q(kQueryBlock * p.group * p.head_dim), m(kQueryBlock * p.group), l(kQueryBlock * p.group),
        acc(kQueryBlock * p.group * p.head_dim), kt(p.head_dim * kLanes) {}
};

// Cache elements: float32, or bfloat16 stored as its 16 high bits.
inline float widen(float x) { return x; }
inline float widen(uint16_t x) {
  const uint32_t bits = uint32_t{x} << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// A chunk of up to 16 keys at positions [kpos0, kpos0 + nk): K transposed (`kt[d * kt_stride + j]`,
// 16 readable lanes per row; lanes >= nk are masked) and V rows `v_stride` elements apart. Elements are
// float, or bfloat16 bits widened as they are loaded (no copy of the chunk).
template <typename KT, typename VT>
struct Chunk {
  const KT* kt;
  int64_t kt_stride;
  const VT* v;
  int64_t v_stride, nk, kpos0;
};

// Fold a chunk into `R` query rows starting at `r0`. `kD` > 0 fixes head_dim at compile time.
template <int64_t kD, int R, typename KT, typename VT>
void fold_rows(const Problem& p, const Item& it, State& st, const Chunk<KT, VT>& c, int64_t r0) {
  const int64_t D = kD > 0 ? kD : p.head_dim;
  int64_t lo[R], hi[R];
  bool any = false;
  for (int i = 0; i < R; ++i) {
    const int64_t qpos = it.prior + (it.t0 - it.seq_start) + (r0 + i) / p.group;
    // Visible keys: kpos <= qpos, and kpos > qpos - window.
    hi[i] = std::min<int64_t>(c.nk, qpos - c.kpos0 + 1);
    lo[i] = p.window > 0 ? std::max<int64_t>(0, qpos - p.window + 1 - c.kpos0) : 0;
    any |= hi[i] > lo[i];
  }
  if (!any) return;
  float s[R][kLanes] = {};
  const float* q = st.q.data() + r0 * D;
  for (int64_t d = 0; d < D; ++d) {
    const KT* kt = c.kt + d * c.kt_stride;
    float k_row[kLanes];
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) k_row[j] = widen(kt[j]);
    for (int i = 0; i < R; ++i) {
      const float qd = q[i * D + d];
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) s[i][j] += qd * k_row[j];
    }
  }
  for (int i = 0; i < R; ++i) {
    if (hi[i] <= lo[i]) {
      for (int j = 0; j < kLanes; ++j) s[i][j] = 0.0f;
      continue;
    }
    if (p.soft_cap > 0.0f)
      for (int j = 0; j < kLanes; ++j) s[i][j] = p.soft_cap * std::tanh(s[i][j] / p.soft_cap);
    float mx = -INFINITY;
    for (int j = 0; j < kLanes; ++j)
      if (j >= lo[i] && j < hi[i]) mx = std::max(mx, s[i][j]);
    const int64_t r = r0 + i;
    const float m_old = st.m[r];
    const float m_new = std::max(m_old, mx);
    const float correction = m_old == -INFINITY ? 0.0f : exp_nonpositive(m_old - m_new);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < kLanes; ++j) {
      const float e = exp_nonpositive(s[i][j] - m_new);
      s[i][j] = (j >= lo[i] && j < hi[i]) ? e : 0.0f;  // a select: masked lanes may hold NaN
      sum += s[i][j];
    }
    st.l[r] = st.l[r] * correction + sum;
    st.m[r] = m_new;
    float* acc = st.acc.data() + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
  }
  float* acc = st.acc.data() + r0 * D;
  for (int64_t j = 0; j < c.nk; ++j) {
    const VT* v = c.v + j * c.v_stride;
    for (int i = 0; i < R; ++i) {
      const float pj = s[i][j];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[i * D + d] += pj * widen(v[d]);
    }
  }
}

template <int64_t kD, typename KT, typename VT>
void fold_chunk(const Problem& p, const Item& it, State& st, const Chunk<KT, VT>& c) {
  const int64_t rows = (it.t1 - it.t0) * p.group;
  int64_t r0 = 0;
  for (; r0 + kRowGroup <= rows; r0 += kRowGroup) fold_rows<kD, kRowGroup>(p, it, st, c, r0);
  switch (rows - r0) {
    case 3: fold_rows<kD, 3>(p, it, st, c, r0); break;
    case 2: fold_rows<kD, 2>(p, it, st, c, r0); break;
    case 1: fold_rows<kD, 1>(p, it, st, c, r0); break;
    default: break;
  }
}

// Transpose `nk` key rows (`stride` elements apart) into the item's buffer; unused lanes are zero.
template <typename T>
const float* transpose_keys(State& st, int64_t D, const T* k, int64_t stride, int64_t nk) {
  float* kt = st.kt.data();
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = 0; j < kLanes; ++j) kt[d * kLanes + j] = j < nk ? widen(k[j * stride + d]) : 0.0f;
  return kt;
}

template <int64_t kD, typename CacheT>
void run_item(const Problem& p, const Item& it, State& st) {
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
      const int64_t nk = std::min(kLanes, page_keys - j0);
      const CacheT* v_rows = v + j0 * v_stride;
      if (in_place) {  // K^T rows are page_size elements apart
        fold_chunk<kD>(p, it, st, Chunk<CacheT, CacheT>{k + j0, ps, v_rows, v_stride, nk, page_no * ps + j0});
        continue;
      }
      const float* kt;
      if (p.layout == kLayoutHeadMajorKT) {
        // K^T [D, ps] with pages narrower than a chunk: copy (and widen) this chunk's lanes.
        float* buffer = st.kt.data();
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = 0; j < kLanes; ++j) buffer[d * kLanes + j] = j < nk ? widen(k[d * ps + j0 + j]) : 0.0f;
        kt = buffer;
      } else {
        kt = transpose_keys(st, D, k + j0 * k_stride, k_stride, nk);
      }
      fold_chunk<kD>(p, it, st, Chunk<float, CacheT>{kt, kLanes, v_rows, v_stride, nk, page_no * ps + j0});
    }
  }

  // 2. The step's own tokens of this sequence, up to the block's last token.
  const int64_t own_end = it.t1 - it.seq_start;  // keys [0, own_end) of this sequence's new tokens
  int64_t own_start = 0;
  if (p.window > 0) own_start = std::max<int64_t>(0, first_pos - p.window + 1 - it.prior);
  const int64_t stride = p.kv_heads * D;
  for (int64_t j0 = own_start; j0 < own_end; j0 += kLanes) {
    const int64_t nk = std::min(kLanes, own_end - j0);
    const int64_t row = (it.seq_start + j0) * p.kv_heads + it.head;
    const Chunk<float, float> c{transpose_keys(st, D, p.k_new + row * D, stride, nk), kLanes, p.v_new + row * D,
                                stride, nk, it.prior + j0};
    fold_chunk<kD>(p, it, st, c);
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

  std::atomic<size_t> next{0};
  auto worker = [&] {
    State st(p);
    auto run = bf16 ? (p.head_dim == 64    ? run_item<64, uint16_t>
                       : p.head_dim == 128 ? run_item<128, uint16_t>
                                           : run_item<0, uint16_t>)
                    : (p.head_dim == 64    ? run_item<64, float>
                       : p.head_dim == 128 ? run_item<128, float>
                                           : run_item<0, float>);
    for (size_t i = next++; i < items.size(); i = next++) run(p, items[i], st);
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

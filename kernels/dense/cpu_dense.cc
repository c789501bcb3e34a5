// Dense products for CPUs, as an XLA FFI custom call (built and registered by cpu.py).
//
// y[M, N] = x[M, K] @ W (+ bias), float32 accumulation, W float32 or bfloat16 (its 16 high bits),
// either `[K, N]` (a Dense kernel, `transposed` = 0) or `[N, K]` (a tied LM head reading the embedding
// table, `transposed` = 1). x and y are float32.
//
// Why: XLA:CPU widens a bfloat16 weight to float32 before every dot (a weight-sized convert per call,
// 1.7 GB/s), and its float32 matrix-vector product reads weights well below the copy rate. Here each
// weight is read once per call at the streaming rate, widened in registers, and used for up to kTileRows
// rows of x while it is there (several row tiles read a contiguous float32 copy of their column tile, or
// with AVX512-BF16 a pair-packed bfloat16 one for `vdpbf16ps`).
//
// Work: with several rows of x, the output columns (the rows of a transposed W) are cut into contiguous
// chunks, run by the calling thread and XLA's intra-op pool (`compute`); each chunk streams its slice of
// every weight row. Tiles are a few rows of x by a few vectors of columns, held in registers; the vector
// type is the widest the build target has (GCC vector extensions: the same code compiles for AVX-512,
// AVX2 and NEON). With one row of x (a single decode stream, bound by reading W once) the chunks are
// blocks of whole weight rows instead, so each is one sequential read (`compute_row_kn` summing a partial
// output per block, added in block order so the bits do not depend on the threads' timing; `compute_row_nk`
// one dot product per row), small enough that the two threads finish together, and bfloat16 is widened as
// even and odd lanes (`load_group`).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include <thread>
#include <vector>

#include "native_vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using native::load;
using native::store;
using native::widen;
using vf = native::vec;
using vu = native::uvec;
constexpr int kLanes = native::kVectorLanes;
constexpr int kTileRows = 4;                  // rows of x per tile
constexpr int kTileVecs = kLanes == 16 ? 4 : 2;  // vectors of columns per tile
constexpr int kTileWRows = 4;   // rows of a transposed W per tile
constexpr int64_t kPrefetchRows = 8;       // weight rows ahead of the one being read
constexpr int64_t kThreadWork = 1 << 16;   // multiply-adds below which one thread is enough
constexpr int kSpin = 1 << 12;             // pause loops before the caller yields while helpers finish
constexpr int64_t kMaxThreads = 2;         // measured on 2-core machines only; more needs measuring
constexpr int64_t kChunksPerThread = 4;    // chunks per thread, so a preempted helper delays little

inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline void relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

struct Problem {
  const float* x;     // [M, K]
  const void* w;      // [K, N] or [N, K]
  const float* bias;  // [N] or null
  float* y;           // [M, N]
  int64_t m, k, n;
  const uint32_t* x_pairs = nullptr;  // [M, ceil(K / 2)] bfloat16 pairs of x, for `tile_dp` (else null)
};

// -- W [K, N]: column tiles, each streaming down the K rows -------------------------------------------

// y[r0:r0+R, c0:c0+V*kLanes] for full vectors of columns; `w` points at W[0, c0], rows `ld` apart.
template <int R, int V, typename T>
void tile_kn(const Problem& p, const T* w, int64_t ld, int64_t r0, int64_t c0) {
  vf acc[R][V] = {};
  for (int64_t k = 0; k < p.k; ++k) {
    const T* row = w + k * ld;
    if (R == 1 && k + kPrefetchRows < p.k)
      for (int v = 0; v < V * kLanes * int(sizeof(T)); v += 64) __builtin_prefetch(
          reinterpret_cast<const char*>(row + kPrefetchRows * ld) + v);
    vf wv[V];
    for (int v = 0; v < V; ++v) wv[v] = load(row + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float xr = p.x[(r0 + r) * p.k + k];
      for (int v = 0; v < V; ++v) acc[r][v] += xr * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      vf out = acc[r][v];
      if (p.bias) out += load(p.bias + c0 + v * kLanes);
      store(p.y + (r0 + r) * p.n + c0 + v * kLanes, out);
    }
}

template <int V, typename T>
void rows_on(const Problem& p, const T* w, int64_t ld, int64_t c0) {
  int64_t r = 0;
  for (; r + kTileRows <= p.m; r += kTileRows) tile_kn<kTileRows, V, T>(p, w, ld, r, c0);
  for (; r < p.m; ++r) tile_kn<1, V, T>(p, w, ld, r, c0);
}

#if defined(__AVX512BF16__)
// AVX512-BF16: y[r0:r0+R, c0:c0+V*16] from a column tile packed as (k, k+1) pairs (`packed[kp][col][2]`),
// `vdpbf16ps` doing two multiply-adds per lane per instruction. x's pairs come from `p.x_pairs`. Measured
// single-threaded at 64 x 576 x 3072: 3.4 ms against 3.7-4.8 ms widening to float32 for FMAs.
template <int R, int V>
void tile_dp(const Problem& p, const uint16_t* packed, int64_t r0, int64_t c0) {
  const int64_t pairs = (p.k + 1) / 2;
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __m512bh wv[V];
    for (int v = 0; v < V; ++v) wv[v] = (__m512bh)_mm512_loadu_si512(packed + (kp * V * 16 + v * 16) * 2);
    for (int r = 0; r < R; ++r) {
      const __m512bh xr = (__m512bh)_mm512_set1_epi32(static_cast<int>(p.x_pairs[(r0 + r) * pairs + kp]));
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xr, wv[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      __m512 out = acc[r][v];
      if (p.bias) out = _mm512_add_ps(out, _mm512_loadu_ps(p.bias + c0 + v * 16));
      _mm512_storeu_ps(p.y + (r0 + r) * p.n + c0 + v * 16, out);
    }
}

// Pack W[:, c0:c0+V*16] (`w` at W[0, c0]) as (k, k+1) pairs, a zero row past an odd K, and run every row.
template <int V>
void rows_dp(const Problem& p, const uint16_t* w, int64_t c0) {
  const int64_t pairs = (p.k + 1) / 2, cols = V * 16;
  thread_local std::vector<uint16_t> packed;
  packed.resize(pairs * cols * 2);
  // vpermt2w interleaves 16 columns of rows k and k+1 per output vector.
  alignas(64) static const uint16_t kLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t kp = 0; kp < pairs; ++kp) {
    const uint16_t* a = w + 2 * kp * p.n;
    const bool odd = 2 * kp + 1 == p.k;  // the pair's second row is past K: zeros
    for (int64_t j = 0; j < cols; j += 32) {
      const __m512i r0 = _mm512_loadu_si512(a + j);
      const __m512i r1 = odd ? _mm512_setzero_si512() : _mm512_loadu_si512(a + p.n + j);
      uint16_t* out = packed.data() + (kp * cols + j) * 2;
      _mm512_storeu_si512(out, _mm512_permutex2var_epi16(r0, low, r1));
      _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(r0, high, r1));
    }
  }
  int64_t r = 0;
  for (; r + kTileRows <= p.m; r += kTileRows) tile_dp<kTileRows, V>(p, packed.data(), r, c0);
  for (; r < p.m; ++r) tile_dp<1, V>(p, packed.data(), r, c0);
}
#endif

// Rows [0, M) of a column tile, R rows at a time. With several row tiles the tile is first copied
// (a bfloat16 one widened) into a contiguous float32 buffer (K x V vectors, in L2): the row tiles then
// read it sequentially, where W's own rows are a page apart (no prefetch, a TLB entry each), and widen
// nothing in their inner loop. 2x on the fused gate/up product at 64 rows.
template <int V, typename T>
void rows_kn(const Problem& p, int64_t c0) {
  const T* w = static_cast<const T*>(p.w) + c0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<T, uint16_t>::value && V % 2 == 0)  // packing goes 32 columns at a time
    if (p.x_pairs) return rows_dp<V>(p, w, c0);
#endif
  if (p.m >= 2 * kTileRows) {
    thread_local std::vector<float> widened;
    widened.resize(p.k * V * kLanes);
    for (int64_t k = 0; k < p.k; ++k)
      for (int v = 0; v < V; ++v) store(widened.data() + (k * V + v) * kLanes, load(w + k * p.n + v * kLanes));
    return rows_on<V, float>(p, widened.data(), V * kLanes, c0);
  }
  rows_on<V, T>(p, w, p.n, c0);
}

// Columns [c0, c1) (c0 a multiple of kLanes): tiles of V vectors, single vectors, then scalar columns.
template <typename T>
void columns_kn(const Problem& p, int64_t c0, int64_t c1) {
  for (; c0 + kTileVecs * kLanes <= c1; c0 += kTileVecs * kLanes) rows_kn<kTileVecs, T>(p, c0);
  for (; c0 + kLanes <= c1; c0 += kLanes) rows_kn<1, T>(p, c0);
  const T* w = static_cast<const T*>(p.w);
  for (; c0 < c1; ++c0)
    for (int64_t r = 0; r < p.m; ++r) {
      float s = p.bias ? p.bias[c0] : 0.0f;
      for (int64_t k = 0; k < p.k; ++k) s += p.x[r * p.k + k] * widen(w[k * p.n + c0]);
      p.y[r * p.n + c0] = s;
    }
}

// -- one row of x against W [K, N]: blocks of whole weight rows ---------------------------------------

// 2 * kLanes columns of a weight row as two vectors: float32 in order; bfloat16 as its even columns then
// its odd ones (each 32-bit pair holds the odd value in its high half as it stands, the even one in its
// low half, shifted up): one load, a shift and a mask, where widening in order costs several shuffles.
// `pair_slot` maps a column of such a group to its slot.
constexpr int64_t kGroup = 2 * kLanes;
inline void load_group(const float* p, vf& a, vf& b) {
  a = load(p);
  b = load(p + kLanes);
}
inline void load_group(const uint16_t* p, vf& a, vf& b) {
  vu u;
  std::memcpy(&u, p, sizeof u);
  const vu even = u << 16, odd = u & 0xffff0000u;
  std::memcpy(&a, &even, sizeof a);
  std::memcpy(&b, &odd, sizeof b);
}
// Software prefetch of the group kPrefetchAhead bytes further on: measured on a read-only stream, 4 KB
// ahead adds ~10% to what the hardware prefetcher reaches alone (it stops at each 4 KB page).
constexpr int64_t kPrefetchAhead = 4096;
template <typename T>
inline void prefetch_group(const T* p) {
  for (int64_t b = 0; b < kGroup * int64_t(sizeof(T)); b += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchAhead + b);
}
template <typename T>
inline int64_t pair_slot(int64_t j) {
  return std::is_same<T, float>::value ? j : (j % 2) * kLanes + j / 2;
}

// out[N] += sum over k in [k0, k1) of x[k] * W[k, :], groups of columns in `load_group`'s order. W's rows are
// read whole and in order, four at a time (four sequential streams the prefetcher follows), so a block
// of rows is one contiguous read; `out` (N floats) stays in L1 / L2. Column tiles instead read a few
// cache lines per row, a row's length apart: latency-bound, bfloat16 read at half float32's byte rate.
template <typename T>
void row_block_kn(const Problem& p, int64_t k0, int64_t k1, float* out) {
  const T* w = static_cast<const T*>(p.w);
  const int64_t n = p.n, full = n / kGroup * kGroup;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const float x0 = p.x[k], x1 = p.x[k + 1], x2 = p.x[k + 2], x3 = p.x[k + 3];
    const T *r0 = w + k * n, *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;
    for (int64_t c = 0; c < full; c += kGroup) {
      prefetch_group(r0 + c);
      prefetch_group(r1 + c);
      prefetch_group(r2 + c);
      prefetch_group(r3 + c);
      vf a0, b0, a1, b1, a2, b2, a3, b3;
      load_group(r0 + c, a0, b0);
      load_group(r1 + c, a1, b1);
      load_group(r2 + c, a2, b2);
      load_group(r3 + c, a3, b3);
      store(out + c, load(out + c) + x0 * a0 + x1 * a1 + x2 * a2 + x3 * a3);
      store(out + c + kLanes, load(out + c + kLanes) + x0 * b0 + x1 * b1 + x2 * b2 + x3 * b3);
    }
    for (int64_t c = full; c < n; ++c)
      out[c] += x0 * widen(r0[c]) + x1 * widen(r1[c]) + x2 * widen(r2[c]) + x3 * widen(r3[c]);
  }
  for (; k < k1; ++k) {
    const float xk = p.x[k];
    const T* r = w + k * n;
    for (int64_t c = 0; c < full; c += kGroup) {
      vf a, b;
      load_group(r + c, a, b);
      store(out + c, load(out + c) + xk * a);
      store(out + c + kLanes, load(out + c + kLanes) + xk * b);
    }
    for (int64_t c = full; c < n; ++c) out[c] += xk * widen(r[c]);
  }
}

// -- one row of x against W [N, K]: each weight row dotted with x -----------------------------------

// y[c0:c1]: weight rows (contiguous, so a chunk of them is one sequential read) dotted with x, C at a
// time; K in groups of `load_group`'s order, against `xg`, x put in that order once per call.
template <int C, typename T>
void dots_nk(const Problem& p, const float* xg, int64_t c0) {
  const T* w = static_cast<const T*>(p.w) + c0 * p.k;
  const int64_t full = p.k / kGroup * kGroup;
  vf acc[C] = {};
  for (int64_t g = 0; g < full; g += kGroup) {
    const vf xa = load(xg + g), xb = load(xg + g + kLanes);
    for (int c = 0; c < C; ++c) {
      prefetch_group(w + c * p.k + g);
      vf a, b;
      load_group(w + c * p.k + g, a, b);
      acc[c] += a * xa + b * xb;
    }
  }
  for (int c = 0; c < C; ++c) {
    float s = hsum(acc[c]);
    for (int64_t k = full; k < p.k; ++k) s += p.x[k] * widen(w[c * p.k + k]);
    p.y[c0 + c] = s + (p.bias ? p.bias[c0 + c] : 0.0f);
  }
}

template <typename T>
void row_dots_nk(const Problem& p, const float* xg, int64_t c0, int64_t c1) {
  for (; c0 + kTileWRows <= c1; c0 += kTileWRows) dots_nk<kTileWRows, T>(p, xg, c0);
  for (; c0 < c1; ++c0) dots_nk<1, T>(p, xg, c0);
}

// -- W [N, K]: rows of W against rows of x, dot products along K --------------------------------------

// y[r0:r0+R, c0:c0+C]; `w` points at W[c0, 0] (rows K apart).
template <int R, int C, typename T>
void tile_nk(const Problem& p, const T* w, int64_t r0, int64_t c0) {
  vf acc[R][C] = {};
  int64_t k = 0;
  for (; k + kLanes <= p.k; k += kLanes) {
    vf wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load(w + c * p.k + k);
    for (int r = 0; r < R; ++r) {
      const vf xv = load(p.x + (r0 + r) * p.k + k);
      for (int c = 0; c < C; ++c) acc[r][c] += xv * wv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t kk = k; kk < p.k; ++kk) s += p.x[(r0 + r) * p.k + kk] * widen(w[c * p.k + kk]);
      p.y[(r0 + r) * p.n + c0 + c] = s + (p.bias ? p.bias[c0 + c] : 0.0f);
    }
}

template <int C, typename T>
void rows_nk_on(const Problem& p, const T* w, int64_t c0) {
  int64_t r = 0;
  for (; r + kTileRows <= p.m; r += kTileRows) tile_nk<kTileRows, C, T>(p, w, r, c0);
  for (; r < p.m; ++r) tile_nk<1, C, T>(p, w, r, c0);
}

// As `rows_kn`: with several row tiles, bfloat16 rows of W are widened once into a float32 buffer.
template <int C, typename T>
void rows_nk(const Problem& p, int64_t c0) {
  const T* w = static_cast<const T*>(p.w) + c0 * p.k;
  if (std::is_same<T, uint16_t>::value && p.m >= 2 * kTileRows) {
    thread_local std::vector<float> widened;
    widened.resize(C * p.k);
    for (int64_t i = 0; i < C * p.k; ++i) widened[i] = widen(w[i]);
    return rows_nk_on<C, float>(p, widened.data(), c0);
  }
  rows_nk_on<C, T>(p, w, c0);
}

template <typename T>
void columns_nk(const Problem& p, int64_t c0, int64_t c1) {
  for (; c0 + kTileWRows <= c1; c0 += kTileWRows) rows_nk<kTileWRows, T>(p, c0);
  for (; c0 < c1; ++c0) rows_nk<1, T>(p, c0);
}

// -- splitting the work -----------------------------------------------------------------------------

// The output is cut into chunks of whole tiles, claimed from an atomic counter by the calling thread and
// by helpers scheduled on XLA's own intra-op pool (no threads of our own to compete with it on a small
// machine). A helper that starts late finds nothing left and returns, so a busy pool costs parallelism,
// never a wait; the state is shared so a helper may outlive the call.
struct Split {
  std::atomic<int64_t> next{0}, done{0};
  int64_t chunks = 0;
};

// Runs `body(chunk, worker)` for chunks [0, chunks) on the calling thread (worker 0) and up to
// `parallel - 1` helpers (workers 1, ...).
template <typename Body>
void run_chunks(int64_t chunks, int64_t parallel, ffi::ThreadPool& threads, Body body) {
  auto split = std::make_shared<Split>();
  split->chunks = chunks;
  auto work = [split, body](int64_t worker) {
    for (int64_t i = split->next++; i < split->chunks; i = split->next++) {
      body(i, worker);
      split->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < parallel; ++i) threads.Schedule([work, i] { work(i); });
  work(0);
  for (int spins = 0; split->done.load(std::memory_order_acquire) < split->chunks; ++spins)
    spins < kSpin ? relax() : std::this_thread::yield();  // only chunks a helper is running remain
}

int64_t parallelism(const Problem& p, ffi::ThreadPool& threads) {
  const int64_t helpers = std::max<int64_t>(0, std::min<int64_t>(threads.num_threads(), kMaxThreads) - 1);
  return p.m * p.k * p.n < kThreadWork ? 1 : 1 + helpers;
}

// [begin, end) of chunk i of `units` units of `unit` each, `total` in all (the last chunk takes the rest).
inline std::pair<int64_t, int64_t> chunk_range(int64_t i, int64_t chunks, int64_t units, int64_t unit,
                                               int64_t total) {
  return {units * i / chunks * unit, i + 1 == chunks ? total : units * (i + 1) / chunks * unit};
}

// How many chunks a one-row product of W [N, K] (`bytes` of weights) is cut into: small ones (kStreamChunk
// bytes, a few microseconds each), so the thread that finishes first waits little for the other, and a helper
// that starts late still takes its share; at most kMaxStreamChunks per call.
constexpr int64_t kStreamChunk = 64 << 10;
constexpr int64_t kMaxStreamChunks = 64;
int64_t stream_chunks(int64_t bytes, int64_t units, int64_t parallel) {
  if (parallel == 1) return 1;
  return std::max<int64_t>(1, std::min({units, kMaxStreamChunks, bytes / kStreamChunk}));
}

// One row of x against W [K, N]: chunks are blocks of W's rows (`row_block_kn`), each summing into its own
// float32 partial output, which the caller adds in chunk order: the result does not depend on which thread
// ran which chunk (a partial per thread would sum its chunks in whatever order the threads claimed them,
// and the last bits of a product would change from run to run). The partials (chunks x N floats) are
// kept small by guided chunk sizes, fixed before the threads start: each chunk takes 1 / (2 x threads)
// of the rows left, down to kStreamChunk bytes, so the first chunks are long and the last ones short.
constexpr int64_t kMaxRowChunks = 32;
template <typename T>
void compute_row_kn(const Problem& p, ffi::ThreadPool& threads) {
  const int64_t parallel = parallelism(p, threads), row_bytes = p.n * int64_t(sizeof(T));
  const int64_t min_rows = std::max<int64_t>(4, (kStreamChunk / row_bytes + 3) / 4 * 4);
  thread_local std::vector<int64_t> starts;  // chunk i is rows [starts[i], starts[i + 1])
  starts.assign(1, 0);
  for (int64_t k = 0; k < p.k;) {
    int64_t rows = parallel == 1 ? p.k : std::max(min_rows, (p.k - k) / (2 * parallel) / 4 * 4);
    if (int64_t(starts.size()) == kMaxRowChunks || p.k - k - rows < min_rows / 2) rows = p.k - k;
    starts.push_back(k += rows);
  }
  const int64_t chunks = int64_t(starts.size()) - 1;
  thread_local std::vector<float> partials;  // helpers only touch it while the caller waits for them
  partials.resize(chunks * p.n);
  float* out = partials.data();
  const int64_t* bounds = starts.data();
  run_chunks(chunks, parallel, threads, [p, out, bounds](int64_t i, int64_t) {
    float* part = out + i * p.n;
    std::fill(part, part + p.n, 0.0f);
    row_block_kn<T>(p, bounds[i], bounds[i + 1], part);
  });
  // The partials summed into the first (vectors, in chunk order), then put in column order with the bias.
  const int64_t full = p.n / kGroup * kGroup;
  for (int64_t c = 0; c + kLanes <= full; c += kLanes) {
    vf s = load(out + c);
    for (int64_t i = 1; i < chunks; ++i) s += load(out + i * p.n + c);
    store(out + c, s);
  }
  for (int64_t c = full; c < p.n; ++c)
    for (int64_t i = 1; i < chunks; ++i) out[c] += out[i * p.n + c];
  for (int64_t c = 0; c < p.n; ++c) {
    const int64_t slot = c < full ? c / kGroup * kGroup + pair_slot<T>(c % kGroup) : c;
    p.y[c] = out[slot] + (p.bias ? p.bias[c] : 0.0f);
  }
}

// One row of x against W [N, K]: chunks of whole weight rows (`row_dots_nk`).
template <typename T>
void compute_row_nk(const Problem& p, ffi::ThreadPool& threads) {
  thread_local std::vector<float> grouped;  // x in `load_group`'s order; read-only while helpers run
  grouped.resize(p.k);
  const int64_t full = p.k / kGroup * kGroup;
  for (int64_t k = 0; k < p.k; ++k) grouped[k < full ? k / kGroup * kGroup + pair_slot<T>(k % kGroup) : k] = p.x[k];
  const float* xg = grouped.data();
  const int64_t units = std::max<int64_t>(1, p.n / kTileWRows), parallel = parallelism(p, threads);
  const int64_t chunks = stream_chunks(p.k * p.n * int64_t(sizeof(T)), units, parallel);
  run_chunks(chunks, parallel, threads, [p, xg, units, chunks](int64_t i, int64_t) {
    const auto [c0, c1] = chunk_range(i, chunks, units, kTileWRows, p.n);
    row_dots_nk<T>(p, xg, c0, c1);
  });
}

template <typename T>
void compute(const Problem& p, bool transposed, ffi::ThreadPool& threads) {
  if (p.m == 1) return transposed ? compute_row_nk<T>(p, threads) : compute_row_kn<T>(p, threads);
  // Units: tiles of columns ([K, N]) or of rows of W ([N, K]); chunks are whole units, the last takes the tail.
  const int64_t unit = transposed ? kTileWRows : kTileVecs * kLanes;
  const int64_t units = std::max<int64_t>(1, p.n / unit);
  const int64_t parallel = parallelism(p, threads);
  const int64_t chunks = std::min<int64_t>(units, parallel * kChunksPerThread);
  run_chunks(chunks, parallel, threads, [p, transposed, unit, units, chunks](int64_t i, int64_t) {
    const auto [c0, c1] = chunk_range(i, chunks, units, unit, p.n);
    transposed ? columns_nk<T>(p, c0, c1) : columns_kn<T>(p, c0, c1);
  });
}

ffi::Error DenseImpl(ffi::ThreadPool threads, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                     ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, int64_t transposed,
                     int64_t x_is_bf16) {
  const auto xd = x.dimensions(), wd = w.dimensions(), bd = bias.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || bd.size() != 1)
    return ffi::Error::InvalidArgument("dense: x [M, K], w rank 2, bias rank 1");
  // A uint16 weight holds bfloat16 bit patterns.
  const auto type = w.element_type();
  if (type != ffi::F32 && type != ffi::BF16 && type != ffi::U16)
    return ffi::Error::InvalidArgument("dense: the CPU kernel takes float32 or bfloat16 weights");
  Problem p{x.typed_data(), w.untyped_data(), nullptr, y->typed_data(), xd[0], xd[1], transposed ? wd[0] : wd[1]};
  if ((transposed ? wd[1] : wd[0]) != p.k || (bd[0] != 0 && bd[0] != p.n))
    return ffi::Error::InvalidArgument("dense: inconsistent shapes");
  if (bd[0] != 0) p.bias = bias.typed_data();
  if (p.m == 0 || p.n == 0) return ffi::Error::Success();
#if defined(__AVX512BF16__)
  // bfloat16 x and W, several row tiles, [K, N]: `tile_dp`. x holds bfloat16 values, so its pairs are
  // its high halves, exactly.
  std::vector<uint32_t> x_pairs;
  if (type != ffi::F32 && x_is_bf16 && !transposed && p.m >= 2 * kTileRows) {
    const int64_t pairs = (p.k + 1) / 2;
    x_pairs.resize(p.m * pairs);
    for (int64_t r = 0; r < p.m; ++r)
      for (int64_t kp = 0; kp < pairs; ++kp) {
        uint32_t lo, hi = 0;
        std::memcpy(&lo, p.x + r * p.k + 2 * kp, 4);
        if (2 * kp + 1 < p.k) std::memcpy(&hi, p.x + r * p.k + 2 * kp + 1, 4);
        x_pairs[r * pairs + kp] = (lo >> 16) | (hi & 0xffff0000u);
      }
    p.x_pairs = x_pairs.data();
  }
#else
  (void)x_is_bf16;
#endif
  if (type == ffi::F32)
    compute<float>(p, transposed != 0, threads);
  else
    compute<uint16_t>(p, transposed != 0, threads);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DenseF32, DenseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("transposed")
                                  .Attr<int64_t>("x_is_bf16"));

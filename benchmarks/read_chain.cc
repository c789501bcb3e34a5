// The read-only ceiling of a decode step's chain of products (benchmarks/read_bandwidth.py builds and
// calls it): buffers read one after another by two threads, each half of each buffer, with a barrier
// between buffers as the dense kernel has between products, summing the floats (no products, no output).
// What remains between this and the kernel's rate is the kernel's own cost; what remains between this and
// the copy bandwidth is the machine's (reads of separate buffers, a start and a finish per buffer).

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

namespace {

typedef float vf __attribute__((vector_size(64)));

float read_sum(const char* p, int64_t bytes) {
  vf a = {}, b = {}, c = {}, d = {};
  int64_t i = 0;
  for (; i + 256 <= bytes; i += 256) {
    vf x, y, z, w;
    __builtin_memcpy(&x, p + i, 64);
    __builtin_memcpy(&y, p + i + 64, 64);
    __builtin_memcpy(&z, p + i + 128, 64);
    __builtin_memcpy(&w, p + i + 192, 64);
    a += x;
    b += y;
    c += z;
    d += w;
  }
  const vf s = a + b + c + d;
  float total = 0.0f;
  for (int l = 0; l < 16; ++l) total += s[l];
  for (; i < bytes; ++i) total += float(p[i]);
  return total;
}

inline void relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

// Seconds to read `count` buffers in order, each split in two halves read by the caller and one helper.
extern "C" double read_chain(const char* const* buffers, const int64_t* bytes, int64_t count) {
  std::atomic<int64_t> posted{-1}, finished{-1};
  volatile float sink = 0.0f;
  std::thread helper([&] {
    float local = 0.0f;
    for (int64_t i = 0; i < count; ++i) {
      while (posted.load(std::memory_order_acquire) < i) relax();
      const int64_t half = bytes[i] / 2 / 64 * 64;
      local += read_sum(buffers[i] + half, bytes[i] - half);
      finished.store(i, std::memory_order_release);
    }
    sink = sink + local;
  });
  const auto start = std::chrono::steady_clock::now();
  float local = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    posted.store(i, std::memory_order_release);
    local += read_sum(buffers[i], bytes[i] / 2 / 64 * 64);
    while (finished.load(std::memory_order_acquire) < i) relax();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  helper.join();
  sink = sink + local;
  return seconds;
}

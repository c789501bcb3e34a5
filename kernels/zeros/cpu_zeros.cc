// A zeroed buffer whose pages are not touched, as an XLA FFI custom call (built and registered by
// __init__.py): what the KV cache is allocated with on CPU.
//
// Why: XLA's zeros write every byte, and a 5.8 GB cache costs ~3 s of page faults and memset at every
// start though most of it stays unused for a long while. Here the buffer XLA allocated for the result is
// handed back to the kernel with MADV_DONTNEED: the pages of a private anonymous mapping then read as
// zeros and are faulted in, zeroed, on first touch (madvise(2)). The result is an ordinary XLA-owned
// buffer, so a later step can still donate it and update it in place.
//
// Where the buffer is not such a mapping (which /proc/self/maps says), or madvise refuses, it is
// written with zeros instead; so are the partial pages at its two ends, which other data may share.

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Whether [begin, end) is covered by private anonymous mappings only (no file, no shared memory).
bool private_anonymous(uintptr_t begin, uintptr_t end) {
  FILE* maps = std::fopen("/proc/self/maps", "r");
  if (maps == nullptr) return false;
  char line[4096];
  uintptr_t covered = begin;
  bool ok = true;
  while (ok && covered < end && std::fgets(line, sizeof line, maps)) {
    unsigned long lo, hi, offset, inode;
    char perms[8], device[32];
    int path_at = 0;
    if (std::sscanf(line, "%lx-%lx %7s %lx %31s %lu %n", &lo, &hi, perms, &offset, device, &inode, &path_at) < 6)
      continue;
    if (hi <= covered) continue;
    if (lo > covered) break;  // a hole: not all mapped
    const char* path = line + path_at;
    const bool anonymous = inode == 0 && (*path == '\n' || *path == '\0' || std::strncmp(path, "[heap]", 6) == 0 ||
                                         std::strncmp(path, "[anon", 5) == 0);
    ok = anonymous && perms[3] == 'p';
    covered = hi;
  }
  std::fclose(maps);
  return ok && covered >= end;
}

ffi::Error ZerosImpl(ffi::Result<ffi::AnyBuffer> out) {
  char* data = static_cast<char*>(out->untyped_data());
  const size_t size = out->size_bytes();
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t start = reinterpret_cast<uintptr_t>(data), stop = start + size;
  const uintptr_t first = (start + page - 1) / page * page, last = stop / page * page;
  if (last <= first || !private_anonymous(first, last) ||
      madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED) != 0) {
    std::memset(data, 0, size);
    return ffi::Error::Success();
  }
  std::memset(data, 0, first - start);
  std::memset(reinterpret_cast<char*>(last), 0, stop - last);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LazyZeros, ZerosImpl, ffi::Ffi::Bind().Ret<ffi::AnyBuffer>());

// Per-thread scratch memory that is kept between calls.
//
// A kernel that allocates its multi-megabyte work buffers afresh on every call pays for page
// faults each time: the operating system maps and zeroes every page again (about 15% of a
// 512-channel 7x7 convolution). The buffers here only grow, to the largest request seen on their
// thread, and are reused; each thread keeps what it has used until it exits. Requests above
// kMaxKeptBytes are not kept: a call that large barely notices its page faults, and a thread
// should not hold that much memory after it.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastdl::cpu {

constexpr int kScratchSlots = 8;
constexpr size_t kMaxKeptBytes = size_t(32) << 20;

// At least `bytes` bytes, 64-byte aligned, of this thread's buffer `slot`.
inline void* kept_buffer(int slot, size_t bytes) {
  struct AlignedDelete {
    void operator()(void* p) const { ::operator delete(p, std::align_val_t{64}); }
  };
  thread_local std::array<std::unique_ptr<void, AlignedDelete>, kScratchSlots> buffers;
  thread_local std::array<size_t, kScratchSlots> capacity{};
  if (capacity[slot] < bytes) {
    buffers[slot].reset();  // the old buffer goes before the new one is taken
    buffers[slot].reset(::operator new(bytes, std::align_val_t{64}));
    capacity[slot] = bytes;
  }
  return buffers[slot].get();
}

// An uninitialised tensor of `shape`: a view of this thread's kept buffer `slot`, valid until the
// slot is asked for again on this thread (buffers alive at the same time need different slots),
// or above kMaxKeptBytes a tensor of its own.
inline at::Tensor workspace(int slot, at::IntArrayRef shape, const at::TensorOptions& options) {
  const size_t bytes =
      static_cast<size_t>(c10::multiply_integers(shape)) * options.dtype().itemsize();
  if (bytes > kMaxKeptBytes) return at::empty(shape, options);
  return at::from_blob(kept_buffer(slot, bytes), shape, options);
}

// A zero-filled tensor of `shape` whose memory is advised to be transparent huge pages (Linux;
// honoured where THP is in "always" or "madvise" mode). For a large output allocated afresh on
// every call, such as a language model head's [V, E] weight gradient, the zeroing then faults in
// one page per 2 MB instead of one per 4 KB, which dominates its cost on virtual machines.
inline at::Tensor zeros_on_huge_pages(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHugePage - 1) & ~(kHugePage - 1),
                  end = (start + t.nbytes()) & ~(kHugePage - 1);
  // Advice only: where it is refused the pages are ordinary ones.
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t.zero_();
}

}  // namespace fastdl::cpu

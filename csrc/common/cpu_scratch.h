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
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(shape)) * options.dtype().itemsize();
  if (bytes > kMaxKeptBytes) return at::empty(shape, options);
  return at::from_blob(kept_buffer(slot, bytes), shape, options);
}

}  // namespace fastdl::cpu

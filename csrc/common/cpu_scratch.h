// Per-thread scratch memory that is kept between calls.
//
// A kernel that allocates its multi-megabyte work buffers afresh on every call pays for page
// faults each time: the operating system maps and zeroes every page again (about 15% of a
// 512-channel 7x7 convolution). These buffers only grow, to the largest request seen on their
// thread, and are reused; each thread keeps what it has used until it exits.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

namespace fastdl::cpu {

constexpr int kScratchSlots = 8;

// `count` values of type T, 64-byte aligned, contents unspecified. Buffers alive at the same
// time on one thread need different slots.
template <typename T>
T* scratch(int slot, int64_t count) {
  struct AlignedDelete {
    void operator()(void* p) const { ::operator delete(p, std::align_val_t{64}); }
  };
  thread_local std::array<std::unique_ptr<void, AlignedDelete>, kScratchSlots> buffers;
  thread_local std::array<size_t, kScratchSlots> capacity{};
  const size_t bytes = static_cast<size_t>(count) * sizeof(T);
  if (capacity[slot] < bytes) {
    buffers[slot].reset();  // the old buffer goes before the new one is taken
    buffers[slot].reset(::operator new(bytes, std::align_val_t{64}));
    capacity[slot] = bytes;
  }
  return static_cast<T*>(buffers[slot].get());
}

}  // namespace fastdl::cpu

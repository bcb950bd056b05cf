// The one place that decides which instruction set fastdl's CPU kernels may use.
//
// Kernels compiled for an instruction set the baseline x86-64 lacks (functions marked
// __attribute__((target("avx512f"))) or target("avx2,fma")) must only be reached behind
// cpu::has(): calling one on a CPU without that set is SIGILL, not an error. The capability in
// use is the best the CPU supports (cpuid, and the OS saving the vector registers), lowered by
// the environment variable FASTDL_CPU_CAPABILITY=avx512|avx2|default when the library is loaded
// or by set_active() later (tests run every path this way). It can never be raised above what
// the CPU supports.
#pragma once

namespace fastdl::cpu {

enum class Capability : int { Default = 0, AVX2 = 1, AVX512 = 2 };

// The best the running CPU supports, whatever was asked for.
Capability supported();

// The one in use.
Capability active();

// Whether kernels for `c` may run: true for every capability up to the active one.
inline bool has(Capability c) { return static_cast<int>(active()) >= static_cast<int>(c); }

// Lowers (or restores) the capability in use; TORCH_CHECK-fails above supported().
void set_active(Capability c);

const char* name(Capability c);

}  // namespace fastdl::cpu

#include "common/cpu_capability.h"

#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>

namespace fastdl::cpu {
namespace {

constexpr std::array<const char*, 3> kNames{"default", "avx2", "avx512"};

Capability detect() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  // libgcc's checks include the OS enabling the ymm/zmm state (xgetbv), not only cpuid bits.
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Capability::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Capability::AVX2;
#endif
  return Capability::Default;
}

Capability parse(std::string_view text, const char* what) {
  for (size_t i = 0; i < kNames.size(); ++i)
    if (text == kNames[i]) return static_cast<Capability>(i);
  TORCH_CHECK(false, what, " must be one of default, avx2, avx512; got '", text, "'");
}

// The capability at load: supported(), lowered by FASTDL_CPU_CAPABILITY. Asking for more than
// the CPU has is logged and ignored rather than fatal, so one environment serves every machine.
Capability initial() {
  const char* asked = std::getenv("FASTDL_CPU_CAPABILITY");
  if (asked == nullptr || *asked == '\0') return supported();
  const Capability c = parse(asked, "FASTDL_CPU_CAPABILITY");
  if (static_cast<int>(c) > static_cast<int>(supported())) {
    std::fprintf(stderr,
                 "fastdl: FASTDL_CPU_CAPABILITY=%s but this CPU supports at most %s; using %s\n",
                 asked, name(supported()), name(supported()));
    return supported();
  }
  return c;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial())};
  return slot;
}

// Copies an error's message (without c10's backtrace) into a caller's buffer, for the C entry
// points below.
int report(const c10::Error& e, char* error, int size) {
  if (error != nullptr && size > 0)
    std::snprintf(error, static_cast<size_t>(size), "%s", e.what_without_backtrace());
  return -1;
}

}  // namespace

Capability supported() {
  static const Capability c = detect();
  return c;
}

Capability active() {
  return static_cast<Capability>(active_slot().load(std::memory_order_relaxed));
}

void set_active(Capability c) {
  TORCH_CHECK(static_cast<int>(c) <= static_cast<int>(supported()),
              "fastdl: cannot use CPU capability ", name(c), ": this CPU supports at most ",
              name(supported()));
  active_slot().store(static_cast<int>(c), std::memory_order_relaxed);
}

const char* name(Capability c) { return kNames[static_cast<size_t>(c)]; }

}  // namespace fastdl::cpu

// C entry points for csrc/module.c (fastdl._C.cpu_capability and friends), which uses only
// Python's C API: they return -1 and a message instead of throwing.
extern "C" {

int fastdl_cpu_capability(const char** out, char* error, int size) {
  try {
    *out = fastdl::cpu::name(fastdl::cpu::active());
    return 0;
  } catch (const c10::Error& e) {
    return fastdl::cpu::report(e, error, size);
  }
}

const char* fastdl_cpu_supported_capability(void) {
  return fastdl::cpu::name(fastdl::cpu::supported());
}

int fastdl_set_cpu_capability(const char* requested, char* error, int size) {
  try {
    fastdl::cpu::set_active(fastdl::cpu::parse(requested, "capability"));
    return 0;
  } catch (const c10::Error& e) {
    return fastdl::cpu::report(e, error, size);
  }
}
}

// Vector math for kernels compiled for AVX-512 only (functions marked target("avx512f") and
// called where the running CPU has it).
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace fastdl::cpu::avx512 {

// 2^t per lane. 2^t = 2^round(t) * 2^f with |f| <= 1/2: the Taylor polynomial of degree 6 for
// 2^f (relative error below 1.3e-7) scaled by scalef, which needs no integer conversion or bit
// tricks and saturates cleanly: very negative t gives 0, very large t gives inf.
__attribute__((target("avx512f"), always_inline)) inline __m512 exp2(__m512 t) {
  const __m512 r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, r);
  __m512 p = _mm512_set1_ps(1.5403530393381608e-04f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, r);
}

}  // namespace fastdl::cpu::avx512

#endif

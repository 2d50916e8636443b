// The CPU instruction-set choice (csrc/policy/cpu_isa.h). ISA-neutral: no -m flags; the build
// says which copies exist (-DML_COMPILED_AVX2, -DML_COMPILED_AVX512).
#include "cpu_isa.h"

#include <ATen/Version.h>  // at::get_cpu_capability()
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

namespace manual_layers {
namespace {

bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::DEFAULT: return true;
#ifdef ML_COMPILED_AVX2
    case Isa::AVX2: return true;
#endif
#ifdef ML_COMPILED_AVX512
    case Isa::AVX512: return true;
#endif
    default: return false;
  }
}

// Does this CPU (and OS: libgcc's checks include the XSAVE state) run the copy's instructions?
// The same feature sets as ATen's choice (avx2+fma for AVX2; avx512 f/bw/vl/dq + fma for
// AVX512), plus f16c that our AVX2 copy is compiled with.
bool cpu_has(Isa isa) {
  if (isa == Isa::DEFAULT) return true;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (isa == Isa::AVX2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool parse_isa(std::string s, Isa& out) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::toupper(c); });
  for (int i = 0; i < 3; ++i) {
    if (s == kIsaNames[i]) {
      out = static_cast<Isa>(i);
      return true;
    }
  }
  return false;
}

// The highest level <= want that is compiled and that this CPU runs.
Isa clamp_to_usable(Isa want) {
  for (int i = static_cast<int>(want); i > 0; --i) {
    const Isa isa = static_cast<Isa>(i);
    if (isa_compiled(isa) && cpu_has(isa)) return isa;
  }
  return Isa::DEFAULT;
}

}  // namespace

Isa choose_cpu_isa() {
  const char* env = std::getenv("MANUAL_LAYERS_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    Isa want;
    if (!parse_isa(env, want)) {
      TORCH_WARN("manual_layers: MANUAL_LAYERS_CPU_ISA='", env,
                 "' is not one of default, avx2, avx512; ignored (following ATen's choice)");
    } else {
      const Isa got = clamp_to_usable(want);
      if (got != want) {
        TORCH_WARN("manual_layers: MANUAL_LAYERS_CPU_ISA=", env, " refused: ",
                   !isa_compiled(want) ? "this build has no such kernels (non-x86-64 build)"
                                   : "this CPU lacks the instructions",
                   "; using ", kIsaNames[static_cast<int>(got)], " instead");
      }
      return got;
    }
  }
  // ATen's level: its own CPU check and ATEN_CPU_CAPABILITY. Names other than ours (VSX,
  // ZVECTOR, SVE*) are non-x86 levels, where only DEFAULT is compiled.
  Isa aten = Isa::DEFAULT;
  if (!parse_isa(at::get_cpu_capability(), aten)) aten = Isa::DEFAULT;
  return clamp_to_usable(aten);
}

}  // namespace manual_layers

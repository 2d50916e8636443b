// Which compiled copy of the CPU kernels runs (csrc/cpu/runtime/dispatch.cpp registers it): the
// rule of the ISA choice, made once at load. csrc/cpu/runtime/dispatch.cpp explains the copies.
#pragma once

namespace manual_layers {

enum class Isa : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };
inline constexpr const char* kIsaNames[] = {"DEFAULT", "AVX2", "AVX512"};

// MANUAL_LAYERS_CPU_ISA=default|avx2|avx512 if set, else ATen's level (at::get_cpu_capability(),
// which honours ATEN_CPU_CAPABILITY); in both cases never a level this build lacks or this CPU
// cannot run (checked here, not trusted): a refused request warns and falls back to the best
// level below it.
Isa choose_cpu_isa();

}  // namespace manual_layers

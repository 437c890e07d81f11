// Python module `megatron_rl._C` (plain C++ extension, built everywhere torch is): importing it
// (after `import torch`) registers the CPU ops of fused_loss_cpu.cpp with the torch dispatcher,
// called as torch.ops.megatron_rl.<name>. The CUDA ops live in `megatron_rl._C_cuda`.
//
// Only pybind11 here, not <torch/extension.h>: the module passes no tensors through pybind11.
#include <pybind11/pybind11.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#include <string>

namespace megatron_rl {

std::string cpu_build_info() {
  std::string simd = "scalar";
#if defined(CPU_CAPABILITY_AVX512)
  simd = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  simd = "avx2";
#endif
  return "megatron_rl._C: CPU ops (" + simd + "), torch " + std::to_string(TORCH_VERSION_MAJOR) +
         "." + std::to_string(TORCH_VERSION_MINOR) + "." + std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace megatron_rl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_rl CPU kernels; ops live under torch.ops.megatron_rl";
  m.def("cpu_build_info", &megatron_rl::cpu_build_info,
        "String naming the SIMD level and the torch this extension was compiled against.");
}

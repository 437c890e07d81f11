// Python module `megatron_rl._C_cuda`: build facts only. Importing it (after `import torch` and
// `megatron_rl._C`, which defines the schemas) registers the CUDA implementations of
// fused_loss_cuda.cu (TORCH_LIBRARY_IMPL(megatron_rl, CUDA, m)), called as
// torch.ops.megatron_rl.<name>.
//
// Only pybind11 here, not <torch/extension.h>: the module passes no tensors through pybind11,
// and the full header costs about a minute of compile time per file.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#include <string>

namespace megatron_rl {

std::string cuda_build_info() {
  const int v = CUDART_VERSION;  // e.g. 13000 for 13.0
  return "megatron_rl._C_cuda: CUDA " + std::to_string(v / 1000) + "." +
         std::to_string((v % 1000) / 10) + ", torch " + std::to_string(TORCH_VERSION_MAJOR) +
         "." + std::to_string(TORCH_VERSION_MINOR) + "." + std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace megatron_rl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_rl CUDA kernels; ops live under torch.ops.megatron_rl";
  m.def("cuda_build_info", &megatron_rl::cuda_build_info,
        "String naming the CUDA toolkit and torch this extension was compiled against.");
}

// Host-side view of the CUDA runtime, implemented in cuda/runtime_info.cu (plain C++ interface: no
// CUDA headers needed by the caller).
#pragma once
#include <cstdint>
#include <string>

namespace issl_fast::cuda {

struct DeviceQuery {
  int count = 0;         // usable devices; 0 when the runtime reports an error
  int error = 0;         // cudaError_t of cudaGetDeviceCount (0 = success)
  std::string message;   // the runtime's error string when error != 0
};

DeviceQuery device_count();
int runtime_version();   // CUDART_VERSION the module was built against, e.g. 13000

// out[i] = hash_word(column_key(key, cols[i]), words[i]) computed on the device (all pointers are
// device pointers, launched on `stream`); lets tests pin the GPU's hash to the reference.
// Throws std::runtime_error with the CUDA error string on failure.
void hash_words(uint64_t key, const uint64_t* cols, const uint64_t* words, uint64_t* out,
                int64_t n, std::uintptr_t stream);

}  // namespace issl_fast::cuda

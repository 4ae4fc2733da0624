// An exception cannot leave an OpenMP region: it calls std::terminate, and the whole Python
// process dies (a std::bad_alloc for a large scratch buffer would be a SIGABRT instead of a
// MemoryError). Regions whose threads never wait for each other (no barrier, no worksharing
// construct inside) run each thread's work through capture(); the first exception is rethrown
// after the region, where pybind11 turns it into a Python error.
#pragma once

#include <exception>
#include <mutex>

namespace issl_fast::cpu {

class FirstError {
 public:
  template <class Body>
  void capture(Body&& body) noexcept {
    try {
      body();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr error_;
};

}  // namespace issl_fast::cpu

#include "tandem/common/async.h"

#include <spdlog/spdlog.h>

#include <cstdlib>

namespace tandem {

void AbortOnException::operator()(const std::exception_ptr& e) const {
  if (!e) return;
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    spdlog::critical("internal error: an exception escaped {}: {}", what, ex.what());
  } catch (...) {
    spdlog::critical("internal error: a non-standard exception escaped {}", what);
  }
  spdlog::default_logger()->flush();
  std::abort();
}

void abort_on_exception(std::exception_ptr e) { AbortOnException{"a coroutine"}(e); }

}  // namespace tandem

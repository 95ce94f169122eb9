#include "tandem/common/async.h"

#include <spdlog/spdlog.h>

#include <cstdlib>

namespace tandem {

void abort_on_exception(std::exception_ptr e) {
  if (!e) return;
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    spdlog::critical("internal error: unhandled exception in a coroutine: {}", ex.what());
  } catch (...) {
    spdlog::critical("internal error: unhandled non-standard exception in a coroutine");
  }
  std::abort();
}

}  // namespace tandem

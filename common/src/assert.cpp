#include "tandem/common/assert.h"

#include <cstdio>
#include <cstdlib>

namespace tandem::detail {

void assert_fail(const char* expr, const char* file, int line, const char* msg) noexcept {
  // Plain stdio: the logger may be the thing that is broken.
  std::fprintf(stderr, "tandem: assertion failed: %s at %s:%d%s%s\n", expr, file, line, msg ? ": " : "",
               msg ? msg : "");
  std::fflush(stderr);
  std::abort();
}

}  // namespace tandem::detail

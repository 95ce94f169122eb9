// TANDEM_ASSERT: invariant checks that stay on in every build type.
//
// RelWithDebInfo and Release define NDEBUG, so plain assert() disappears exactly where data is
// at stake. A broken invariant means memory or on-disk state is not what the code believes; the
// only safe reaction is to stop before writing anything more, so the assertion logs and aborts.
// Expected failures (I/O errors, bad input) are never asserted: they are Result values.
#pragma once

namespace tandem::detail {
[[noreturn]] void assert_fail(const char* expr, const char* file, int line, const char* msg) noexcept;
}  // namespace tandem::detail

#define TANDEM_ASSERT(cond)                                              \
  do {                                                                   \
    if (!(cond)) [[unlikely]]                                            \
      ::tandem::detail::assert_fail(#cond, __FILE__, __LINE__, nullptr); \
  } while (0)

#define TANDEM_ASSERT_MSG(cond, msg)                                   \
  do {                                                                 \
    if (!(cond)) [[unlikely]]                                          \
      ::tandem::detail::assert_fail(#cond, __FILE__, __LINE__, (msg)); \
  } while (0)

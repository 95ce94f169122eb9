// Result<T>: the value of a fallible call, or the std::error_code saying why it failed.
//
// Expected failures are values in tandem, never exceptions: every module defines an `errc` enum
// with a std::error_category, and public calls that can fail return Result<T> (or Status for
// Result<void>). Results are [[nodiscard]] so an ignored failure is a compiler warning.
// An optional context string carries the detail an operator needs ("superblock slot 1: checksum
// mismatch") without inventing an error code per sentence.
#pragma once

#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>

#include "tandem/common/assert.h"

namespace tandem {

// An error with an optional human-readable context.
struct Error {
  std::error_code code;
  std::string context;

  Error() = default;
  Error(std::error_code c) : code(c) {}  // NOLINT(google-explicit-constructor)
  Error(std::error_code c, std::string ctx) : code(c), context(std::move(ctx)) {}
  template <typename E, typename = std::enable_if_t<std::is_error_code_enum_v<E>>>
  Error(E e) : code(make_error_code(e)) {}  // NOLINT(google-explicit-constructor)
  template <typename E, typename = std::enable_if_t<std::is_error_code_enum_v<E>>>
  Error(E e, std::string ctx) : code(make_error_code(e)), context(std::move(ctx)) {}

  // "context: message" or just the message.
  [[nodiscard]] std::string message() const {
    if (context.empty()) return code.message();
    return context + ": " + code.message();
  }
};

inline Error errno_error(int err, std::string ctx = {}) {
  return Error(std::error_code(err, std::generic_category()), std::move(ctx));
}

template <typename T>
class [[nodiscard]] Result {
 public:
  // A default Result is a failure ("no result"): Asio's co_spawn hands one to the completion
  // handler when the coroutine threw. It is never mistaken for success.
  Result() : v_(std::in_place_index<1>, Error(std::make_error_code(std::errc::operation_canceled), "no result")) {}
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT
  Result(Error e) : v_(std::in_place_index<1>, std::move(e)) {       // NOLINT
    TANDEM_ASSERT(std::get<1>(v_).code);
  }
  template <typename E, typename = std::enable_if_t<std::is_error_code_enum_v<E>>>
  Result(E e) : Result(Error(e)) {}  // NOLINT

  [[nodiscard]] bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & {
    TANDEM_ASSERT_MSG(ok(), error_message_cstr());
    return std::get<0>(v_);
  }
  const T& value() const& {
    TANDEM_ASSERT_MSG(ok(), error_message_cstr());
    return std::get<0>(v_);
  }
  T&& value() && {
    TANDEM_ASSERT_MSG(ok(), error_message_cstr());
    return std::get<0>(std::move(v_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  [[nodiscard]] const Error& error() const {
    TANDEM_ASSERT(!ok());
    return std::get<1>(v_);
  }
  [[nodiscard]] std::error_code code() const { return ok() ? std::error_code{} : error().code; }

 private:
  const char* error_message_cstr() const { return ok() ? "" : std::get<1>(v_).context.c_str(); }
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error e) : e_(std::move(e)) { TANDEM_ASSERT(e_.code); }  // NOLINT
  template <typename E, typename = std::enable_if_t<std::is_error_code_enum_v<E>>>
  Result(E e) : Result(Error(e)) {}  // NOLINT

  [[nodiscard]] bool ok() const { return !e_.code; }
  explicit operator bool() const { return ok(); }
  [[nodiscard]] const Error& error() const {
    TANDEM_ASSERT(!ok());
    return e_;
  }
  [[nodiscard]] std::error_code code() const { return e_.code; }

 private:
  Error e_;
};

using Status = Result<void>;

}  // namespace tandem

// Propagate a failed Result from the enclosing function (plain functions only).
#define TANDEM_TRY(expr)                                   \
  do {                                                     \
    auto&& tandem_try_r_ = (expr);                         \
    if (!tandem_try_r_.ok()) return tandem_try_r_.error(); \
  } while (0)
// Same, inside a coroutine returning awaitable<Result<...>>.
#define TANDEM_CO_TRY(expr)                                   \
  do {                                                        \
    auto&& tandem_try_r_ = (expr);                            \
    if (!tandem_try_r_.ok()) co_return tandem_try_r_.error(); \
  } while (0)

// Error codes of the api module (see docs/ for what an operator sees).
#pragma once

#include <system_error>

namespace tandem::api {

enum class errc {
  ok = 0,
  bad_request = 1,
  not_found = 2,
  unauthorized = 3,
  body_too_large = 4,
};

const std::error_category& api_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), api_category()}; }

}  // namespace tandem::api

template <>
struct std::is_error_code_enum<tandem::api::errc> : std::true_type {};

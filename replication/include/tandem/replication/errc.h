// Error codes of the replication module (see docs/ for what an operator sees).
#pragma once

#include <system_error>

namespace tandem::replication {

enum class errc {
  ok = 0,
  not_allowed_in_state = 1,
  wrong_role = 2,
  split_brain = 3,
  unrelated_volumes = 4,
  peer_unreachable = 5,
  unknown_session = 6,
  bad_message = 7,
  paused = 8,  // a transfer stopped because an operator paused the session
};

const std::error_category& replication_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), replication_category()}; }

}  // namespace tandem::replication

template <>
struct std::is_error_code_enum<tandem::replication::errc> : std::true_type {};

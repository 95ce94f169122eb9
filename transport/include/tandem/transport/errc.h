// Error codes of the transport module (see docs/ for what an operator sees).
#pragma once

#include <system_error>

namespace tandem::transport {

enum class errc {
  ok = 0,
  tls_handshake_failed = 1,
  peer_name_mismatch = 2,
  bad_frame = 3,
  frame_too_large = 4,
  hash_mismatch = 5,
  timeout = 6,
  connection_closed = 7,
  protocol_version = 8,
};

const std::error_category& transport_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), transport_category()}; }

}  // namespace tandem::transport

template <>
struct std::is_error_code_enum<tandem::transport::errc> : std::true_type {};

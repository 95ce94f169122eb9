// Error codes of the frontend (the NBD server's listeners and connections). Expected failures
// only: bad listen addresses, a socket path already served by a live process, and so on.
#pragma once

#include <system_error>

namespace tandem::frontend {

enum class errc {
  ok = 0,
  bad_address = 1,       // a listen address that does not parse ("host:port", "[v6]:port")
  address_in_use,        // a Unix socket path another live server is listening on
  not_a_socket,          // the Unix socket path exists and is not a socket: never removed
  socket_path_too_long,  // longer than sun_path allows
  unknown_export,        // no export of that name
  stopped,               // the server was stopped; it does not listen again
};

const std::error_category& frontend_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), frontend_category()}; }

}  // namespace tandem::frontend

template <>
struct std::is_error_code_enum<tandem::frontend::errc> : std::true_type {};

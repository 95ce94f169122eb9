#include "tandem/frontend/errc.h"

#include <string>

namespace tandem::frontend {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "tandem.frontend"; }
  std::string message(int c) const override {
    switch (static_cast<errc>(c)) {
      case errc::ok:
        return "ok";
      case errc::bad_address:
        return "bad listen address (expected host:port or [v6]:port)";
      case errc::address_in_use:
        return "another server is listening on this socket";
      case errc::not_a_socket:
        return "path exists and is not a socket; refusing to remove it";
      case errc::socket_path_too_long:
        return "Unix socket path is too long";
      case errc::unknown_export:
        return "no such export";
      case errc::stopped:
        return "server is stopped";
    }
    return "unknown frontend error " + std::to_string(c);
  }
};

}  // namespace

const std::error_category& frontend_category() noexcept {
  static const Category c;
  return c;
}

}  // namespace tandem::frontend

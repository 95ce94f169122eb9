#include "tandem/transport/errc.h"

#include <string>

namespace tandem::transport {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "tandem.transport"; }
  std::string message(int c) const override {
    switch (static_cast<errc>(c)) {
      case errc::ok:
        return "ok";
      case errc::tls_handshake_failed:
        return "tls handshake failed";
      case errc::peer_name_mismatch:
        return "peer name mismatch";
      case errc::bad_frame:
        return "bad frame";
      case errc::frame_too_large:
        return "frame too large";
      case errc::hash_mismatch:
        return "hash mismatch";
      case errc::timeout:
        return "timeout";
      case errc::connection_closed:
        return "connection closed";
      case errc::protocol_version:
        return "protocol version";
      case errc::bad_address:
        return "bad address (expected host:port or [v6]:port)";
      case errc::bad_config:
        return "bad link configuration";
      case errc::tls_config:
        return "bad TLS configuration";
      case errc::not_tls:
        return "peer does not speak TLS";
      case errc::send_queue_full:
        return "send queue full";
      case errc::stopped:
        return "link stopped";
    }
    return "unknown transport error " + std::to_string(c);
  }
};

}  // namespace

const std::error_category& transport_category() noexcept {
  static const Category c;
  return c;
}

}  // namespace tandem::transport

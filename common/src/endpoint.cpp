#include "tandem/common/endpoint.h"

#include <system_error>

namespace tandem {
namespace {

Error bad(std::string why) { return Error(std::make_error_code(std::errc::invalid_argument), std::move(why)); }

// Decimal digits only (no sign, no spaces); leading zeros are allowed.
Result<std::uint16_t> parse_port(std::string_view text, EndpointUse use) {
  if (text.empty()) return bad("no port after the ':'");
  std::uint32_t v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return bad("port \"" + std::string(text) + "\" is not a number");
    // Past 65535 the value no longer matters; stopping there keeps long inputs from overflowing.
    if (v <= 65535) v = v * 10 + static_cast<std::uint32_t>(c - '0');
  }
  if (v > 65535) return bad("port " + std::string(text) + " is above 65535");
  if (v == 0 && use == EndpointUse::dial) return bad("port 0 cannot be dialed; a port is 1 to 65535");
  return static_cast<std::uint16_t>(v);
}

}  // namespace

std::string Endpoint::to_string() const {
  const std::string p = std::to_string(port);
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + p;
  return host + ":" + p;
}

Result<Endpoint> parse_endpoint(std::string_view text, EndpointUse use) {
  if (text.empty()) return bad("it is empty");
  std::string_view host;
  std::string_view port;
  if (text.front() == '[') {
    const auto close = text.find(']');
    if (close == std::string_view::npos) return bad("'[' without a closing ']'");
    host = text.substr(1, close - 1);
    if (host.empty()) return bad("no address between the brackets");
    const std::string_view rest = text.substr(close + 1);
    if (rest.empty()) return bad("no port after ']'");
    if (rest.front() != ':') return bad("expected ':' and the port after ']'");
    port = rest.substr(1);
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos) return bad("no port");
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) {
      return bad("more than one ':'; write an IPv6 address in brackets, as in [::1]:port");
    }
    if (host.empty()) return bad("no host before the ':'");
  }
  if (host.find_first_of("[]") != std::string_view::npos) {
    return bad("a bracket inside the host; only an IPv6 address is bracketed, as in [::1]:port");
  }
  auto p = parse_port(port, use);
  if (!p) return p.error();
  return Endpoint{std::string(host), *p};
}

}  // namespace tandem

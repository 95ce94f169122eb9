// Endpoint: a TCP address as operators write it, "host:port" or "[v6]:port". Every "host:port"
// string in tandem (configuration, NBD and API listeners, the replication link) goes through
// parse_endpoint, so they all accept the same forms and reject the rest with the same reasons.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "tandem/common/result.h"

namespace tandem {

struct Endpoint {
  std::string host;  // a name, an IPv4 address or an IPv6 address (without the brackets); never empty
  std::uint16_t port = 0;

  // "host:port", or "[host]:port" when the host has a ':' (an IPv6 address).
  [[nodiscard]] std::string to_string() const;
  bool operator==(const Endpoint&) const = default;
};

// What the address is for: a listener may ask for port 0 (the kernel picks a free port); an
// address to dial needs a port from 1 to 65535.
enum class EndpointUse { dial, listen };

// Parses "host:port" (a name or an IPv4 address) or "[v6]:port". The port is decimal digits
// only. An IPv6 address without brackets is refused (its last ':' would be ambiguous).
// Failures carry std::errc::invalid_argument and a context that says what is wrong ("port
// 70000 is above 65535"); callers put their own name for the value in front of it.
Result<Endpoint> parse_endpoint(std::string_view text, EndpointUse use);

}  // namespace tandem

// Error codes of the transport module (the peer link). Expected failures only: a peer that is
// refused (certificate, name, protocol), a connection that breaks or goes silent, a frame that
// breaks the envelope grammar (docs/wire-protocol.md), bad link configuration. Each Error
// carries a context sentence with the detail an operator needs.
#pragma once

#include <system_error>

namespace tandem::transport {

enum class errc {
  ok = 0,
  tls_handshake_failed = 1,  // TLS did not complete: not TLS 1.3, an alert, a verify failure
  peer_name_mismatch = 2,    // the peer's certificate names someone else
  bad_frame = 3,             // bad magic, reserved bits set, unknown transport frame, bad hello
  frame_too_large = 4,       // payload length beyond kFramePayloadBytesMax (or a type's bound)
  hash_mismatch = 5,         // (replication's: extent hash check)
  timeout = 6,               // handshake not done in time, or the peer went silent (keep-alive)
  connection_closed = 7,     // closed locally, by the peer (goodbye) or by the network
  protocol_version = 8,      // frame version unknown, or no common protocol version in hello
  bad_address = 9,           // "host:port" does not parse or does not resolve
  bad_config = 10,           // link options out of range (intervals, hello size)
  tls_config = 11,           // CA, certificate or key file unreadable, invalid or mismatched
  not_tls = 12,              // the peer spoke plaintext to a TLS port
  send_queue_full = 13,      // more concurrent send() calls than kSendQueueFramesMax
  stopped = 14,              // the link was stopped
};

const std::error_category& transport_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), transport_category()}; }

}  // namespace tandem::transport

template <>
struct std::is_error_code_enum<tandem::transport::errc> : std::true_type {};

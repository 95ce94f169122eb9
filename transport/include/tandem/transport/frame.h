// The envelope of the peer link: the fixed frame header, the transport's own frame types (hello,
// keep-alive ping/pong, goodbye) and the hello payload that opens every connection.
//
// Sans-IO: no Asio, no sockets, no allocation beyond the returned values. Every decoder here
// reads untrusted bytes from the network and answers with a value or an Error (errc::bad_frame,
// errc::frame_too_large, errc::protocol_version), never with an assertion, and never reads past
// the span it was given. The grammar these functions implement is docs/wire-protocol.md; keep
// the two in step.
//
// Frame types 0..15 belong to the transport; the replication layer uses 16 and up, and the
// transport passes those through without looking at their flags or payload.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "tandem/common/result.h"

namespace tandem::transport {

// ----------------------------------------------------------------------------------- header

// magic "TNDM" | version u16le | type u16le | flags u16le | reserved u16le (0) | payload u32le
inline constexpr std::size_t kFrameHeaderBytes = 16;
// The largest payload: an 8 MiB extent plus 64 KiB for the replication message around it.
// Bounds the receiver's allocation per frame; anything larger is a broken or hostile peer.
inline constexpr std::uint32_t kFramePayloadBytesMax = (8u << 20) + 64 * 1024;
inline constexpr unsigned char kFrameMagic[4] = {'T', 'N', 'D', 'M'};
// The envelope layout version carried by every frame. Not the protocol version (that one is
// negotiated in the hello): a new envelope layout would be a new frame version.
inline constexpr std::uint16_t kFrameVersion = 1;

struct FrameHeader {
  std::uint16_t type = 0;
  std::uint16_t flags = 0;
  std::uint32_t payload_bytes = 0;
  std::uint16_t version = kFrameVersion;  // always kFrameVersion after a successful decode
};

// Writes the 16 header bytes. Asserts payload_bytes <= kFramePayloadBytesMax and the version.
void encode_frame_header(const FrameHeader& h, std::span<std::byte, kFrameHeaderBytes> out);
// Reads a header from the wire: bad magic or non-zero reserved bits → bad_frame; an unknown
// envelope version → protocol_version; a payload over kFramePayloadBytesMax → frame_too_large.
Result<FrameHeader> decode_frame_header(std::span<const std::byte, kFrameHeaderBytes> in);

// ------------------------------------------------------------------------------- frame types

inline constexpr std::uint16_t kFrameTypeHello = 1;            // first frame each way, exactly once
inline constexpr std::uint16_t kFrameTypePing = 2;             // keep-alive; answered by a pong
inline constexpr std::uint16_t kFrameTypePong = 3;             // echoes the ping's payload
inline constexpr std::uint16_t kFrameTypeGoodbye = 4;          // "I am closing, because <reason>"
inline constexpr std::uint16_t kFrameTypeTransportMax = 15;    // 5..15 reserved
inline constexpr std::uint16_t kFrameTypeApplicationMin = 16;  // replication's

inline constexpr std::uint32_t kPingPayloadBytes = 8;
// A goodbye reason is a log line for the peer's operator, not a message to parse.
inline constexpr std::uint32_t kGoodbyeReasonBytesMax = 256;

// Checks a decoded header against its type's rules before its payload is read, so a "ping"
// cannot make the receiver allocate 8 MiB: transport frames must have flags 0 and their type's
// payload size; types 5..15 are reserved (bad_frame). Application types pass.
Status check_frame_type(const FrameHeader& h);

// ------------------------------------------------------------------------------------- hello

// The protocol version of the whole wire protocol (envelope semantics and the replication
// messages carried in it). Bump it when a message changes incompatibly; keep the old one in
// kProtocolVersionMin while it is still spoken.
inline constexpr std::uint16_t kProtocolVersion = 1;
inline constexpr std::uint16_t kProtocolVersionMin = 1;

// version_min u16le | version_max u16le | reserved u32le | capabilities u64le |
// instance_id u64le | app_bytes u32le | app byte[app_bytes] | (ignored: later versions' fields)
inline constexpr std::size_t kHelloFixedBytes = 28;
// The replication layer's part of the hello (node name, volumes, generations...). Bounded so a
// hello is always a small frame read before the peer is trusted with anything bigger.
inline constexpr std::uint32_t kHelloAppBytesMax = 64 * 1024;
// Later protocol versions may append fields after the app part; a hello is still bounded.
inline constexpr std::uint32_t kHelloBytesMax = kHelloFixedBytes + kHelloAppBytesMax + 4096;

// Capability bits: 0..15 are the transport's (none defined in version 1), 16..63 are the
// replication layer's to define. The agreed set on a connection is the AND of both sides'.
inline constexpr std::uint64_t kCapabilitiesTransportMask = 0xffff;

struct Hello {
  std::uint16_t version_min = kProtocolVersionMin;
  std::uint16_t version_max = kProtocolVersion;
  std::uint64_t capabilities = 0;
  // Random per Link object: a peer whose instance changed has restarted. See link.h for how a
  // second connection from the same instance (a simultaneous dial) is resolved.
  std::uint64_t instance_id = 0;
  std::vector<std::byte> app;  // opaque to the transport
};

// Asserts app.size() <= kHelloAppBytesMax and version_min <= version_max.
std::vector<std::byte> encode_hello(const Hello& h);
// bad_frame when short, when app_bytes overruns the payload or exceeds kHelloAppBytesMax, or
// when version_min is 0 or above version_max.
Result<Hello> decode_hello(std::span<const std::byte> payload);

struct Agreement {
  std::uint16_t version = 0;       // highest version both speak
  std::uint64_t capabilities = 0;  // both sides' bits
};
// protocol_version when the two version ranges do not overlap.
Result<Agreement> negotiate(const Hello& ours, const Hello& theirs);

// ------------------------------------------------------------------------- small payloads

// A goodbye reason or a peer-supplied string made safe for a log line: printable ASCII kept,
// anything else shown as '?', at most kGoodbyeReasonBytesMax bytes.
std::string printable(std::span<const std::byte> bytes);

}  // namespace tandem::transport

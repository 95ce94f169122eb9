#include "tandem/transport/frame.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

#include "tandem/common/assert.h"
#include "tandem/common/units.h"
#include "tandem/transport/errc.h"

namespace tandem::transport {
namespace {

const unsigned char* bytes_of(std::span<const std::byte> s) { return reinterpret_cast<const unsigned char*>(s.data()); }

}  // namespace

void encode_frame_header(const FrameHeader& h, std::span<std::byte, kFrameHeaderBytes> out) {
  TANDEM_ASSERT(h.version == kFrameVersion);
  TANDEM_ASSERT(h.payload_bytes <= kFramePayloadBytesMax);
  auto* p = reinterpret_cast<unsigned char*>(out.data());
  std::memcpy(p, kFrameMagic, sizeof kFrameMagic);
  put_le16(p + 4, h.version);
  put_le16(p + 6, h.type);
  put_le16(p + 8, h.flags);
  put_le16(p + 10, 0);
  put_le32(p + 12, h.payload_bytes);
}

Result<FrameHeader> decode_frame_header(std::span<const std::byte, kFrameHeaderBytes> in) {
  const unsigned char* p = bytes_of(in);
  if (std::memcmp(p, kFrameMagic, sizeof kFrameMagic) != 0) {
    return Error(errc::bad_frame, fmt::format("bad magic 0x{:08x} (expected \"TNDM\")", get_be32(p)));
  }
  FrameHeader h;
  h.version = get_le16(p + 4);
  if (h.version != kFrameVersion) {
    return Error(errc::protocol_version,
                 fmt::format("frame version {} (this build speaks {})", h.version, kFrameVersion));
  }
  h.type = get_le16(p + 6);
  h.flags = get_le16(p + 8);
  const std::uint16_t reserved = get_le16(p + 10);
  if (reserved != 0) {
    return Error(errc::bad_frame, fmt::format("reserved header field is 0x{:04x}, not 0", reserved));
  }
  h.payload_bytes = get_le32(p + 12);
  if (h.payload_bytes > kFramePayloadBytesMax) {
    return Error(errc::frame_too_large,
                 fmt::format("payload length {} bytes (at most {})", h.payload_bytes, kFramePayloadBytesMax));
  }
  return h;
}

Status check_frame_type(const FrameHeader& h) {
  if (h.type >= kFrameTypeApplicationMin) return {};
  if (h.flags != 0) {
    return Error(errc::bad_frame, fmt::format("transport frame type {} with flags 0x{:04x}", h.type, h.flags));
  }
  switch (h.type) {
    case kFrameTypeHello:
      if (h.payload_bytes < kHelloFixedBytes || h.payload_bytes > kHelloBytesMax) {
        return Error(errc::frame_too_large, fmt::format("hello of {} bytes (expected {}..{})", h.payload_bytes,
                                                        kHelloFixedBytes, kHelloBytesMax));
      }
      return {};
    case kFrameTypePing:
    case kFrameTypePong:
      if (h.payload_bytes != kPingPayloadBytes) {
        return Error(errc::bad_frame,
                     fmt::format("{} of {} bytes (expected {})", h.type == kFrameTypePing ? "ping" : "pong",
                                 h.payload_bytes, kPingPayloadBytes));
      }
      return {};
    case kFrameTypeGoodbye:
      if (h.payload_bytes > kGoodbyeReasonBytesMax) {
        return Error(errc::frame_too_large,
                     fmt::format("goodbye of {} bytes (at most {})", h.payload_bytes, kGoodbyeReasonBytesMax));
      }
      return {};
    default:
      return Error(errc::bad_frame, fmt::format("unknown transport frame type {}", h.type));
  }
}

std::vector<std::byte> encode_hello(const Hello& h) {
  TANDEM_ASSERT(h.app.size() <= kHelloAppBytesMax);
  TANDEM_ASSERT(h.version_min >= 1 && h.version_min <= h.version_max);
  std::vector<std::byte> out(kHelloFixedBytes + h.app.size());
  auto* p = reinterpret_cast<unsigned char*>(out.data());
  put_le16(p + 0, h.version_min);
  put_le16(p + 2, h.version_max);
  put_le32(p + 4, 0);
  put_le64(p + 8, h.capabilities);
  put_le64(p + 16, h.instance_id);
  put_le32(p + 24, static_cast<std::uint32_t>(h.app.size()));
  if (!h.app.empty()) std::memcpy(p + kHelloFixedBytes, h.app.data(), h.app.size());
  return out;
}

Result<Hello> decode_hello(std::span<const std::byte> payload) {
  if (payload.size() < kHelloFixedBytes) {
    return Error(errc::bad_frame, fmt::format("hello of {} bytes (at least {})", payload.size(), kHelloFixedBytes));
  }
  const unsigned char* p = bytes_of(payload);
  Hello h;
  h.version_min = get_le16(p + 0);
  h.version_max = get_le16(p + 2);
  // p + 4: reserved, zero from version-1 senders, ignored so a later version may use it.
  h.capabilities = get_le64(p + 8);
  h.instance_id = get_le64(p + 16);
  const std::uint32_t app_bytes = get_le32(p + 24);
  if (h.version_min == 0 || h.version_min > h.version_max) {
    return Error(errc::bad_frame, fmt::format("hello with protocol versions {}..{}", h.version_min, h.version_max));
  }
  if (app_bytes > kHelloAppBytesMax) {
    return Error(errc::frame_too_large,
                 fmt::format("hello application part of {} bytes (at most {})", app_bytes, kHelloAppBytesMax));
  }
  if (app_bytes > payload.size() - kHelloFixedBytes) {
    return Error(errc::bad_frame, fmt::format("hello application part of {} bytes overruns the {}-byte payload",
                                              app_bytes, payload.size()));
  }
  const auto app = payload.subspan(kHelloFixedBytes, app_bytes);
  h.app.assign(app.begin(), app.end());
  // Bytes after the application part are fields of a later protocol version: ignored.
  return h;
}

Result<Agreement> negotiate(const Hello& ours, const Hello& theirs) {
  const std::uint16_t version = std::min(ours.version_max, theirs.version_max);
  if (version < ours.version_min || version < theirs.version_min) {
    return Error(errc::protocol_version,
                 fmt::format("no common protocol version: we speak {}..{}, the peer speaks {}..{}", ours.version_min,
                             ours.version_max, theirs.version_min, theirs.version_max));
  }
  return Agreement{version, ours.capabilities & theirs.capabilities};
}

std::string printable(std::span<const std::byte> bytes) {
  std::string s;
  const std::size_t n = std::min<std::size_t>(bytes.size(), kGoodbyeReasonBytesMax);
  s.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(bytes[i]);
    s.push_back(c >= 0x20 && c < 0x7f ? static_cast<char>(c) : '?');
  }
  return s;
}

}  // namespace tandem::transport

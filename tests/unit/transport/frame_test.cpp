// Plan: the sans-IO envelope codecs (frame.h) against the grammar of docs/wire-protocol.md.
// Headers round-trip for every field's extremes and have the documented byte layout; each way
// a header can be bad (magic, version, reserved bits, length) is rejected with its own error
// code and a reason; per-type payload rules hold for the transport frames and application
// frames pass; hellos round-trip, tolerate trailing fields of later versions, and every
// malformed hello is rejected; version negotiation picks the highest common version, ANDs the
// capabilities, and refuses disjoint ranges; printable() makes peer strings log-safe.
#include <gtest/gtest.h>

#include <array>
#include <cstring>

#include "tandem/transport/errc.h"
#include "tandem/transport/frame.h"

namespace tandem::transport {
namespace {

using Header = std::array<std::byte, kFrameHeaderBytes>;

Header encode(const FrameHeader& h) {
  Header b{};
  encode_frame_header(h, b);
  return b;
}

TEST(FrameHeader, RoundTripsAndHasTheDocumentedLayout) {
  for (std::uint16_t type : {std::uint16_t{0}, std::uint16_t{1}, std::uint16_t{16}, std::uint16_t{0xffff}}) {
    for (std::uint32_t len : {0u, 1u, 4096u, kFramePayloadBytesMax}) {
      FrameHeader h;
      h.type = type;
      h.flags = 0xa5c3;
      h.payload_bytes = len;
      const Header b = encode(h);
      const auto d = decode_frame_header(b);
      ASSERT_TRUE(d.ok()) << d.error().message();
      EXPECT_EQ(d->type, type);
      EXPECT_EQ(d->flags, 0xa5c3);
      EXPECT_EQ(d->payload_bytes, len);
      EXPECT_EQ(d->version, kFrameVersion);
    }
  }
  FrameHeader h;
  h.type = 0x1234;
  h.flags = 0x5678;
  h.payload_bytes = 0x0a0b0c0d;
  h.payload_bytes = 0x00010203;
  const Header b = encode(h);
  const unsigned char want[16] = {'T', 'N', 'D', 'M', 1, 0, 0x34, 0x12, 0x78, 0x56, 0, 0, 0x03, 0x02, 0x01, 0x00};
  EXPECT_EQ(std::memcmp(b.data(), want, 16), 0);
}

TEST(FrameHeader, RejectsBadMagicVersionReservedAndLength) {
  FrameHeader h;
  h.type = 20;
  h.payload_bytes = 10;
  Header b = encode(h);
  b[0] = std::byte{'X'};
  auto d = decode_frame_header(b);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.code(), errc::bad_frame);
  EXPECT_NE(d.error().context.find("bad magic"), std::string::npos);

  b = encode(h);
  b[4] = std::byte{2};
  d = decode_frame_header(b);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.code(), errc::protocol_version);
  EXPECT_NE(d.error().context.find("frame version 2"), std::string::npos);

  b = encode(h);
  b[11] = std::byte{1};
  d = decode_frame_header(b);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.code(), errc::bad_frame);
  EXPECT_NE(d.error().context.find("reserved"), std::string::npos);

  b = encode(h);
  const std::uint32_t over = kFramePayloadBytesMax + 1;
  std::memcpy(b.data() + 12, &over, 4);  // little-endian host
  d = decode_frame_header(b);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.code(), errc::frame_too_large);
  std::memset(b.data() + 12, 0xff, 4);
  EXPECT_EQ(decode_frame_header(b).code(), errc::frame_too_large);
}

TEST(FrameType, TransportFramesHaveFixedShapes) {
  auto check = [](std::uint16_t type, std::uint16_t flags, std::uint32_t len) {
    FrameHeader h;
    h.type = type;
    h.flags = flags;
    h.payload_bytes = len;
    return check_frame_type(h).code();
  };
  EXPECT_FALSE(check(kFrameTypePing, 0, 8));
  EXPECT_FALSE(check(kFrameTypePong, 0, 8));
  EXPECT_EQ(check(kFrameTypePing, 0, 9), errc::bad_frame);
  EXPECT_EQ(check(kFrameTypePong, 0, 0), errc::bad_frame);
  EXPECT_EQ(check(kFrameTypePing, 1, 8), errc::bad_frame);
  EXPECT_FALSE(check(kFrameTypeGoodbye, 0, 0));
  EXPECT_FALSE(check(kFrameTypeGoodbye, 0, kGoodbyeReasonBytesMax));
  EXPECT_EQ(check(kFrameTypeGoodbye, 0, kGoodbyeReasonBytesMax + 1), errc::frame_too_large);
  EXPECT_FALSE(check(kFrameTypeHello, 0, kHelloFixedBytes));
  EXPECT_EQ(check(kFrameTypeHello, 0, kHelloFixedBytes - 1), errc::frame_too_large);
  EXPECT_EQ(check(kFrameTypeHello, 0, kHelloBytesMax + 1), errc::frame_too_large);
  for (std::uint16_t t = 0; t <= kFrameTypeTransportMax; ++t) {
    if (t >= kFrameTypeHello && t <= kFrameTypeGoodbye) continue;
    EXPECT_EQ(check(t, 0, 0), errc::bad_frame) << t;
  }
  EXPECT_FALSE(check(kFrameTypeApplicationMin, 0xffff, kFramePayloadBytesMax));
  EXPECT_FALSE(check(0xffff, 0, 0));
}

TEST(Hello, RoundTripsAndIgnoresLaterFields) {
  Hello h;
  h.version_min = 1;
  h.version_max = 3;
  h.capabilities = 0x8000'0000'0001'0002;
  h.instance_id = 0x0123'4567'89ab'cdef;
  h.app = {std::byte{1}, std::byte{2}, std::byte{3}};
  std::vector<std::byte> b = encode_hello(h);
  EXPECT_EQ(b.size(), kHelloFixedBytes + 3);
  auto d = decode_hello(b);
  ASSERT_TRUE(d.ok()) << d.error().message();
  EXPECT_EQ(d->version_min, 1);
  EXPECT_EQ(d->version_max, 3);
  EXPECT_EQ(d->capabilities, h.capabilities);
  EXPECT_EQ(d->instance_id, h.instance_id);
  EXPECT_EQ(d->app, h.app);
  b.push_back(std::byte{0x77});  // a field of a later version
  d = decode_hello(b);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->app, h.app);

  h.app.assign(kHelloAppBytesMax, std::byte{9});
  d = decode_hello(encode_hello(h));
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->app.size(), kHelloAppBytesMax);
}

TEST(Hello, RejectsMalformed) {
  Hello h;
  h.app = {std::byte{1}, std::byte{2}};
  const std::vector<std::byte> good = encode_hello(h);
  EXPECT_EQ(decode_hello(std::span(good).first(kHelloFixedBytes - 1)).code(), errc::bad_frame);
  EXPECT_EQ(decode_hello(std::span(good).first(kHelloFixedBytes + 1)).code(),
            errc::bad_frame);  // app overruns
  std::vector<std::byte> b = good;
  b[0] = std::byte{0};  // version_min 0
  EXPECT_EQ(decode_hello(b).code(), errc::bad_frame);
  b = good;
  b[0] = std::byte{5};  // min 5 > max 1
  EXPECT_EQ(decode_hello(b).code(), errc::bad_frame);
  b = good;
  const std::uint32_t huge = kHelloAppBytesMax + 1;
  std::memcpy(b.data() + 24, &huge, 4);
  EXPECT_EQ(decode_hello(b).code(), errc::frame_too_large);
}

TEST(Hello, NegotiatesHighestCommonVersionAndSharedCapabilities) {
  Hello a;
  a.version_min = 1;
  a.version_max = 3;
  a.capabilities = 0b1110;
  Hello b;
  b.version_min = 2;
  b.version_max = 5;
  b.capabilities = 0b0111;
  auto r = negotiate(a, b);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->version, 3);
  EXPECT_EQ(r->capabilities, 0b0110u);
  b.version_min = 4;
  r = negotiate(a, b);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.code(), errc::protocol_version);
  EXPECT_NE(r.error().context.find("we speak 1..3, the peer speaks 4..5"), std::string::npos);
}

TEST(Printable, KeepsPrintableAsciiOnlyAndBoundsLength) {
  const std::vector<std::byte> in = {std::byte{'o'}, std::byte{'k'}, std::byte{'\n'}, std::byte{0xff}, std::byte{'!'}};
  EXPECT_EQ(printable(in),
            "ok?"
            "?!");
  const std::vector<std::byte> longer(1000, std::byte{'x'});
  EXPECT_EQ(printable(longer).size(), kGoodbyeReasonBytesMax);
}

}  // namespace
}  // namespace tandem::transport

// Fuzzer for the transport's parsers of untrusted bytes (transport/frame.h): the frame header
// decoder, the per-type frame checks, the hello decoder and the version negotiation.
//
// Input layout: one mode byte, then bytes as a peer would send them. Mode bit 0 clear: the
// bytes are a stream of frames (header, then payload), parsed the way a connection's reader
// does until the first bad header; mode bit 0 set: the bytes are one hello payload.
//
// Beyond "no crash, no assert", it checks the decoders' contract: a header that decodes
// re-encodes to exactly the same 16 bytes (the grammar has no two spellings) and is within
// kFramePayloadBytesMax; a frame that passes check_frame_type has the size its type demands;
// a hello that decodes re-encodes to the same bytes (but for the ignored reserved field and
// trailing fields), its application part is within kHelloAppBytesMax, and a negotiated
// version lies in both sides' ranges; printable() output is bounded and printable.
#include <array>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "fuzz_driver.h"
#include "tandem/common/assert.h"
#include "tandem/transport/frame.h"

namespace tt = tandem::transport;

namespace {

void check_hello(std::span<const std::byte> payload) {
  const tandem::Result<tt::Hello> h = tt::decode_hello(payload);
  if (!h.ok()) {
    TANDEM_ASSERT(!h.error().context.empty());
    return;
  }
  TANDEM_ASSERT(h->app.size() <= tt::kHelloAppBytesMax);
  TANDEM_ASSERT(h->version_min >= 1 && h->version_min <= h->version_max);
  const std::vector<std::byte> again = tt::encode_hello(*h);
  TANDEM_ASSERT(again.size() <= payload.size());
  // Bytes 4..7 are reserved (ignored on decode, written as zero); the rest must match.
  TANDEM_ASSERT(std::memcmp(again.data(), payload.data(), 4) == 0);
  TANDEM_ASSERT(std::memcmp(again.data() + 8, payload.data() + 8, again.size() - 8) == 0);

  const tt::Hello ours;
  const tandem::Result<tt::Agreement> a = tt::negotiate(ours, *h);
  if (a.ok()) {
    TANDEM_ASSERT(a->version >= ours.version_min && a->version <= ours.version_max);
    TANDEM_ASSERT(a->version >= h->version_min && a->version <= h->version_max);
    TANDEM_ASSERT((a->capabilities & ~h->capabilities) == 0);
  } else {
    TANDEM_ASSERT(h->version_max < ours.version_min || h->version_min > ours.version_max);
  }
}

void check_printable(std::span<const std::byte> bytes) {
  const std::string s = tt::printable(bytes);
  TANDEM_ASSERT(s.size() <= tt::kGoodbyeReasonBytesMax);
  TANDEM_ASSERT(s.size() == std::min<std::size_t>(bytes.size(), tt::kGoodbyeReasonBytesMax));
  for (const char c : s) TANDEM_ASSERT(c >= 0x20 && c < 0x7f);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t mode = data[0];
  const std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data + 1), size - 1);
  if ((mode & 1) != 0) {
    check_hello(in);
    return 0;
  }
  std::size_t pos = 0;
  bool first = true;
  while (in.size() - pos >= tt::kFrameHeaderBytes) {
    const std::span<const std::byte, tt::kFrameHeaderBytes> hb(in.data() + pos, tt::kFrameHeaderBytes);
    pos += tt::kFrameHeaderBytes;
    const tandem::Result<tt::FrameHeader> h = tt::decode_frame_header(hb);
    if (!h.ok()) {
      TANDEM_ASSERT(!h.error().context.empty());
      break;  // the connection closes
    }
    TANDEM_ASSERT(h->payload_bytes <= tt::kFramePayloadBytesMax);
    std::array<std::byte, tt::kFrameHeaderBytes> again{};
    tt::encode_frame_header(*h, again);
    TANDEM_ASSERT(std::memcmp(again.data(), hb.data(), tt::kFrameHeaderBytes) == 0);
    if (!tt::check_frame_type(*h).ok()) break;
    // Only now would a reader allocate the payload: the type's bound has been checked.
    const std::size_t n = std::min<std::size_t>(h->payload_bytes, in.size() - pos);
    const std::span<const std::byte> payload = in.subspan(pos, n);
    pos += n;
    switch (h->type) {
      case tt::kFrameTypeHello:
        TANDEM_ASSERT(h->payload_bytes >= tt::kHelloFixedBytes && h->payload_bytes <= tt::kHelloBytesMax);
        check_hello(payload);
        break;
      case tt::kFrameTypePing:
      case tt::kFrameTypePong:
        TANDEM_ASSERT(h->payload_bytes == tt::kPingPayloadBytes);
        break;
      case tt::kFrameTypeGoodbye:
        TANDEM_ASSERT(h->payload_bytes <= tt::kGoodbyeReasonBytesMax);
        check_printable(payload);
        break;
      default:
        TANDEM_ASSERT(h->type >= tt::kFrameTypeApplicationMin);
        break;
    }
    if (first) check_printable(payload);
    first = false;
  }
  return 0;
}

// ---------------------------------------------------------------------------------- seeds

namespace {

struct Stream {
  std::string s;
  void frame(std::uint16_t type, std::uint16_t flags, const std::vector<std::byte>& payload) {
    std::array<std::byte, tt::kFrameHeaderBytes> h{};
    tt::FrameHeader fh;
    fh.type = type;
    fh.flags = flags;
    fh.payload_bytes = static_cast<std::uint32_t>(payload.size());
    tt::encode_frame_header(fh, h);
    s.append(reinterpret_cast<const char*>(h.data()), h.size());
    if (!payload.empty()) s.append(reinterpret_cast<const char*>(payload.data()), payload.size());
  }
};

std::vector<std::byte> bytes(const std::string& t) {
  std::vector<std::byte> v(t.size());
  if (!t.empty()) std::memcpy(v.data(), t.data(), t.size());
  return v;
}

std::vector<std::byte> hello(std::uint16_t lo, std::uint16_t hi, std::uint64_t caps, const std::string& app) {
  tt::Hello h;
  h.version_min = lo;
  h.version_max = hi;
  h.capabilities = caps;
  h.instance_id = 0x1122334455667788;
  h.app = bytes(app);
  return tt::encode_hello(h);
}

}  // namespace

namespace tandem::fuzz {

std::vector<std::string> seeds() {
  std::vector<std::string> out;
  Stream conv;  // a whole conversation
  conv.s.push_back('\0');
  conv.frame(tt::kFrameTypeHello, 0, hello(1, 1, 0x10000, "node=site-a volumes=3"));
  conv.frame(tt::kFrameTypePing, 0, std::vector<std::byte>(8, std::byte{7}));
  conv.frame(tt::kFrameTypePong, 0, std::vector<std::byte>(8, std::byte{7}));
  conv.frame(16, 0x8001, bytes("an extent header and some data"));
  conv.frame(17, 0, {});
  conv.frame(tt::kFrameTypeGoodbye, 0, bytes("link stopping"));
  out.push_back(conv.s);

  Stream odd;  // reserved types, a second hello, a ping of the wrong size
  odd.s.push_back('\x02');
  odd.frame(tt::kFrameTypeHello, 0, hello(1, 4, ~0ull, std::string(300, 'x')));
  odd.frame(tt::kFrameTypeHello, 0, hello(2, 2, 0, ""));
  odd.frame(9, 0, {});
  odd.frame(tt::kFrameTypePing, 0, std::vector<std::byte>(4));
  out.push_back(odd.s);

  Stream bad;  // an over-long length written by hand
  bad.s.push_back('\0');
  bad.frame(20, 0, bytes("ok"));
  bad.s += std::string("TNDM\x01\x00\x10\x00\x00\x00\x00\x00\xff\xff\xff\xff", 16);
  out.push_back(bad.s);

  for (const auto& h : {hello(1, 1, 0, "app"), hello(1, 9, 5, std::string(1000, 'a')), hello(3, 5, 1, "")}) {
    std::string one(1, '\x01');
    one.append(reinterpret_cast<const char*>(h.data()), h.size());
    out.push_back(one);
    out.push_back(one + "trailing fields of a later version");
  }
  return out;
}

}  // namespace tandem::fuzz

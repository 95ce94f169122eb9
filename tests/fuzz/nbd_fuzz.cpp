// Fuzzer for the NBD parsers of untrusted bytes: the handshake machine and the transmission
// request decoder and validator (frontend/nbd_protocol.h).
//
// Input layout: one mode byte, then a byte stream as a client would send it. The mode picks
// how the stream is cut into feed() calls (what the machine asks for, single bytes, odd-sized
// chunks or everything at once) and the export state the requests are checked against. The
// bytes left after the handshake's decision (or all of them after a close) are decoded as
// requests with their WRITE payloads.
//
// Beyond "no crash, no assert", it checks the machine's contract: it consumes everything while
// negotiating and nothing past its decision, its output is a well-formed sequence of option
// replies (or the EXPORT_NAME reply) of bounded size, and every request the validator lets
// through is in bounds with flags valid for its command.
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "fuzz_driver.h"
#include "tandem/common/assert.h"
#include "tandem/common/units.h"
#include "tandem/frontend/nbd_protocol.h"

namespace nbd = tandem::frontend::nbd;

namespace {

constexpr std::uint64_t kExportBytes = 1 << 20;
constexpr std::uint32_t kPayloadMax = 65536;
// Largest output one feed() may produce: a LIST over the three exports below, or a GO with
// every info reply. Far below this; the bound catches runaway output.
constexpr std::size_t kOutputBytesMax = 16 * 1024;

std::vector<nbd::NbdExport> exports() {
  return {nbd::NbdExport{"vol0", "first", kExportBytes, nbd::transmission_flags(true)},
          nbd::NbdExport{"ro", "read-only", 8192, nbd::transmission_flags(false)},
          nbd::NbdExport{std::string(300, 'n'), "", 4096, nbd::transmission_flags(true)}};
}

// Checks that `out` is a sequence of complete option replies, possibly ending (once the
// client chose an export with NBD_OPT_EXPORT_NAME) in that option's reply.
void check_output(const std::vector<std::uint8_t>& out, const nbd::Handshake& hs) {
  std::size_t p = 0;
  while (p < out.size()) {
    const std::size_t left = out.size() - p;
    if (left >= 8 && tandem::get_be64(out.data() + p) == nbd::kOptReplyMagic) {
      TANDEM_ASSERT(left >= nbd::kOptionReplyHeaderBytes);
      const std::uint32_t len = tandem::get_be32(out.data() + p + 16);
      p += nbd::kOptionReplyHeaderBytes;
      TANDEM_ASSERT(len <= out.size() - p);
      p += len;
      continue;
    }
    // NBD_OPT_EXPORT_NAME's reply: size, flags, and the zeroes unless the client said no.
    TANDEM_ASSERT(hs.outcome() == nbd::HandshakeOutcome::go);
    TANDEM_ASSERT(left == (hs.no_zeroes() ? 10 : nbd::kExportNameReplyBytes));
    TANDEM_ASSERT(tandem::get_be64(out.data() + p) == hs.chosen().size_bytes);
    break;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::uint8_t mode = data[0];
  const std::uint8_t* in = data + 1;
  const std::size_t n = size - 1;

  nbd::HandshakeLimits limits;
  limits.option_bytes_max = 8192;  // small, so ERR_TOO_BIG skipping is reachable
  limits.options_max = 64;
  limits.payload_bytes_max = kPayloadMax;
  nbd::Handshake hs(exports(), limits);
  TANDEM_ASSERT(hs.take_output().size() == nbd::kGreetingBytes);

  std::size_t pos = 0;
  while (pos < n && hs.outcome() == nbd::HandshakeOutcome::negotiating) {
    std::size_t chunk = 0;
    switch (mode & 3) {
      case 0:
        chunk = hs.bytes_wanted();
        break;  // what the server does
      case 1:
        chunk = 1;
        break;
      case 2:
        chunk = 1 + (pos * 7919) % 61;
        break;
      default:
        chunk = n - pos;
        break;
    }
    TANDEM_ASSERT(hs.bytes_wanted() > 0);
    chunk = std::min(chunk, n - pos);
    const std::size_t used = hs.feed({in + pos, chunk});
    TANDEM_ASSERT(used <= chunk);
    if (hs.outcome() == nbd::HandshakeOutcome::negotiating) TANDEM_ASSERT(used == chunk);
    pos += used;
    const std::vector<std::uint8_t> out = hs.take_output();
    TANDEM_ASSERT(out.size() <= kOutputBytesMax);
    check_output(out, hs);
  }
  if (hs.outcome() != nbd::HandshakeOutcome::negotiating) {
    TANDEM_ASSERT(hs.bytes_wanted() == 0);
    TANDEM_ASSERT(hs.feed({in + pos, n - pos}) == 0);
  }

  nbd::ExportState state;
  state.size_bytes = kExportBytes;
  if (hs.outcome() == nbd::HandshakeOutcome::go) state.size_bytes = hs.chosen().size_bytes;
  state.writable = (mode & 4) != 0;
  state.shutting_down = (mode & 8) != 0;
  state.payload_bytes_max = kPayloadMax;

  // The transmission phase: requests, each followed by its WRITE payload.
  while (n - pos >= nbd::kRequestHeaderBytes) {
    const std::span<const std::uint8_t, nbd::kRequestHeaderBytes> hdr(in + pos, nbd::kRequestHeaderBytes);
    pos += nbd::kRequestHeaderBytes;
    const auto req = nbd::decode_request(hdr);
    if (!req) break;  // the server closes the connection
    std::uint8_t again[nbd::kRequestHeaderBytes];
    nbd::encode_request(*req, again);
    TANDEM_ASSERT(std::memcmp(again, hdr.data(), sizeof again) == 0);

    const nbd::RequestCheck c = nbd::check_request(*req, state);
    if (c.verdict == nbd::Verdict::close || c.verdict == nbd::Verdict::disconnect) break;
    TANDEM_ASSERT(c.payload_bytes == (req->type == nbd::kCmdWrite ? req->length : 0));
    if (c.verdict == nbd::Verdict::error) {
      TANDEM_ASSERT(c.error != 0 && !c.reason.empty());
      const auto chunk = nbd::encode_error_chunk(req->handle, c.error, c.reason);
      TANDEM_ASSERT(chunk.size() == nbd::kChunkHeaderBytes + 6 + c.reason.size());
    } else {
      TANDEM_ASSERT(!state.shutting_down);
      TANDEM_ASSERT(req->type <= nbd::kCmdWriteZeroes && req->type != nbd::kCmdDisc);
      TANDEM_ASSERT((req->flags & ~(nbd::kCmdFlagFua | nbd::kCmdFlagNoHole | nbd::kCmdFlagFastZero)) == 0);
      if (req->type != nbd::kCmdFlush) {
        TANDEM_ASSERT(req->length > 0);
        TANDEM_ASSERT(req->offset <= state.size_bytes);
        TANDEM_ASSERT(req->length <= state.size_bytes - req->offset);
      }
      if (req->type == nbd::kCmdRead || req->type == nbd::kCmdWrite) {
        TANDEM_ASSERT(req->length <= kPayloadMax);
      }
      if (req->type == nbd::kCmdWrite || req->type == nbd::kCmdTrim || req->type == nbd::kCmdWriteZeroes) {
        TANDEM_ASSERT(state.writable);
      }
    }
    pos += std::min<std::size_t>(c.payload_bytes, n - pos);
  }
  return 0;
}

// ---------------------------------------------------------------------------------- seeds

namespace {

struct Stream {
  std::string s;
  void u8(std::uint8_t v) { s.push_back(static_cast<char>(v)); }
  void be16(std::uint16_t v) {
    std::uint8_t b[2];
    tandem::put_be16(b, v);
    s.append(reinterpret_cast<const char*>(b), 2);
  }
  void be32(std::uint32_t v) {
    std::uint8_t b[4];
    tandem::put_be32(b, v);
    s.append(reinterpret_cast<const char*>(b), 4);
  }
  void be64(std::uint64_t v) {
    std::uint8_t b[8];
    tandem::put_be64(b, v);
    s.append(reinterpret_cast<const char*>(b), 8);
  }
  void option(std::uint32_t opt, const std::string& data) {
    be64(nbd::kOptMagic);
    be32(opt);
    be32(static_cast<std::uint32_t>(data.size()));
    s += data;
  }
  void go(std::uint32_t opt, const std::string& name, std::vector<std::uint16_t> infos) {
    Stream d;
    d.be32(static_cast<std::uint32_t>(name.size()));
    d.s += name;
    d.be16(static_cast<std::uint16_t>(infos.size()));
    for (auto i : infos) d.be16(i);
    option(opt, d.s);
  }
  void request(std::uint16_t flags, std::uint16_t type, std::uint64_t off, std::uint32_t len) {
    be32(nbd::kRequestMagic);
    be16(flags);
    be16(type);
    be64(0x1000 + s.size());
    be64(off);
    be32(len);
    if (type == nbd::kCmdWrite) s.append(len, 'w');
  }
  void requests() {
    request(0, nbd::kCmdWrite, 4096, 512);
    request(nbd::kCmdFlagFua, nbd::kCmdWrite, 1, 3);
    request(0, nbd::kCmdRead, 0, 4096);
    request(nbd::kCmdFlagNoHole, nbd::kCmdRead, 0, 4096);
    request(0, nbd::kCmdRead, kExportBytes, 1);
    request(0, nbd::kCmdFlush, 0, 0);
    request(nbd::kCmdFlagFua, nbd::kCmdTrim, 0, 8192);
    request(nbd::kCmdFlagNoHole | nbd::kCmdFlagFastZero, nbd::kCmdWriteZeroes, 100, 5000);
    request(0, nbd::kCmdCache, 0, 65536);
    request(0, 42, 0, 0);
    request(0, nbd::kCmdDisc, 0, 0);
  }
};

}  // namespace

namespace tandem::fuzz {

std::vector<std::string> seeds() {
  std::vector<std::string> out;
  for (int mode : {0, 1, 2, 3, 4, 5, 6, 7, 12, 15}) {
    Stream go;  // modern client: structured replies, GO with every info type
    go.u8(static_cast<std::uint8_t>(mode));
    go.be32(nbd::kClientFlagFixedNewstyle | nbd::kClientFlagNoZeroes);
    go.option(nbd::kOptStructuredReply, "");
    go.go(nbd::kOptGo, "vol0", {nbd::kInfoName, nbd::kInfoDescription, nbd::kInfoBlockSize});
    go.requests();
    out.push_back(go.s);
  }
  Stream old;  // EXPORT_NAME with zeroes
  old.u8(4);
  old.be32(nbd::kClientFlagFixedNewstyle);
  old.option(nbd::kOptExportName, "vol0");
  old.requests();
  out.push_back(old.s);

  Stream nonfixed;  // plain newstyle client
  nonfixed.u8(0);
  nonfixed.be32(0);
  nonfixed.option(nbd::kOptExportName, "");
  nonfixed.requests();
  out.push_back(nonfixed.s);

  Stream browse;  // nbdinfo --list style, ending in ABORT
  browse.u8(0);
  browse.be32(nbd::kClientFlagFixedNewstyle | nbd::kClientFlagNoZeroes);
  browse.option(nbd::kOptList, "");
  browse.go(nbd::kOptInfo, "ro", {nbd::kInfoDescription});
  browse.go(nbd::kOptInfo, std::string(300, 'n'), {});
  browse.go(nbd::kOptInfo, "missing", {});
  browse.option(nbd::kOptStartTls, "");
  browse.option(nbd::kOptSetMetaContext, std::string(12, 'm'));
  browse.option(nbd::kOptAbort, "");
  out.push_back(browse.s);

  Stream big;  // an option over the limit, skipped, then GO
  big.u8(2);
  big.be32(nbd::kClientFlagFixedNewstyle);
  big.option(nbd::kOptInfo, std::string(9000, 'x'));
  big.go(nbd::kOptGo, "", {});
  big.request(0, nbd::kCmdWrite, 0, 65536);
  big.request(0, nbd::kCmdRead, 0, 65537);
  big.be32(nbd::kRequestMagic);  // then an oversized write header
  big.be16(0);
  big.be16(nbd::kCmdWrite);
  big.be64(1);
  big.be64(0);
  big.be32(0xffffffff);
  out.push_back(big.s);
  return out;
}

}  // namespace tandem::fuzz

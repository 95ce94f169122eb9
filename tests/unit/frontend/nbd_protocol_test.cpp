// Plan: the sans-IO NBD protocol code, byte for byte. The handshake machine is driven like the
// server drives it (feed bytes, collect output) and its replies are parsed back: the good paths
// (NBD_OPT_EXPORT_NAME with and without the 124 zero bytes, GO with every info type, INFO,
// LIST, STRUCTURED_REPLY, ABORT), negotiation continuing after refusals (unknown option →
// ERR_UNSUP, STARTTLS → ERR_POLICY, unknown export → ERR_UNKNOWN, malformed data →
// ERR_INVALID, over-long option → ERR_TOO_BIG without buffering), and the cases that must close
// (bad magic, unknown client flags, non-fixed client, unknown EXPORT_NAME, too many options).
// Feeding one byte at a time must give the same bytes as feeding everything at once, and the
// machine must never consume past its decision. The request validator is checked for every
// error the server promises (EINVAL/ENOSPC/EPERM/ESHUTDOWN/close) and the reply encoders and
// errno mapping against hand-computed layouts.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "tandem/common/units.h"
#include "tandem/engine/errc.h"
#include "tandem/frontend/nbd_protocol.h"

namespace tandem::frontend::nbd {
namespace {

using Bytes = std::vector<std::uint8_t>;

void put16(Bytes& b, std::uint16_t v) {
  std::uint8_t t[2];
  put_be16(t, v);
  b.insert(b.end(), t, t + 2);
}
void put32(Bytes& b, std::uint32_t v) {
  std::uint8_t t[4];
  put_be32(t, v);
  b.insert(b.end(), t, t + 4);
}
void put64(Bytes& b, std::uint64_t v) {
  std::uint8_t t[8];
  put_be64(t, v);
  b.insert(b.end(), t, t + 8);
}
void put_str(Bytes& b, std::string_view s) { b.insert(b.end(), s.begin(), s.end()); }

Bytes option(std::uint32_t opt, const Bytes& data = {}) {
  Bytes b;
  put64(b, kOptMagic);
  put32(b, opt);
  put32(b, static_cast<std::uint32_t>(data.size()));
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

Bytes go_data(std::string_view name, std::vector<std::uint16_t> infos = {}) {
  Bytes b;
  put32(b, static_cast<std::uint32_t>(name.size()));
  put_str(b, name);
  put16(b, static_cast<std::uint16_t>(infos.size()));
  for (auto i : infos) put16(b, i);
  return b;
}

Bytes client_flags(std::uint32_t f) {
  Bytes b;
  put32(b, f);
  return b;
}

struct OptReply {
  std::uint32_t option = 0;
  std::uint32_t type = 0;
  Bytes data;
};

// Parses a run of option replies; fails the test on a malformed one.
std::vector<OptReply> parse_replies(const Bytes& b) {
  std::vector<OptReply> out;
  std::size_t p = 0;
  while (p < b.size()) {
    EXPECT_GE(b.size() - p, kOptionReplyHeaderBytes);
    if (b.size() - p < kOptionReplyHeaderBytes) break;
    EXPECT_EQ(get_be64(b.data() + p), kOptReplyMagic);
    OptReply r;
    r.option = get_be32(b.data() + p + 8);
    r.type = get_be32(b.data() + p + 12);
    const std::uint32_t len = get_be32(b.data() + p + 16);
    p += kOptionReplyHeaderBytes;
    EXPECT_LE(len, b.size() - p);
    if (len > b.size() - p) break;
    r.data.assign(b.begin() + static_cast<std::ptrdiff_t>(p), b.begin() + static_cast<std::ptrdiff_t>(p + len));
    p += len;
    out.push_back(std::move(r));
  }
  return out;
}

constexpr std::uint16_t kRwFlags = kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendTrim | kTxSendWriteZeroes |
                                   kTxSendFastZero | kTxSendCache | kTxCanMultiConn;

class HandshakeTest : public ::testing::Test {
 protected:
  HandshakeTest() : hs(exports(), limits()) {}
  static std::vector<NbdExport> exports() {
    return {NbdExport{"vol0", "tandem volume vol0", 1 << 20, kRwFlags},
            NbdExport{"vol1", "second", 8192, kRwFlags | kTxReadOnly}};
  }
  static HandshakeLimits limits() {
    HandshakeLimits l;
    l.payload_bytes_max = 1 << 20;
    l.options_max = 16;
    return l;
  }
  // Consumes the greeting and checks it.
  void SetUp() override {
    Bytes g = hs.take_output();
    ASSERT_EQ(g.size(), kGreetingBytes);
    EXPECT_EQ(get_be64(g.data()), kNbdMagic);
    EXPECT_EQ(get_be64(g.data() + 8), kOptMagic);
    EXPECT_EQ(get_be16(g.data() + 16), kFlagFixedNewstyle | kFlagNoZeroes);
  }
  // Feeds everything (must all be consumed) and returns what the machine wants to send.
  Bytes send(const Bytes& in) {
    EXPECT_EQ(hs.feed(in), in.size());
    return hs.take_output();
  }
  Handshake hs;
};

TEST_F(HandshakeTest, GoWithEveryInfoTypeAndStructuredReplies) {
  EXPECT_EQ(hs.bytes_wanted(), 4u);
  EXPECT_TRUE(send(client_flags(kClientFlagFixedNewstyle | kClientFlagNoZeroes)).empty());
  EXPECT_EQ(hs.bytes_wanted(), kOptionHeaderBytes);

  auto sr = parse_replies(send(option(kOptStructuredReply)));
  ASSERT_EQ(sr.size(), 1u);
  EXPECT_EQ(sr[0].option, kOptStructuredReply);
  EXPECT_EQ(sr[0].type, kRepAck);

  auto r = parse_replies(send(option(kOptGo, go_data("vol0", {kInfoName, kInfoDescription, kInfoBlockSize, 77}))));
  ASSERT_EQ(r.size(), 5u);
  for (const auto& x : r) EXPECT_EQ(x.option, kOptGo);
  ASSERT_EQ(r[0].type, kRepInfo);
  ASSERT_EQ(r[0].data.size(), 12u);
  EXPECT_EQ(get_be16(r[0].data.data()), kInfoExport);
  EXPECT_EQ(get_be64(r[0].data.data() + 2), 1u << 20);
  EXPECT_EQ(get_be16(r[0].data.data() + 10), kRwFlags);
  EXPECT_EQ(get_be16(r[1].data.data()), kInfoName);
  EXPECT_EQ(std::string(r[1].data.begin() + 2, r[1].data.end()), "vol0");
  EXPECT_EQ(get_be16(r[2].data.data()), kInfoDescription);
  EXPECT_EQ(std::string(r[2].data.begin() + 2, r[2].data.end()), "tandem volume vol0");
  ASSERT_EQ(r[3].data.size(), 14u);
  EXPECT_EQ(get_be16(r[3].data.data()), kInfoBlockSize);
  EXPECT_EQ(get_be32(r[3].data.data() + 2), 1u);
  EXPECT_EQ(get_be32(r[3].data.data() + 6), 4096u);
  EXPECT_EQ(get_be32(r[3].data.data() + 10), 1u << 20);
  EXPECT_EQ(r[4].type, kRepAck);

  EXPECT_EQ(hs.outcome(), HandshakeOutcome::go);
  EXPECT_EQ(hs.chosen().name, "vol0");
  EXPECT_TRUE(hs.structured_replies());
  EXPECT_EQ(hs.bytes_wanted(), 0u);
}

TEST_F(HandshakeTest, GoWithoutRequestsStillSendsExportAndBlockSize) {
  send(client_flags(kClientFlagFixedNewstyle));
  auto r = parse_replies(send(option(kOptGo, go_data("vol1"))));
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(get_be16(r[0].data.data()), kInfoExport);
  EXPECT_EQ(get_be64(r[0].data.data() + 2), 8192u);
  EXPECT_EQ(get_be16(r[0].data.data() + 10), kRwFlags | kTxReadOnly);
  EXPECT_EQ(get_be16(r[1].data.data()), kInfoBlockSize);
  EXPECT_EQ(r[2].type, kRepAck);
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::go);
  EXPECT_EQ(hs.chosen().name, "vol1");
  EXPECT_FALSE(hs.structured_replies());
}

TEST_F(HandshakeTest, EmptyNameIsTheDefaultExport) {
  send(client_flags(kClientFlagFixedNewstyle));
  auto r = parse_replies(send(option(kOptGo, go_data("", {kInfoName}))));
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(std::string(r[1].data.begin() + 2, r[1].data.end()), "vol0");
  EXPECT_EQ(hs.chosen().name, "vol0");
}

TEST_F(HandshakeTest, ExportNameWithZeroes) {
  send(client_flags(kClientFlagFixedNewstyle));
  Bytes name;
  put_str(name, "vol1");
  Bytes out = send(option(kOptExportName, name));
  ASSERT_EQ(out.size(), kExportNameReplyBytes);
  EXPECT_EQ(get_be64(out.data()), 8192u);
  EXPECT_EQ(get_be16(out.data() + 8), kRwFlags | kTxReadOnly);
  for (std::size_t i = 10; i < out.size(); ++i) EXPECT_EQ(out[i], 0) << i;
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::go);
  EXPECT_EQ(hs.chosen().name, "vol1");
}

TEST_F(HandshakeTest, ExportNameNoZeroesAndDefault) {
  send(client_flags(kClientFlagFixedNewstyle | kClientFlagNoZeroes));
  Bytes out = send(option(kOptExportName));
  ASSERT_EQ(out.size(), 10u);
  EXPECT_EQ(get_be64(out.data()), 1u << 20);
  EXPECT_EQ(hs.chosen().name, "vol0");
}

TEST_F(HandshakeTest, NonFixedClientMayUseExportName) {
  send(client_flags(0));
  Bytes name;
  put_str(name, "vol0");
  EXPECT_EQ(send(option(kOptExportName, name)).size(), kExportNameReplyBytes);
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::go);
}

TEST_F(HandshakeTest, NonFixedClientSendingOtherOptionsIsClosed) {
  send(client_flags(0));
  // Decided at the option header: the data is never read.
  EXPECT_EQ(hs.feed(option(kOptGo, go_data("vol0"))), kOptionHeaderBytes);
  EXPECT_FALSE(hs.has_output());
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::close);
}

TEST_F(HandshakeTest, UnknownExportNameCloses) {
  send(client_flags(kClientFlagFixedNewstyle));
  Bytes name;
  put_str(name, "nope");
  EXPECT_TRUE(send(option(kOptExportName, name)).empty());
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::close);
  EXPECT_NE(hs.reason().find("nope"), std::string::npos);
}

TEST_F(HandshakeTest, InfoThenGo) {
  send(client_flags(kClientFlagFixedNewstyle));
  auto r = parse_replies(send(option(kOptInfo, go_data("vol1", {kInfoDescription}))));
  ASSERT_EQ(r.size(), 4u);
  EXPECT_EQ(r[0].option, kOptInfo);
  EXPECT_EQ(std::string(r[1].data.begin() + 2, r[1].data.end()), "second");
  EXPECT_EQ(r[3].type, kRepAck);
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::negotiating);
  send(option(kOptGo, go_data("vol0")));
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::go);
  EXPECT_EQ(hs.chosen().name, "vol0");
}

TEST_F(HandshakeTest, ListNamesEveryExport) {
  send(client_flags(kClientFlagFixedNewstyle));
  auto r = parse_replies(send(option(kOptList)));
  ASSERT_EQ(r.size(), 3u);
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(r[i].type, kRepServer);
    ASSERT_GE(r[i].data.size(), 4u);
    EXPECT_EQ(get_be32(r[i].data.data()), 4u);
    EXPECT_EQ(std::string(r[i].data.begin() + 4, r[i].data.end()), "vol" + std::to_string(i));
  }
  EXPECT_EQ(r[2].type, kRepAck);

  auto bad = parse_replies(send(option(kOptList, Bytes{1})));
  ASSERT_EQ(bad.size(), 1u);
  EXPECT_EQ(bad[0].type, kRepErrInvalid);
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::negotiating);
}

TEST_F(HandshakeTest, AbortIsAcknowledged) {
  send(client_flags(kClientFlagFixedNewstyle));
  auto r = parse_replies(send(option(kOptAbort)));
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].option, kOptAbort);
  EXPECT_EQ(r[0].type, kRepAck);
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::abort);
}

TEST_F(HandshakeTest, UnknownOptionsAreRefusedAndNegotiationGoesOn) {
  send(client_flags(kClientFlagFixedNewstyle));
  for (std::uint32_t opt : {99u, kOptSetMetaContext, kOptListMetaContext, 4u}) {
    auto r = parse_replies(send(option(opt, Bytes{1, 2, 3})));
    ASSERT_EQ(r.size(), 1u);
    EXPECT_EQ(r[0].option, opt);
    EXPECT_EQ(r[0].type, kRepErrUnsup);
    EXPECT_FALSE(r[0].data.empty());  // a message for humans
  }
  send(option(kOptGo, go_data("vol0")));
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::go);
}

TEST_F(HandshakeTest, StartTlsIsRefusedByPolicy) {
  send(client_flags(kClientFlagFixedNewstyle));
  auto r = parse_replies(send(option(kOptStartTls)));
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrPolicy);
  send(option(kOptGo, go_data("vol0")));
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::go);
}

TEST_F(HandshakeTest, UnknownExportInGoIsAnError) {
  send(client_flags(kClientFlagFixedNewstyle));
  auto r = parse_replies(send(option(kOptGo, go_data("missing"))));
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].type, kRepErrUnknown);
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::negotiating);
  send(option(kOptGo, go_data("vol1")));
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::go);
}

TEST_F(HandshakeTest, MalformedOptionDataIsInvalid) {
  send(client_flags(kClientFlagFixedNewstyle));
  Bytes short_data{0, 0, 0};
  Bytes name_too_long = go_data("vol0");
  put_be32(name_too_long.data(), 100);
  Bytes count_mismatch = go_data("vol0", {kInfoName});
  count_mismatch.pop_back();
  for (const Bytes& d : {short_data, name_too_long, count_mismatch}) {
    auto r = parse_replies(send(option(kOptGo, d)));
    ASSERT_EQ(r.size(), 1u);
    EXPECT_EQ(r[0].type, kRepErrInvalid);
  }
  auto sr = parse_replies(send(option(kOptStructuredReply, Bytes{0})));
  ASSERT_EQ(sr.size(), 1u);
  EXPECT_EQ(sr[0].type, kRepErrInvalid);
  EXPECT_FALSE(hs.structured_replies());
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::negotiating);
}

TEST_F(HandshakeTest, OverlongOptionIsSkippedAndRefused) {
  send(client_flags(kClientFlagFixedNewstyle));
  const std::uint32_t len = limits().option_bytes_max + 1;
  Bytes hdr;
  put64(hdr, kOptMagic);
  put32(hdr, kOptGo);
  put32(hdr, len);
  EXPECT_TRUE(send(hdr).empty());
  EXPECT_EQ(hs.bytes_wanted(), len);
  // Stream the data in small pieces: nothing is buffered, nothing is answered early.
  Bytes chunk(1000, 0xab);
  std::uint32_t left = len;
  while (left > 0) {
    const std::uint32_t n = std::min<std::uint32_t>(left, 1000);
    EXPECT_EQ(hs.feed({chunk.data(), n}), n);
    left -= n;
    if (left > 0) {
      EXPECT_FALSE(hs.has_output());
    }
  }
  auto r = parse_replies(hs.take_output());
  ASSERT_EQ(r.size(), 1u);
  EXPECT_EQ(r[0].option, kOptGo);
  EXPECT_EQ(r[0].type, kRepErrTooBig);
  send(option(kOptGo, go_data("vol0")));
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::go);
}

TEST_F(HandshakeTest, OverlongExportNameCloses) {
  send(client_flags(kClientFlagFixedNewstyle));
  Bytes hdr;
  put64(hdr, kOptMagic);
  put32(hdr, kOptExportName);
  put32(hdr, 0xffffffffu);
  EXPECT_TRUE(send(hdr).empty());
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::close);
}

TEST_F(HandshakeTest, BadOptionMagicCloses) {
  send(client_flags(kClientFlagFixedNewstyle));
  Bytes o = option(kOptList);
  o[0] ^= 0xff;
  EXPECT_TRUE(send(o).empty());
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::close);
}

TEST_F(HandshakeTest, UnknownClientFlagsClose) {
  EXPECT_TRUE(send(client_flags(kClientFlagFixedNewstyle | 4)).empty());
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::close);
}

TEST_F(HandshakeTest, TooManyOptionsClose) {
  send(client_flags(kClientFlagFixedNewstyle));
  for (std::uint32_t i = 0; i < limits().options_max; ++i) {
    send(option(99));
    ASSERT_EQ(hs.outcome(), HandshakeOutcome::negotiating);
  }
  send(option(99));
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::close);
}

TEST_F(HandshakeTest, NeverConsumesPastTheDecision) {
  Bytes in = client_flags(kClientFlagFixedNewstyle);
  const Bytes go = option(kOptGo, go_data("vol0"));
  in.insert(in.end(), go.begin(), go.end());
  const std::size_t decision = in.size();
  in.insert(in.end(), 28, 0x25);  // the first request, already on the wire
  EXPECT_EQ(hs.feed(in), decision);
  EXPECT_EQ(hs.outcome(), HandshakeOutcome::go);
  EXPECT_EQ(hs.feed(in), 0u);
}

TEST(HandshakeBytes, ByteAtATimeEqualsAllAtOnce) {
  std::vector<NbdExport> ex{NbdExport{"a", "d", 4096, kRwFlags}};
  Bytes in = client_flags(kClientFlagFixedNewstyle | kClientFlagNoZeroes);
  for (const Bytes& o : {option(kOptStructuredReply), option(kOptList), option(42, Bytes(9, 1)),
                         option(kOptInfo, go_data("a", {kInfoName})), option(kOptStartTls),
                         option(kOptGo, go_data("a", {kInfoBlockSize}))}) {
    in.insert(in.end(), o.begin(), o.end());
  }
  Handshake whole(ex);
  Bytes out_whole = whole.take_output();
  EXPECT_EQ(whole.feed(in), in.size());
  Bytes t = whole.take_output();
  out_whole.insert(out_whole.end(), t.begin(), t.end());

  Handshake bytewise(ex);
  Bytes out_bytes = bytewise.take_output();
  for (std::size_t i = 0; i < in.size(); ++i) {
    ASSERT_GE(bytewise.bytes_wanted(), 1u);
    ASSERT_EQ(bytewise.feed({in.data() + i, 1}), 1u);
    t = bytewise.take_output();
    out_bytes.insert(out_bytes.end(), t.begin(), t.end());
  }
  EXPECT_EQ(out_whole, out_bytes);
  EXPECT_EQ(whole.outcome(), HandshakeOutcome::go);
  EXPECT_EQ(bytewise.outcome(), HandshakeOutcome::go);
}

// ------------------------------------------------------------------------------ requests

std::array<std::uint8_t, kRequestHeaderBytes> header(const Request& r) {
  std::array<std::uint8_t, kRequestHeaderBytes> h{};
  encode_request(r, h);
  return h;
}

TEST(RequestDecode, RoundTripAndLayout) {
  const Request r{kCmdFlagFua, kCmdWrite, 0x1122334455667788, 0x0102030405060708, 0xa0b0c0d0};
  auto h = header(r);
  EXPECT_EQ(get_be32(h.data()), kRequestMagic);
  EXPECT_EQ(get_be16(h.data() + 4), kCmdFlagFua);
  EXPECT_EQ(get_be16(h.data() + 6), kCmdWrite);
  EXPECT_EQ(get_be64(h.data() + 8), 0x1122334455667788u);
  EXPECT_EQ(get_be64(h.data() + 16), 0x0102030405060708u);
  EXPECT_EQ(get_be32(h.data() + 24), 0xa0b0c0d0u);
  auto d = decode_request(h);
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(d->flags, r.flags);
  EXPECT_EQ(d->type, r.type);
  EXPECT_EQ(d->handle, r.handle);
  EXPECT_EQ(d->offset, r.offset);
  EXPECT_EQ(d->length, r.length);
}

TEST(RequestDecode, BadMagicIsRejected) {
  auto h = header(Request{0, kCmdRead, 1, 0, 512});
  h[3] ^= 1;
  EXPECT_FALSE(decode_request(h).has_value());
}

class RequestCheckTest : public ::testing::Test {
 protected:
  ExportState rw{1 << 20, true, false, 65536};
  ExportState ro{1 << 20, false, false, 65536};
  static RequestCheck check(std::uint16_t type, std::uint16_t flags, std::uint64_t off, std::uint32_t len,
                            const ExportState& s) {
    return check_request(Request{flags, type, 7, off, len}, s);
  }
  static void expect_error(const RequestCheck& c, std::uint32_t err, std::uint32_t payload = 0) {
    EXPECT_EQ(c.verdict, Verdict::error);
    EXPECT_EQ(c.error, err);
    EXPECT_EQ(c.payload_bytes, payload);
    EXPECT_FALSE(c.reason.empty());
  }
};

TEST_F(RequestCheckTest, GoodRequestsExecute) {
  EXPECT_EQ(check(kCmdRead, 0, 0, 4096, rw).verdict, Verdict::execute);
  EXPECT_EQ(check(kCmdRead, kCmdFlagFua, (1 << 20) - 1, 1, ro).verdict, Verdict::execute);
  auto w = check(kCmdWrite, kCmdFlagFua, 1, 65536, rw);
  EXPECT_EQ(w.verdict, Verdict::execute);
  EXPECT_EQ(w.payload_bytes, 65536u);
  EXPECT_EQ(check(kCmdFlush, 0, 0, 0, rw).verdict, Verdict::execute);
  EXPECT_EQ(check(kCmdFlush, 0, 0, 0, ro).verdict, Verdict::execute);
  EXPECT_EQ(check(kCmdTrim, kCmdFlagFua, 0, 1 << 20, rw).verdict, Verdict::execute);
  EXPECT_EQ(check(kCmdWriteZeroes, kCmdFlagFua | kCmdFlagNoHole | kCmdFlagFastZero, 0, 1 << 20, rw).verdict,
            Verdict::execute);
  EXPECT_EQ(check(kCmdCache, 0, 4096, 4096, rw).verdict, Verdict::execute);
  EXPECT_EQ(check(kCmdDisc, 0, 0, 0, rw).verdict, Verdict::disconnect);
}

TEST_F(RequestCheckTest, ReadErrorsAreEinval) {
  expect_error(check(kCmdRead, 0, 1 << 20, 1, rw), kEinval);              // past the end
  expect_error(check(kCmdRead, 0, (1 << 20) - 4095, 4096, rw), kEinval);  // straddles it
  expect_error(check(kCmdRead, 0, UINT64_MAX - 10, 4096, rw), kEinval);   // wraps around
  expect_error(check(kCmdRead, 0, 0, 65537, rw), kEinval);                // over the maximum
  expect_error(check(kCmdRead, kCmdFlagNoHole, 0, 512, rw), kEinval);     // flag not for READ
  expect_error(check(kCmdRead, kCmdFlagDf, 0, 512, rw), kEinval);         // DF not advertised
  expect_error(check(kCmdRead, 1u << 9, 0, 512, rw), kEinval);            // unknown flag
  expect_error(check(kCmdRead, 0, 0, 0, rw), kEinval);                    // zero length
  expect_error(check(kCmdCache, 0, 1 << 20, 4096, rw), kEinval);
}

TEST_F(RequestCheckTest, WriteErrorsKeepThePayloadInSync) {
  expect_error(check(kCmdWrite, 0, 1 << 20, 512, rw), kEnospc, 512);
  expect_error(check(kCmdWrite, 0, UINT64_MAX, 512, rw), kEnospc, 512);
  expect_error(check(kCmdWrite, 0, 0, 512, ro), kEperm, 512);
  expect_error(check(kCmdWrite, kCmdFlagNoHole, 0, 512, rw), kEinval, 512);
  expect_error(check(kCmdTrim, 0, (1 << 20) - 4096, 8192, rw), kEnospc);
  expect_error(check(kCmdTrim, 0, 0, 4096, ro), kEperm);
  expect_error(check(kCmdTrim, kCmdFlagFastZero, 0, 4096, rw), kEinval);
  expect_error(check(kCmdWriteZeroes, 0, 1 << 20, 1, rw), kEnospc);
  expect_error(check(kCmdWriteZeroes, 0, 0, 1, ro), kEperm);
  expect_error(check(kCmdWriteZeroes, kCmdFlagDf, 0, 1, rw), kEinval);
  expect_error(check(kCmdFlush, 0, 1, 0, rw), kEinval);
  expect_error(check(kCmdFlush, kCmdFlagNoHole, 0, 0, rw), kEinval);
}

TEST_F(RequestCheckTest, OversizedWritePayloadCloses) {
  auto c = check(kCmdWrite, 0, 0, 65537, rw);
  EXPECT_EQ(c.verdict, Verdict::close);
  EXPECT_EQ(c.payload_bytes, 0u);
  // Even on a read-only export: the payload cannot be skipped cheaply.
  EXPECT_EQ(check(kCmdWrite, 0, 0, 0xffffffffu, ro).verdict, Verdict::close);
}

TEST_F(RequestCheckTest, UnknownCommandsAreEinval) {
  expect_error(check(kCmdBlockStatus, 0, 0, 4096, rw), kEinval);
  expect_error(check(9, 0, 0, 4096, rw), kEinval);
  expect_error(check(0xffff, 0, 0, 0, rw), kEinval);
}

TEST_F(RequestCheckTest, ShutdownRefusesEverythingButDisc) {
  ExportState s = rw;
  s.shutting_down = true;
  expect_error(check(kCmdRead, 0, 0, 4096, s), kEshutdown);
  expect_error(check(kCmdWrite, 0, 0, 4096, s), kEshutdown, 4096);
  expect_error(check(kCmdFlush, 0, 0, 0, s), kEshutdown);
  EXPECT_EQ(check(kCmdDisc, 0, 0, 0, s).verdict, Verdict::disconnect);
}

TEST(Replies, Layouts) {
  std::array<std::uint8_t, kSimpleReplyBytes> s{};
  encode_simple_reply(s, kEnospc, 0xabcdef);
  EXPECT_EQ(get_be32(s.data()), kSimpleReplyMagic);
  EXPECT_EQ(get_be32(s.data() + 4), kEnospc);
  EXPECT_EQ(get_be64(s.data() + 8), 0xabcdefu);

  std::array<std::uint8_t, kOffsetDataPrefixBytes> d{};
  encode_offset_data_prefix(d, 5, 4096, 100);
  EXPECT_EQ(get_be32(d.data()), kStructuredReplyMagic);
  EXPECT_EQ(get_be16(d.data() + 4), kReplyFlagDone);
  EXPECT_EQ(get_be16(d.data() + 6), kReplyTypeOffsetData);
  EXPECT_EQ(get_be64(d.data() + 8), 5u);
  EXPECT_EQ(get_be32(d.data() + 16), 108u);
  EXPECT_EQ(get_be64(d.data() + 20), 4096u);

  auto e = encode_error_chunk(9, kEinval, "bad");
  ASSERT_EQ(e.size(), kChunkHeaderBytes + 6 + 3);
  EXPECT_EQ(get_be16(e.data() + 4), kReplyFlagDone);
  EXPECT_EQ(get_be16(e.data() + 6), kReplyTypeError);
  EXPECT_EQ(get_be64(e.data() + 8), 9u);
  EXPECT_EQ(get_be32(e.data() + 16), 9u);
  EXPECT_EQ(get_be32(e.data() + 20), kEinval);
  EXPECT_EQ(get_be16(e.data() + 24), 3u);
  EXPECT_EQ(std::string(e.begin() + 26, e.end()), "bad");

  const std::string huge(10000, 'x');
  EXPECT_EQ(encode_error_chunk(1, kEio, huge).size(), kChunkHeaderBytes + 6 + kStringBytesMax);
}

TEST(Replies, EngineErrorMapping) {
  using engine::errc;
  EXPECT_EQ(nbd_error_from({}), 0u);
  EXPECT_EQ(nbd_error_from(errc::out_of_range), kEinval);
  EXPECT_EQ(nbd_error_from(errc::no_space), kEnospc);
  EXPECT_EQ(nbd_error_from(errc::read_only), kEperm);
  EXPECT_EQ(nbd_error_from(errc::volume_failed), kEperm);
  EXPECT_EQ(nbd_error_from(errc::shutting_down), kEshutdown);
  EXPECT_EQ(nbd_error_from(errc::not_supported), kEnotsup);
  EXPECT_EQ(nbd_error_from(errc::io_error), kEio);
  EXPECT_EQ(nbd_error_from(errc::intent_log_full), kEio);
  EXPECT_EQ(nbd_error_from(std::error_code(ENOSPC, std::generic_category())), kEnospc);
  EXPECT_EQ(nbd_error_from(std::error_code(EDQUOT, std::generic_category())), kEnospc);
  EXPECT_EQ(nbd_error_from(std::error_code(EIO, std::generic_category())), kEio);
  EXPECT_EQ(nbd_error_from(std::make_error_code(std::errc::invalid_argument)), kEio);
}

TEST(Flags, TransmissionFlags) {
  EXPECT_EQ(transmission_flags(true), kRwFlags);
  EXPECT_EQ(transmission_flags(false), kRwFlags | kTxReadOnly);
}

}  // namespace
}  // namespace tandem::frontend::nbd

// Plan: every way a peer can be wrong is refused, with a log line that names the reason, and
// never costs the listener: after each refusal a good peer still connects. A raw TLS client
// (transport_test_util.h) plays the bad peer so every byte is the test's choice: a certificate
// from another CA, an expired certificate, a certificate for another name, no certificate, a
// TLS 1.2-only client, a plaintext client, a client that never speaks and one that completes
// TLS but never sends its hello (each closed by the handshake timeout; waited for with a
// generous bound, never timed), a flood of silent connections (a full table drops its oldest
// silent member to accept the next, so the real peer still gets in, and a peer further along
// is never the one dropped), a first frame that is not a hello, a hello with no common
// version, and — after a good hello — each kind of bad frame (bad magic,
// unknown envelope version, reserved bits, an over-long length, a reserved transport type, a
// malformed ping, a second hello). Bad frames close that connection with the reason logged and
// sent to the peer in a goodbye. The dialing side refuses a listener with the wrong name too.
#include <gtest/gtest.h>
#include <openssl/ssl.h>
#include <sys/socket.h>

#include <cerrno>
#include <ostream>
#include <variant>

#include <boost/asio/connect.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>

#include "tandem/transport/errc.h"
#include "transport_test_util.h"

namespace tandem::transport::test {
namespace {

using namespace asio::experimental::awaitable_operators;

LinkOptions dialer(const std::string& peer, std::uint16_t port) {
  LinkOptions o = options(peer);
  o.listen_address = "";
  o.connect_address = "127.0.0.1:" + std::to_string(port);
  return o;
}

// A good site-b Link still gets a connection to `a` (the listener survived whatever came
// before); stops that Link again.
asio::awaitable<bool> good_peer_connects(TransportTest& t, Peer& a) {
  const std::size_t before = a.connections.size();
  Peer& b = t.add_peer("site-b", dialer("site-a", a.link->listen_port()));
  if (!b.link->start()) co_return false;
  const bool ok = co_await eventually([&a, &b, before] { return a.connections.size() > before && b.connected(); }, 10s);
  co_await b.link->stop();
  co_return ok;
}

// A raw client with `cert` (signed by `ca`) completes what it can of the handshake and reads
// until the server closes; returns the server's goodbye reason, if any.
asio::awaitable<std::string> raw_attempt(TransportTest& t, std::uint16_t port, std::string cert, std::string ca,
                                         RawClient::Mode mode = RawClient::Mode::tls13) {
  RawClient raw(t.io_, cert, ca, mode);
  if (co_await raw.connect(port)) co_return "connect failed";
  if (co_await raw.handshake()) co_return "";
  // TLS 1.3: the client is done before the server has judged its certificate; the verdict
  // arrives as an alert (or a goodbye frame) on the first read.
  if (co_await raw.send_hello(77)) co_return "";
  co_return co_await raw.read_until_closed();
}

// A TCP connection to `port` that will never say anything.
asio::awaitable<std::unique_ptr<Tcp::socket>> silent_connection(TransportTest& t, std::uint16_t port) {
  auto s = std::make_unique<Tcp::socket>(t.io_);
  auto [ec] = co_await s->async_connect(Tcp::endpoint(asio::ip::make_address("127.0.0.1"), port), kTuple);
  if (ec) ADD_FAILURE() << "connect: " << ec.message();
  co_return s;
}

// True once the server has closed `s` (EOF or reset); false if it is still open after `limit`.
// The server never writes to a client that has said nothing, so the first read ends with the
// close.
asio::awaitable<bool> closed_within(Tcp::socket& s, std::chrono::milliseconds limit) {
  std::array<char, 256> buf{};
  auto r = co_await (s.async_read_some(asio::buffer(buf), kTuple) || sleep_for(limit));
  if (r.index() == 1) co_return false;
  const auto [ec, n] = std::get<0>(r);
  if (!ec) ADD_FAILURE() << "the server sent " << n << " bytes to a silent client";
  co_return ec.failed();
}

// True while the server has not closed `s`: nothing to read, not even an EOF. Asks the kernel
// without waiting.
bool still_open(Tcp::socket& s) {
  char c = 0;
  const ssize_t n = ::recv(s.native_handle(), &c, 1, MSG_PEEK | MSG_DONTWAIT);
  return n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
}

// How the server names the connection `s` in its log lines.
std::string address_of(const Tcp::socket& s) { return "127.0.0.1:" + std::to_string(s.local_endpoint().port()); }

struct RefusalCase {
  const char* name;
  const char* cert;
  const char* ca;
  RawClient::Mode mode;
  std::vector<std::string_view> log;  // all in one log line
};

// Names, not bytes, in test listings (and so in ctest's test names).
void PrintTo(const RefusalCase& c, std::ostream* os) { *os << c.name; }

class Refusal : public TransportTest, public ::testing::WithParamInterface<RefusalCase> {};

TEST_P(Refusal, IsLoggedWithItsReasonAndTheListenerStaysUp) {
  run(io_, [](Refusal& t) -> asio::awaitable<void> {
    const RefusalCase& c = t.GetParam();
    Peer& a = t.add_peer("site-a", options("site-b"));
    CO_ASSERT(a.link->start().ok());
    const std::string goodbye = co_await raw_attempt(t, a.link->listen_port(), c.cert, c.ca, c.mode);
    (void)goodbye;
    CO_ASSERT(co_await eventually(
        [&t, &c] {
          for (auto part : c.log) {
            if (!t.logs_.contains({"peer 127.0.0.1:", "refused", part})) return false;
          }
          return true;
        },
        5s));
    EXPECT_TRUE(a.connections.empty());
    CO_ASSERT(co_await good_peer_connects(t, a));
  }(*this));
}

INSTANTIATE_TEST_SUITE_P(
    Transport, Refusal,
    ::testing::Values(
        RefusalCase{"wrong_ca",
                    "other-site-b",
                    "other-ca",
                    RawClient::Mode::tls13,
                    {"certificate verify failed: unable to get local issuer certificate"}},
        RefusalCase{"expired",
                    "expired-site-b",
                    "ca",
                    RawClient::Mode::tls13,
                    {"certificate verify failed: certificate has expired"}},
        RefusalCase{"wrong_name",
                    "site-c",
                    "ca",
                    RawClient::Mode::tls13,
                    {"certificate name 'site-c' does not match expected peer 'site-b'"}},
        RefusalCase{"no_certificate", "", "ca", RawClient::Mode::tls13, {"the peer presented no certificate"}},
        RefusalCase{"tls12_only", "site-b", "ca", RawClient::Mode::tls12_only, {"does not offer TLS 1.3"}}),
    [](const ::testing::TestParamInfo<RefusalCase>& i) { return std::string(i.param.name); });

TEST_F(TransportTest, WrongNameRefusalIsSentToThePeerToo) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer& a = t.add_peer("site-a", options("site-b"));
    CO_ASSERT(a.link->start().ok());
    const std::string goodbye = co_await raw_attempt(t, a.link->listen_port(), "site-c", "ca");
    EXPECT_EQ(goodbye, "certificate name 'site-c' does not match expected peer 'site-b'");
  }(*this));
}

TEST_F(TransportTest, PlaintextClientIsRefused) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer& a = t.add_peer("site-a", options("site-b"));
    CO_ASSERT(a.link->start().ok());
    Tcp::socket s(t.io_);
    auto [cec] =
        co_await s.async_connect(Tcp::endpoint(asio::ip::make_address("127.0.0.1"), a.link->listen_port()), kTuple);
    CO_ASSERT(!cec);
    const std::string junk = "hello, this is not TLS\r\n\r\n";
    auto [wec, wn] = co_await asio::async_write(s, asio::buffer(junk), kTuple);
    (void)wn;
    CO_ASSERT(!wec);
    std::array<char, 64> buf{};
    auto [rec, rn] = co_await asio::async_read(s, asio::buffer(buf), kTuple);
    EXPECT_TRUE(rec) << "the server answered plaintext with " << rn << " bytes";
    EXPECT_TRUE(t.logs_.contains({"refused", "plaintext (non-TLS) client: first byte 0x68"})) << t.logs_.dump();
    CO_ASSERT(co_await good_peer_connects(t, a));
  }(*this));
}

TEST_F(TransportTest, SilentClientTimesOutInTheHandshake) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    LinkOptions o = options("site-b");
    o.handshake_timeout_ms = 300;
    Peer& a = t.add_peer("site-a", o);
    CO_ASSERT(a.link->start().ok());
    std::unique_ptr<Tcp::socket> s = co_await silent_connection(t, a.link->listen_port());
    // Generous: the bound is 300 ms; only a server that never drops the connection fails this.
    EXPECT_TRUE(co_await closed_within(*s, 10s));
    EXPECT_TRUE(t.logs_.contains(
        {"handshake with 127.0.0.1:", "handshake not completed within 300 ms", "waiting for the TLS client hello"}))
        << t.logs_.dump();
    CO_ASSERT(co_await good_peer_connects(t, a));
  }(*this));
}

TEST_F(TransportTest, ClientThatNeverSendsItsHelloTimesOutInTheHandshake) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    LinkOptions o = options("site-b");
    o.handshake_timeout_ms = 300;
    Peer& a = t.add_peer("site-a", o);
    CO_ASSERT(a.link->start().ok());
    // A client with a good certificate: TLS completes and the server sends its hello, but the
    // client's never comes.
    RawClient raw(t.io_, "site-b");
    CO_ASSERT(!(co_await raw.connect(a.link->listen_port())));
    CO_ASSERT(!(co_await raw.handshake()));
    auto r = co_await (raw.read_until_closed() || sleep_for(10s));
    EXPECT_EQ(r.index(), 0u) << "the server still holds a connection that never sent its hello";
    EXPECT_TRUE(t.logs_.contains(
        {"handshake with 127.0.0.1:", "handshake not completed within 300 ms", "waiting for the peer's hello"}))
        << t.logs_.dump();
    EXPECT_TRUE(a.connections.empty());
    CO_ASSERT(co_await good_peer_connects(t, a));
  }(*this));
}

TEST_F(TransportTest, FullHandshakeTableDropsTheOldestSilentConnection) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    LinkOptions o = options("site-b");
    o.handshake_timeout_ms = 60'000;  // so that only making room can close a connection here
    Peer& a = t.add_peer("site-a", o);
    CO_ASSERT(a.link->start().ok());
    const std::uint16_t port = a.link->listen_port();
    // The flood that found this: twelve connections that say nothing. The first kHandshakesMax
    // fill the table and each later one pushes out the oldest; the server accepts them in the
    // order they connected (the listen backlog is a FIFO).
    constexpr std::size_t kExtra = 4;
    std::vector<std::unique_ptr<Tcp::socket>> silent;
    for (std::size_t i = 0; i < kHandshakesMax + kExtra; ++i) {
      silent.push_back(co_await silent_connection(t, port));
    }
    for (std::size_t i = 0; i < kExtra; ++i) {
      CO_ASSERT(co_await closed_within(*silent[i], 10s));
      EXPECT_TRUE(t.logs_.contains({"handshakes already in progress: dropping the connection from " +
                                        address_of(*silent[i]) + " (nothing received",
                                    "to accept 127.0.0.1:"}))
          << t.logs_.dump();
    }
    for (std::size_t i = kExtra; i < silent.size(); ++i) EXPECT_TRUE(still_open(*silent[i])) << i;
    // The real peer still gets in, at the price of the oldest silent connection only.
    CO_ASSERT(co_await good_peer_connects(t, a));
    EXPECT_TRUE(co_await closed_within(*silent[kExtra], 10s));
    for (std::size_t i = kExtra + 1; i < silent.size(); ++i) EXPECT_TRUE(still_open(*silent[i])) << i;
  }(*this));
}

TEST_F(TransportTest, FloodNeverDropsAPeerFurtherAlong) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    LinkOptions o = options("site-b");
    o.handshake_timeout_ms = 60'000;
    Peer& a = t.add_peer("site-a", o);
    CO_ASSERT(a.link->start().ok());
    const std::uint16_t port = a.link->listen_port();
    // The oldest handshake in the table is authenticated: the server has checked its
    // certificate and sent its hello (read here), and waits for the client's.
    RawClient raw(t.io_, "site-b");
    CO_ASSERT(!(co_await raw.connect(port)));
    CO_ASSERT(!(co_await raw.handshake()));
    std::optional<Frame> server_hello = co_await raw.read_frame();
    CO_ASSERT(server_hello && server_hello->type == kFrameTypeHello);
    // kHandshakesMax silent ones: the last finds the table full, and the one dropped for it is
    // the oldest silent one, not the older, authenticated client.
    std::vector<std::unique_ptr<Tcp::socket>> silent;
    for (std::size_t i = 0; i < kHandshakesMax; ++i) silent.push_back(co_await silent_connection(t, port));
    CO_ASSERT(co_await closed_within(*silent[0], 10s));
    EXPECT_TRUE(t.logs_.contains({"dropping the connection from " + address_of(*silent[0]) + " (nothing received"}))
        << t.logs_.dump();
    for (std::size_t i = 1; i < silent.size(); ++i) EXPECT_TRUE(still_open(*silent[i])) << i;
    CO_ASSERT(!(co_await raw.send_hello(42)));
    CO_ASSERT(co_await eventually([&a] { return a.connected(); }, 10s));
    EXPECT_EQ(a.last()->peer_address(), address_of(raw.stream().next_layer()));
  }(*this));
}

TEST_F(TransportTest, DialerRefusesAListenerWithTheWrongName) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer& c = t.add_peer("site-c", options("site-b"));  // claims to be our peer, but is site-c
    CO_ASSERT(c.link->start().ok());
    Peer& b = t.add_peer("site-b", dialer("site-a", c.link->listen_port()));
    CO_ASSERT(b.link->start().ok());
    const std::string want = "refused: certificate name 'site-c' does not match expected peer 'site-a'";
    CO_ASSERT(co_await eventually([&t, &want] { return t.logs_.contains({want}); }, 5s));
    CO_ASSERT(co_await eventually([&t] { return t.logs_.contains({"the peer refused us", "site-c"}); }, 5s));
    EXPECT_TRUE(b.connections.empty());
    EXPECT_TRUE(c.connections.empty());
  }(*this));
}

// ------------------------------------------------------------------------------ bad frames

struct BadFrameCase {
  const char* name;
  std::vector<std::byte> (*bytes)();
  const char* reason;  // in the log line and the goodbye
};

std::vector<std::byte> header_bytes(std::uint16_t type, std::uint16_t flags, std::uint32_t len) {
  std::vector<std::byte> b(kFrameHeaderBytes);
  FrameHeader h;
  h.type = type;
  h.flags = flags;
  h.payload_bytes = std::min(len, kFramePayloadBytesMax);
  encode_frame_header(h, std::span<std::byte, kFrameHeaderBytes>(b.data(), kFrameHeaderBytes));
  if (len > kFramePayloadBytesMax) std::memcpy(b.data() + 12, &len, 4);
  return b;
}

void PrintTo(const BadFrameCase& c, std::ostream* os) { *os << c.name; }

class BadFrame : public TransportTest, public ::testing::WithParamInterface<BadFrameCase> {};

TEST_P(BadFrame, ClosesThatConnectionWithAReason) {
  run(io_, [](BadFrame& t) -> asio::awaitable<void> {
    const BadFrameCase& c = t.GetParam();
    Peer& a = t.add_peer("site-a", options("site-b"));
    CO_ASSERT(a.link->start().ok());
    RawClient raw(t.io_, "site-b");
    CO_ASSERT(!(co_await raw.connect(a.link->listen_port())));
    CO_ASSERT(!(co_await raw.handshake()));
    CO_ASSERT(!(co_await raw.send_hello(99)));
    CO_ASSERT(co_await eventually([&a] { return a.connected(); }, 5s));
    CO_ASSERT(!(co_await raw.write(c.bytes())));
    const std::string goodbye = co_await raw.read_until_closed();
    EXPECT_NE(goodbye.find(c.reason), std::string::npos) << goodbye;
    EXPECT_FALSE(a.last()->is_open());
    EXPECT_NE(a.last()->close_error().context.find(c.reason), std::string::npos) << a.last()->close_error().context;
    EXPECT_TRUE(t.logs_.contains({"closed: bad frame from the peer", c.reason})) << t.logs_.dump();
    CO_ASSERT(co_await good_peer_connects(t, a));
  }(*this));
}

INSTANTIATE_TEST_SUITE_P(Transport, BadFrame,
                         ::testing::Values(BadFrameCase{"bad_magic",
                                                        [] {
                                                          auto b = header_bytes(16, 0, 0);
                                                          b[0] = std::byte{'X'};
                                                          return b;
                                                        },
                                                        "bad magic"},
                                           BadFrameCase{"unknown_version",
                                                        [] {
                                                          auto b = header_bytes(16, 0, 0);
                                                          b[4] = std::byte{9};
                                                          return b;
                                                        },
                                                        "frame version 9"},
                                           BadFrameCase{"reserved_bits",
                                                        [] {
                                                          auto b = header_bytes(16, 0, 0);
                                                          b[10] = std::byte{1};
                                                          return b;
                                                        },
                                                        "reserved header field"},
                                           BadFrameCase{"oversize_length",
                                                        [] { return header_bytes(16, 0, kFramePayloadBytesMax + 1); },
                                                        "payload length 8454145 bytes"},
                                           BadFrameCase{"reserved_transport_type", [] { return header_bytes(7, 0, 0); },
                                                        "unknown transport frame type 7"},
                                           BadFrameCase{"short_ping",
                                                        [] {
                                                          auto b = header_bytes(kFrameTypePing, 0, 4);
                                                          b.resize(b.size() + 4);
                                                          return b;
                                                        },
                                                        "ping of 4 bytes"},
                                           BadFrameCase{"second_hello",
                                                        [] {
                                                          Hello h;
                                                          const std::vector<std::byte> p = encode_hello(h);
                                                          auto b = header_bytes(kFrameTypeHello, 0,
                                                                                static_cast<std::uint32_t>(p.size()));
                                                          b.insert(b.end(), p.begin(), p.end());
                                                          return b;
                                                        },
                                                        "a second hello frame"}),
                         [](const ::testing::TestParamInfo<BadFrameCase>& i) { return std::string(i.param.name); });

TEST_F(TransportTest, FirstFrameMustBeAHello) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer& a = t.add_peer("site-a", options("site-b"));
    CO_ASSERT(a.link->start().ok());
    RawClient raw(t.io_, "site-b");
    CO_ASSERT(!(co_await raw.connect(a.link->listen_port())));
    CO_ASSERT(!(co_await raw.handshake()));
    CO_ASSERT(!(co_await raw.send_frame(16, 0, bytes_of("data before hello"))));
    const std::string goodbye = co_await raw.read_until_closed();
    EXPECT_EQ(goodbye, "expected a hello frame first, got type 16");
    EXPECT_TRUE(t.logs_.contains({"refused", "expected a hello frame first"})) << t.logs_.dump();
    EXPECT_TRUE(a.connections.empty());
  }(*this));
}

TEST_F(TransportTest, HelloWithoutACommonVersionIsRefused) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer& a = t.add_peer("site-a", options("site-b"));
    CO_ASSERT(a.link->start().ok());
    RawClient raw(t.io_, "site-b");
    CO_ASSERT(!(co_await raw.connect(a.link->listen_port())));
    CO_ASSERT(!(co_await raw.handshake()));
    Hello h;
    h.version_min = 7;
    h.version_max = 9;
    h.instance_id = 5;
    CO_ASSERT(!(co_await raw.send_frame(kFrameTypeHello, 0, encode_hello(h))));
    const std::string goodbye = co_await raw.read_until_closed();
    EXPECT_EQ(goodbye, "no common protocol version: we speak 1..1, the peer speaks 7..9");
    EXPECT_TRUE(t.logs_.contains({"refused", "no common protocol version"})) << t.logs_.dump();
    EXPECT_TRUE(a.connections.empty());
  }(*this));
}

}  // namespace
}  // namespace tandem::transport::test

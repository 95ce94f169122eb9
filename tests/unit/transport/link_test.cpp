// Plan: Links over real TLS 1.3 on 127.0.0.1 (ephemeral ports), with certificates made by
// tests/tools/make_certs.sh, everything on one io_context run by the test thread, each test
// body bounded by run()'s deadline and each wait by eventually()'s. It proves: the handshake
// works both ways (listener and dialer), hands each side the other's hello payload and agrees
// on version and capabilities, and accepts a CN-only certificate; frames round-trip both ways
// at sizes 0, 1, odd and kFramePayloadBytesMax, from gathered buffers; many coroutines sending
// at once get every frame through intact and in each sender's order; a receive() cancelled by
// a timer loses no frame, and a send() cancelled while rate-limited is withdrawn; the rate
// limit holds a stream to its rate (a lower bound on elapsed time, which the limiter
// guarantees) and can be lifted at run time; keep-alives keep an idle link up well past
// peer_timeout; a peer that goes silent (a raw client, or a stalled fault proxy) is declared
// dead within peer_timeout and the dialer reconnects with back-off (on_connected fires
// again); a close or a dropped TCP connection reconnects too, and frames queued before the
// peer's goodbye are still delivered; a newer connection from a restarted peer replaces the
// old one; two Links dialing each other settle on one connection; stop() says goodbye; bad
// options are refused by start().
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <random>
#include <variant>

#include "tandem/common/hash.h"
#include "tandem/transport/errc.h"
#include "transport_test_util.h"

namespace tandem::transport::test {
namespace {

using namespace asio::experimental::awaitable_operators;
using Clock = std::chrono::steady_clock;

LinkOptions dialer(const std::string& peer, std::uint16_t port, std::string hello = {}) {
  LinkOptions o = options(peer, std::move(hello));
  o.listen_address = "";
  o.connect_address = "127.0.0.1:" + std::to_string(port);
  return o;
}

// site-a listens, site-b dials it; both connected on return (or a failure is recorded).
asio::awaitable<bool> connect_pair(TransportTest& t, Peer*& a, Peer*& b, LinkOptions ao = options("site-b"),
                                   std::string b_cert = "site-b") {
  a = &t.add_peer("site-a", std::move(ao));
  if (Status st = a->link->start(); !st) {
    ADD_FAILURE() << st.error().message();
    co_return false;
  }
  b = &t.add_peer(b_cert, dialer("site-a", a->link->listen_port()));
  if (Status st = b->link->start(); !st) {
    ADD_FAILURE() << st.error().message();
    co_return false;
  }
  Peer* pa = a;
  Peer* pb = b;
  const bool ok = co_await eventually([pa, pb] { return pa->connected() && pb->connected(); }, 10s);
  if (!ok) ADD_FAILURE() << "the pair did not connect";
  co_return ok;
}

asio::awaitable<Status> send_bytes(std::shared_ptr<Connection> c, std::uint16_t type, std::uint16_t flags,
                                   const std::vector<std::byte>& payload) {
  // Three pieces, so the writer's gathering and staging are exercised.
  const std::size_t n = payload.size();
  const std::array<asio::const_buffer, 3> bufs{asio::buffer(payload.data(), n / 3),
                                               asio::buffer(payload.data() + n / 3, n / 3),
                                               asio::buffer(payload.data() + 2 * (n / 3), n - 2 * (n / 3))};
  co_return co_await c->send(type, flags, bufs);
}

std::uint16_t free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof sa;
  ::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len);
  ::close(fd);
  return ntohs(sa.sin_port);
}

// ------------------------------------------------------------------------------- handshake

TEST_F(TransportTest, HandshakeBothWaysExchangesHellos) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    LinkOptions ao = options("site-b", "hello from a");
    ao.capabilities = 0x3'0000;
    Peer& a = t.add_peer("site-a", ao);
    CO_ASSERT(a.link->start().ok());
    CO_ASSERT(a.link->listen_port() != 0);
    LinkOptions bo = dialer("site-a", a.link->listen_port(), "hello from b");
    bo.capabilities = 0x1'0001;
    Peer& b = t.add_peer("site-b", bo);
    CO_ASSERT(b.link->start().ok());
    CO_ASSERT(co_await eventually([&a, &b] { return a.connected() && b.connected(); }, 10s));
    const auto ca = a.last();
    const auto cb = b.last();
    EXPECT_EQ(ca->peer_hello(), bytes_of("hello from b"));
    EXPECT_EQ(cb->peer_hello(), bytes_of("hello from a"));
    EXPECT_EQ(ca->peer_name(), "site-b");
    EXPECT_EQ(cb->peer_name(), "site-a");
    EXPECT_FALSE(ca->dialed());
    EXPECT_TRUE(cb->dialed());
    EXPECT_EQ(ca->protocol_version(), kProtocolVersion);
    EXPECT_EQ(ca->capabilities(), 0x1'0000u);
    EXPECT_EQ(cb->capabilities(), 0x1'0000u);
    EXPECT_EQ(cb->peer_address(), "127.0.0.1:" + std::to_string(a.link->listen_port()));
    EXPECT_EQ(a.link->connection(), ca);
    EXPECT_EQ(a.connections.size(), 1u);
    EXPECT_TRUE(t.logs_.contains({"connected to site-b", "accepted"}));
    EXPECT_TRUE(t.logs_.contains({"connected to site-a", "dialed"}));
  }(*this));
}

TEST_F(TransportTest, CommonNameIsTheFallbackWithoutSan) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer* a = nullptr;
    Peer* b = nullptr;
    CO_ASSERT(co_await connect_pair(t, a, b, options("site-b"), "cn-site-b"));
    EXPECT_EQ(a->last()->peer_name(), "site-b");
  }(*this));
}

// ---------------------------------------------------------------------------------- frames

TEST_F(TransportTest, FramesRoundTripAtBoundarySizes) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer* a = nullptr;
    Peer* b = nullptr;
    CO_ASSERT(co_await connect_pair(t, a, b));
    const std::vector<std::size_t> sizes = {0, 1, 2, 4097, 65536 + 3, kFramePayloadBytesMax};
    std::uint16_t type = kFrameTypeApplicationMin;
    for (const std::size_t size : sizes) {
      for (int dir = 0; dir < 2; ++dir) {
        const auto from = dir == 0 ? a->last() : b->last();
        const auto to = dir == 0 ? b->last() : a->last();
        const std::vector<std::byte> payload = pattern(size, size * 2 + static_cast<std::size_t>(dir));
        const auto flags = static_cast<std::uint16_t>(0xf00d + dir);
        Status st = co_await send_bytes(from, type, flags, payload);
        CO_ASSERT(st.ok());
        Result<Frame> f = co_await to->receive();
        CO_ASSERT(f.ok());
        EXPECT_EQ(f->type, type);
        EXPECT_EQ(f->flags, flags);
        EXPECT_EQ(f->payload.size(), size);
        EXPECT_TRUE(f->payload == payload) << "size " << size;
        ++type;
      }
    }
    const std::uint64_t max_frame = kFrameHeaderBytes + kFramePayloadBytesMax;
    EXPECT_GE(a->last()->stats().bytes_sent, max_frame);
    EXPECT_GE(b->last()->stats().bytes_received, max_frame);
    EXPECT_GE(a->last()->stats().frames_received, sizes.size());

    std::vector<std::byte> too_big(kFramePayloadBytesMax + 1);
    Status st = co_await send_bytes(a->last(), 16, 0, too_big);
    EXPECT_EQ(st.code(), errc::frame_too_large);
    EXPECT_TRUE(a->last()->is_open());
  }(*this));
}

asio::awaitable<void> sender(std::shared_ptr<Connection> c, std::uint32_t id, int frames, int* failures, int* done) {
  std::mt19937_64 rng(id);
  for (std::uint32_t seq = 0; seq < static_cast<std::uint32_t>(frames); ++seq) {
    const std::uint64_t r = rng() % 100;
    const std::size_t size = r < 70 ? rng() % 2048 : r < 95 ? rng() % 65536 : rng() % (1 << 20);
    std::array<std::uint32_t, 2> head{id, seq};
    const std::vector<std::byte> body = pattern(size, id * 100'000 + seq);
    const std::array<asio::const_buffer, 2> bufs{asio::buffer(head), asio::buffer(body)};
    Status st = co_await c->send(static_cast<std::uint16_t>(kFrameTypeApplicationMin + id), 0, bufs);
    if (!st) {
      ++*failures;
      ADD_FAILURE() << "sender " << id << ": " << st.error().message();
      break;
    }
  }
  ++*done;
}

TEST_F(TransportTest, ConcurrentSendersArriveIntactInEachSendersOrder) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer* a = nullptr;
    Peer* b = nullptr;
    CO_ASSERT(co_await connect_pair(t, a, b));
    constexpr std::uint32_t kSenders = 8;
    constexpr int kFrames = 60;
    int failures = 0;
    int done = 0;
    for (std::uint32_t id = 0; id < kSenders; ++id) {
      asio::co_spawn(t.io_, sender(b->last(), id, kFrames, &failures, &done), [](const std::exception_ptr& e) {
        if (e) std::rethrow_exception(e);
      });
    }
    std::array<std::uint32_t, kSenders> next{};
    for (std::uint32_t i = 0; i < kSenders * kFrames; ++i) {
      Result<Frame> f = co_await a->last()->receive();
      CO_ASSERT(f.ok());
      CO_ASSERT(f->payload.size() >= 8);
      std::uint32_t id = 0;
      std::uint32_t seq = 0;
      std::memcpy(&id, f->payload.data(), 4);
      std::memcpy(&seq, f->payload.data() + 4, 4);
      CO_ASSERT(id < kSenders);
      EXPECT_EQ(f->type, kFrameTypeApplicationMin + id);
      EXPECT_EQ(seq, next[id]) << "sender " << id;
      next[id] = seq + 1;
      const std::vector<std::byte> want = pattern(f->payload.size() - 8, id * 100'000 + seq);
      EXPECT_EQ(xxh3_64(std::span(f->payload).subspan(8)), xxh3_64(want)) << "sender " << id << " seq " << seq;
    }
    CO_ASSERT(co_await eventually([&done] { return done == static_cast<int>(kSenders); }, 10s));
    EXPECT_EQ(failures, 0);
    for (std::uint32_t id = 0; id < kSenders; ++id) EXPECT_EQ(next[id], static_cast<std::uint32_t>(kFrames));
  }(*this));
}

TEST_F(TransportTest, CancelledReceiveLosesNoFrame) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer* a = nullptr;
    Peer* b = nullptr;
    CO_ASSERT(co_await connect_pair(t, a, b));
    const auto ca = a->last();
    std::variant<Result<Frame>, std::monostate> r = co_await (ca->receive() || sleep_for(100ms));
    EXPECT_EQ(r.index(), 1u);  // the timer won; receive() was withdrawn
    const std::vector<std::byte> payload = bytes_of("after the cancel");
    Status st = co_await send_bytes(b->last(), 20, 0, payload);
    CO_ASSERT(st.ok());
    Result<Frame> f = co_await ca->receive();
    CO_ASSERT(f.ok());
    EXPECT_EQ(f->payload, payload);
  }(*this));
}

TEST_F(TransportTest, RateLimitHoldsSendsWithdrawsCancelledOnesAndLiftsAtRunTime) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer* a = nullptr;
    Peer* b = nullptr;
    CO_ASSERT(co_await connect_pair(t, a, b));
    const auto cb = b->last();
    const auto ca = a->last();

    // A lower bound the limiter guarantees: 8 × 256 KiB at 2 MiB/s, burst 100 ms, cannot
    // finish before ~775 ms.
    b->link->set_rate_limit(2 << 20);
    const auto t0 = Clock::now();
    const std::vector<std::byte> chunk = pattern(256 * 1024, 1);
    for (int i = 0; i < 8; ++i) {
      Status st = co_await send_bytes(cb, 16, 0, chunk);
      CO_ASSERT(st.ok());
    }
    EXPECT_GE(Clock::now() - t0, 600ms);
    for (int i = 0; i < 8; ++i) {
      Result<Frame> f = co_await ca->receive();
      CO_ASSERT(f.ok());
    }

    // 1000 B/s: the first frame overdraws the bucket, the second would wait ~10 s.
    b->link->set_rate_limit(1000);
    const std::vector<std::byte> first = pattern(10'000, 2);
    Status st = co_await send_bytes(cb, 17, 0, first);
    CO_ASSERT(st.ok());
    const std::vector<std::byte> second = pattern(100, 3);
    std::variant<Status, std::monostate> r = co_await (send_bytes(cb, 18, 0, second) || sleep_for(200ms));
    EXPECT_EQ(r.index(), 1u);  // held by the limit, then withdrawn by the cancellation
    b->link->set_rate_limit(0);
    const std::vector<std::byte> third = pattern(100, 4);
    const auto t1 = Clock::now();
    st = co_await send_bytes(cb, 19, 0, third);
    CO_ASSERT(st.ok());
    EXPECT_LT(Clock::now() - t1, 5s);
    Result<Frame> f = co_await ca->receive();
    CO_ASSERT(f.ok());
    EXPECT_EQ(f->type, 17);
    f = co_await ca->receive();
    CO_ASSERT(f.ok());
    EXPECT_EQ(f->type, 19);  // 18 never went out
    EXPECT_EQ(f->payload, third);
  }(*this));
}

// ------------------------------------------------------------------------------ keep-alive

TEST_F(TransportTest, KeepalivesHoldAnIdleLinkUp) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer* a = nullptr;
    Peer* b = nullptr;
    CO_ASSERT(co_await connect_pair(t, a, b));
    co_await sleep_for(5000ms);  // 2.5 × peer_timeout with nothing but keep-alives
    EXPECT_TRUE(a->last()->is_open());
    EXPECT_TRUE(b->last()->is_open());
    EXPECT_EQ(a->connections.size(), 1u);
    EXPECT_EQ(b->connections.size(), 1u);
    EXPECT_GE(a->last()->stats().frames_sent, 10u);  // hello + pings + pongs
    EXPECT_GE(b->last()->stats().frames_received, 10u);
    EXPECT_GT(b->last()->stats().keepalive_rtt_us_last, 0u);
  }(*this));
}

TEST_F(TransportTest, SilentPeerIsDeclaredDeadWithinPeerTimeout) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    LinkOptions ao = options("site-b");
    ao.peer_timeout_ms = 1000;
    Peer& a = t.add_peer("site-a", ao);
    CO_ASSERT(a.link->start().ok());
    RawClient raw(t.io_, "site-b");
    CO_ASSERT(!(co_await raw.connect(a.link->listen_port())));
    CO_ASSERT(!(co_await raw.handshake()));
    CO_ASSERT(!(co_await raw.send_hello(12345)));
    std::optional<Frame> hello = co_await raw.read_frame();
    CO_ASSERT(hello && hello->type == kFrameTypeHello);
    const auto t0 = Clock::now();
    CO_ASSERT(co_await eventually([&a] { return a.connections.size() == 1; }, 5s));
    // The raw client now never reads, writes or answers a ping.
    CO_ASSERT(co_await eventually([&a] { return !a.last()->is_open(); }, 5s));
    const auto elapsed = Clock::now() - t0;
    EXPECT_GE(elapsed, 800ms);
    EXPECT_LE(elapsed, 1000ms + 3000ms);  // slack for a loaded machine, not for the design
    EXPECT_EQ(a.last()->close_error().code, errc::timeout);
    EXPECT_TRUE(t.logs_.contains({"closed", "keep-alive timeout 1000 ms"})) << t.logs_.dump();
  }(*this));
}

// ------------------------------------------------------------------------------- reconnect

TEST_F(TransportTest, PeerCloseReconnectsAndDeliversFramesSentBeforeTheGoodbye) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer* a = nullptr;
    Peer* b = nullptr;
    CO_ASSERT(co_await connect_pair(t, a, b));
    const auto cb = b->last();
    for (int i = 0; i < 3; ++i) {
      const std::vector<std::byte> p = pattern(1000, static_cast<std::uint64_t>(i));
      Status st = co_await send_bytes(cb, 16, static_cast<std::uint16_t>(i), p);
      CO_ASSERT(st.ok());
    }
    cb->close("bye now");
    Status late = co_await send_bytes(cb, 16, 0, bytes_of("late"));
    EXPECT_EQ(late.code(), errc::connection_closed);
    const auto ca = a->connections.front();
    for (int i = 0; i < 3; ++i) {
      Result<Frame> f = co_await ca->receive();
      CO_ASSERT(f.ok());
      EXPECT_EQ(f->flags, i);
    }
    Result<Frame> end = co_await ca->receive();
    CO_ASSERT(!end.ok());
    EXPECT_EQ(end.code(), errc::connection_closed);
    EXPECT_NE(end.error().context.find("bye now"), std::string::npos) << end.error().context;
    // b dials again (it is the dialer), with back-off; both sides see a new connection.
    CO_ASSERT(
        co_await eventually([a, b] { return a->connections.size() == 2 && a->connected() && b->connected(); }, 10s));
    EXPECT_EQ(b->connections.size(), 2u);
    EXPECT_TRUE(t.logs_.contains({"the peer closed the connection: bye now"})) << t.logs_.dump();
    const std::vector<std::byte> p = bytes_of("over the new connection");
    Status st = co_await send_bytes(a->last(), 30, 0, p);
    CO_ASSERT(st.ok());
    Result<Frame> f = co_await b->last()->receive();
    CO_ASSERT(f.ok());
    EXPECT_EQ(f->payload, p);
  }(*this));
}

TEST_F(TransportTest, StalledNetworkIsDetectedOnBothSidesThenReconnects) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    LinkOptions ao = options("site-b");
    ao.handshake_timeout_ms = 1500;
    ao.peer_timeout_ms = 1000;
    Peer& a = t.add_peer("site-a", ao);
    CO_ASSERT(a.link->start().ok());
    FaultProxy proxy(a.link->listen_port(), 7);
    LinkOptions bo = dialer("site-a", proxy.port());
    bo.handshake_timeout_ms = 1500;
    bo.peer_timeout_ms = 1000;
    Peer& b = t.add_peer("site-b", bo);
    CO_ASSERT(b.link->start().ok());
    CO_ASSERT(co_await eventually([&a, &b] { return a.connected() && b.connected(); }, 10s));
    const auto ca = a.last();
    const auto cb = b.last();
    CO_ASSERT(proxy.command("stall 3000") == "ok");
    const auto t0 = Clock::now();
    CO_ASSERT(co_await eventually([&ca, &cb] { return !ca->is_open() && !cb->is_open(); }, 6s));
    EXPECT_LE(Clock::now() - t0, 1000ms + 2500ms);  // within the stall: only keep-alives can tell
    EXPECT_EQ(ca->close_error().code, errc::timeout);
    EXPECT_EQ(cb->close_error().code, errc::timeout);
    // Dials during the stall time out in their handshake; after it, b gets through.
    CO_ASSERT(
        co_await eventually([&a, &b] { return a.connections.size() >= 2 && a.connected() && b.connected(); }, 20s));
    EXPECT_GE(b.connections.size(), 2u);
    const std::vector<std::byte> p = bytes_of("after the stall");
    Status st = co_await send_bytes(b.last(), 16, 0, p);
    CO_ASSERT(st.ok());
    Result<Frame> f = co_await a.last()->receive();
    CO_ASSERT(f.ok());
    EXPECT_EQ(f->payload, p);
  }(*this));
}

TEST_F(TransportTest, DroppedTcpConnectionReconnects) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer& a = t.add_peer("site-a", options("site-b"));
    CO_ASSERT(a.link->start().ok());
    FaultProxy proxy(a.link->listen_port(), 8);
    Peer& b = t.add_peer("site-b", dialer("site-a", proxy.port()));
    CO_ASSERT(b.link->start().ok());
    CO_ASSERT(co_await eventually([&a, &b] { return a.connected() && b.connected(); }, 10s));
    CO_ASSERT(proxy.command("drop") == "ok");
    CO_ASSERT(
        co_await eventually([&a, &b] { return a.connections.size() == 2 && a.connected() && b.connected(); }, 10s));
    EXPECT_NE(b.connections.front()->close_error().context.find("without a goodbye"), std::string::npos)
        << b.connections.front()->close_error().context;
    CO_ASSERT(proxy.command("reset") == "ok");
    CO_ASSERT(
        co_await eventually([&a, &b] { return a.connections.size() == 3 && a.connected() && b.connected(); }, 10s));
  }(*this));
}

// ------------------------------------------------------------------ replacement and races

TEST_F(TransportTest, NewerConnectionFromARestartedPeerReplacesTheOld) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer& a = t.add_peer("site-a", options("site-b"));
    CO_ASSERT(a.link->start().ok());
    // The "old" peer: a raw client that completes the handshake and then just sits there.
    RawClient old(t.io_, "site-b");
    CO_ASSERT(!(co_await old.connect(a.link->listen_port())));
    CO_ASSERT(!(co_await old.handshake()));
    CO_ASSERT(!(co_await old.send_hello(1)));
    CO_ASSERT(co_await eventually([&a] { return a.connected(); }, 5s));
    // The restarted peer dials in with another instance id.
    Peer& b = t.add_peer("site-b", dialer("site-a", a.link->listen_port()));
    CO_ASSERT(b.link->start().ok());
    CO_ASSERT(
        co_await eventually([&a, &b] { return a.connections.size() == 2 && a.connected() && b.connected(); }, 10s));
    EXPECT_FALSE(a.connections.front()->is_open());
    EXPECT_NE(a.connections.front()->close_error().context.find("replaced by a newer connection"), std::string::npos);
    const std::string goodbye = co_await old.read_until_closed();
    EXPECT_EQ(goodbye, "replaced by a newer connection");
  }(*this));
}

TEST_F(TransportTest, TwoLinksDialingEachOtherSettleOnOneConnection) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    const std::uint16_t pa = free_port();
    const std::uint16_t pb = free_port();
    LinkOptions ao = options("site-b");
    ao.listen_address = "127.0.0.1:" + std::to_string(pa);
    ao.connect_address = "127.0.0.1:" + std::to_string(pb);
    LinkOptions bo = options("site-a");
    bo.listen_address = "127.0.0.1:" + std::to_string(pb);
    bo.connect_address = "127.0.0.1:" + std::to_string(pa);
    Peer& a = t.add_peer("site-a", ao);
    Peer& b = t.add_peer("site-b", bo);
    CO_ASSERT(a.link->start().ok());
    CO_ASSERT(b.link->start().ok());
    CO_ASSERT(co_await eventually([&a, &b] { return a.connected() && b.connected(); }, 10s));
    co_await sleep_for(1500ms);  // let any duplicate be resolved
    CO_ASSERT(a.connected() && b.connected());
    const std::size_t na = a.connections.size();
    const std::size_t nb = b.connections.size();
    co_await sleep_for(1500ms);
    EXPECT_EQ(a.connections.size(), na) << "still flapping";
    EXPECT_EQ(b.connections.size(), nb) << "still flapping";
    // Both hold the same TCP connection: dialed by exactly one of them.
    EXPECT_NE(a.last()->dialed(), b.last()->dialed());
    const std::vector<std::byte> p = bytes_of("one link");
    Status st = co_await send_bytes(a.last(), 16, 0, p);
    CO_ASSERT(st.ok());
    Result<Frame> f = co_await b.last()->receive();
    CO_ASSERT(f.ok());
    EXPECT_EQ(f->payload, p);
  }(*this));
}

// ------------------------------------------------------------------------- stop and config

TEST_F(TransportTest, StopSaysGoodbyeAndIsIdempotent) {
  run(io_, [](TransportTest& t) -> asio::awaitable<void> {
    Peer* a = nullptr;
    Peer* b = nullptr;
    CO_ASSERT(co_await connect_pair(t, a, b));
    const auto cb = b->last();
    co_await a->link->stop();
    co_await a->link->stop();
    EXPECT_FALSE(a->last()->is_open());
    CO_ASSERT(co_await eventually([&cb] { return !cb->is_open(); }, 5s));
    EXPECT_NE(cb->close_error().context.find("link stopping"), std::string::npos) << cb->close_error().context;
    // b keeps dialing a port nobody listens on any more, and says so once.
    CO_ASSERT(co_await eventually([&t] { return t.logs_.contains({"dialing site-a", "failed"}); }, 5s));
  }(*this));
}

TEST_F(TransportTest, StartRefusesBadOptions) {
  auto start = [this](LinkOptions o) {
    Peer& p = add_peer("site-a", std::move(o));
    Status st = p.link->start();
    return st.ok() ? std::string("ok") : st.error().message();
  };
  LinkOptions o = options("site-b");
  o.peer_name = "";
  EXPECT_NE(start(o).find("peer_name"), std::string::npos);
  o = options("site-b");
  o.listen_address = "";
  EXPECT_NE(start(o).find("neither"), std::string::npos);
  o = options("site-b");
  o.keepalive_interval_ms = o.peer_timeout_ms;
  EXPECT_NE(start(o).find("keepalive_interval_ms"), std::string::npos);
  o = options("site-b");
  o.backoff_min_ms = 10;
  o.backoff_max_ms = 5;
  EXPECT_NE(start(o).find("backoff_min_ms"), std::string::npos);
  o = options("site-b");
  o.hello.resize(kHelloAppBytesMax + 1);
  EXPECT_NE(start(o).find("hello payload"), std::string::npos);
  o = options("site-b");
  o.listen_address = "no-port-here";
  EXPECT_NE(start(o).find("listen_address"), std::string::npos);
  o = options("site-b");
  o.listen_address = "";
  o.connect_address = "[::1:80";
  EXPECT_NE(start(o).find("connect_address"), std::string::npos);
}

}  // namespace
}  // namespace tandem::transport::test

// Connection internals, shared by connection.cpp and link.cpp.
//
// Life of a connection:
//   1. establish(): (dial: connect) → (accept: check the first byte is a TLS record) → TLS 1.3
//      handshake with mutual certificate verification → peer name check → hello frames both
//      ways → negotiate(). All of it bounded by handshake_timeout, whose timer closes the
//      socket. On failure the connection is closed and never shown to anyone.
//   2. start(): three tasks run until the connection closes:
//      - the reader reads frames, answers pings, records pongs, takes a goodbye as the peer's
//        close, queues application frames for receive() (bounded; it stops reading when full);
//      - the writer drains control frames (ping/pong) first, then queued sends in batches,
//        honouring the rate limit; small frames are coalesced into one staging buffer so a
//        keep-alive or a small message is one TLS record, not three;
//      - the keep-alive task sends a ping every keepalive_interval and declares the peer dead
//        when nothing at all has been read for peer_timeout (while the reader wanted to read).
//   3. close_with(): once. Pending sends fail, receivers wake, and either the socket closes at
//      once (broken or silent peer) or the writer sends a goodbye, half-closes, and the reader
//      drains until the peer closes too, bounded by kLinger. When all three tasks are done the
//      socket is closed and wait_closed() returns.
#pragma once

#include <array>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/asio/steady_timer.hpp>
#include <chrono>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "park.h"
#include "tandem/common/async.h"
#include "tandem/common/result.h"
#include "tandem/transport/connection.h"
#include "tandem/transport/frame.h"
#include "tandem/transport/rate_limiter.h"

namespace tandem::transport {

namespace asio = boost::asio;
using Tcp = asio::ip::tcp;
using SslStream = asio::ssl::stream<Tcp::socket>;
using Clock = std::chrono::steady_clock;

// ------------------------------------------------------------------------------ the bounds

// Application frames read ahead of receive(): enough to keep the link busy while the caller
// works on the previous frames, few enough that a caller that stops receiving pushes back on
// the peer (through TCP) instead of growing memory. Whichever bound is reached first; one
// frame is always admitted.
inline constexpr std::size_t kReceiveQueueFramesMax = 1024;
inline constexpr std::uint64_t kReceiveQueueBytesMax = 32ull << 20;
// Payloads are read in pieces of this size so a slow 8 MiB frame keeps proving the peer is
// alive, piece by piece, to the keep-alive watchdog.
inline constexpr std::size_t kReadPieceBytes = 256 * 1024;
// The writer's staging buffer: headers and small payload buffers are copied here and go out
// as one write (one TLS record when small). Payload buffers larger than kCopyBytesMax are
// written from the caller's memory instead.
inline constexpr std::size_t kStagingBytes = 64 * 1024;
inline constexpr std::size_t kCopyBytesMax = 8 * 1024;
// One write covers at most this many frames / bytes (at least one frame), so a keep-alive
// never waits behind more than ~1 MiB plus one frame.
inline constexpr std::size_t kBatchFramesMax = 256;
inline constexpr std::uint64_t kBatchBytesMax = 1 << 20;
// After a goodbye: how long we wait for it to be written and for the peer to close in turn
// before the socket is closed anyway.
inline constexpr std::chrono::milliseconds kLinger{1000};

// What the Link hands to each connection.
struct ConnectionParams {
  std::string expected_peer_name;
  Hello hello;  // ours
  std::chrono::milliseconds keepalive_interval{1000};
  std::chrono::milliseconds peer_timeout{5000};
  std::chrono::milliseconds handshake_timeout{5000};
  std::uint64_t rate_limit_bytes_per_s = 0;
};

struct Connection::Impl {
  Impl(asio::any_io_executor ex, asio::ssl::context& tls, Tcp::socket socket, bool dialed, std::string address,
       ConnectionParams params);

  // Step 1. `endpoints` empty: the socket is already accepted; otherwise dial them. Logs the
  // reason of a refusal or a failure, except for a failed connect (connected() is false), which
  // the dial loop reports. On failure the socket is closed.
  asio::awaitable<Status> establish(std::shared_ptr<Connection> self, Tcp::resolver::results_type endpoints);
  // Step 2: spawns the reader, writer and keep-alive tasks.
  void start(const std::shared_ptr<Connection>& self);
  // Step 3. `goodbye`: tell the peer why (and linger for it); false for a dead or broken peer.
  // `local`: the caller closed; frames not yet received are dropped.
  void close_with(Error e, bool goodbye, bool local);

  void set_rate_limit(std::uint64_t bytes_per_s);
  // Called (posted) once, when the connection starts closing. Set by the Link.
  void set_on_closing(MoveFunction<void()> f) { on_closing_ = std::move(f); }
  [[nodiscard]] bool connected() const { return connected_; }
  [[nodiscard]] std::uint64_t peer_instance() const { return peer_hello_.instance_id; }
  [[nodiscard]] bool established() const { return established_; }
  // How far the handshake got: the Link drops the least advanced accepted connection first.
  enum class Progress { nothing_received, tls, authenticated };
  [[nodiscard]] Progress progress() const { return progress_; }
  [[nodiscard]] bool finished() const { return finished_; }

  // ----- handshake
  asio::awaitable<Status> handshake_steps(Tcp::resolver::results_type endpoints);
  asio::awaitable<Status> refuse(Error e);
  asio::awaitable<Status> read_hello();
  void on_handshake_timeout();
  // Gives up the handshake now (the socket closes): establish() returns `why` and logs nothing,
  // the caller having said why. The Link does this when it stops (errc::stopped) and when it
  // drops an accepted connection to make room for a newer one.
  void abort_handshake(Error why);
  [[nodiscard]] Error handshake_failure(const boost::system::error_code& ec, const char* doing) const;

  // ----- running
  asio::awaitable<void> read_loop(std::shared_ptr<Connection> self);
  asio::awaitable<void> write_loop(std::shared_ptr<Connection> self);
  asio::awaitable<void> keepalive_loop(std::shared_ptr<Connection> self);
  asio::awaitable<void> drain_after_close();
  void on_read_error(const boost::system::error_code& ec);
  void protocol_error(const Error& e);
  Status dispatch(const FrameHeader& h, std::vector<std::byte> payload);
  void wake_writer() { writer_timer_.cancel(); }
  void task_done();
  void close_socket();
  [[nodiscard]] bool inbound_full() const;

  struct SendOp {
    std::array<std::byte, kFrameHeaderBytes> header{};
    std::span<const asio::const_buffer> payload;
    std::uint64_t bytes = 0;  // header + payload
    enum class State { queued, writing, done } state = State::queued;
    Status result;
    detail::Parking park;
  };

  asio::any_io_executor ex_;
  SslStream stream_;
  const bool dialed_;
  std::string address_;
  ConnectionParams params_;

  // Handshake results.
  bool connected_ = false;
  bool established_ = false;
  bool handshake_timed_out_ = false;
  std::optional<Error> abort_error_;  // set by abort_handshake()
  Progress progress_ = Progress::nothing_received;
  bool failure_logged_ = false;  // refuse() logs at the moment of the decision
  std::string verify_failure_;   // the first X509 verify failure OpenSSL reported
  std::string peer_name_;
  Hello peer_hello_;
  Agreement agreement_;

  // Running state.
  bool closing_ = false;
  bool socket_closed_ = false;
  bool io_broken_ = false;  // a read or write failed: nothing more will get through
  bool goodbye_pending_ = false;
  std::string goodbye_reason_;
  Error close_error_{make_error_code(std::errc::not_connected), "connection not established"};
  std::deque<SendOp*> sends_;                  // <= kSendQueueFramesMax
  std::optional<std::uint64_t> ping_pending_;  // at most one of each: control never piles up
  std::optional<std::uint64_t> pong_pending_;
  std::deque<Frame> inbound_;
  std::uint64_t inbound_bytes_ = 0;
  std::deque<detail::Parking*> receivers_;
  WaitQueue inbound_space_;
  bool reader_paused_ = false;  // stopped reading because inbound_ is full (our own doing)
  Clock::time_point last_rx_;
  RateLimiter limiter_;
  asio::steady_timer handshake_timer_;
  asio::steady_timer writer_timer_;  // the writer's idle and rate-limit wait; cancel = wake
  asio::steady_timer keepalive_timer_;
  asio::steady_timer linger_timer_;
  int tasks_ = 0;
  bool reader_done_ = false;
  bool writer_done_ = false;
  bool finished_ = false;
  WaitQueue finished_waiters_;
  MoveFunction<void()> on_closing_;
  std::weak_ptr<Connection> owner_;
  ConnectionStats stats_;
};

namespace detail {

// The Link's way in: Connection's constructor and Impl are private to the transport.
struct ConnectionAccess {
  using Impl = Connection::Impl;
  static std::shared_ptr<Connection> make(std::unique_ptr<Connection::Impl> impl);
  static Connection::Impl& impl(Connection& c) { return *c.impl_; }
};

}  // namespace detail
}  // namespace tandem::transport

// Connection: one authenticated, handshaken TLS 1.3 connection to the peer, carrying frames.
//
// A Link creates connections (dialed or accepted), verifies the peer's certificate and name,
// exchanges hello frames, and only then hands the connection to its on_connected callback; a
// Connection the caller sees is always established. From then on the caller sends and receives
// application frames (types >= kFrameTypeApplicationMin); keep-alives, goodbye and the
// envelope are handled inside:
//
//  - send() queues one frame and completes once the frame has been written to the TLS stream
//    (not when the peer has it: acknowledgements are the replication layer's). Any number of
//    coroutines may send concurrently (up to kSendQueueFramesMax pending); one writer drains
//    the queue, so frames never interleave and each sender's frames go out in its order.
//    Sending is never serialized on round trips: pipelining is the caller's window.
//  - receive() returns the next application frame. A reader runs all the time (so keep-alives
//    are answered while the caller is busy) and buffers a bounded number of frames ahead;
//    beyond that it stops reading and TCP pushes back on the peer.
//  - A peer that sends nothing (not even keep-alives) for peer_timeout_ms is declared dead; a
//    frame that breaks the envelope closes the connection. Either way, and after close(),
//    pending and later send()/receive() calls complete with the reason as an Error.
//
// Cancellation: send() and receive() honour per-operation cancellation (e.g. `receive() ||
// timer`): a cancelled receive() returns operation_canceled and loses no frame; a cancelled
// send() that has not started to be written is withdrawn, one already being written completes
// normally (its buffers are in use until then).
//
// Threading: everything runs on the executor of the Link that made the connection (one
// io_context thread); call every member from there. Ownership: shared; the connection's
// internal tasks hold a reference until the socket is closed, so dropping yours is allowed at
// any time, but close() it first if you want it gone.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <boost/asio/buffer.hpp>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "tandem/common/result.h"

namespace tandem::transport {

struct Frame {
  std::uint16_t type = 0;
  std::uint16_t flags = 0;
  std::vector<std::byte> payload;
};

struct ConnectionStats {
  std::uint64_t bytes_sent = 0;  // frame bytes (headers + payloads), all frame types
  std::uint64_t bytes_received = 0;
  std::uint64_t frames_sent = 0;  // all frame types, keep-alives included
  std::uint64_t frames_received = 0;
  std::uint64_t keepalive_rtt_us_last = 0;  // round trip of the last answered ping
};

// Pending send() calls per connection. Each one is a caller suspended with its buffers (the
// memory is the caller's, bounded by its window), so this bound is there to turn a runaway
// caller (a window that never closes) into an error (errc::send_queue_full) instead of silent
// growth: 4096 frames is far beyond any sane window (at 8 MiB each, 32 GiB in flight).
inline constexpr std::size_t kSendQueueFramesMax = 4096;

namespace detail {
struct ConnectionAccess;
}  // namespace detail

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // The certificate name that matched LinkOptions::peer_name.
  [[nodiscard]] const std::string& peer_name() const;
  // "10.0.0.2:7400" or "[fd00::2]:7400": the TCP peer, for log lines.
  [[nodiscard]] const std::string& peer_address() const;
  // The peer's hello payload (the replication layer's part; opaque here).
  [[nodiscard]] const std::vector<std::byte>& peer_hello() const;
  // The negotiated protocol version and the capability bits both sides set.
  [[nodiscard]] std::uint16_t protocol_version() const;
  [[nodiscard]] std::uint64_t capabilities() const;
  // True when we dialed, false when we accepted.
  [[nodiscard]] bool dialed() const;

  // Queues one frame of `type` (>= kFrameTypeApplicationMin, asserted) whose payload is the
  // concatenation of `payload` (at most kFramePayloadBytesMax bytes, else frame_too_large);
  // completes once it is written. The buffers, and the array `payload` views, must stay valid
  // until then. Errors: the close reason (connection_closed, timeout, bad_frame...),
  // send_queue_full, or operation_canceled.
  boost::asio::awaitable<Status> send(std::uint16_t type, std::uint16_t flags,
                                      std::span<const boost::asio::const_buffer> payload);
  // The next application frame. Frames that arrived before the peer closed are still
  // delivered; then the close reason. After a local close(), the reason at once.
  boost::asio::awaitable<Result<Frame>> receive();
  // Closes the connection: pending and later send()/receive() fail with
  // errc::connection_closed and `reason`, the peer gets a goodbye frame with `reason` (best
  // effort, bounded) and the socket is closed. Idempotent; the first reason wins.
  void close(std::string reason);
  [[nodiscard]] bool is_open() const;
  // Why the connection closed (an error with a context sentence); asserts !is_open().
  [[nodiscard]] const Error& close_error() const;
  // Completes once the connection is closed and its socket and internal tasks are gone.
  boost::asio::awaitable<void> wait_closed();

  [[nodiscard]] const ConnectionStats& stats() const;

 private:
  friend struct detail::ConnectionAccess;
  struct Impl;
  explicit Connection(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tandem::transport

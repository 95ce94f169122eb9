// Connection: the handshake, the reader, the writer, keep-alives and closing. See
// connection_impl.h for the life of a connection and the bounds.
#include <fmt/format.h>
#include <openssl/ssl.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/ssl/verify_context.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <cstring>

#include "connection_impl.h"
#include "tandem/common/assert.h"
#include "tandem/common/units.h"
#include "tandem/transport/errc.h"
#include "tls_util.h"

namespace tandem::transport {
namespace {

using ErrorCode = boost::system::error_code;
constexpr auto kTuple = asio::as_tuple(asio::use_awaitable);
// The first byte of every TLS connection: a handshake record (ContentType 22).
constexpr unsigned char kTlsHandshakeRecord = 0x16;
// Raw bytes read and dropped after a close, while waiting for the peer to close in turn.
constexpr std::size_t kDrainBytes = 16 * 1024;

std::uint64_t micros(Clock::time_point t) {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(t.time_since_epoch()).count());
}

long long ms(Clock::duration d) {
  return static_cast<long long>(std::chrono::duration_cast<std::chrono::milliseconds>(d).count());
}

// One whole frame (header + payload) in one buffer, for the few frames written outside the
// writer (hello, a refusal's goodbye, the final goodbye).
std::vector<std::byte> frame_bytes(std::uint16_t type, std::span<const std::byte> payload) {
  std::vector<std::byte> out(kFrameHeaderBytes + payload.size());
  FrameHeader h;
  h.type = type;
  h.payload_bytes = static_cast<std::uint32_t>(payload.size());
  encode_frame_header(h, std::span<std::byte, kFrameHeaderBytes>(out.data(), kFrameHeaderBytes));
  if (!payload.empty()) std::memcpy(out.data() + kFrameHeaderBytes, payload.data(), payload.size());
  return out;
}

std::span<const std::byte> as_bytes(const std::string& s) {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

// Why a read or write on an established connection failed, as a sentence.
std::string io_failure(const ErrorCode& ec, const char* doing) {
  if (ec == asio::error::eof || ec == asio::ssl::error::stream_truncated) {
    return fmt::format("the peer closed the connection without a goodbye ({})", doing);
  }
  if (ec == asio::error::connection_reset) return fmt::format("connection reset by the peer ({})", doing);
  if (ec.category() == asio::error::get_ssl_category()) {
    return fmt::format("TLS error {}: {}", doing, detail::describe_tls_error(ec));
  }
  return fmt::format("{} failed: {}", doing, ec.message());
}

struct VerifyRecorder {
  detail::ConnectionAccess::Impl* impl;
  bool operator()(bool preverified, asio::ssl::verify_context& ctx) const {
    if (!preverified && impl->verify_failure_.empty()) {
      impl->verify_failure_ = detail::describe_verify_failure(ctx.native_handle());
    }
    return preverified;
  }
};

// Refusals (our decision about the peer) and failures (the peer or the network gave up).
bool is_refusal(const std::error_code& c) {
  return c == errc::not_tls || c == errc::peer_name_mismatch || c == errc::protocol_version || c == errc::bad_frame ||
         c == errc::frame_too_large || c == errc::tls_handshake_failed;
}

}  // namespace

std::shared_ptr<Connection> detail::ConnectionAccess::make(std::unique_ptr<Connection::Impl> impl) {
  return std::shared_ptr<Connection>(new Connection(std::move(impl)));
}

Connection::Impl::Impl(asio::any_io_executor ex, asio::ssl::context& tls, Tcp::socket socket, bool dialed,
                       std::string address, ConnectionParams params)
    : ex_(ex),
      stream_(std::move(socket), tls),
      dialed_(dialed),
      address_(std::move(address)),
      params_(std::move(params)),
      limiter_(params_.rate_limit_bytes_per_s),
      handshake_timer_(ex),
      writer_timer_(ex),
      keepalive_timer_(ex),
      linger_timer_(ex) {
  TANDEM_ASSERT(params_.keepalive_interval.count() > 0);
  TANDEM_ASSERT(params_.peer_timeout > params_.keepalive_interval);
  TANDEM_ASSERT(params_.handshake_timeout.count() > 0);
}

// ------------------------------------------------------------------------------- handshake

asio::awaitable<Status> Connection::Impl::establish(std::shared_ptr<Connection> self,
                                                    Tcp::resolver::results_type endpoints) {
  TANDEM_ASSERT(!established_ && !closing_);
  owner_ = self;
  handshake_timer_.expires_after(params_.handshake_timeout);
  std::weak_ptr<Connection> weak = self;
  handshake_timer_.async_wait([weak](const ErrorCode& ec) {
    if (ec) return;
    if (auto c = weak.lock()) detail::ConnectionAccess::impl(*c).on_handshake_timeout();
  });
  Status st = co_await handshake_steps(std::move(endpoints));
  handshake_timer_.cancel();
  if (st && (handshake_timed_out_ || socket_closed_)) {
    st = Error(errc::timeout, "handshake interrupted");
  }
  if (!st) {
    // An abort says why itself (the step it interrupted saw only a closed socket), and the Link
    // that aborted has logged it.
    if (abort_error_) st = *abort_error_;
    closing_ = true;
    finished_ = true;
    close_error_ = st.error();
    close_socket();
    if (!abort_error_ && connected_ && !failure_logged_) {
      const std::string& why = st.error().context.empty() ? st.error().message() : st.error().context;
      if (is_refusal(st.code())) {
        spdlog::warn("transport: peer {} refused: {}", address_, why);
      } else {
        spdlog::warn("transport: handshake with {} failed: {}", address_, why);
      }
    }
    co_return st;
  }
  established_ = true;
  close_error_ = Error(errc::connection_closed, "open");
  co_return st;
}

void Connection::Impl::on_handshake_timeout() {
  if (established_ || socket_closed_) return;
  handshake_timed_out_ = true;
  close_socket();
}

void Connection::Impl::abort_handshake(Error why) {
  if (established_ || socket_closed_) return;
  abort_error_ = std::move(why);
  close_socket();
}

Error Connection::Impl::handshake_failure(const ErrorCode& ec, const char* doing) const {
  if (handshake_timed_out_) {
    return Error(errc::timeout,
                 fmt::format("handshake not completed within {} ms ({})", params_.handshake_timeout.count(), doing));
  }
  if (abort_error_) return *abort_error_;
  if (ec.category() == asio::error::get_ssl_category()) {
    const std::string d = detail::describe_tls_error(ec);
    if (d.find("alert") != std::string::npos) {
      return Error(errc::connection_closed, fmt::format("the peer refused us ({}): {}", doing, d));
    }
  }
  if (ec == asio::error::eof || ec == asio::ssl::error::stream_truncated) {
    return Error(errc::connection_closed, fmt::format("the peer closed the connection ({})", doing));
  }
  return Error(errc::connection_closed, fmt::format("{} ({})", ec.message(), doing));
}

asio::awaitable<Status> Connection::Impl::handshake_steps(Tcp::resolver::results_type endpoints) {
  if (!endpoints.empty()) {
    auto [ec, ep] = co_await asio::async_connect(stream_.lowest_layer(), endpoints, kTuple);
    if (ec || handshake_timed_out_ || abort_error_) {
      if (handshake_timed_out_) {
        co_return Error(errc::timeout,
                        fmt::format("connect: no answer within {} ms", params_.handshake_timeout.count()));
      }
      co_return Error(errc::connection_closed, "connect: " + ec.message());
    }
    ErrorCode ignored;
    stream_.lowest_layer().set_option(Tcp::no_delay(true), ignored);
  } else {
    // A plaintext client would otherwise get a TLS alert it cannot read and we would log an
    // OpenSSL record error; look at the first byte and say what it is.
    std::array<unsigned char, 1> first{};
    auto [ec, n] = co_await stream_.next_layer().async_receive(asio::buffer(first), Tcp::socket::message_peek, kTuple);
    connected_ = true;
    if (ec) co_return handshake_failure(ec, "waiting for the TLS client hello");
    if (n == 1 && first[0] != kTlsHandshakeRecord) {
      co_return Error(errc::not_tls, fmt::format("plaintext (non-TLS) client: first byte 0x{:02x} is not a TLS "
                                                 "handshake record",
                                                 first[0]));
    }
  }
  connected_ = true;
  progress_ = Progress::tls;

  stream_.set_verify_callback(VerifyRecorder{this});
  auto [hec] = co_await stream_.async_handshake(
      dialed_ ? asio::ssl::stream_base::client : asio::ssl::stream_base::server, kTuple);
  if (hec || handshake_timed_out_ || abort_error_) {
    if (!verify_failure_.empty()) {
      co_return Error(errc::tls_handshake_failed, "certificate verify failed: " + verify_failure_);
    }
    const std::string d = detail::describe_tls_error(hec);
    if (!handshake_timed_out_ && !abort_error_ &&
        (d.find("TLS 1.3") != std::string::npos || d.find("does not speak TLS") != std::string::npos ||
         d.find("no certificate") != std::string::npos)) {
      co_return Error(errc::tls_handshake_failed, "TLS handshake failed: " + d);
    }
    co_return handshake_failure(hec, "in the TLS handshake");
  }

  X509* cert = SSL_get0_peer_certificate(stream_.native_handle());
  const std::vector<std::string> names = detail::certificate_names(cert);
  if (!detail::name_matches(names, params_.expected_peer_name)) {
    std::vector<std::string> n = names;
    co_return co_await refuse(
        Error(errc::peer_name_mismatch, fmt::format("certificate name {} does not match expected peer '{}'",
                                                    detail::quote_names(n), params_.expected_peer_name)));
  }
  peer_name_ = params_.expected_peer_name;
  progress_ = Progress::authenticated;

  // Hellos cross: both sides write theirs, then read the other's. A hello is small, so the
  // writes complete into the socket buffers and nobody waits for the other to read.
  const std::vector<std::byte> hello = encode_hello(params_.hello);
  const std::vector<std::byte> frame = frame_bytes(kFrameTypeHello, hello);
  auto [wec, wn] = co_await asio::async_write(stream_, asio::buffer(frame), kTuple);
  if (wec) co_return handshake_failure(wec, "sending our hello");
  stats_.bytes_sent += wn;
  ++stats_.frames_sent;
  co_return co_await read_hello();
}

asio::awaitable<Status> Connection::Impl::read_hello() {
  std::array<std::byte, kFrameHeaderBytes> hb{};
  auto [ec, n] = co_await asio::async_read(stream_, asio::buffer(hb), kTuple);
  if (ec) co_return handshake_failure(ec, "waiting for the peer's hello");
  stats_.bytes_received += n;
  Result<FrameHeader> h = decode_frame_header(hb);
  if (!h) co_return co_await refuse(Error(h.code(), "bad frame instead of a hello: " + h.error().context));
  if (Status chk = check_frame_type(*h); !chk) {
    co_return co_await refuse(Error(chk.code(), "bad frame instead of a hello: " + chk.error().context));
  }
  if (h->type != kFrameTypeHello && h->type != kFrameTypeGoodbye) {
    co_return co_await refuse(
        Error(errc::bad_frame, fmt::format("expected a hello frame first, got type {}", h->type)));
  }
  std::vector<std::byte> payload(h->payload_bytes);
  auto [pec, pn] = co_await asio::async_read(stream_, asio::buffer(payload), kTuple);
  if (pec) co_return handshake_failure(pec, "reading the peer's hello");
  stats_.bytes_received += pn;
  ++stats_.frames_received;
  if (h->type == kFrameTypeGoodbye) {
    co_return Error(errc::connection_closed, "the peer refused us: " + printable(payload));
  }
  Result<Hello> peer = decode_hello(payload);
  if (!peer) co_return co_await refuse(Error(peer.code(), "bad hello: " + peer.error().context));
  Result<Agreement> agreed = negotiate(params_.hello, *peer);
  if (!agreed) co_return co_await refuse(agreed.error());
  peer_hello_ = std::move(*peer);
  agreement_ = *agreed;
  co_return Status{};
}

asio::awaitable<Status> Connection::Impl::refuse(Error e) {
  spdlog::warn("transport: peer {} refused: {}", address_, e.context);
  failure_logged_ = true;
  // Tell the peer why, so its operator sees the reason too, then wait (within the handshake
  // deadline) for it to close: closing first could reset the connection under the goodbye.
  std::string reason = e.context.substr(0, kGoodbyeReasonBytesMax);
  const std::vector<std::byte> frame = frame_bytes(kFrameTypeGoodbye, as_bytes(reason));
  auto [wec, wn] = co_await asio::async_write(stream_, asio::buffer(frame), kTuple);
  (void)wn;
  if (!wec) {
    ErrorCode ignored;
    stream_.lowest_layer().shutdown(Tcp::socket::shutdown_send, ignored);
    std::vector<std::byte> scratch(kDrainBytes);
    for (;;) {
      auto [rec, rn] = co_await stream_.async_read_some(asio::buffer(scratch), kTuple);
      (void)rn;
      if (rec) break;
    }
  }
  co_return e;
}

// --------------------------------------------------------------------------------- running

void Connection::Impl::start(const std::shared_ptr<Connection>& self) {
  TANDEM_ASSERT(established_ && tasks_ == 0 && !finished_);
  last_rx_ = Clock::now();
  tasks_ = 3;
  asio::co_spawn(ex_, read_loop(self), AbortOnException{"a transport reader"});
  asio::co_spawn(ex_, write_loop(self), AbortOnException{"a transport writer"});
  asio::co_spawn(ex_, keepalive_loop(self), AbortOnException{"a transport keep-alive"});
}

bool Connection::Impl::inbound_full() const {
  if (inbound_.empty()) return false;
  return inbound_.size() >= kReceiveQueueFramesMax || inbound_bytes_ >= kReceiveQueueBytesMax;
}

void Connection::Impl::on_read_error(const ErrorCode& ec) {
  io_broken_ = true;
  if (closing_) return;  // our own close aborted the read
  close_with(Error(errc::connection_closed, io_failure(ec, "reading")), false, false);
}

void Connection::Impl::protocol_error(const Error& e) {
  const Error err(e.code, "bad frame from the peer: " + e.context);
  close_with(err, true, false);
}

asio::awaitable<void> Connection::Impl::read_loop(std::shared_ptr<Connection> /*keepalive*/) {
  std::array<std::byte, kFrameHeaderBytes> hb{};
  bool desynchronized = false;  // after a bad frame the byte stream cannot be parsed further
  while (!closing_) {
    while (!closing_ && inbound_full()) {
      reader_paused_ = true;
      co_await inbound_space_.wait();
    }
    if (reader_paused_) {
      // The silence was ours (nobody took the frames); the peer's clock starts again now.
      reader_paused_ = false;
      last_rx_ = Clock::now();
    }
    if (closing_) break;
    auto [ec, n] = co_await asio::async_read(stream_, asio::buffer(hb), kTuple);
    if (ec) {
      on_read_error(ec);
      break;
    }
    last_rx_ = Clock::now();
    stats_.bytes_received += n;
    Result<FrameHeader> h = decode_frame_header(hb);
    Status chk = h ? check_frame_type(*h) : Status(h.error());
    if (!chk) {
      desynchronized = true;
      protocol_error(chk.error());
      break;
    }
    std::vector<std::byte> payload(h->payload_bytes);
    ErrorCode pec;
    for (std::size_t off = 0; off < payload.size() && !pec;) {
      const std::size_t piece = std::min(kReadPieceBytes, payload.size() - off);
      auto [rec, rn] = co_await asio::async_read(stream_, asio::buffer(payload.data() + off, piece), kTuple);
      pec = rec;
      off += rn;
      stats_.bytes_received += rn;
      last_rx_ = Clock::now();
    }
    if (pec) {
      on_read_error(pec);
      break;
    }
    ++stats_.frames_received;
    if (closing_) break;
    if (Status d = dispatch(*h, std::move(payload)); !d) {
      protocol_error(d.error());
      break;
    }
  }
  (void)desynchronized;
  if (!io_broken_ && !socket_closed_) co_await drain_after_close();
  reader_done_ = true;
  task_done();
}

asio::awaitable<void> Connection::Impl::drain_after_close() {
  // Until the peer closes in turn (or kLinger closes the socket): unread bytes at close time
  // would make the kernel reset the connection, and a reset can destroy our goodbye in flight.
  std::vector<std::byte> scratch(kDrainBytes);
  while (!socket_closed_) {
    auto [ec, n] = co_await stream_.async_read_some(asio::buffer(scratch), kTuple);
    (void)n;
    if (ec) break;
  }
}

Status Connection::Impl::dispatch(const FrameHeader& h, std::vector<std::byte> payload) {
  switch (h.type) {
    case kFrameTypeHello:
      return Error(errc::bad_frame, "a second hello frame");
    case kFrameTypePing:
      // Only the latest ping is answered: a peer cannot pile up pongs in our memory.
      pong_pending_ = get_le64(reinterpret_cast<const unsigned char*>(payload.data()));
      wake_writer();
      return {};
    case kFrameTypePong: {
      const std::uint64_t sent_us = get_le64(reinterpret_cast<const unsigned char*>(payload.data()));
      const std::uint64_t now_us = micros(Clock::now());
      if (sent_us <= now_us) stats_.keepalive_rtt_us_last = now_us - sent_us;
      return {};
    }
    case kFrameTypeGoodbye:
      close_with(Error(errc::connection_closed, "the peer closed the connection: " + printable(payload)), false, false);
      return {};
    default:
      break;
  }
  TANDEM_ASSERT(h.type >= kFrameTypeApplicationMin);  // check_frame_type let nothing else by
  inbound_bytes_ += payload.size();
  inbound_.push_back(Frame{h.type, h.flags, std::move(payload)});
  if (!receivers_.empty()) {
    detail::Parking* r = receivers_.front();
    receivers_.pop_front();
    r->wake();
  }
  return {};
}

asio::awaitable<void> Connection::Impl::write_loop(std::shared_ptr<Connection> /*keepalive*/) {
  // The staging buffer never grows past its reservation, so the pieces pointing into it stay
  // valid while a batch is built.
  std::vector<std::byte> staging;
  staging.reserve(kStagingBytes);
  std::vector<asio::const_buffer> pieces;
  std::vector<SendOp*> batch;
  std::size_t staged_from = 0;  // staging bytes not yet covered by a piece
  const auto stage = [&](const void* p, std::size_t n) {
    TANDEM_ASSERT(staging.size() + n <= kStagingBytes);
    const auto* b = static_cast<const std::byte*>(p);
    staging.insert(staging.end(), b, b + n);
  };
  const auto flush_staging = [&] {
    if (staging.size() > staged_from) {
      pieces.emplace_back(staging.data() + staged_from, staging.size() - staged_from);
      staged_from = staging.size();
    }
  };
  const auto stage_control = [&](std::uint16_t type, std::uint64_t value) {
    std::array<std::byte, kFrameHeaderBytes + kPingPayloadBytes> f{};
    FrameHeader h;
    h.type = type;
    h.payload_bytes = kPingPayloadBytes;
    encode_frame_header(h, std::span<std::byte, kFrameHeaderBytes>(f.data(), kFrameHeaderBytes));
    put_le64(reinterpret_cast<unsigned char*>(f.data() + kFrameHeaderBytes), value);
    stage(f.data(), f.size());
  };

  while (!closing_) {
    const Clock::time_point now = Clock::now();
    const bool control = ping_pending_.has_value() || pong_pending_.has_value();
    const Clock::duration rate_wait = limiter_.delay(now);
    const bool sends = !sends_.empty() && rate_wait == Clock::duration::zero();
    if (!control && !sends) {
      // Idle, or every queued frame waits for the rate limit (control frames do not: a
      // keep-alive held back by the limit would get a slow link declared dead).
      if (sends_.empty()) {
        writer_timer_.expires_at(Clock::time_point::max());
      } else {
        writer_timer_.expires_after(rate_wait);
      }
      auto [ec] = co_await writer_timer_.async_wait(kTuple);
      (void)ec;
      continue;
    }

    staging.clear();
    pieces.clear();
    batch.clear();
    staged_from = 0;
    std::uint64_t frames = 0;
    if (ping_pending_) {
      stage_control(kFrameTypePing, *ping_pending_);
      ping_pending_.reset();
      ++frames;
    }
    if (pong_pending_) {
      stage_control(kFrameTypePong, *pong_pending_);
      pong_pending_.reset();
      ++frames;
    }
    std::uint64_t send_bytes = 0;
    while (sends && !sends_.empty() && batch.size() < kBatchFramesMax) {
      SendOp* op = sends_.front();
      if (!batch.empty() && send_bytes + op->bytes > kBatchBytesMax) break;
      if (staging.size() + kFrameHeaderBytes > kStagingBytes) break;
      sends_.pop_front();
      op->state = SendOp::State::writing;
      batch.push_back(op);
      stage(op->header.data(), op->header.size());
      for (const asio::const_buffer& b : op->payload) {
        if (b.size() == 0) continue;
        if (b.size() <= kCopyBytesMax && staging.size() + b.size() <= kStagingBytes) {
          stage(b.data(), b.size());
        } else {
          flush_staging();
          pieces.push_back(b);
        }
      }
      send_bytes += op->bytes;
      ++frames;
    }
    flush_staging();
    TANDEM_ASSERT(!pieces.empty());
    if (send_bytes > 0) limiter_.consume(send_bytes, now);

    auto [ec, n] = co_await asio::async_write(stream_, pieces, kTuple);
    if (ec) {
      io_broken_ = true;
      if (!closing_) close_with(Error(errc::connection_closed, io_failure(ec, "writing")), false, false);
    } else {
      stats_.bytes_sent += n;
      stats_.frames_sent += frames;
    }
    for (SendOp* op : batch) {
      op->state = SendOp::State::done;
      op->result = ec ? Status(close_error_) : Status{};
      op->park.wake();
    }
    if (ec) break;
  }

  if (goodbye_pending_ && !io_broken_ && !socket_closed_) {
    const std::vector<std::byte> frame = frame_bytes(kFrameTypeGoodbye, as_bytes(goodbye_reason_));
    auto [ec, n] = co_await asio::async_write(stream_, asio::buffer(frame), kTuple);
    if (!ec) {
      stats_.bytes_sent += n;
      ++stats_.frames_sent;
      // A half-close: the peer reads the goodbye, then EOF, and closes in turn.
      ErrorCode ignored;
      stream_.lowest_layer().shutdown(Tcp::socket::shutdown_send, ignored);
    }
  }
  writer_done_ = true;
  task_done();
}

asio::awaitable<void> Connection::Impl::keepalive_loop(std::shared_ptr<Connection> /*keepalive*/) {
  Clock::time_point next_ping = Clock::now() + params_.keepalive_interval;
  while (!closing_) {
    const Clock::time_point now = Clock::now();
    if (!reader_paused_ && now - last_rx_ >= params_.peer_timeout) {
      close_with(Error(errc::timeout, fmt::format("nothing received from the peer for {} ms (keep-alive timeout {} ms)",
                                                  ms(now - last_rx_), params_.peer_timeout.count())),
                 false, false);
      break;
    }
    if (now >= next_ping) {
      if (!ping_pending_) {
        ping_pending_ = micros(now);
        wake_writer();
      }
      next_ping = now + params_.keepalive_interval;
    }
    Clock::time_point wake_at = next_ping;
    if (!reader_paused_) wake_at = std::min(wake_at, last_rx_ + params_.peer_timeout);
    keepalive_timer_.expires_at(wake_at);
    auto [ec] = co_await keepalive_timer_.async_wait(kTuple);
    (void)ec;
  }
  task_done();
}

void Connection::Impl::set_rate_limit(std::uint64_t bytes_per_s) {
  limiter_.set_rate(bytes_per_s, Clock::now());
  wake_writer();
}

// --------------------------------------------------------------------------------- closing

void Connection::Impl::close_with(Error e, bool goodbye, bool local) {
  if (closing_) return;
  TANDEM_ASSERT(e.code);
  closing_ = true;
  close_error_ = e;
  const std::string& why = e.context.empty() ? e.message() : e.context;
  if (local || e.code == errc::connection_closed) {
    spdlog::info("transport: connection with {} ({}) closed: {}", peer_name_, address_, why);
  } else {
    spdlog::warn("transport: connection with {} ({}) closed: {}", peer_name_, address_, why);
  }
  while (!sends_.empty()) {
    SendOp* op = sends_.front();
    sends_.pop_front();
    op->state = SendOp::State::done;
    op->result = e;
    op->park.wake();
  }
  if (local) {
    inbound_.clear();
    inbound_bytes_ = 0;
  }
  while (!receivers_.empty()) {
    detail::Parking* r = receivers_.front();
    receivers_.pop_front();
    r->wake();
  }
  inbound_space_.notify_all();
  wake_writer();
  keepalive_timer_.cancel();
  if (goodbye && established_ && tasks_ > 0 && !io_broken_ && !socket_closed_) {
    goodbye_pending_ = true;
    goodbye_reason_ = e.context.substr(0, kGoodbyeReasonBytesMax);
    linger_timer_.expires_after(kLinger);
    linger_timer_.async_wait([weak = owner_](const ErrorCode& ec) {
      if (ec) return;
      if (auto c = weak.lock()) detail::ConnectionAccess::impl(*c).close_socket();
    });
  } else {
    close_socket();
  }
  if (on_closing_) asio::post(ex_, std::move(on_closing_));
  if (tasks_ == 0) {
    // Never started (or already done): nothing else will finish it.
    close_socket();
    finished_ = true;
    finished_waiters_.notify_all();
  }
}

void Connection::Impl::close_socket() {
  if (socket_closed_) return;
  socket_closed_ = true;
  ErrorCode ignored;
  stream_.lowest_layer().close(ignored);
}

void Connection::Impl::task_done() {
  TANDEM_ASSERT(tasks_ > 0);
  --tasks_;
  if (reader_done_ && writer_done_) close_socket();
  if (tasks_ > 0) return;
  TANDEM_ASSERT(closing_);
  close_socket();
  linger_timer_.cancel();
  writer_timer_.cancel();
  keepalive_timer_.cancel();
  finished_ = true;
  finished_waiters_.notify_all();
}

// ------------------------------------------------------------------------------ public API

Connection::Connection(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Connection::~Connection() = default;

const std::string& Connection::peer_name() const { return impl_->peer_name_; }
const std::string& Connection::peer_address() const { return impl_->address_; }
const std::vector<std::byte>& Connection::peer_hello() const { return impl_->peer_hello_.app; }
std::uint16_t Connection::protocol_version() const { return impl_->agreement_.version; }
std::uint64_t Connection::capabilities() const { return impl_->agreement_.capabilities; }
bool Connection::dialed() const { return impl_->dialed_; }
bool Connection::is_open() const { return impl_->established_ && !impl_->closing_; }
const ConnectionStats& Connection::stats() const { return impl_->stats_; }

const Error& Connection::close_error() const {
  TANDEM_ASSERT(!is_open());
  return impl_->close_error_;
}

void Connection::close(std::string reason) {
  if (reason.empty()) reason = "closed";
  impl_->close_with(Error(errc::connection_closed, std::move(reason)), true, true);
}

asio::awaitable<void> Connection::wait_closed() {
  const std::shared_ptr<Connection> keep = shared_from_this();
  while (!impl_->finished_) co_await impl_->finished_waiters_.wait();
}

asio::awaitable<Status> Connection::send(std::uint16_t type, std::uint16_t flags,
                                         std::span<const asio::const_buffer> payload) {
  TANDEM_ASSERT(type >= kFrameTypeApplicationMin);
  const std::shared_ptr<Connection> keep = shared_from_this();
  Impl& s = *impl_;
  std::uint64_t bytes = 0;
  for (const asio::const_buffer& b : payload) bytes += b.size();
  if (bytes > kFramePayloadBytesMax) {
    co_return Error(errc::frame_too_large,
                    fmt::format("frame payload of {} bytes (at most {})", bytes, kFramePayloadBytesMax));
  }
  if (!is_open()) co_return s.close_error_;
  if (s.sends_.size() >= kSendQueueFramesMax) {
    co_return Error(errc::send_queue_full,
                    fmt::format("{} frames already queued (kSendQueueFramesMax)", s.sends_.size()));
  }
  Impl::SendOp op;
  FrameHeader h;
  h.type = type;
  h.flags = flags;
  h.payload_bytes = static_cast<std::uint32_t>(bytes);
  encode_frame_header(h, op.header);
  op.payload = payload;
  op.bytes = kFrameHeaderBytes + bytes;
  op.park.try_cancel = [&s, &op] {
    if (op.state != Impl::SendOp::State::queued) return false;  // its buffers are being written
    const auto it = std::find(s.sends_.begin(), s.sends_.end(), &op);
    TANDEM_ASSERT(it != s.sends_.end());
    s.sends_.erase(it);
    op.state = Impl::SendOp::State::done;
    return true;
  };
  s.sends_.push_back(&op);
  s.wake_writer();
  co_await detail::park(op.park);
  if (op.park.cancelled) {
    co_return Error(make_error_code(std::errc::operation_canceled), "send cancelled before it was written");
  }
  co_return op.result;
}

asio::awaitable<Result<Frame>> Connection::receive() {
  const std::shared_ptr<Connection> keep = shared_from_this();
  Impl& s = *impl_;
  for (;;) {
    if (!s.inbound_.empty()) {
      Frame f = std::move(s.inbound_.front());
      s.inbound_.pop_front();
      TANDEM_ASSERT(s.inbound_bytes_ >= f.payload.size());
      s.inbound_bytes_ -= f.payload.size();
      s.inbound_space_.notify_all();
      co_return f;
    }
    if (!is_open()) co_return s.close_error_;
    detail::Parking p;
    p.try_cancel = [&s, &p] {
      const auto it = std::find(s.receivers_.begin(), s.receivers_.end(), &p);
      TANDEM_ASSERT(it != s.receivers_.end());
      s.receivers_.erase(it);
      return true;
    };
    s.receivers_.push_back(&p);
    co_await detail::park(p);
    if (p.cancelled) co_return Error(make_error_code(std::errc::operation_canceled), "receive cancelled");
  }
}

}  // namespace tandem::transport

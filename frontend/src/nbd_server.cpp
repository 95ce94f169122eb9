// The NBD server: listeners, and per connection the handshake, the request reader, concurrent
// request execution and the single reply writer.
//
// Connection life: run() negotiates (handshake machine, bounded by handshake_timeout_ms), then
// transmit() reads requests in order. Each valid request runs as its own coroutine against the
// volume; each result becomes a Reply in a queue that only write_replies() drains, so replies
// go out whole and one at a time, in completion order. A request counts as in flight from the
// moment its header is read until its reply is written (or dropped on a dead socket); the
// reader stops reading while requests_in_flight_max (or payload_bytes_in_flight_max) is
// reached. The connection ends when the reader is done (EOF, NBD_CMD_DISC, garbage, stop) and
// every request has been answered: requests already on the volume are always awaited, because
// their buffers and the connection must outlive them.
#include "tandem/frontend/nbd_server.h"

#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "tandem/common/assert.h"
#include "tandem/common/async.h"
#include "tandem/common/endpoint.h"
#include "tandem/frontend/errc.h"
#include "tandem/frontend/nbd_protocol.h"

namespace tandem::frontend {
namespace {

using Socket = asio::generic::stream_protocol::socket;
using ErrorCode = boost::system::error_code;
constexpr auto kTuple = asio::as_tuple(asio::use_awaitable);

// Handshake reads and refused WRITE payloads go through a scratch buffer of this size: large
// enough for any option tandem buffers, small enough to allocate per connection.
constexpr std::size_t kScratchBytes = 64 * 1024;
// After a failed accept (EMFILE, ENOBUFS, ...) wait this long before the next one, so a
// persistent failure does not spin the thread.
constexpr auto kAcceptRetryDelay = std::chrono::milliseconds(100);
// Error messages in structured replies are for humans; engine contexts can be long.
constexpr std::size_t kErrorMessageBytesMax = 256;

std::string read_error_reason(const ErrorCode& ec, std::string_view phase) {
  if (ec == asio::error::eof) return "client closed the connection " + std::string(phase);
  if (ec == asio::error::operation_aborted || ec == asio::error::bad_descriptor) {
    return "connection closed by the server " + std::string(phase);
  }
  return "read failed " + std::string(phase) + ": " + ec.message();
}

// "10.0.0.1:51234", "[::1]:51234", or for Unix sockets the socket path and the peer's pid/uid.
std::string describe_peer(Socket& s, const std::string& where) {
  ErrorCode ec;
  const auto ep = s.remote_endpoint(ec);
  if (ec) return where;
  const int family = ep.protocol().family();
  if (family == AF_INET || family == AF_INET6) {
    asio::ip::tcp::endpoint tcp;
    if (ep.size() > tcp.capacity()) return where;
    std::memcpy(tcp.data(), ep.data(), ep.size());
    tcp.resize(ep.size());
    const std::string addr = tcp.address().to_string();
    return (family == AF_INET6 ? "[" + addr + "]" : addr) + ":" + std::to_string(tcp.port());
  }
  if (family == AF_UNIX) {
    ucred cred{};
    socklen_t len = sizeof cred;
    if (::getsockopt(s.native_handle(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
      return where + " (pid " + std::to_string(cred.pid) + ", uid " + std::to_string(cred.uid) + ")";
    }
  }
  return where;
}

class Connection;

// Everything the server shares with its connections. One per NbdServer, on one thread.
struct ServerCore {
  explicit ServerCore(asio::any_io_executor e, NbdServerOptions o) : ex(std::move(e)), opts(o), stop_timer(ex) {}

  struct UnixPath {
    std::string path;
    dev_t dev = 0;
    ino_t ino = 0;
  };

  asio::any_io_executor ex;
  NbdServerOptions opts;
  std::vector<std::pair<std::string, engine::Volume*>> exports;  // first = default export
  std::vector<std::unique_ptr<asio::local::stream_protocol::acceptor>> unix_acceptors;
  std::vector<UnixPath> unix_paths;
  std::vector<std::unique_ptr<asio::ip::tcp::acceptor>> tcp_acceptors;
  std::uint16_t tcp_port = 0;
  std::map<std::uint64_t, Connection*> connections;
  std::uint64_t next_connection_id = 1;
  // Accept loops and connections still running; stop() waits for zero.
  std::uint32_t tasks = 0;
  WaitQueue tasks_done;
  bool stopping = false;
  asio::steady_timer stop_timer;  // the stop grace period
  NbdCounters counters;

  engine::Volume* find_volume(const std::string& name) const {
    for (const auto& [n, v] : exports) {
      if (n == name) return v;
    }
    return nullptr;
  }

  std::vector<nbd::NbdExport> export_snapshot() const {
    std::vector<nbd::NbdExport> v;
    v.reserve(exports.size());
    for (const auto& [name, vol] : exports) {
      v.push_back(nbd::NbdExport{name, "tandem volume " + vol->id(), vol->size_bytes(),
                                 nbd::transmission_flags(vol->writable())});
    }
    return v;
  }

  void task_finished() {
    TANDEM_ASSERT(tasks > 0);
    if (--tasks == 0) tasks_done.notify_all();
  }

  void start_connection(Socket socket, const std::string& where);
};

class Connection {
 public:
  Connection(ServerCore& core, Socket socket, std::string peer, std::uint64_t id)
      : core_(core), socket_(std::move(socket)), peer_(std::move(peer)), id_(id) {}
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // The whole life of the connection; `self` keeps it alive.
  asio::awaitable<void> run(std::shared_ptr<Connection> self);
  // The server is stopping: a connection still negotiating closes now; one in transmission
  // answers new requests with ESHUTDOWN and closes once the volume has finished its requests.
  void on_server_stop();
  // The stop grace period is over: close now, dropping replies not yet written.
  void force_close() {
    set_reason("server stopping (replies not taken within the stop grace period)");
    close_socket();
  }

 private:
  struct Reply {
    std::vector<std::uint8_t> head;
    engine::IoBuffer data;  // READ data, sent after head
    std::size_t data_bytes = 0;
    std::uint64_t accounted_bytes = 0;  // counted in payload_in_flight_ until written
  };

  asio::awaitable<bool> negotiate();
  asio::awaitable<bool> negotiate_io();
  asio::awaitable<void> transmit(std::shared_ptr<Connection> self);
  asio::awaitable<void> write_replies(std::shared_ptr<Connection> keepalive);
  asio::awaitable<void> execute(std::shared_ptr<Connection> keepalive, nbd::Request r, engine::IoBuffer payload,
                                std::uint64_t accounted);
  asio::awaitable<ErrorCode> discard(std::size_t bytes);
  void queue_success(const nbd::Request& r, engine::IoBuffer data, std::uint64_t accounted);
  void queue_error(const nbd::Request& r, std::uint32_t error, std::string_view message, std::uint64_t accounted);
  void queue(Reply r);
  void close_socket();
  void set_reason(std::string r, bool protocol_error = false) {
    if (!reason_.empty()) return;
    reason_ = std::move(r);
    protocol_error_ = protocol_error;
    if (protocol_error) ++core_.counters.protocol_errors;
  }
  [[nodiscard]] nbd::ExportState export_state() const {
    return nbd::ExportState{volume_->size_bytes(), volume_->writable(), core_.stopping, core_.opts.payload_bytes_max};
  }

  ServerCore& core_;
  Socket socket_;
  const std::string peer_;
  const std::uint64_t id_;
  std::string reason_;  // why the connection ended (first cause wins)
  bool protocol_error_ = false;

  bool in_transmission_ = false;
  engine::Volume* volume_ = nullptr;
  std::string export_name_;
  bool structured_ = false;

  // Transmission state.
  std::deque<Reply> replies_;    // at most in_flight_ entries
  std::uint32_t in_flight_ = 0;  // read, not yet answered; <= requests_in_flight_max
  std::uint64_t payload_in_flight_ = 0;
  std::uint32_t volume_ops_ = 0;  // executing on the volume
  bool reader_done_ = false;
  bool writer_done_ = false;
  bool broken_ = false;    // a reply write failed: drop the rest
  bool closing_ = false;   // the socket is closed or closing
  WaitQueue slot_free_;    // in_flight_ dropped, or closing_
  WaitQueue writer_wake_;  // a reply was queued, a volume op finished, or the reader is done
  WaitQueue writer_exit_;
};

void ServerCore::start_connection(Socket socket, const std::string& where) {
  const std::uint64_t id = next_connection_id++;
  std::string peer = describe_peer(socket, where);
  auto c = std::make_shared<Connection>(*this, std::move(socket), std::move(peer), id);
  connections.emplace(id, c.get());
  ++counters.connections_open;
  ++tasks;
  asio::co_spawn(ex, c->run(c), AbortOnException{"an NBD connection"});
}

template <typename Acceptor>
asio::awaitable<void> accept_loop(ServerCore& core, Acceptor& acceptor, std::string where) {
  for (;;) {
    Socket socket(core.ex);
    auto [ec] = co_await acceptor.async_accept(socket, kTuple);
    if (core.stopping || ec == asio::error::operation_aborted) break;
    if (ec) {
      spdlog::warn("nbd {}: accept failed: {}", where, ec.message());
      asio::steady_timer t(core.ex, kAcceptRetryDelay);
      auto [tec] = co_await t.async_wait(kTuple);
      (void)tec;
      continue;
    }
    ++core.counters.connections_accepted;
    if (core.counters.connections_open >= core.opts.connections_max) {
      spdlog::warn("nbd {}: refusing a connection: {} connections open (connections_max)", where,
                   core.counters.connections_open);
      ErrorCode ignored;
      socket.close(ignored);
      continue;
    }
    core.start_connection(std::move(socket), where);
  }
  core.task_finished();
}

asio::awaitable<void> Connection::run(std::shared_ptr<Connection> self) {
  spdlog::info("nbd: connection {} opened from {}", id_, peer_);
  const bool go = co_await negotiate();
  if (go) {
    in_transmission_ = true;
    spdlog::info("nbd: connection {} uses export '{}' ({} replies)", id_, export_name_,
                 structured_ ? "structured" : "simple");
    co_await transmit(self);
  }
  close_socket();
  if (reason_.empty()) reason_ = "closed";
  if (protocol_error_) {
    spdlog::warn("nbd: connection {} from {} closed: {}", id_, peer_, reason_);
  } else {
    spdlog::info("nbd: connection {} closed: {}", id_, reason_);
  }
  core_.connections.erase(id_);
  TANDEM_ASSERT(core_.counters.connections_open > 0);
  --core_.counters.connections_open;
  core_.task_finished();
}

void Connection::on_server_stop() {
  if (!in_transmission_) {
    set_reason("server stopping");
    close_socket();
    return;
  }
  writer_wake_.notify_all();
}

void Connection::close_socket() {
  closing_ = true;
  ErrorCode ignored;
  socket_.shutdown(asio::socket_base::shutdown_both, ignored);
  socket_.close(ignored);
  slot_free_.notify_all();
}

// ---------------------------------------------------------------------------------- handshake

asio::awaitable<bool> Connection::negotiate() {
  using namespace asio::experimental::awaitable_operators;
  asio::steady_timer timer(core_.ex, std::chrono::milliseconds(core_.opts.handshake_timeout_ms));
  auto r = co_await (negotiate_io() || timer.async_wait(kTuple));
  if (r.index() == 1) {
    set_reason("handshake timed out after " + std::to_string(core_.opts.handshake_timeout_ms) + " ms");
    co_return false;
  }
  co_return std::get<0>(r);
}

asio::awaitable<bool> Connection::negotiate_io() {
  nbd::HandshakeLimits limits;
  limits.payload_bytes_max = core_.opts.payload_bytes_max;
  nbd::Handshake hs(core_.export_snapshot(), limits);
  std::vector<std::uint8_t> scratch(kScratchBytes);
  for (;;) {
    const std::vector<std::uint8_t> out = hs.take_output();
    if (!out.empty()) {
      auto [wec, wn] = co_await asio::async_write(socket_, asio::buffer(out), kTuple);
      (void)wn;
      if (wec) {
        // A client that sent NBD_OPT_ABORT may close without waiting for the ACK.
        set_reason(hs.outcome() == nbd::HandshakeOutcome::abort
                       ? hs.reason()
                       : "write failed during the handshake: " + wec.message());
        co_return false;
      }
    }
    switch (hs.outcome()) {
      case nbd::HandshakeOutcome::negotiating:
        break;
      case nbd::HandshakeOutcome::go:
        export_name_ = hs.chosen().name;
        volume_ = core_.find_volume(export_name_);
        TANDEM_ASSERT(volume_ != nullptr);
        structured_ = hs.structured_replies();
        co_return true;
      case nbd::HandshakeOutcome::abort:
        set_reason(hs.reason());
        co_return false;
      case nbd::HandshakeOutcome::close:
        set_reason(hs.reason(), true);
        co_return false;
    }
    const std::size_t want = std::min(hs.bytes_wanted(), scratch.size());
    TANDEM_ASSERT(want > 0);
    auto [rec, n] = co_await asio::async_read(socket_, asio::buffer(scratch.data(), want), kTuple);
    if (rec) {
      set_reason(read_error_reason(rec, "during the handshake"));
      co_return false;
    }
    // Exactly what the machine asked for: it consumes all of it.
    const std::size_t used = hs.feed({scratch.data(), n});
    TANDEM_ASSERT(used == n);
  }
}

// ------------------------------------------------------------------------------- transmission

asio::awaitable<void> Connection::transmit(std::shared_ptr<Connection> self) {
  asio::co_spawn(core_.ex, write_replies(self), AbortOnException{"an NBD reply writer"});
  const NbdServerOptions& o = core_.opts;
  std::array<std::uint8_t, nbd::kRequestHeaderBytes> header{};
  for (;;) {
    while (!closing_ && in_flight_ >= o.requests_in_flight_max) co_await slot_free_.wait();
    if (closing_) break;
    auto [hec, hn] = co_await asio::async_read(socket_, asio::buffer(header), kTuple);
    (void)hn;
    if (hec) {
      set_reason(read_error_reason(hec, "between requests"));
      break;
    }
    const std::optional<nbd::Request> req = nbd::decode_request(header);
    if (!req) {
      set_reason("bad request magic (garbage on the socket)", true);
      break;
    }
    ++core_.counters.requests;
    const nbd::RequestCheck check = nbd::check_request(*req, export_state());
    if (check.verdict == nbd::Verdict::close) {
      set_reason(std::string(check.reason) + " (" + std::to_string(req->length) + " bytes)", true);
      break;
    }
    if (check.verdict == nbd::Verdict::disconnect) {
      set_reason("client disconnected (NBD_CMD_DISC)");
      break;
    }
    // Bytes this request holds until its reply is written: WRITE payload or READ data.
    std::uint64_t accounted = 0;
    if (check.verdict == nbd::Verdict::execute && (req->type == nbd::kCmdRead || req->type == nbd::kCmdWrite)) {
      accounted = req->length;
    }
    while (!closing_ && in_flight_ > 0 && payload_in_flight_ + accounted > o.payload_bytes_in_flight_max) {
      co_await slot_free_.wait();
    }
    if (closing_) break;
    engine::IoBuffer payload;
    if (check.payload_bytes > 0) {
      ErrorCode pec;
      if (check.verdict == nbd::Verdict::execute) {
        payload = volume_->buffers().allocate(check.payload_bytes);
        auto [rec, rn] = co_await asio::async_read(socket_, asio::buffer(payload.data(), check.payload_bytes), kTuple);
        (void)rn;
        pec = rec;
      } else {
        pec = co_await discard(check.payload_bytes);
      }
      if (pec) {
        set_reason(read_error_reason(pec, "in a write payload"));
        break;
      }
    }
    ++in_flight_;
    payload_in_flight_ += accounted;
    if (check.verdict == nbd::Verdict::error) {
      spdlog::debug("nbd: connection {}: {} refused: {}", id_, nbd::command_name(req->type), check.reason);
      queue_error(*req, check.error, check.reason, accounted);
      continue;
    }
    ++volume_ops_;
    asio::co_spawn(core_.ex, execute(self, *req, std::move(payload), accounted), AbortOnException{"an NBD request"});
  }
  reader_done_ = true;
  writer_wake_.notify_all();
  while (!writer_done_) co_await writer_exit_.wait();
}

asio::awaitable<ErrorCode> Connection::discard(std::size_t bytes) {
  std::vector<std::uint8_t> scratch(std::min(bytes, kScratchBytes));
  while (bytes > 0) {
    const std::size_t n = std::min(bytes, scratch.size());
    auto [ec, got] = co_await asio::async_read(socket_, asio::buffer(scratch.data(), n), kTuple);
    (void)got;
    if (ec) co_return ec;
    bytes -= n;
  }
  co_return ErrorCode{};
}

asio::awaitable<void> Connection::execute(std::shared_ptr<Connection> /*keepalive*/, nbd::Request r,
                                          engine::IoBuffer payload, std::uint64_t accounted) {
  engine::Volume& v = *volume_;
  const bool fua = (r.flags & nbd::kCmdFlagFua) != 0;
  engine::IoBuffer data;
  Status st;
  switch (r.type) {
    case nbd::kCmdRead:
      data = v.buffers().allocate(r.length);
      st = co_await v.read(r.offset, r.length, data);
      break;
    case nbd::kCmdWrite:
      st = co_await v.write(r.offset, r.length, payload, fua);
      break;
    case nbd::kCmdFlush:
      st = co_await v.flush();
      break;
    case nbd::kCmdTrim:
      st = co_await v.trim(r.offset, r.length, fua);
      break;
    case nbd::kCmdWriteZeroes: {
      const bool may_unmap = (r.flags & nbd::kCmdFlagNoHole) == 0;
      const bool fast_only = (r.flags & nbd::kCmdFlagFastZero) != 0;
      st = co_await v.write_zeroes(r.offset, r.length, may_unmap, fua, fast_only);
      break;
    }
    case nbd::kCmdCache:
      // A hint only: the volume is read with O_DIRECT, so there is no cache to warm.
      break;
    default:
      TANDEM_ASSERT_MSG(false, "check_request let an unknown command through");
  }
  payload.reset();
  TANDEM_ASSERT(volume_ops_ > 0);
  --volume_ops_;
  if (st) {
    queue_success(r, std::move(data), accounted);
    co_return;
  }
  const std::uint32_t err = nbd::nbd_error_from(st.code());
  // A fast zero the device cannot do is an expected answer, not a failure worth a warning.
  if (err == nbd::kEnotsup || err == nbd::kEshutdown) {
    spdlog::debug("nbd: connection {}: {} offset {} length {}: {}", id_, nbd::command_name(r.type), r.offset, r.length,
                  st.error().message());
  } else {
    spdlog::warn("nbd: connection {}: {} offset {} length {} failed: {}", id_, nbd::command_name(r.type), r.offset,
                 r.length, st.error().message());
  }
  queue_error(r, err, st.error().message(), accounted);
}

void Connection::queue_success(const nbd::Request& r, engine::IoBuffer data, std::uint64_t accounted) {
  Reply rep;
  rep.accounted_bytes = accounted;
  if (r.type == nbd::kCmdRead) {
    rep.data = std::move(data);
    rep.data_bytes = r.length;
  }
  if (r.type == nbd::kCmdRead && structured_) {
    // The whole read as one OFFSET_DATA chunk with DONE: the read has already succeeded, so
    // no error can follow it.
    rep.head.resize(nbd::kOffsetDataPrefixBytes);
    nbd::encode_offset_data_prefix(
        std::span<std::uint8_t, nbd::kOffsetDataPrefixBytes>(rep.head.data(), nbd::kOffsetDataPrefixBytes), r.handle,
        r.offset, r.length);
  } else {
    // Simple replies are allowed for everything but READ once structured replies are on.
    rep.head.resize(nbd::kSimpleReplyBytes);
    nbd::encode_simple_reply(std::span<std::uint8_t, nbd::kSimpleReplyBytes>(rep.head.data(), nbd::kSimpleReplyBytes),
                             0, r.handle);
  }
  queue(std::move(rep));
}

void Connection::queue_error(const nbd::Request& r, std::uint32_t error, std::string_view message,
                             std::uint64_t accounted) {
  TANDEM_ASSERT(error != 0);
  ++core_.counters.request_errors;
  Reply rep;
  rep.accounted_bytes = accounted;
  if (structured_) {
    rep.head = nbd::encode_error_chunk(r.handle, error, message.substr(0, kErrorMessageBytesMax));
  } else {
    // Without structured replies a failed READ is a bare error with no data.
    rep.head.resize(nbd::kSimpleReplyBytes);
    nbd::encode_simple_reply(std::span<std::uint8_t, nbd::kSimpleReplyBytes>(rep.head.data(), nbd::kSimpleReplyBytes),
                             error, r.handle);
  }
  queue(std::move(rep));
}

void Connection::queue(Reply r) {
  TANDEM_ASSERT(replies_.size() < in_flight_);
  replies_.push_back(std::move(r));
  writer_wake_.notify_all();
}

asio::awaitable<void> Connection::write_replies(std::shared_ptr<Connection> /*keepalive*/) {
  for (;;) {
    if (!replies_.empty()) {
      Reply r = std::move(replies_.front());
      replies_.pop_front();
      if (!broken_) {
        const std::array<asio::const_buffer, 2> bufs{asio::buffer(r.head),
                                                     asio::const_buffer(r.data.data(), r.data_bytes)};
        auto [ec, n] = co_await asio::async_write(socket_, bufs, kTuple);
        (void)n;
        if (ec) {
          broken_ = true;
          set_reason(read_error_reason(ec, "while writing a reply"));
          close_socket();
        }
      }
      TANDEM_ASSERT(in_flight_ > 0);
      TANDEM_ASSERT(payload_in_flight_ >= r.accounted_bytes);
      --in_flight_;
      payload_in_flight_ -= r.accounted_bytes;
      slot_free_.notify_all();
      continue;
    }
    if (reader_done_ && volume_ops_ == 0) break;
    if (core_.stopping && volume_ops_ == 0 && !closing_) {
      // Everything that reached the volume has been answered; later requests got ESHUTDOWN.
      set_reason("server stopping");
      close_socket();
      continue;
    }
    co_await writer_wake_.wait();
  }
  writer_done_ = true;
  writer_exit_.notify_all();
}

}  // namespace

struct NbdServer::Impl {
  Impl(asio::any_io_executor ex, NbdServerOptions opts) : core(std::move(ex), opts) {}
  ServerCore core;
};

NbdServer::NbdServer(asio::any_io_executor ex, NbdServerOptions opts)
    : impl_(std::make_unique<Impl>(std::move(ex), opts)) {
  TANDEM_ASSERT(opts.payload_bytes_max >= 4096);
  TANDEM_ASSERT(opts.requests_in_flight_max >= 1);
  TANDEM_ASSERT(opts.payload_bytes_in_flight_max >= 1);
  TANDEM_ASSERT(opts.connections_max >= 1);
}

NbdServer::~NbdServer() { TANDEM_ASSERT_MSG(impl_->core.tasks == 0, "NbdServer destroyed before stop() completed"); }

void NbdServer::add_export(const std::string& name, engine::Volume& volume) {
  ServerCore& c = impl_->core;
  TANDEM_ASSERT(name.size() <= nbd::kStringBytesMax);
  TANDEM_ASSERT_MSG(c.find_volume(name) == nullptr, "duplicate NBD export name");
  c.exports.emplace_back(name, &volume);
}

Status NbdServer::listen_unix(const std::string& path) {
  ServerCore& c = impl_->core;
  if (c.stopping) return errc::stopped;
  if (path.empty() || path.size() >= sizeof(sockaddr_un{}.sun_path)) {
    return Error(errc::socket_path_too_long, path);
  }
  using Local = asio::local::stream_protocol;
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) return Error(errc::not_a_socket, path);
    // A socket file nobody accepts on is left over from a process that died; a live one
    // belongs to another server and stays. Non-blocking so a full backlog cannot hang us.
    Local::socket probe(c.ex);
    ErrorCode ec;
    probe.open(Local(), ec);
    if (!ec) probe.non_blocking(true, ec);
    if (!ec) probe.connect(Local::endpoint(path), ec);
    if (!ec || ec == asio::error::would_block || ec == asio::error::try_again || ec == asio::error::in_progress) {
      return Error(errc::address_in_use, path);
    }
    if (ec != asio::error::connection_refused && ec != boost::system::errc::no_such_file_or_directory) {
      return Error(ec, "probing existing socket " + path);
    }
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return errno_error(errno, "removing stale socket " + path);
    }
    spdlog::info("nbd: removed stale socket {}", path);
  }
  auto acceptor = std::make_unique<Local::acceptor>(c.ex);
  ErrorCode ec;
  acceptor->open(Local(), ec);
  if (!ec) acceptor->bind(Local::endpoint(path), ec);
  if (ec) return Error(ec, "binding " + path);
  // Not listening yet, so nobody can connect while the mode is still the umask's.
  if (::chmod(path.c_str(), 0660) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return errno_error(err, "chmod 0660 " + path);
  }
  struct stat mine {};
  if (::lstat(path.c_str(), &mine) != 0) {
    const int err = errno;
    ::unlink(path.c_str());
    return errno_error(err, "stat " + path);
  }
  acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    ::unlink(path.c_str());
    return Error(ec, "listening on " + path);
  }
  c.unix_paths.push_back({path, mine.st_dev, mine.st_ino});
  Local::acceptor& a = *acceptor;
  c.unix_acceptors.push_back(std::move(acceptor));
  ++c.tasks;
  asio::co_spawn(c.ex, accept_loop(c, a, "unix:" + path), AbortOnException{"an NBD accept loop"});
  spdlog::info("nbd: listening on unix socket {}", path);
  return {};
}

Status NbdServer::listen_tcp(const std::string& address) {
  ServerCore& c = impl_->core;
  if (c.stopping) return errc::stopped;
  const auto hp = parse_endpoint(address, EndpointUse::listen);
  if (!hp) return Error(errc::bad_address, address + ": " + hp.error().context);
  using Tcp = asio::ip::tcp;
  Tcp::resolver resolver(c.ex);
  ErrorCode ec;
  const auto results =
      resolver.resolve(hp->host, std::to_string(hp->port), Tcp::resolver::passive | Tcp::resolver::numeric_service, ec);
  if (ec) return Error(ec, "resolving " + address);
  if (results.empty()) return Error(errc::bad_address, address);
  const Tcp::endpoint ep = results.begin()->endpoint();
  auto acceptor = std::make_unique<Tcp::acceptor>(c.ex);
  acceptor->open(ep.protocol(), ec);
  if (!ec) acceptor->set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) acceptor->bind(ep, ec);
  if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return Error(ec, "listening on " + address);
  const Tcp::endpoint local = acceptor->local_endpoint(ec);
  if (ec) return Error(ec, "listening on " + address);
  c.tcp_port = local.port();
  Tcp::acceptor& a = *acceptor;
  c.tcp_acceptors.push_back(std::move(acceptor));
  ++c.tasks;
  const std::string where = "tcp:" + local.address().to_string() + ":" + std::to_string(local.port());
  asio::co_spawn(c.ex, accept_loop(c, a, where), AbortOnException{"an NBD accept loop"});
  spdlog::info("nbd: listening on {}", where);
  return {};
}

std::uint16_t NbdServer::tcp_port() const { return impl_->core.tcp_port; }

const NbdCounters& NbdServer::counters() const { return impl_->core.counters; }

asio::awaitable<void> NbdServer::stop() {
  ServerCore& c = impl_->core;
  if (!c.stopping) {
    c.stopping = true;
    ErrorCode ignored;
    for (auto& a : c.unix_acceptors) a->close(ignored);
    for (auto& a : c.tcp_acceptors) a->close(ignored);
    for (const auto& u : c.unix_paths) {
      // Only our own socket: another server may have replaced it since.
      struct stat st {};
      if (::lstat(u.path.c_str(), &st) == 0 && st.st_dev == u.dev && st.st_ino == u.ino) {
        ::unlink(u.path.c_str());
      }
    }
    for (auto& [id, conn] : c.connections) conn->on_server_stop();
    spdlog::info("nbd: stopping; {} connections open", c.connections.size());
    c.stop_timer.expires_after(std::chrono::milliseconds(c.opts.stop_grace_ms));
    // A plain handler, not a coroutine: on cancellation it must not touch the server, which
    // may be gone by the time it runs.
    c.stop_timer.async_wait([core = &c](const ErrorCode& ec) {
      if (ec) return;
      spdlog::warn("nbd: {} connections still open after the stop grace period; closing them",
                   core->connections.size());
      for (auto& [id, conn] : core->connections) conn->force_close();
    });
  }
  while (c.tasks > 0) co_await c.tasks_done.wait();
  c.stop_timer.cancel();
  spdlog::info("nbd: stopped");
}

}  // namespace tandem::frontend

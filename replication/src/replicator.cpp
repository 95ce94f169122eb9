#include "tandem/replication/replicator.h"

#include <spdlog/spdlog.h>

#include <array>
#include <boost/asio/buffer.hpp>
#include <boost/asio/co_spawn.hpp>

#include "tandem/replication/errc.h"
#include "tandem/transport/frame.h"

namespace tandem::replication {
namespace {

// The production PeerChannel: a replication frame is one transport frame of its message type.
class ConnectionChannel final : public PeerChannel {
 public:
  explicit ConnectionChannel(std::shared_ptr<transport::Connection> c) : c_(std::move(c)) {}
  asio::awaitable<Status> send(MsgType type, std::span<const std::byte> fields,
                               std::span<const std::byte> data) override {
    const std::array<asio::const_buffer, 2> bufs{asio::buffer(fields.data(), fields.size()),
                                                 asio::buffer(data.data(), data.size())};
    co_return co_await c_->send(static_cast<std::uint16_t>(type), 0,
                                std::span<const asio::const_buffer>(bufs.data(), data.empty() ? 1 : 2));
  }
  void close(const std::string& reason) override { c_->close(reason); }

 private:
  std::shared_ptr<transport::Connection> c_;
};

}  // namespace

Replicator::Replicator(asio::any_io_executor ex, ReplicatorOptions opts) : ex_(std::move(ex)), opts_(std::move(opts)) {}

Replicator::~Replicator() = default;

Status Replicator::start() {
  auto tls = transport::make_tls_context(opts_.tls);
  if (!tls) return tls.error();
  transport::LinkOptions lo;
  lo.peer_name = opts_.peer_name;
  lo.connect_address = dials() ? opts_.peer_address : std::string{};
  lo.listen_address = opts_.listen_address;
  const std::string& n = opts_.node_name;
  lo.hello.assign(reinterpret_cast<const std::byte*>(n.data()),
                  reinterpret_cast<const std::byte*>(n.data()) + n.size());
  lo.keepalive_interval_ms = opts_.keepalive_interval_ms;
  lo.peer_timeout_ms = opts_.peer_timeout_ms;
  lo.rate_limit_bytes_per_s = opts_.rate_limit_bytes_per_s;
  link_ = std::make_unique<transport::Link>(
      ex_, std::move(tls).value(), std::move(lo),
      [this](std::shared_ptr<transport::Connection> c) { on_connected(std::move(c)); });
  return link_->start();
}

std::uint16_t Replicator::listen_port() const { return link_ ? link_->listen_port() : 0; }

void Replicator::set_rate_limit(std::uint64_t bytes_per_s) {
  opts_.rate_limit_bytes_per_s = bytes_per_s;
  if (link_) link_->set_rate_limit(bytes_per_s);
}

void Replicator::on_connected(std::shared_ptr<transport::Connection> c) {
  if (stopping_) {
    c->close("shutting down");
    return;
  }
  if (conn_ && conn_->is_open()) conn_->close("replaced by a newer connection");
  conn_ = c;
  const std::uint64_t gen = ++gen_;
  spdlog::info("replication link to {} up ({})", opts_.peer_name, c->peer_address());
  const auto channel = std::make_shared<ConnectionChannel>(c);
  for (auto* s : sessions_) s->attach(channel);
  ++loops_;
  asio::co_spawn(ex_, receive_loop(std::move(c), gen), abort_on_exception);
}

Session* Replicator::find(std::span<const std::byte> payload) const {
  // Every replication message starts with the session id (u16 length, bytes).
  if (payload.size() < 2) return nullptr;
  const std::size_t n = std::to_integer<std::size_t>(payload[0]) | (std::to_integer<std::size_t>(payload[1]) << 8);
  if (n == 0 || n > kIdBytesMax || payload.size() < 2 + n) return nullptr;
  const std::string id(reinterpret_cast<const char*>(payload.data() + 2), n);
  for (auto* s : sessions_) {
    if (s->id() == id) return s;
  }
  return nullptr;
}

asio::awaitable<void> Replicator::receive_loop(std::shared_ptr<transport::Connection> c, std::uint64_t gen) {
  std::string reason;
  for (;;) {
    auto f = co_await c->receive();
    if (!f) {
      reason = f.error().message();
      break;
    }
    if (f->type < static_cast<std::uint16_t>(MsgType::session_hello) ||
        f->type > static_cast<std::uint16_t>(MsgType::changed_blocks)) {
      reason = "unknown frame type " + std::to_string(f->type);
      c->close(reason);
      break;
    }
    Session* s = find(f->payload);
    if (s == nullptr) {
      // A session the peer has and we do not: say so once per frame type, keep the link for others.
      spdlog::warn("replication: {} sent a frame for a session this node does not have", opts_.peer_name);
      continue;
    }
    Status st = co_await s->handle(static_cast<MsgType>(f->type), f->payload);
    if (!st) {
      reason = "session " + s->id() + ": " + st.error().message();
      spdlog::warn("replication link to {}: closing: {}", opts_.peer_name, reason);
      c->close(reason);
      break;
    }
  }
  if (gen == gen_) {
    for (auto* s : sessions_) s->detach(reason);
    conn_.reset();
  }
  --loops_;
  loops_done_.notify_all();
}

asio::awaitable<void> Replicator::stop() {
  stopping_ = true;
  if (conn_) conn_->close("shutting down");
  if (link_) co_await link_->stop();
  while (loops_ > 0) co_await loops_done_.wait();
}

}  // namespace tandem::replication

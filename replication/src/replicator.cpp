#include "tandem/replication/replicator.h"

#include <spdlog/spdlog.h>

#include <algorithm>
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

void Replicator::add_session(Session* s) {
  sessions_.push_back(s);
  if (!conn_ || !conn_->is_open() || !channel_) return;
  s->attach(channel_);
  auto it = unclaimed_hellos_.find(s->id());
  if (it == unclaimed_hellos_.end()) {
    // The peer's hello for it went by before it existed here, or never came (the peer's side
    // was running all along: re-added here). Both sides say hello again on a new link; the
    // other sessions resume from their restart addresses.
    conn_->close("session " + s->id() + " added here; saying hello again");
    return;
  }
  std::vector<std::byte> hello = std::move(it->second);
  unclaimed_hellos_.erase(it);
  ++loops_;  // stop() waits for it as for a receive loop
  asio::co_spawn(ex_, replay_hello(s, std::move(hello)), abort_on_exception);
}

asio::awaitable<void> Replicator::replay_hello(Session* s, std::vector<std::byte> hello) {
  in_handle_.push_back(s);
  Status st = co_await s->handle(MsgType::session_hello, hello);
  in_handle_.erase(std::find(in_handle_.begin(), in_handle_.end(), s));
  handled_.notify_all();
  if (!st && conn_) conn_->close("session " + s->id() + ": " + st.error().message());
  --loops_;
  loops_done_.notify_all();
}

asio::awaitable<void> Replicator::remove_session(Session* s) {
  std::erase(sessions_, s);
  while (std::find(in_handle_.begin(), in_handle_.end(), s) != in_handle_.end()) co_await handled_.wait();
  // The peer's side of it hears of the removal as a lost link (it shows System_Paused rather
  // than waiting on a transfer nobody answers); the other sessions resume on the next link.
  if (conn_ && conn_->is_open()) conn_->close("session " + s->id() + " removed here");
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
  channel_ = std::make_shared<ConnectionChannel>(c);
  unclaimed_hellos_.clear();  // the peer says hello again on this link
  unknown_warned_.clear();
  for (auto* s : sessions_) s->attach(channel_);
  ++loops_;
  asio::co_spawn(ex_, receive_loop(std::move(c), gen), abort_on_exception);
}

std::string Replicator::session_id_of(std::span<const std::byte> payload) {
  // Every replication message starts with the session id (u16 length, bytes).
  if (payload.size() < 2) return {};
  const std::size_t n = std::to_integer<std::size_t>(payload[0]) | (std::to_integer<std::size_t>(payload[1]) << 8);
  if (n == 0 || n > kIdBytesMax || payload.size() < 2 + n) return {};
  return std::string(reinterpret_cast<const char*>(payload.data() + 2), n);
}

Session* Replicator::find(std::span<const std::byte> payload) const {
  const std::string id = session_id_of(payload);
  if (id.empty()) return nullptr;
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
      // A session the peer has and we do not: said once per session and link; the link stays
      // for the others. Its hello is kept for a session of that id added here later (at most a
      // few dozen are kept).
      const std::string id = session_id_of(f->payload);
      if (unknown_warned_.size() < 64 && unknown_warned_.insert(id).second) {
        spdlog::warn("replication: {} sent frames for session '{}', which this node does not have", opts_.peer_name,
                     id);
      }
      if (f->type == static_cast<std::uint16_t>(MsgType::session_hello)) {
        auto h = decode_session_hello(f->payload);
        if (h && (unclaimed_hellos_.size() < 64 || unclaimed_hellos_.contains(h->session_id))) {
          unclaimed_hellos_[h->session_id].assign(f->payload.begin(), f->payload.end());
        }
      }
      continue;
    }
    in_handle_.push_back(s);
    Status st = co_await s->handle(static_cast<MsgType>(f->type), f->payload);
    in_handle_.erase(std::find(in_handle_.begin(), in_handle_.end(), s));
    handled_.notify_all();
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
    channel_.reset();
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

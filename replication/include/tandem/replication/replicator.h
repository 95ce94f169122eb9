// Replicator: a node's replication link to its peer and the sessions that share it.
//
// It owns the transport Link (mutual TLS; the node whose name sorts first dials, the other
// accepts, so the two never race to connect), attaches every session to each new connection,
// and runs the connection's receive loop: each frame goes to the session it names. A frame
// that fails to decode, names an unknown session, or that a session rejects (a hash mismatch,
// a protocol violation) closes the connection with the reason logged; every session then
// resumes from its restart address when the link comes back.
//
// Threading: one io_context thread. Ownership: sessions are the daemon's; they outlive stop(),
// which returns only when no receive loop runs (none is inside a session any more).
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "tandem/common/async.h"
#include "tandem/common/result.h"
#include "tandem/replication/session.h"
#include "tandem/transport/connection.h"
#include "tandem/transport/link.h"
#include "tandem/transport/tls.h"

namespace tandem::replication {

struct ReplicatorOptions {
  std::string node_name;
  transport::TlsFiles tls;
  std::string peer_name;
  std::string peer_address;    // host:port to dial
  std::string listen_address;  // host:port to accept on
  std::uint64_t rate_limit_bytes_per_s = 0;
  std::uint32_t keepalive_interval_ms = 1000;
  std::uint32_t peer_timeout_ms = 5000;
};

class Replicator {
 public:
  Replicator(asio::any_io_executor ex, ReplicatorOptions opts);
  ~Replicator();
  // A session joins the link (at start, or added at run time: with the link up it gets the
  // peer's hello kept for it, or the link is re-established so both sides say hello again).
  void add_session(Session* s);
  // A session leaves the link: frames for it are no longer handed to it, and this returns once
  // none is being handled any more, so the caller may stop and destroy it. The link is
  // re-established, so the peer's side sees it as lost.
  asio::awaitable<void> remove_session(Session* s);
  Status start();
  asio::awaitable<void> stop();
  [[nodiscard]] std::uint16_t listen_port() const;
  [[nodiscard]] bool dials() const { return opts_.node_name < opts_.peer_name; }
  void set_rate_limit(std::uint64_t bytes_per_s);

 private:
  void on_connected(std::shared_ptr<transport::Connection> c);
  asio::awaitable<void> receive_loop(std::shared_ptr<transport::Connection> c, std::uint64_t gen);
  Session* find(std::span<const std::byte> payload) const;
  static std::string session_id_of(std::span<const std::byte> payload);  // empty: none
  asio::awaitable<void> replay_hello(Session* s, std::vector<std::byte> hello);

  asio::any_io_executor ex_;
  ReplicatorOptions opts_;
  std::vector<Session*> sessions_;
  std::unique_ptr<transport::Link> link_;
  std::shared_ptr<transport::Connection> conn_;
  std::shared_ptr<PeerChannel> channel_;  // conn_ as the sessions see it
  std::vector<Session*> in_handle_;       // the sessions receive loops are handing a frame to
  // The peer's hellos on this link for sessions this node does not have (yet): one added at run
  // time gets its peer's hello from here, as the peer sent it only once.
  std::map<std::string, std::vector<std::byte>> unclaimed_hellos_;
  std::set<std::string> unknown_warned_;  // sessions this link's frames named that we lack, said once
  WaitQueue handled_;
  std::uint64_t gen_ = 0;
  bool stopping_ = false;
  // Receive loops still running (a closed connection's loop may be inside a session's handle(),
  // applying a cycle): stop() waits for them, so no session is stopped under one.
  std::size_t loops_ = 0;
  WaitQueue loops_done_;
};

}  // namespace tandem::replication

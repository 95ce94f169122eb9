// PeerChannel: how a session reaches its peer. One channel is one connection: the session gets
// it with attach() (the link came up), sends replication frames on it, and loses it with
// detach() (the link went down); frames from the peer reach the session through handle().
// The production channel is a mutual-TLS transport connection (the Replicator makes it); the
// simulation's is an in-memory link that it delays, stalls, cuts and corrupts at will.
//
// Threading: the session's executor.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <cstddef>
#include <span>
#include <string>

#include "tandem/common/result.h"
#include "tandem/replication/messages.h"

namespace tandem::replication {

namespace asio = boost::asio;

class PeerChannel {
 public:
  virtual ~PeerChannel() = default;
  // Sends one frame: the message's encoded fields, then its data (an extent's bytes; may be
  // empty). Frames arrive in the order sent or not at all; an error means the channel is gone.
  virtual asio::awaitable<Status> send(MsgType type, std::span<const std::byte> fields,
                                       std::span<const std::byte> data) = 0;
  // Ends the connection; the peer's and this side's detach() follow.
  virtual void close(const std::string& reason) = 0;
};

}  // namespace tandem::replication

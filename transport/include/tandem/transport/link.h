// Link: keeps at most one authenticated Connection to one peer up, for as long as it runs.
//
// A Link listens (listen_address), dials (connect_address), or both. Every connection, dialed
// or accepted, goes through the same handshake (connection.h): TLS, the peer name check and
// the hellos, all within handshake_timeout_ms, or the connection is dropped. At most
// kHandshakesMax accepted connections may be handshaking at once (only one peer is legitimate,
// so more is a flood); when one more arrives, the Link makes room rather than refusing it: it
// drops the least advanced handshake (nothing received yet, then in TLS, then authenticated
// but without a hello), the oldest among equals, with a warning naming its address. So
// connections that connect and say nothing can neither hold a slot past the timeout nor keep
// the real peer out while they last. A peer is refused, with a warning that says why, when it
// does not speak TLS 1.3, its certificate does not chain to the CA or has expired, its
// certificate name is not `peer_name`, or its hello is bad or shares no protocol version with
// ours.
//
// Each established connection becomes the current one and is handed to on_connected. If one
// is already up, the newest wins and the old one is closed ("replaced") — a peer that restarted
// dials anew while our old connection may still look alive. One exception keeps two dialing
// peers from flapping: when both connections come from the same peer *instance* (hello's
// instance_id, random per Link) and one was dialed by each side, it is a simultaneous dial,
// and both sides keep the connection dialed by the side with the smaller instance id.
//
// Dialing: whenever no connection is up, the Link dials, waiting between attempts with
// bounded exponential back-off with jitter (backoff.h). The back-off restarts from
// backoff_min_ms only after a connection that stayed up for peer_timeout_ms, so a peer that
// accepts and then drops us at once is not hammered. Failed dials are logged (a repeated
// failure with the same reason only at debug level).
//
// Threading: everything runs on the executor given at construction (one io_context thread);
// call every member from there. on_connected runs there too, inline; it must not block.
// Ownership: the Link owns its acceptor and the connections it has not handed out; stop() must
// complete before the Link is destroyed (asserted).
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tandem/common/result.h"
#include "tandem/transport/connection.h"

namespace boost::asio::ssl {
class context;
}  // namespace boost::asio::ssl

namespace tandem::transport {

// Accepted connections handshaking at once. Reconnect races need two or three; the rest of
// this bound is slack. Beyond it each newcomer pushes out the least advanced one (see above),
// so a flood holds at most this many sockets and handshakes.
inline constexpr std::size_t kHandshakesMax = 8;

struct LinkOptions {
  std::string peer_name;                       // the name the peer's certificate must carry (SAN DNS or CN)
  std::string connect_address;                 // "host:port" to dial ("" = never dial)
  std::string listen_address;                  // "host:port" to accept on ("" = never listen); port 0 = ephemeral
  std::vector<std::byte> hello;                // our hello payload, at most kHelloAppBytesMax bytes
  std::uint32_t keepalive_interval_ms = 1000;  // a ping this often; must be < peer_timeout_ms
  std::uint32_t peer_timeout_ms = 5000;        // silence after which the peer is dead
  std::uint32_t backoff_min_ms = 100, backoff_max_ms = 5000;
  std::uint64_t rate_limit_bytes_per_s = 0;  // 0 = unlimited; applies to sends, not keep-alives
  // TCP connect + TLS + hello must complete within this, or the attempt is dropped. The real
  // peer needs a few round trips; one that has not finished after 5 s is stuck or hostile, and
  // holds one of the kHandshakesMax slots until then.
  std::uint32_t handshake_timeout_ms = 5'000;
  // Our capability bits (frame.h: 0..15 transport, 16..63 replication); the connection's
  // capabilities() are the bits both sides set.
  std::uint64_t capabilities = 0;
};

class Link {
 public:
  using OnConnected = std::function<void(std::shared_ptr<Connection>)>;

  Link(boost::asio::any_io_executor ex, std::shared_ptr<boost::asio::ssl::context> tls, LinkOptions opts,
       OnConnected on_connected);
  ~Link();
  Link(const Link&) = delete;
  Link& operator=(const Link&) = delete;

  // Checks the options (errc::bad_config, errc::bad_address), binds the listener if any
  // (errors name the address) and starts dialing if asked. Call once.
  Status start();
  // Stops listening and dialing, abandons handshakes, closes the current connection (with a
  // goodbye) and waits until every connection the Link made is closed. Idempotent.
  boost::asio::awaitable<void> stop();

  // The bound port (useful with port 0); 0 when not listening.
  [[nodiscard]] std::uint16_t listen_port() const;
  // Changes the send rate limit of the current and future connections; 0 = unlimited.
  void set_rate_limit(std::uint64_t bytes_per_s);
  // The current connection (open or just closed), or null before the first one.
  [[nodiscard]] std::shared_ptr<Connection> connection() const;
  // Random, per Link object; sent in every hello (see above).
  [[nodiscard]] std::uint64_t instance_id() const;

 private:
  struct Core;
  std::shared_ptr<Core> core_;
};

}  // namespace tandem::transport

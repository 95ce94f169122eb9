// NbdServer: exports engine volumes to hosts over the NBD protocol (fixed newstyle), on Unix
// sockets and TCP.
//
// One server serves any number of exports (by name) on any number of listeners. Each
// connection negotiates with the handshake state machine (nbd_protocol.h), then runs its
// transmission phase: requests are read in order, up to a bounded number are executed
// concurrently against the volume, and replies go out as they complete (out of order).
// Several connections to one export share the volume, so a FLUSH on any of them covers writes
// completed on all of them (CAN_MULTI_CONN).
//
// Shutdown: stop() closes the listeners and the connections still negotiating, answers new
// requests with ESHUTDOWN, waits for requests already executing to be answered (at most
// stop_grace_ms for the replies to be taken), then closes every connection. It must complete
// before the server is destroyed.
//
// Threading: everything runs on the executor given at construction (one io_context thread);
// call every member from that thread (or before it runs). Ownership: the server does not own
// the volumes; they must outlive stop().
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <memory>
#include <string>

#include "tandem/common/result.h"
#include "tandem/engine/volume.h"

namespace tandem::frontend {

namespace asio = boost::asio;

struct NbdServerOptions {
  // Connections per server; further connections are accepted and closed at once with a log line.
  std::uint32_t connections_max = 64;
  // Requests executing concurrently per connection; the reader stops reading beyond this.
  std::uint32_t requests_in_flight_max = 128;
  // Largest READ/WRITE payload accepted (advertised as the maximum block size). At least 4096.
  std::uint32_t payload_bytes_max = 32 * 1024 * 1024;
  // READ/WRITE payload bytes held per connection (buffers of requests read but not yet
  // answered); the reader stops reading beyond this, but always admits one request.
  std::uint64_t payload_bytes_in_flight_max = 64 * 1024 * 1024;
  // A client that has not finished the handshake by then is disconnected, so idle or slow
  // connections cannot hold slots forever.
  std::uint32_t handshake_timeout_ms = 30'000;
  // stop() waits this long for clients to take the replies of requests in flight; then it
  // closes their connections anyway, so a client that stops reading cannot hold up shutdown.
  std::uint32_t stop_grace_ms = 10'000;
};

struct NbdCounters {
  std::uint64_t connections_accepted = 0;
  std::uint64_t connections_open = 0;
  std::uint64_t requests = 0;
  std::uint64_t request_errors = 0;   // requests answered with a non-zero error
  std::uint64_t protocol_errors = 0;  // connections closed for garbage
};

class NbdServer {
 public:
  NbdServer(asio::any_io_executor ex, NbdServerOptions opts = {});
  ~NbdServer();
  NbdServer(const NbdServer&) = delete;
  NbdServer& operator=(const NbdServer&) = delete;

  // Registers a volume under an export name. The first export added is also the default
  // export (empty name). Names are unique and at most 4096 bytes (asserted).
  void add_export(const std::string& name, engine::Volume& volume);
  // Starts listening; a stale socket file at `path` is replaced. The socket is created mode 0660.
  Status listen_unix(const std::string& path);
  // "host:port" (IPv4, [IPv6] or a name); port 0 picks a free port, see tcp_port().
  Status listen_tcp(const std::string& address);
  [[nodiscard]] std::uint16_t tcp_port() const;

  // Stops accepting, answers new requests with ESHUTDOWN, waits for requests in flight and
  // closes every connection. Removes the Unix socket files it created.
  asio::awaitable<void> stop();

  [[nodiscard]] const NbdCounters& counters() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tandem::frontend

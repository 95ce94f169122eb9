// Helpers for the transport tests: a test PKI made by tests/tools/make_certs.sh, a spdlog sink
// that captures log lines, bounded runs of coroutines on an io_context, Links with a record of
// their connections, a raw TLS client that speaks the envelope byte by byte, and the fault
// proxy (tests/tools/fault_proxy.py) as a subprocess.
#pragma once

#include <gtest/gtest.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "tandem/transport/connection.h"
#include "tandem/transport/frame.h"
#include "tandem/transport/link.h"
#include "tandem/transport/tls.h"

namespace tandem::transport::test {

namespace asio = boost::asio;
using namespace std::chrono_literals;
using Tcp = asio::ip::tcp;
using ErrorCode = boost::system::error_code;
inline constexpr auto kTuple = asio::as_tuple(asio::use_awaitable);

// The directory make_certs.sh wrote, made once per test process and removed at exit.
const std::string& certs_dir();
// CA + <name>.crt + <name>.key from certs_dir(); ca is "ca" or "other-ca".
TlsFiles tls_files(const std::string& name, const std::string& ca = "ca");
std::shared_ptr<asio::ssl::context> tls_context(const std::string& name, const std::string& ca = "ca");

// Captures every log line (and still prints them) while alive.
class LogCapture {
 public:
  LogCapture();
  ~LogCapture();
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;
  // True if one line contains all of `parts`.
  [[nodiscard]] bool contains(std::initializer_list<std::string_view> parts) const;
  [[nodiscard]] std::string dump() const;

  class Sink;

 private:
  std::shared_ptr<Sink> sink_;
  std::shared_ptr<spdlog::logger> previous_;
};

// Runs `aw` on `io` until it completes or `limit` passes (then the test fails). Exceptions
// escaping `aw` are rethrown.
void run(asio::io_context& io, asio::awaitable<void> aw, std::chrono::milliseconds limit = 60s);

// Polls `pred` every few ms until true (returns true) or `limit` passes (returns false).
asio::awaitable<bool> eventually(std::function<bool()> pred, std::chrono::milliseconds limit);
asio::awaitable<void> sleep_for(std::chrono::milliseconds d);

// A Link plus every connection it handed out.
struct Peer {
  std::unique_ptr<Link> link;
  std::vector<std::shared_ptr<Connection>> connections;
  [[nodiscard]] std::shared_ptr<Connection> last() const { return connections.empty() ? nullptr : connections.back(); }
  [[nodiscard]] bool connected() const { return !connections.empty() && connections.back()->is_open(); }
};

// Options for site-x talking to `peer`: short timers, so the tests are quick.
LinkOptions options(const std::string& peer, std::string hello = {});
std::unique_ptr<Peer> make_peer(asio::io_context& io, const std::string& cert, LinkOptions opts,
                                const std::string& ca = "ca");

std::vector<std::byte> bytes_of(std::string_view s);
// Deterministic payload of `n` bytes derived from `seed`.
std::vector<std::byte> pattern(std::size_t n, std::uint64_t seed);

// A TLS client that speaks the envelope by hand, for refusals and bad frames.
class RawClient {
 public:
  enum class Mode { tls13, tls12_only };
  // `cert` empty: present no certificate. The client never verifies the server (the tests
  // are about the server's verdict on the client).
  RawClient(asio::io_context& io, const std::string& cert, const std::string& ca = "ca", Mode mode = Mode::tls13);

  asio::awaitable<ErrorCode> connect(std::uint16_t port);
  asio::awaitable<ErrorCode> handshake();
  asio::awaitable<ErrorCode> write(std::vector<std::byte> bytes);
  asio::awaitable<ErrorCode> send_frame(std::uint16_t type, std::uint16_t flags, std::vector<std::byte> payload);
  // A well-formed hello with `instance_id`, and read the server's; returns its type (hello or
  // goodbye) or an error.
  asio::awaitable<ErrorCode> send_hello(std::uint64_t instance_id, std::vector<std::byte> app = {});
  // Reads one frame; nullopt on EOF or error (error_ holds it).
  asio::awaitable<std::optional<Frame>> read_frame();
  // Reads frames until EOF or an error; returns the goodbye reason seen ("" if none).
  asio::awaitable<std::string> read_until_closed();

  asio::ssl::stream<Tcp::socket>& stream() { return stream_; }
  ErrorCode error_;

 private:
  asio::ssl::context ctx_;
  asio::ssl::stream<Tcp::socket> stream_;
};

// gtest's ASSERT_* return from the function, which a coroutine cannot do.
#define CO_ASSERT(cond)                            \
  do {                                             \
    if (!(cond)) {                                 \
      ADD_FAILURE() << "CO_ASSERT failed: " #cond; \
      co_return;                                   \
    }                                              \
  } while (0)

// The fixture of the socket tests: an io_context run by the test thread, captured logs, and
// peers that TearDown stops (a Link must be stopped before it is destroyed), so a test that
// fails half-way still ends cleanly.
class TransportTest : public ::testing::Test {
 public:
  Peer& add_peer(const std::string& cert, LinkOptions opts, const std::string& ca = "ca") {
    peers_.push_back(make_peer(io_, cert, std::move(opts), ca));
    return *peers_.back();
  }
  void TearDown() override { run(io_, stop_all(), 30s); }
  asio::awaitable<void> stop_all() {
    for (auto& p : peers_) co_await p->link->stop();
  }

  asio::io_context io_;
  LogCapture logs_;
  std::vector<std::unique_ptr<Peer>> peers_;
};

// tests/tools/fault_proxy.py in front of 127.0.0.1:target_port.
class FaultProxy {
 public:
  FaultProxy(std::uint16_t target_port, std::uint64_t seed);
  ~FaultProxy();
  FaultProxy(const FaultProxy&) = delete;
  FaultProxy& operator=(const FaultProxy&) = delete;
  [[nodiscard]] std::uint16_t port() const { return port_; }
  // Sends one command on the control socket and returns the reply ("ok" ...).
  std::string command(const std::string& line);

 private:
  std::string dir_;
  int pid_ = -1;
  std::uint16_t port_ = 0;
};

}  // namespace tandem::transport::test

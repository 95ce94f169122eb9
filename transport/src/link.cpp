// Link: the listener, the dialer with back-off, and the rule for which connection is current.
#include "tandem/transport/link.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/ip/address.hpp>
#include <random>
#include <utility>

#include "connection_impl.h"
#include "tandem/common/assert.h"
#include "tandem/common/endpoint.h"
#include "tandem/transport/backoff.h"
#include "tandem/transport/errc.h"

namespace tandem::transport {
namespace {

using ErrorCode = boost::system::error_code;
using Access = detail::ConnectionAccess;
constexpr auto kTuple = asio::as_tuple(asio::use_awaitable);
// After a failed accept (EMFILE, ENOBUFS...) wait this long, so a persistent failure does not
// spin the thread.
constexpr std::chrono::milliseconds kAcceptRetryDelay{100};

std::string describe(const Tcp::endpoint& ep) {
  const std::string addr = ep.address().to_string();
  return (ep.address().is_v6() ? "[" + addr + "]" : addr) + ":" + std::to_string(ep.port());
}

std::uint64_t random_instance_id() {
  std::random_device rd;
  std::uint64_t v = 0;
  while (v == 0) v = (std::uint64_t{rd()} << 32) ^ rd();
  return v;
}

}  // namespace

struct Link::Core : std::enable_shared_from_this<Link::Core> {
  Core(asio::any_io_executor e, std::shared_ptr<asio::ssl::context> t, LinkOptions o, OnConnected cb)
      : ex(std::move(e)),
        tls(std::move(t)),
        opts(std::move(o)),
        on_connected(std::move(cb)),
        instance_id(random_instance_id()),
        resolver(ex),
        backoff_timer(ex),
        backoff(std::max<std::uint32_t>(1, opts.backoff_min_ms),
                std::max(std::max<std::uint32_t>(1, opts.backoff_min_ms), opts.backoff_max_ms), instance_id),
        rate(opts.rate_limit_bytes_per_s) {}

  asio::any_io_executor ex;
  std::shared_ptr<asio::ssl::context> tls;
  LinkOptions opts;
  OnConnected on_connected;
  const std::uint64_t instance_id;
  std::unique_ptr<Tcp::acceptor> acceptor;
  Tcp::resolver resolver;
  std::uint16_t port = 0;
  std::shared_ptr<Connection> current;
  Clock::time_point current_since;
  // Connections in their handshake: the dialer's and the accepted ones (stop() aborts them).
  std::vector<std::shared_ptr<Connection>> handshaking;
  // The accepted ones among them, oldest first; at most kHandshakesMax. One dropped to make
  // room leaves this list at once (its task winds down on its own, its socket already closed).
  struct Accepted {
    std::shared_ptr<Connection> conn;
    Clock::time_point since;
  };
  std::vector<Accepted> accepted_handshaking;
  // Connections closed by the Link that may still be saying goodbye; stop() waits for them.
  std::vector<std::weak_ptr<Connection>> retired;
  bool started = false;
  bool stopping = false;
  bool stopped = false;
  int tasks = 0;  // accept loop, dial loop, handshakes
  WaitQueue tasks_done;
  WaitQueue changed;  // the current connection closed, or stop()
  asio::steady_timer backoff_timer;
  Backoff backoff;
  std::uint64_t rate;
  std::string last_dial_failure;

  ConnectionParams params() const {
    ConnectionParams p;
    p.expected_peer_name = opts.peer_name;
    p.hello.capabilities = opts.capabilities;
    p.hello.instance_id = instance_id;
    p.hello.app = opts.hello;
    p.keepalive_interval = std::chrono::milliseconds(opts.keepalive_interval_ms);
    p.peer_timeout = std::chrono::milliseconds(opts.peer_timeout_ms);
    p.handshake_timeout = std::chrono::milliseconds(opts.handshake_timeout_ms);
    p.rate_limit_bytes_per_s = rate;
    return p;
  }

  std::shared_ptr<Connection> make_connection(Tcp::socket socket, bool dialed, std::string address) {
    auto impl = std::make_unique<Access::Impl>(ex, *tls, std::move(socket), dialed, std::move(address), params());
    return Access::make(std::move(impl));
  }

  void task_done() {
    TANDEM_ASSERT(tasks > 0);
    if (--tasks == 0) tasks_done.notify_all();
  }

  void retire(const std::shared_ptr<Connection>& c) {
    std::erase_if(retired, [](const std::weak_ptr<Connection>& w) { return w.expired(); });
    retired.push_back(c);
  }

  void on_closing(const Connection* c) {
    if (c == current.get() && Clock::now() - current_since >= std::chrono::milliseconds(opts.peer_timeout_ms)) {
      // It stayed up: the next dial starts again from backoff_min_ms.
      backoff.reset();
    }
    changed.notify_all();
  }

  // The table of accepted handshakes is full: drop one so that the newcomer (at `address`) gets
  // its slot. Refusing the newcomer instead would let anyone who connects first and says
  // nothing keep the real peer out, again each time a handshake times out. The one dropped is
  // the least advanced (nothing received yet, then still in TLS, then authenticated but
  // without its hello), the oldest among equals: a flood of silent connections pushes out only
  // its own members, never a peer whose TLS handshake has begun, and one that has proved it
  // holds the peer's certificate goes last.
  void make_room(const std::string& address) {
    TANDEM_ASSERT(accepted_handshaking.size() == kHandshakesMax);
    const auto victim = std::min_element(accepted_handshaking.begin(), accepted_handshaking.end(),
                                         [](const Accepted& x, const Accepted& y) {
                                           return Access::impl(*x.conn).progress() < Access::impl(*y.conn).progress();
                                         });
    const Accepted dropped = *victim;
    accepted_handshaking.erase(victim);
    const char* progress = "nothing received";
    switch (Access::impl(*dropped.conn).progress()) {
      case Access::Impl::Progress::nothing_received:
        break;
      case Access::Impl::Progress::tls:
        progress = "in the TLS handshake";
        break;
      case Access::Impl::Progress::authenticated:
        progress = "authenticated, no hello yet";
        break;
    }
    const auto age_ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - dropped.since).count();
    spdlog::warn(
        "transport: {} handshakes already in progress: dropping the connection from {} ({} after {} ms) to "
        "accept {}",
        kHandshakesMax, dropped.conn->peer_address(), progress, age_ms, address);
    Access::impl(*dropped.conn)
        .abort_handshake(
            Error(errc::connection_closed, fmt::format("dropped to make room for a newer connection ({} handshakes in "
                                                       "progress)",
                                                       kHandshakesMax)));
  }

  // A connection finished its handshake: make it current, or refuse it.
  void install(const std::shared_ptr<Connection>& c) {
    Access::Impl& ci = Access::impl(*c);
    // Started before any close, so a refused connection still says goodbye and winds down
    // through its own tasks like every other.
    ci.start(c);
    if (stopping) {
      c->close("link stopping");
      retire(c);
      return;
    }
    if (ci.peer_instance() == instance_id) {
      c->close("connected to itself (same instance id): check connect_address");
      retire(c);
      return;
    }
    if (current && current->is_open()) {
      const Access::Impl& old = Access::impl(*current);
      bool keep_old = false;
      if (old.peer_instance() == ci.peer_instance() && current->dialed() != c->dialed()) {
        // The same peer process holds both, one dialed by each side: a simultaneous dial.
        // Both sides keep the connection dialed by the smaller instance id, without talking.
        const bool keep_ours = instance_id < ci.peer_instance();
        keep_old = current->dialed() == keep_ours;
      }
      if (keep_old) {
        spdlog::info("transport: {}: simultaneous dial; keeping the connection dialed by {}", opts.peer_name,
                     current->dialed() ? "us" : "the peer");
        c->close("duplicate connection (simultaneous dial)");
        retire(c);
        return;
      }
      current->close("replaced by a newer connection");
      retire(current);
    }
    current = c;
    current_since = Clock::now();
    std::weak_ptr<Core> weak = shared_from_this();
    const Connection* raw = c.get();
    ci.set_on_closing([weak, raw] {
      if (auto core = weak.lock()) core->on_closing(raw);
    });
    spdlog::info("transport: connected to {} at {} ({}), protocol version {}, capabilities 0x{:x}", c->peer_name(),
                 c->peer_address(), c->dialed() ? "dialed" : "accepted", c->protocol_version(), c->capabilities());
    if (on_connected) on_connected(c);
  }

  static asio::awaitable<void> handshake_task(std::shared_ptr<Core> core, std::shared_ptr<Connection> conn);
  static asio::awaitable<void> accept_loop(std::shared_ptr<Core> core);
  static asio::awaitable<void> dial_loop(std::shared_ptr<Core> core);
  asio::awaitable<Result<Tcp::resolver::results_type>> resolve(const std::string& host, const std::string& service);

  Result<Tcp::endpoint> listen_endpoint() {
    const auto hp = parse_endpoint(opts.listen_address, EndpointUse::listen);
    if (!hp) return Error(errc::bad_address, "listen_address '" + opts.listen_address + "': " + hp.error().context);
    ErrorCode ec;
    const auto results = resolver.resolve(hp->host, std::to_string(hp->port),
                                          Tcp::resolver::passive | Tcp::resolver::numeric_service, ec);
    if (ec || results.empty()) {
      return Error(errc::bad_address,
                   "listen_address '" + opts.listen_address + "': " + (ec ? ec.message() : std::string("no address")));
    }
    return results.begin()->endpoint();
  }
};

asio::awaitable<void> Link::Core::handshake_task(std::shared_ptr<Core> core, std::shared_ptr<Connection> conn) {
  // accept_loop listed it (in both lists) before this task began, so that stop() and
  // make_room() can abort it even before it starts.
  Tcp::resolver::results_type none;
  Status st = co_await Access::impl(*conn).establish(conn, std::move(none));
  std::erase(core->handshaking, conn);
  // Still listed unless make_room() dropped it.
  std::erase_if(core->accepted_handshaking, [&conn](const Accepted& a) { return a.conn == conn; });
  if (st) core->install(conn);
  core->task_done();
}

asio::awaitable<void> Link::Core::accept_loop(std::shared_ptr<Core> core) {
  for (;;) {
    Tcp::socket socket(core->ex);
    auto [ec] = co_await core->acceptor->async_accept(socket, kTuple);
    if (core->stopping || ec == asio::error::operation_aborted) break;
    if (ec) {
      spdlog::warn("transport: accept on port {} failed: {}", core->port, ec.message());
      asio::steady_timer t(core->ex, kAcceptRetryDelay);
      auto [tec] = co_await t.async_wait(kTuple);
      (void)tec;
      continue;
    }
    ErrorCode rec;
    const Tcp::endpoint remote = socket.remote_endpoint(rec);
    const std::string address = rec ? std::string("(unknown peer)") : describe(remote);
    if (core->accepted_handshaking.size() >= kHandshakesMax) core->make_room(address);
    TANDEM_ASSERT(core->accepted_handshaking.size() < kHandshakesMax);
    socket.set_option(Tcp::no_delay(true), rec);
    ++core->tasks;
    std::shared_ptr<Connection> conn = core->make_connection(std::move(socket), false, address);
    core->accepted_handshaking.push_back(Accepted{conn, Clock::now()});
    core->handshaking.push_back(conn);
    asio::co_spawn(core->ex, handshake_task(core, std::move(conn)), AbortOnException{"a transport handshake"});
  }
  core->task_done();
}

asio::awaitable<Result<Tcp::resolver::results_type>> Link::Core::resolve(const std::string& host,
                                                                         const std::string& service) {
  auto [ec, results] = co_await resolver.async_resolve(host, service, Tcp::resolver::numeric_service, kTuple);
  if (ec) co_return Error(errc::bad_address, "resolving '" + host + "': " + ec.message());
  if (results.empty()) co_return Error(errc::bad_address, "'" + host + "' has no address");
  co_return std::move(results);
}

asio::awaitable<void> Link::Core::dial_loop(std::shared_ptr<Core> core) {
  const auto hp = parse_endpoint(core->opts.connect_address, EndpointUse::dial);
  TANDEM_ASSERT(hp);  // start() checked it
  bool first = true;
  while (!core->stopping) {
    while (!core->stopping && core->current && core->current->is_open()) co_await core->changed.wait();
    if (core->stopping) break;
    if (!first) {
      const std::uint32_t delay_ms = core->backoff.next_ms();
      core->backoff_timer.expires_after(std::chrono::milliseconds(delay_ms));
      auto [tec] = co_await core->backoff_timer.async_wait(kTuple);
      (void)tec;
      if (core->stopping) break;
      if (core->current && core->current->is_open()) continue;  // the peer dialed us meanwhile
    }
    first = false;

    Result<Tcp::resolver::results_type> endpoints = co_await core->resolve(hp->host, std::to_string(hp->port));
    if (core->stopping) break;
    std::string failure;
    if (endpoints) {
      std::shared_ptr<Connection> conn = core->make_connection(Tcp::socket(core->ex), true, core->opts.connect_address);
      core->handshaking.push_back(conn);
      Tcp::resolver::results_type eps = std::move(*endpoints);
      Status st = co_await Access::impl(*conn).establish(conn, std::move(eps));
      std::erase(core->handshaking, conn);
      if (st) {
        core->last_dial_failure.clear();
        core->install(conn);
        continue;
      }
      // establish() has logged refusals and handshake failures; connect failures are ours.
      if (!Access::impl(*conn).connected() && st.code() != errc::stopped) failure = st.error().context;
    } else {
      failure = endpoints.error().context;
    }
    if (!failure.empty()) {
      if (failure != core->last_dial_failure) {
        spdlog::warn("transport: dialing {} at {} failed: {}; retrying with back-off", core->opts.peer_name,
                     core->opts.connect_address, failure);
      } else {
        spdlog::debug("transport: dialing {} at {} failed again: {}", core->opts.peer_name, core->opts.connect_address,
                      failure);
      }
      core->last_dial_failure = std::move(failure);
    }
  }
  core->task_done();
}

Link::Link(asio::any_io_executor ex, std::shared_ptr<asio::ssl::context> tls, LinkOptions opts,
           OnConnected on_connected)
    : core_(std::make_shared<Core>(std::move(ex), std::move(tls), std::move(opts), std::move(on_connected))) {
  TANDEM_ASSERT(core_->tls != nullptr);
}

Link::~Link() { TANDEM_ASSERT_MSG(!core_->started || core_->stopped, "Link destroyed before stop() completed"); }

Status Link::start() {
  Core& c = *core_;
  TANDEM_ASSERT_MSG(!c.started, "Link::start() called twice");
  const LinkOptions& o = c.opts;
  if (o.peer_name.empty()) return Error(errc::bad_config, "peer_name is empty");
  if (o.connect_address.empty() && o.listen_address.empty()) {
    return Error(errc::bad_config, "neither connect_address nor listen_address is set");
  }
  if (o.keepalive_interval_ms == 0 || o.peer_timeout_ms <= o.keepalive_interval_ms) {
    return Error(errc::bad_config, fmt::format("keepalive_interval_ms ({}) must be above 0 and below "
                                               "peer_timeout_ms ({})",
                                               o.keepalive_interval_ms, o.peer_timeout_ms));
  }
  if (o.backoff_min_ms == 0 || o.backoff_min_ms > o.backoff_max_ms) {
    return Error(errc::bad_config, fmt::format("backoff_min_ms ({}) must be above 0 and at most "
                                               "backoff_max_ms ({})",
                                               o.backoff_min_ms, o.backoff_max_ms));
  }
  if (o.handshake_timeout_ms == 0) return Error(errc::bad_config, "handshake_timeout_ms is 0");
  if (o.hello.size() > kHelloAppBytesMax) {
    return Error(errc::bad_config,
                 fmt::format("hello payload of {} bytes (at most {})", o.hello.size(), kHelloAppBytesMax));
  }
  if (!o.connect_address.empty()) {
    const auto dial = parse_endpoint(o.connect_address, EndpointUse::dial);
    if (!dial) return Error(errc::bad_address, "connect_address '" + o.connect_address + "': " + dial.error().context);
  }
  if (!o.listen_address.empty()) {
    Result<Tcp::endpoint> ep = c.listen_endpoint();
    if (!ep) return ep.error();
    auto acceptor = std::make_unique<Tcp::acceptor>(c.ex);
    ErrorCode ec;
    acceptor->open(ep->protocol(), ec);
    if (!ec) acceptor->set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor->bind(*ep, ec);
    if (!ec) acceptor->listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return Error(ec, "listening on " + o.listen_address);
    const Tcp::endpoint local = acceptor->local_endpoint(ec);
    if (ec) return Error(ec, "listening on " + o.listen_address);
    c.port = local.port();
    c.acceptor = std::move(acceptor);
    spdlog::info("transport: listening for {} on {}", o.peer_name, describe(local));
  }
  c.started = true;
  if (c.acceptor) {
    ++c.tasks;
    asio::co_spawn(c.ex, Core::accept_loop(core_), AbortOnException{"a transport accept loop"});
  }
  if (!o.connect_address.empty()) {
    ++c.tasks;
    asio::co_spawn(c.ex, Core::dial_loop(core_), AbortOnException{"a transport dial loop"});
  }
  return {};
}

asio::awaitable<void> Link::stop() {
  const std::shared_ptr<Core> core = core_;
  if (!core->stopping) {
    core->stopping = true;
    ErrorCode ignored;
    if (core->acceptor) core->acceptor->close(ignored);
    core->resolver.cancel();
    core->backoff_timer.cancel();
    core->changed.notify_all();
    for (const auto& c : core->handshaking) {
      Access::impl(*c).abort_handshake(Error(errc::stopped, "link stopping"));
    }
    if (core->current) core->current->close("link stopping");
  }
  while (core->tasks > 0) co_await core->tasks_done.wait();
  if (core->current) co_await core->current->wait_closed();
  // Retired connections are closing already; wait for their goodbyes (bounded by kLinger).
  for (std::size_t i = 0; i < core->retired.size(); ++i) {
    if (std::shared_ptr<Connection> c = core->retired[i].lock()) {
      c->close("link stopping");
      co_await c->wait_closed();
    }
  }
  core->retired.clear();
  core->stopped = true;
}

std::uint16_t Link::listen_port() const { return core_->port; }

void Link::set_rate_limit(std::uint64_t bytes_per_s) {
  core_->rate = bytes_per_s;
  if (core_->current && core_->current->is_open()) Access::impl(*core_->current).set_rate_limit(bytes_per_s);
}

std::shared_ptr<Connection> Link::connection() const { return core_->current; }

std::uint64_t Link::instance_id() const { return core_->instance_id; }

}  // namespace tandem::transport

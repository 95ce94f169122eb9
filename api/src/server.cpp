#include "tandem/api/server.h"

#include <grp.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/ssl/stream.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/basic_stream.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/ssl/ssl_stream.hpp>
#include <chrono>
#include <filesystem>
#include <list>

#include "tandem/common/async.h"
#include "tandem/common/endpoint.h"

namespace tandem::api {

namespace beast = boost::beast;
namespace http = beast::http;
using local = asio::local::stream_protocol;
using tcp = asio::ip::tcp;

namespace {

constexpr std::chrono::seconds kIdleTimeout{60};
constexpr std::uint32_t kHeaderBytesMax = 8 * 1024;

bool token_matches(std::string_view header, const std::string& token) {
  constexpr std::string_view kBearer = "Bearer ";
  if (header.substr(0, kBearer.size()) != kBearer) return false;
  const std::string_view given = header.substr(kBearer.size());
  // Constant time in the token's content (the length is not a secret worth hiding).
  return given.size() == token.size() && CRYPTO_memcmp(given.data(), token.data(), token.size()) == 0;
}

http::response<http::string_body> to_beast(const HttpResponse& r, unsigned version, bool keep_alive) {
  http::response<http::string_body> res{static_cast<http::status>(r.status), version};
  res.set(http::field::server, "tandemd");
  if (!r.content_type.empty()) res.set(http::field::content_type, r.content_type);
  res.body() = r.body;
  res.keep_alive(keep_alive);
  res.prepare_payload();
  return res;
}

}  // namespace

struct ApiServer::Impl {
  asio::any_io_executor ex;
  ApiServerOptions opts;
  Router* router = nullptr;
  local::acceptor acceptor;
  tcp::acceptor tcp_acceptor;
  std::list<std::function<void()>> open;  // closes each live connection (on stop)
  std::size_t running = 0;
  bool stopping = false;
  WaitQueue done;

  Impl(asio::any_io_executor e, ApiServerOptions o, Router& r)
      : ex(std::move(e)), opts(std::move(o)), router(&r), acceptor(ex), tcp_acceptor(ex) {}

  // Accepts until stop; each connection is served by its own coroutine.
  template <typename Acceptor, typename Serve>
  asio::awaitable<void> accept_loop(Acceptor& a, Serve serve_one) {
    ++running;
    while (!stopping) {
      auto [ec, sock] = co_await a.async_accept(asio::as_tuple(asio::use_awaitable));
      if (ec) {
        if (stopping || ec == asio::error::operation_aborted) break;
        spdlog::warn("api: accept failed: {}", ec.message());
        continue;
      }
      asio::co_spawn(ex, (this->*serve_one)(std::move(sock)), abort_on_exception);
    }
    --running;
    done.notify_all();
  }

  asio::awaitable<void> serve_unix(local::socket sock) {
    ++running;
    beast::basic_stream<local, asio::any_io_executor> stream(std::move(sock));
    auto it = open.insert(open.end(), [&stream] {
      boost::system::error_code ec;
      stream.socket().close(ec);
    });
    co_await serve(stream, false);
    boost::system::error_code ignored;
    stream.socket().shutdown(local::socket::shutdown_both, ignored);
    open.erase(it);
    --running;
    done.notify_all();
  }

  asio::awaitable<void> serve_tls(tcp::socket sock) {
    ++running;
    beast::ssl_stream<beast::tcp_stream> stream(beast::tcp_stream(std::move(sock)), *opts.tls);
    auto it = open.insert(open.end(), [&stream] {
      boost::system::error_code ec;
      beast::get_lowest_layer(stream).socket().close(ec);
    });
    beast::get_lowest_layer(stream).expires_after(kIdleTimeout);
    auto [ec] = co_await stream.async_handshake(asio::ssl::stream_base::server, asio::as_tuple(asio::use_awaitable));
    if (!ec) {
      co_await serve(stream, true);
      beast::get_lowest_layer(stream).expires_after(std::chrono::seconds(5));
      (void)co_await stream.async_shutdown(asio::as_tuple(asio::use_awaitable));
    } else if (!stopping) {
      spdlog::info("api: TLS handshake with {} failed: {}", endpoint_text(beast::get_lowest_layer(stream).socket()),
                   ec.message());
    }
    open.erase(it);
    --running;
    done.notify_all();
  }

  static std::string endpoint_text(const tcp::socket& s) {
    boost::system::error_code ec;
    const auto ep = s.remote_endpoint(ec);
    return ec ? std::string("?") : ep.address().to_string() + ":" + std::to_string(ep.port());
  }

  template <typename Stream>
  asio::awaitable<void> serve(Stream& stream, bool needs_token) {
    beast::flat_buffer buffer;
    for (;;) {
      http::request_parser<http::string_body> parser;
      parser.header_limit(kHeaderBytesMax);
      parser.body_limit(Router::kBodyBytesMax);
      beast::get_lowest_layer(stream).expires_after(kIdleTimeout);
      auto [ec, n] = co_await http::async_read(stream, buffer, parser, asio::as_tuple(asio::use_awaitable));
      (void)n;
      if (ec == http::error::end_of_stream || ec == beast::error::timeout || stopping) break;
      if (ec) {
        // Bad bytes or too much of them: answer once, then close this connection only.
        HttpResponse r =
            ec == http::error::body_limit
                ? error_response(ErrorKind::body_too_large,
                                 "The request body is larger than " + std::to_string(Router::kBodyBytesMax) + " bytes.")
                : error_response(ErrorKind::bad_request, "Malformed HTTP request: " + ec.message() + ".");
        if (ec != asio::error::operation_aborted && ec != asio::error::eof && ec != asio::error::connection_reset) {
          auto res = to_beast(r, 11, false);
          beast::get_lowest_layer(stream).expires_after(kIdleTimeout);
          (void)co_await http::async_write(stream, res, asio::as_tuple(asio::use_awaitable));
        }
        break;
      }
      auto& req = parser.get();
      HttpRequest hr;
      hr.method = std::string(req.method_string());
      hr.target = std::string(req.target());
      if (auto ct = req.find(http::field::content_type); ct != req.end()) hr.content_type = std::string(ct->value());
      hr.body = std::move(req.body());
      const bool keep_alive = req.keep_alive();
      const unsigned version = req.version();
      bool authorized = !needs_token;
      if (needs_token) {
        auto auth = req.find(http::field::authorization);
        authorized = auth != req.end() && token_matches(auth->value(), opts.token);
      }
      beast::get_lowest_layer(stream).expires_never();  // an action may take a while (a pause waits for the peer)
      // No co_await inside a conditional expression: GCC 12 destroys its temporaries twice.
      HttpResponse r;
      if (authorized) {
        r = co_await router->handle(std::move(hr));
      } else {
        r = error_response(ErrorKind::unauthorized, "A valid bearer token is required (Authorization: Bearer ...).");
      }
      auto res = to_beast(r, version, keep_alive);
      if (!authorized) res.set(http::field::www_authenticate, "Bearer");
      beast::get_lowest_layer(stream).expires_after(kIdleTimeout);
      auto [wec, wn] = co_await http::async_write(stream, res, asio::as_tuple(asio::use_awaitable));
      (void)wn;
      if (wec || !keep_alive || stopping) break;
    }
  }
};

ApiServer::ApiServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ApiServer::~ApiServer() = default;

Result<std::unique_ptr<ApiServer>> ApiServer::listen(asio::any_io_executor ex, ApiServerOptions opts, Router& router) {
  auto impl = std::make_unique<Impl>(ex, opts, router);
  namespace fs = std::filesystem;
  std::error_code fec;
  const fs::path path(opts.socket_path);
  if (path.has_parent_path()) fs::create_directories(path.parent_path(), fec);
  boost::system::error_code ec;
  if (fs::is_socket(path, fec)) {
    // A socket someone still answers on belongs to a running daemon: never steal it. One nobody
    // answers on is left over from a run that died, and is replaced.
    local::socket probe(ex);
    probe.connect(local::endpoint(opts.socket_path), ec);
    if (!ec) {
      return Error(std::make_error_code(std::errc::address_in_use),
                   "api socket " + opts.socket_path + " is in use by another process (another tandemd?)");
    }
    fs::remove(path, fec);
  }
  // Created with no access for others from the first instant; the mode is set right after.
  const mode_t old = ::umask(0177);
  impl->acceptor.open(local(), ec);
  if (!ec) impl->acceptor.bind(local::endpoint(opts.socket_path), ec);
  ::umask(old);
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return Error(std::error_code(ec.value(), std::system_category()), "api socket " + opts.socket_path);
  if (!opts.socket_group.empty()) {
    struct group* g = ::getgrnam(opts.socket_group.c_str());
    if (g == nullptr)
      return Error(std::make_error_code(std::errc::invalid_argument),
                   "api socket group " + opts.socket_group + " does not exist");
    if (::chown(opts.socket_path.c_str(), static_cast<uid_t>(-1), g->gr_gid) != 0) {
      return Error(std::error_code(errno, std::system_category()), "chgrp " + opts.socket_path);
    }
  }
  if (::chmod(opts.socket_path.c_str(), opts.socket_mode) != 0) {
    return Error(std::error_code(errno, std::system_category()), "chmod " + opts.socket_path);
  }
  if (!opts.tcp_listen.empty()) {
    if (!opts.tls || opts.token.empty()) {
      return Error(std::make_error_code(std::errc::invalid_argument), "the TCP API needs TLS and a token");
    }
    const auto hp = parse_endpoint(opts.tcp_listen, EndpointUse::listen);
    if (!hp) return Error(hp.error().code, "api_listen " + opts.tcp_listen + ": " + hp.error().context);
    // The host must be an IP address: it is not resolved as a name.
    const auto addr = asio::ip::make_address(hp->host, ec);
    if (ec) return Error(std::error_code(ec.value(), std::system_category()), "api_listen " + opts.tcp_listen);
    tcp::endpoint ep(addr, hp->port);
    impl->tcp_acceptor.open(ep.protocol(), ec);
    if (!ec) impl->tcp_acceptor.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) impl->tcp_acceptor.bind(ep, ec);
    if (!ec) impl->tcp_acceptor.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return Error(std::error_code(ec.value(), std::system_category()), "api_listen " + opts.tcp_listen);
    asio::co_spawn(ex, impl->accept_loop(impl->tcp_acceptor, &Impl::serve_tls), abort_on_exception);
    spdlog::info("api: listening on {} (TLS, bearer token), port {}", opts.tcp_listen,
                 impl->tcp_acceptor.local_endpoint().port());
  }
  asio::co_spawn(ex, impl->accept_loop(impl->acceptor, &Impl::serve_unix), abort_on_exception);
  spdlog::info("api: listening on {}", opts.socket_path);
  return std::unique_ptr<ApiServer>(new ApiServer(std::move(impl)));
}

asio::awaitable<void> ApiServer::stop() {
  Impl& d = *impl_;
  d.stopping = true;
  boost::system::error_code ec;
  d.acceptor.close(ec);
  d.tcp_acceptor.close(ec);
  for (auto& close : d.open) close();
  while (d.running > 0) co_await d.done.wait();
  std::error_code fec;
  std::filesystem::remove(d.opts.socket_path, fec);
}

std::uint16_t ApiServer::tcp_port() const {
  boost::system::error_code ec;
  if (!impl_->tcp_acceptor.is_open()) return 0;
  const auto ep = impl_->tcp_acceptor.local_endpoint(ec);
  return ec ? 0 : ep.port();
}

}  // namespace tandem::api

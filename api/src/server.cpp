#include "tandem/api/server.h"

#include <grp.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/basic_stream.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <filesystem>
#include <list>

#include "tandem/common/async.h"

namespace tandem::api {

namespace beast = boost::beast;
namespace http = beast::http;
using local = asio::local::stream_protocol;

namespace {

constexpr std::chrono::seconds kIdleTimeout{60};
constexpr std::uint32_t kHeaderBytesMax = 8 * 1024;

void abort_on_exception(std::exception_ptr e) {
  if (!e) return;
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    spdlog::critical("api: unhandled exception: {}", ex.what());
  }
  std::abort();
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
  std::list<local::socket*> open;  // connections, closed on stop
  std::size_t running = 0;
  bool stopping = false;
  WaitQueue done;

  Impl(asio::any_io_executor e, ApiServerOptions o, Router& r)
      : ex(std::move(e)), opts(std::move(o)), router(&r), acceptor(ex) {}

  asio::awaitable<void> accept_loop() {
    ++running;
    while (!stopping) {
      auto [ec, sock] = co_await acceptor.async_accept(asio::as_tuple(asio::use_awaitable));
      if (ec) {
        if (stopping || ec == asio::error::operation_aborted) break;
        spdlog::warn("api: accept failed: {}", ec.message());
        continue;
      }
      asio::co_spawn(ex, serve(std::move(sock)), abort_on_exception);
    }
    --running;
    done.notify_all();
  }

  asio::awaitable<void> serve(local::socket sock) {
    ++running;
    beast::basic_stream<local, asio::any_io_executor> stream(std::move(sock));
    auto it = open.insert(open.end(), &stream.socket());
    beast::flat_buffer buffer;
    for (;;) {
      http::request_parser<http::string_body> parser;
      parser.header_limit(kHeaderBytesMax);
      parser.body_limit(Router::kBodyBytesMax);
      stream.expires_after(kIdleTimeout);
      auto [ec, n] = co_await http::async_read(stream, buffer, parser, asio::as_tuple(asio::use_awaitable));
      (void)n;
      if (ec == http::error::end_of_stream || ec == beast::error::timeout || stopping) break;
      if (ec) {
        // Bad bytes or too much of them: answer once, then close this connection only.
        HttpResponse r = ec == http::error::body_limit
                             ? error_response(ErrorKind::body_too_large,
                                              "The request body is larger than " +
                                                  std::to_string(Router::kBodyBytesMax) + " bytes.")
                             : error_response(ErrorKind::bad_request, "Malformed HTTP request: " + ec.message() + ".");
        if (ec != asio::error::operation_aborted && ec != asio::error::eof && ec != asio::error::connection_reset) {
          auto res = to_beast(r, 11, false);
          stream.expires_after(kIdleTimeout);
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
      stream.expires_never();  // an action may take a while (a pause waits for the peer)
      HttpResponse r = co_await router->handle(std::move(hr));
      auto res = to_beast(r, version, keep_alive);
      stream.expires_after(kIdleTimeout);
      auto [wec, wn] = co_await http::async_write(stream, res, asio::as_tuple(asio::use_awaitable));
      (void)wn;
      if (wec || !keep_alive || stopping) break;
    }
    boost::system::error_code ignored;
    stream.socket().shutdown(local::socket::shutdown_both, ignored);
    open.erase(it);
    --running;
    done.notify_all();
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
    if (g == nullptr) return Error(std::make_error_code(std::errc::invalid_argument), "api socket group " + opts.socket_group + " does not exist");
    if (::chown(opts.socket_path.c_str(), static_cast<uid_t>(-1), g->gr_gid) != 0) {
      return Error(std::error_code(errno, std::system_category()), "chgrp " + opts.socket_path);
    }
  }
  if (::chmod(opts.socket_path.c_str(), opts.socket_mode) != 0) {
    return Error(std::error_code(errno, std::system_category()), "chmod " + opts.socket_path);
  }
  asio::co_spawn(ex, impl->accept_loop(), abort_on_exception);
  spdlog::info("api: listening on {}", opts.socket_path);
  return std::unique_ptr<ApiServer>(new ApiServer(std::move(impl)));
}

asio::awaitable<void> ApiServer::stop() {
  Impl& d = *impl_;
  d.stopping = true;
  boost::system::error_code ec;
  d.acceptor.close(ec);
  for (auto* s : d.open) s->close(ec);
  while (d.running > 0) co_await d.done.wait();
  std::error_code fec;
  std::filesystem::remove(d.opts.socket_path, fec);
}

}  // namespace tandem::api

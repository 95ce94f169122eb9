// ApiServer: HTTP/1.1 (Boost.Beast) on a Unix socket, in front of a Router. Requests are read
// with bounded header and body sizes (413 for a body over Router::kBodyBytesMax, 400 for a
// malformed request, then the connection closes); keep-alive otherwise. Idle connections
// close after a timeout. One io_context thread; every connection is its own coroutine.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ssl/context.hpp>
#include <memory>
#include <string>

#include "tandem/api/router.h"
#include "tandem/common/result.h"

namespace tandem::api {

struct ApiServerOptions {
  std::string socket_path;  // created (a stale socket file is replaced), removed on stop
  unsigned socket_mode = 0660;
  std::string socket_group;  // chgrp the socket to this group, if set
  // Optional TCP listener ("host:port"), TLS only, every request with
  // "Authorization: Bearer <token>" (401 otherwise).
  std::string tcp_listen;
  std::shared_ptr<asio::ssl::context> tls;
  std::string token;
};

class ApiServer {
 public:
  static Result<std::unique_ptr<ApiServer>> listen(asio::any_io_executor ex, ApiServerOptions opts, Router& router);
  ~ApiServer();
  ApiServer(const ApiServer&) = delete;
  ApiServer& operator=(const ApiServer&) = delete;
  // Stops accepting, closes every connection, waits for their coroutines, removes the socket.
  asio::awaitable<void> stop();
  // The TCP listener's port (0 without one): api_listen may ask for port 0.
  [[nodiscard]] std::uint16_t tcp_port() const;

 private:
  struct Impl;
  explicit ApiServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tandem::api

// Fuzzer for the control API's request handling: raw bytes go through Beast's request parser
// with the server's limits, and what parses goes through the Router (no sessions behind it);
// the same bytes are also an action body for every verb. Whatever comes in, the answer is a
// well-formed response (an error_response with a JSON body for every 4xx), never a crash.
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/beast/core/buffers_to_string.hpp>
#include <boost/beast/http.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "fuzz_driver.h"
#include "tandem/api/router.h"
#include "tandem/common/assert.h"

namespace {

namespace http = boost::beast::http;
using tandem::api::HttpResponse;

void check_response(const HttpResponse& r) {
  TANDEM_ASSERT(r.status >= 200 && r.status < 600);
  if (r.status >= 400) {
    auto j = nlohmann::json::parse(r.body, nullptr, false);
    TANDEM_ASSERT(!j.is_discarded() && j.contains("messages") && j["messages"].size() == 1);
    TANDEM_ASSERT(j["messages"][0]["code"].get<std::string>().rfind("0xE", 0) == 0);
    TANDEM_ASSERT(!j["messages"][0]["message_l10n"].get<std::string>().empty());
  }
}

tandem::api::Router& router() {
  static tandem::api::Router r([] {
    tandem::api::ApiContext c;
    c.node_name = "fuzz";
    c.sessions = [] { return std::vector<tandem::replication::Session*>{}; };
    c.volumes = [] { return std::vector<tandem::api::VolumeView>{{"vol0", 4096, "read-write", {}, "/x", ""}}; };
    return c;
  }());
  return r;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  for (std::string_view verb :
       {"pause", "resume", "sync", "failover", "reprotect", "start_failover_test", "stop_failover_test", "bogus"}) {
    auto r = tandem::api::parse_action(verb, "application/json", bytes);
    if (auto* resp = std::get_if<HttpResponse>(&r)) check_response(*resp);
  }
  http::request_parser<http::string_body> parser;
  parser.header_limit(8 * 1024);
  parser.body_limit(tandem::api::Router::kBodyBytesMax);
  parser.eager(true);
  boost::beast::error_code ec;
  parser.put(boost::asio::buffer(data, size), ec);
  if (ec || !parser.is_done()) return 0;
  auto& req = parser.get();
  tandem::api::HttpRequest hr;
  hr.method = std::string(req.method_string());
  hr.target = std::string(req.target());
  if (auto ct = req.find(http::field::content_type); ct != req.end()) hr.content_type = std::string(ct->value());
  hr.body = req.body();
  boost::asio::io_context ctx;
  HttpResponse out;
  bool done = false;
  boost::asio::co_spawn(ctx, router().handle(std::move(hr)), [&](std::exception_ptr e, HttpResponse r) {
    TANDEM_ASSERT(!e);
    out = std::move(r);
    done = true;
  });
  ctx.run();
  TANDEM_ASSERT(done);
  check_response(out);
  return 0;
}

std::vector<std::string> tandem::fuzz::seeds() {
  return {
      "POST /api/rest/replication_session/s-vol0/failover HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
      "Content-Length: 37\r\n\r\n{\"is_planned\": false, \"force\": true}",
      "GET /api/rest/replication_session HTTP/1.1\r\nHost: x\r\n\r\n",
      "GET /api/rest/volume/vol0 HTTP/1.1\r\nHost: x\r\n\r\n",
      "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
      "POST /api/rest/replication_session/s/stop_failover_test HTTP/1.1\r\nContent-Type: application/json\r\n"
      "Content-Length: 15\r\n\r\n{\"force\": true}",
      "{\"is_planned\": true, \"reverse\": true}",
      "[{\"a\": [1, 2, {\"b\": null}]}]",
  };
}

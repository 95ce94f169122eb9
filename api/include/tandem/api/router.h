// The control API's HTTP layer, transport-free: a request (method, target, headers that
// matter, body) goes in, a response comes out. It parses and validates, calls the session,
// and renders JSON and error_response bodies; every rule about what an action may do lives in
// replication/ (control.h). docs/api.md describes the API as it ships, with the error codes,
// and api/share/openapi.json is its machine-readable form.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "tandem/importer/import.h"
#include "tandem/replication/session.h"

namespace tandem::api {

namespace asio = boost::asio;

// A local volume as the API shows it (the daemon fills it in; the api module does not know
// the NBD frontend).
struct VolumeView {
  std::string id;
  std::uint64_t size_bytes = 0;
  std::string access;                // "read-write" | "read-only" | "none"
  std::vector<std::string> exports;  // "nbd+unix:///vol0?socket=/run/tandem/vol0.nbd", "nbd://127.0.0.1:10809/vol0"
  std::string backing;               // device or file path
  std::string session_id;            // the session it belongs to, or empty
};

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // path and query
  std::string content_type;
  std::string body;
};

struct HttpResponse {
  unsigned status = 200;
  std::string content_type = "application/json";
  std::string body;
};

struct ApiContext {
  std::string node_name;
  std::function<std::vector<replication::Session*>()> sessions;
  std::function<std::vector<VolumeView>()> volumes;
  std::function<std::string()> extra_metrics;  // more Prometheus text (NBD counters), may be empty
  // POST /api/rest/volume: the body is a JSON object (the router checked that much; the daemon
  // holds it to the rules of a configured volume). The new volume, or the error to answer.
  std::function<asio::awaitable<std::variant<VolumeView, HttpResponse>>(std::string body)> create_volume;
  // DELETE /api/rest/volume/{id}: nothing, or the error to answer.
  std::function<asio::awaitable<std::optional<HttpResponse>>(std::string id)> delete_volume;
  // Import sessions: every import of this daemon, as it stands.
  std::function<std::vector<importer::ImportStatus>()> imports;
  // POST /api/rest/import_session: the body is a JSON object (checked that far here). The new
  // import, or the error to answer.
  std::function<asio::awaitable<std::variant<importer::ImportStatus, HttpResponse>>(std::string body)> create_import;
  // An action (DELETE is ImportAction::remove) on an existing import whose state allows it (the
  // router checked both): nothing, or the error to answer.
  std::function<asio::awaitable<std::optional<HttpResponse>>(std::string id, importer::ImportAction a)> import_action;
};

// Stable codes per error kind (docs/api.md lists them).
enum class ErrorKind {
  bad_json,            // 400
  unknown_field,       // 400
  wrong_type,          // 400
  wrong_role,          // 400
  bad_request,         // 400: anything else wrong with the request
  unauthorized,        // 401
  not_found,           // 404: unknown path
  unknown_session,     // 404
  unknown_volume,      // 404
  unknown_import,      // 404
  bad_method,          // 405
  body_too_large,      // 413
  not_allowed,         // 422: not in this state
  failed,              // 422: accepted, then failed
  import_not_allowed,  // 422: the import's state does not allow the action
  import_failed,       // 422: an import action accepted, then failed
  internal,            // 500
};
std::string_view error_code(ErrorKind k);
unsigned error_status(ErrorKind k);

// {"messages": [{"code", "severity": "Error", "message_l10n", "arguments"}]}
HttpResponse error_response(ErrorKind k, std::string message, std::vector<std::string> arguments = {});

struct ActionRequest {
  replication::Action action = replication::Action::pause;
  replication::ActionArgs args;
};

// The verb of POST /api/rest/replication_session/{id}/{verb} and its body: empty, or a JSON
// object of known boolean fields. Anything else gives the error_response to send (400, or
// 404 for an unknown verb).
std::variant<ActionRequest, HttpResponse> parse_action(std::string_view verb, std::string_view content_type,
                                                       std::string_view body);

// The action verbs: POST /api/rest/replication_session/{id}/<verb>. parse_action() knows
// exactly these.
std::span<const std::string_view> action_verbs();
// The action verbs of an import session: POST /api/rest/import_session/{id}/<verb>.
std::span<const std::string_view> import_verbs();
// An import session as the API shows it.
std::string import_json(const importer::ImportStatus& s);
// Every route Router::handle() serves, "METHOD /path/{id}", sorted. The OpenAPI document lists
// exactly these (tests/unit/api/openapi_test.cpp; the api integration test calls each one on a
// real daemon).
std::vector<std::string> routes();
// The OpenAPI 3 document served at GET /api/rest/openapi.json (api/share/openapi.json).
std::string_view openapi_document();

class Router {
 public:
  // Largest request body accepted; the server refuses more with 413 before reading it.
  static constexpr std::size_t kBodyBytesMax = 64 * 1024;

  explicit Router(ApiContext ctx) : ctx_(std::move(ctx)) {}
  asio::awaitable<HttpResponse> handle(HttpRequest req);

  // The JSON views, for tests and tandemctl's expectations.
  [[nodiscard]] std::string session_json(const replication::Session& s) const;
  [[nodiscard]] std::string metrics() const;

 private:
  asio::awaitable<HttpResponse> handle_import(const HttpRequest& req, const std::vector<std::string>& p);
  ApiContext ctx_;
};

}  // namespace tandem::api

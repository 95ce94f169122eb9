#include "tandem/api/router.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <ctime>
#include <nlohmann/json.hpp>
#include <optional>

namespace tandem::api {

namespace {

using json = nlohmann::json;
using replication::Action;
using replication::Role;
using replication::State;
using replication::Verdict;

// Request bytes echoed back (a path, a field name) may be any bytes: invalid UTF-8 is replaced,
// never thrown about.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

struct KindInfo {
  std::string_view code;
  unsigned status;
};

KindInfo info(ErrorKind k) {
  switch (k) {
    case ErrorKind::bad_json:
      return {"0xE04000010001", 400};
    case ErrorKind::unknown_field:
      return {"0xE04000010002", 400};
    case ErrorKind::wrong_type:
      return {"0xE04000010003", 400};
    case ErrorKind::wrong_role:
      return {"0xE0101001000D", 400};
    case ErrorKind::bad_request:
      return {"0xE04000010004", 400};
    case ErrorKind::unauthorized:
      return {"0xE04010010001", 401};
    case ErrorKind::not_found:
      return {"0xE04040010001", 404};
    case ErrorKind::unknown_session:
      return {"0xE04040020001", 404};
    case ErrorKind::unknown_volume:
      return {"0xE04040030001", 404};
    case ErrorKind::unknown_import:
      return {"0xE04040040001", 404};
    case ErrorKind::import_not_allowed:
      return {"0xE0102001000C", 422};
    case ErrorKind::import_failed:
      return {"0xE0102001000E", 422};
    case ErrorKind::bad_method:
      return {"0xE04050010001", 405};
    case ErrorKind::body_too_large:
      return {"0xE04130010001", 413};
    case ErrorKind::not_allowed:
      return {"0xE0101001000C", 422};
    case ErrorKind::failed:
      return {"0xE0101001000E", 422};
    case ErrorKind::internal:
      return {"0xE05000010001", 500};
  }
  return {"0xE05000010001", 500};
}

// RFC 3339 in UTC with milliseconds: two cycles in the same second still differ.
std::string rfc3339(std::chrono::system_clock::time_point t) {
  const auto ms = std::chrono::time_point_cast<std::chrono::milliseconds>(t);
  const std::time_t tt = std::chrono::system_clock::to_time_t(ms);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  std::array<char, 32> buf{};
  std::strftime(buf.data(), buf.size(), "%Y-%m-%dT%H:%M:%S", &tm);
  const auto frac = ms.time_since_epoch().count() % 1000;
  return fmt::format("{}.{:03d}Z", buf.data(), frac < 0 ? frac + 1000 : frac);
}

json time_or_null(const std::optional<std::chrono::system_clock::time_point>& t) {
  return t ? json(rfc3339(*t)) : json(nullptr);
}

std::string_view data_transfer_state(const replication::SessionStatus& st) {
  switch (st.state) {
    case State::paused:
    case State::paused_for_ndu:
      return "Paused";
    case State::system_paused:
    case State::error:
      return "Faulted";
    case State::initializing:
    case State::ok:
    case State::synchronizing:
    case State::failing_over:
    case State::failing_over_for_dr:
    case State::failed_over:
    case State::reprotecting:
      break;
  }
  return st.initial_sync ? "Initial_Sync" : "Asynchronous";
}

std::string_view data_connection_state(const replication::SessionStatus& st) {
  if (st.connected) return "OK";
  if (st.state == State::initializing && st.last_sync == std::nullopt && st.committed_cycle == 0) {
    return "Initializing";
  }
  return "Complete_Data_Connection_Loss";
}

json session_object(const replication::Session& s, const std::string& node) {
  (void)node;
  const auto& o = s.options();
  const replication::SessionStatus st = s.status();
  json pairs = json::array();
  for (std::size_t i = 0; i < o.members.size(); ++i) {
    pairs.push_back({{"local_id", o.members[i].volume->id()},
                     {"remote_id", i < o.remote_volumes.size() ? o.remote_volumes[i] : std::string()}});
  }
  const bool group = o.members.size() > 1;
  json j;
  j["id"] = o.id;
  j["name"] = o.id;
  j["resource_type"] = group ? "volume_group" : "volume";
  j["local_resource_id"] = group ? o.id : o.members[0].volume->id();
  j["remote_resource_id"] = group ? o.id : (o.remote_volumes.empty() ? std::string() : o.remote_volumes[0]);
  j["remote_system"] = o.peer_name;
  j["storage_element_pairs"] = std::move(pairs);
  j["type"] = "Asynchronous";
  j["role"] = replication::role_name(st.role);
  j["state"] = replication::state_name(st.state);
  j["local_only_paused"] = st.local_only_paused;
  j["data_transfer_state"] = data_transfer_state(st);
  j["data_connection_state"] = data_connection_state(st);
  j["failover_test_in_progress"] = st.test_running;
  const bool running = st.transferring && st.transfer_bytes_total > 0;
  if (running) {
    const auto pct = st.transfer_bytes_done * 100 / st.transfer_bytes_total;
    j["progress_percentage"] = static_cast<int>(std::min<std::uint64_t>(pct, 100));
  } else {
    j["progress_percentage"] = nullptr;
  }
  j["estimated_completion_timestamp"] = nullptr;
  // tandem's own: the running transfer in bytes (tandemctl shows a rate from them).
  j["transfer_bytes_total"] = running ? json(st.transfer_bytes_total) : json(nullptr);
  j["transfer_bytes_done"] = running ? json(st.transfer_bytes_done) : json(nullptr);
  if (running && st.transfer_started && st.transfer_bytes_done > 0) {
    const auto now = std::chrono::system_clock::now();
    const auto elapsed = now - *st.transfer_started;
    const double left =
        static_cast<double>(st.transfer_bytes_total - std::min(st.transfer_bytes_done, st.transfer_bytes_total)) /
        static_cast<double>(st.transfer_bytes_done);
    const auto eta = now + std::chrono::duration_cast<std::chrono::system_clock::duration>(elapsed * left);
    j["estimated_completion_timestamp"] = rfc3339(eta);
  }
  j["last_sync_timestamp"] = time_or_null(st.last_sync);
  j["last_sync_duration"] = st.last_sync ? json(st.last_sync_duration_ms) : json(nullptr);
  if (st.role == Role::source && st.last_sync && (st.state == State::ok || st.state == State::synchronizing)) {
    j["next_sync_timestamp"] = rfc3339(*st.last_sync + std::chrono::milliseconds(o.rpo_seconds * 500ull));
  } else {
    j["next_sync_timestamp"] = nullptr;
  }
  j["rpo_seconds"] = o.rpo_seconds;
  j["restart_address"] = {{"cycle", st.restart.cycle}, {"offset", st.restart.offset}};
  j["lag_bytes"] = st.lag_bytes;
  // tandem's own: a destination in Failed_Over counts the blocks written here after the
  // failover point, which reprotect will overwrite.
  j["diverged_blocks"] = st.diverged_blocks;
  const bool faulted = st.state == State::system_paused || st.state == State::error;
  j["error_code"] = faulted ? json(st.state == State::error ? "refused" : "transfer_interrupted") : json(nullptr);
  j["error_message"] = faulted && !st.error.empty() ? json(st.error) : json(nullptr);
  return j;
}

// Splits "/a/b/c?x" into {"a", "b", "c"}; false on an empty segment or a bad character.
bool split_path(std::string_view target, std::vector<std::string>& out) {
  if (const auto q = target.find('?'); q != std::string_view::npos) target = target.substr(0, q);
  if (target.empty() || target[0] != '/') return false;
  target.remove_prefix(1);
  while (!target.empty() && target.back() == '/') target.remove_suffix(1);
  while (!target.empty()) {
    const auto slash = target.find('/');
    std::string_view seg = target.substr(0, slash);
    if (seg.empty() || seg.size() > 256) return false;
    for (char c : seg) {
      const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
                      c == '_' || c == '.';
      if (!ok) return false;
    }
    out.emplace_back(seg);
    if (slash == std::string_view::npos) break;
    target.remove_prefix(slash + 1);
  }
  return true;
}

struct Field {
  const char* name;
  bool* out;
};

// A request body that must be a JSON object: the object, or the error_response to send.
std::variant<json, HttpResponse> parse_json_object(std::string_view content_type, std::string_view body) {
  if (content_type.rfind("application/json", 0) != 0) {
    return error_response(ErrorKind::bad_request, "The request body must be JSON (Content-Type: application/json).",
                          {std::string(content_type)});
  }
  json j = json::parse(body, nullptr, false);
  if (j.is_discarded()) return error_response(ErrorKind::bad_json, "The request body is not valid JSON.");
  if (!j.is_object()) return error_response(ErrorKind::wrong_type, "The request body must be a JSON object.");
  return j;
}

// Parses an action body: empty, or a JSON object whose fields are all known booleans.
std::optional<HttpResponse> parse_flags(std::string_view content_type, std::string_view body,
                                        std::initializer_list<Field> fields) {
  while (!body.empty() &&
         (body.front() == ' ' || body.front() == '\n' || body.front() == '\r' || body.front() == '\t')) {
    body.remove_prefix(1);
  }
  if (body.empty()) return std::nullopt;
  auto parsed = parse_json_object(content_type, body);
  if (auto* bad = std::get_if<HttpResponse>(&parsed)) return std::move(*bad);
  const json& j = std::get<json>(parsed);
  for (auto it = j.begin(); it != j.end(); ++it) {
    const Field* f = nullptr;
    for (const Field& x : fields) {
      if (it.key() == x.name) f = &x;
    }
    if (f == nullptr) {
      return error_response(ErrorKind::unknown_field, "Unknown field '" + it.key() + "' in the request body.",
                            {it.key()});
    }
    if (!it.value().is_boolean()) {
      return error_response(ErrorKind::wrong_type, "Field '" + it.key() + "' must be a boolean.", {it.key()});
    }
    *f->out = it.value().get<bool>();
  }
  return std::nullopt;
}

// A body that must be a JSON object (creating a resource): its fields are checked by whoever
// creates it.
std::optional<HttpResponse> check_json_object(std::string_view content_type, std::string_view body) {
  auto parsed = parse_json_object(content_type, body);
  if (auto* bad = std::get_if<HttpResponse>(&parsed)) return std::move(*bad);
  return std::nullopt;
}

json volume_object(const VolumeView& v) {
  return {
      {"id", v.id},           {"size", v.size_bytes},
      {"access", v.access},   {"exports", v.exports},
      {"backing", v.backing}, {"replication_session_id", v.session_id.empty() ? json(nullptr) : json(v.session_id)}};
}

json ms_time(std::optional<std::int64_t> ms) {
  if (!ms) return nullptr;
  return rfc3339(std::chrono::system_clock::time_point(std::chrono::milliseconds(*ms)));
}

json import_object(const importer::ImportStatus& st) {
  const importer::ImportRecord& r = st.record;
  const bool running = importer::filters_host_io(r.state);
  json j = {
      {"id", r.id},
      {"name", r.name},
      {"state", std::string(importer::to_string(r.state))},
      {"type", "Non_Disruptive"},
      {"source", {{"uri", importer::redact_uri(r.source_uri)}, {"size", r.source_size}}},
      {"volume_id", r.volume_id},
      {"automatic_cutover", r.automatic_cutover},
      {"scheduled_timestamp", ms_time(r.scheduled_ms)},
      {"rate_limit", r.rate_limit},
      {"progress_percentage", st.progress},
      {"estimated_completion_timestamp", ms_time(st.eta_ms)},
      {"average_transfer_rate", st.average_rate ? json(*st.average_rate) : json(nullptr)},
      {"current_transfer_rate", st.current_rate ? json(*st.current_rate) : json(nullptr)},
      {"copied_bytes", r.copied_bytes},
      {"skipped_bytes", r.skipped_bytes},
      {"restart_address", {{"offset", r.restart_address}}},
      {"source_missing_blocks", r.source_missing_blocks},
      {"data_connection_state", !running ? "Not_Applicable" : (st.source_connected ? "Connected" : "Disconnected")},
      {"last_update_timestamp", ms_time(r.last_update_ms)},
      {"error_code", r.error_code.empty() ? json(nullptr) : json(r.error_code)},
      {"error_message", r.error_message.empty() ? json(nullptr) : json(r.error_message)},
  };
  return j;
}

HttpResponse json_response(const json& j) {
  HttpResponse r;
  r.body = dump(j);
  return r;
}

HttpResponse no_content() {
  HttpResponse r;
  r.status = 204;
  r.content_type.clear();
  return r;
}

}  // namespace

std::string_view error_code(ErrorKind k) { return info(k).code; }

std::span<const std::string_view> action_verbs() {
  static constexpr std::string_view kVerbs[] = {
      "pause", "resume", "sync", "failover", "reprotect", "start_failover_test", "stop_failover_test"};
  return kVerbs;
}

std::span<const std::string_view> import_verbs() {
  static constexpr std::string_view kVerbs[] = {"pause", "resume", "cutover", "cancel"};
  return kVerbs;
}

std::string import_json(const importer::ImportStatus& s) { return dump(import_object(s)); }

std::vector<std::string> routes() {
  std::vector<std::string> r = {"GET /metrics",
                                "GET /api/rest/openapi.json",
                                "GET /api/rest/volume",
                                "POST /api/rest/volume",
                                "GET /api/rest/volume/{id}",
                                "DELETE /api/rest/volume/{id}",
                                "GET /api/rest/replication_session",
                                "GET /api/rest/replication_session/{id}"};
  for (const auto verb : action_verbs()) r.push_back("POST /api/rest/replication_session/{id}/" + std::string(verb));
  r.push_back("GET /api/rest/import_session");
  r.push_back("POST /api/rest/import_session");
  r.push_back("GET /api/rest/import_session/{id}");
  r.push_back("DELETE /api/rest/import_session/{id}");
  for (const auto verb : import_verbs()) r.push_back("POST /api/rest/import_session/{id}/" + std::string(verb));
  std::sort(r.begin(), r.end());
  return r;
}

std::variant<ActionRequest, HttpResponse> parse_action(std::string_view verb, std::string_view content_type,
                                                       std::string_view body) {
  const auto verbs = action_verbs();
  if (std::find(verbs.begin(), verbs.end(), verb) == verbs.end()) {
    return error_response(ErrorKind::not_found, "No such action: " + std::string(verb) + ".", {std::string(verb)});
  }
  ActionRequest ar;
  bool planned = true;
  std::optional<HttpResponse> bad;
  // Verbs without a body of their own: at most an empty object.
  static constexpr std::pair<std::string_view, Action> kPlain[] = {{"pause", Action::pause},
                                                                   {"resume", Action::resume},
                                                                   {"sync", Action::sync},
                                                                   {"reprotect", Action::reprotect},
                                                                   {"start_failover_test", Action::start_test}};
  const auto* plain =
      std::find_if(std::begin(kPlain), std::end(kPlain), [&](const auto& p) { return p.first == verb; });
  if (plain != std::end(kPlain)) {
    ar.action = plain->second;
    bad = parse_flags(content_type, body, {});
  } else if (verb == "failover") {
    bad = parse_flags(content_type, body,
                      {{"is_planned", &planned}, {"reverse", &ar.args.reverse}, {"force", &ar.args.force}});
    ar.action = planned ? Action::failover_planned : Action::failover_unplanned;
    if (!bad && !planned && ar.args.reverse) {
      bad = error_response(ErrorKind::bad_request, "reverse applies to a planned failover only.", {"reverse"});
    }
  } else if (verb == "stop_failover_test") {
    ar.action = Action::stop_test;
    bad = parse_flags(content_type, body, {{"force", &ar.args.force}});
  } else {  // unreachable: action_verbs() lists every verb handled above
    return error_response(ErrorKind::internal, "Action " + std::string(verb) + " has no parser.", {std::string(verb)});
  }
  if (bad) return std::move(*bad);
  return ar;
}
unsigned error_status(ErrorKind k) { return info(k).status; }

HttpResponse error_response(ErrorKind k, std::string message, std::vector<std::string> arguments) {
  json m = {{"code", std::string(error_code(k))},
            {"severity", "Error"},
            {"message_l10n", std::move(message)},
            {"arguments", std::move(arguments)}};
  HttpResponse r;
  r.status = error_status(k);
  r.body = dump(json{{"messages", json::array({std::move(m)})}});
  return r;
}

std::string Router::session_json(const replication::Session& s) const {
  return dump(session_object(s, ctx_.node_name));
}

asio::awaitable<HttpResponse> Router::handle(HttpRequest req) {
  std::vector<std::string> p;
  if (!split_path(req.target, p)) co_return error_response(ErrorKind::not_found, "No such resource.", {req.target});
  const bool get = req.method == "GET";
  const bool post = req.method == "POST";
  auto method_not_allowed = [&](const char* allowed) {
    return error_response(ErrorKind::bad_method,
                          "Method " + req.method + " is not allowed on " + req.target + "; use " + allowed + ".",
                          {req.method, allowed});
  };
  if (p.size() == 1 && p[0] == "metrics") {
    if (!get) co_return method_not_allowed("GET");
    HttpResponse r;
    r.content_type = "text/plain; version=0.0.4";
    r.body = metrics();
    co_return r;
  }
  if (p.size() < 3 || p[0] != "api" || p[1] != "rest") {
    co_return error_response(ErrorKind::not_found, "No such resource.", {req.target});
  }
  if (p.size() == 3 && p[2] == "openapi.json") {
    if (!get) co_return method_not_allowed("GET");
    HttpResponse r;
    r.body = std::string(openapi_document());
    co_return r;
  }
  if (p[2] == "volume" && p.size() <= 4) {
    if (p.size() == 3 && post) {
      if (!ctx_.create_volume) co_return method_not_allowed("GET");
      if (auto bad = check_json_object(req.content_type, req.body)) co_return std::move(*bad);
      auto made = co_await ctx_.create_volume(req.body);
      if (auto* r = std::get_if<HttpResponse>(&made)) co_return std::move(*r);
      HttpResponse r = json_response(volume_object(std::get<VolumeView>(made)));
      r.status = 201;
      co_return r;
    }
    if (p.size() == 4 && req.method == "DELETE") {
      if (!ctx_.delete_volume) co_return method_not_allowed("GET");
      auto refused = co_await ctx_.delete_volume(p[3]);
      if (refused) co_return std::move(*refused);
      co_return no_content();
    }
    if (!get) co_return method_not_allowed(p.size() == 3 ? "GET, POST" : "GET, DELETE");
    json all = json::array();
    for (const VolumeView& v : ctx_.volumes()) {
      json j = volume_object(v);
      if (p.size() == 4 && v.id == p[3]) co_return json_response(j);
      all.push_back(std::move(j));
    }
    if (p.size() == 4)
      co_return error_response(ErrorKind::unknown_volume, "Volume " + p[3] + " does not exist.", {p[3]});
    co_return json_response(all);
  }
  if (p[2] == "import_session" && p.size() <= 5 && ctx_.imports) co_return co_await handle_import(req, p);
  if (p[2] != "replication_session" || p.size() > 5) {
    co_return error_response(ErrorKind::not_found, "No such resource.", {req.target});
  }
  const auto sessions = ctx_.sessions();
  if (p.size() == 3) {
    if (!get) co_return method_not_allowed("GET");
    json all = json::array();
    for (const auto* s : sessions) all.push_back(session_object(*s, ctx_.node_name));
    co_return json_response(all);
  }
  replication::Session* session = nullptr;
  for (auto* s : sessions) {
    if (s->id() == p[3]) session = s;
  }
  if (p.size() == 4) {
    if (!get) co_return method_not_allowed("GET");
    if (session == nullptr) {
      co_return error_response(ErrorKind::unknown_session, "Replication session " + p[3] + " does not exist.", {p[3]});
    }
    co_return json_response(session_object(*session, ctx_.node_name));
  }
  // An action.
  auto parsed = parse_action(p[4], req.content_type, req.body);
  if (auto* r = std::get_if<HttpResponse>(&parsed); r != nullptr && r->status == 404) co_return std::move(*r);
  if (!post) co_return method_not_allowed("POST");
  if (session == nullptr) {
    co_return error_response(ErrorKind::unknown_session, "Replication session " + p[3] + " does not exist.", {p[3]});
  }
  if (auto* r = std::get_if<HttpResponse>(&parsed)) co_return std::move(*r);
  const ActionRequest ar = std::get<ActionRequest>(parsed);
  const replication::State before = session->state();
  replication::ActionResult r = co_await session->act(ar.action, ar.args);
  if (r.ok()) co_return no_content();
  const std::string action_arg(replication::action_name(ar.action));
  const std::string state_arg(replication::state_name(before));
  switch (r.verdict) {
    case Verdict::wrong_role:
      co_return error_response(ErrorKind::wrong_role, r.message, {action_arg});
    case Verdict::failed:
      co_return error_response(ErrorKind::failed, r.message, {action_arg, state_arg});
    case Verdict::not_allowed:
    case Verdict::accept:  // (not reached: ok() returned above)
      break;
  }
  co_return error_response(ErrorKind::not_allowed, r.message, {action_arg, state_arg});
}

asio::awaitable<HttpResponse> Router::handle_import(const HttpRequest& req, const std::vector<std::string>& p) {
  const bool get = req.method == "GET";
  auto method_not_allowed = [&](const char* allowed) {
    return error_response(ErrorKind::bad_method,
                          "Method " + req.method + " is not allowed on " + req.target + "; use " + allowed + ".",
                          {req.method, allowed});
  };
  if (p.size() == 3) {
    if (req.method == "POST") {
      if (auto bad = check_json_object(req.content_type, req.body)) co_return std::move(*bad);
      auto made = co_await ctx_.create_import(req.body);
      if (auto* r = std::get_if<HttpResponse>(&made)) co_return std::move(*r);
      HttpResponse r = json_response(import_object(std::get<importer::ImportStatus>(made)));
      r.status = 201;
      co_return r;
    }
    if (!get) co_return method_not_allowed("GET, POST");
    json all = json::array();
    for (const auto& st : ctx_.imports()) all.push_back(import_object(st));
    co_return json_response(all);
  }
  std::optional<importer::ImportStatus> found;
  for (auto& st : ctx_.imports()) {
    if (st.record.id == p[3]) found = std::move(st);
  }
  importer::ImportAction action = importer::ImportAction::remove;
  if (p.size() == 5) {
    const auto verbs = import_verbs();
    if (std::find(verbs.begin(), verbs.end(), p[4]) == verbs.end()) {
      co_return error_response(ErrorKind::not_found, "No such action: " + p[4] + ".", {p[4]});
    }
    if (req.method != "POST") co_return method_not_allowed("POST");
    bool force = false;
    std::optional<HttpResponse> bad;
    if (p[4] == "cancel") {
      bad = parse_flags(req.content_type, req.body, {{"force", &force}});
      action = force ? importer::ImportAction::cancel_force : importer::ImportAction::cancel;
    } else {
      bad = parse_flags(req.content_type, req.body, {});
      action = p[4] == "pause"    ? importer::ImportAction::pause
               : p[4] == "resume" ? importer::ImportAction::resume
                                  : importer::ImportAction::cutover;
    }
    if (!found) {
      co_return error_response(ErrorKind::unknown_import, "Import session " + p[3] + " does not exist.", {p[3]});
    }
    if (bad) co_return std::move(*bad);
  } else {
    if (!get && req.method != "DELETE") co_return method_not_allowed("GET, DELETE");
    if (!found) {
      co_return error_response(ErrorKind::unknown_import, "Import session " + p[3] + " does not exist.", {p[3]});
    }
    if (get) co_return json_response(import_object(*found));
  }
  const std::string verb(importer::to_string(action));
  const std::string state(importer::to_string(found->record.state));
  if (!importer::import_action_allowed(found->record.state, action)) {
    co_return error_response(ErrorKind::import_not_allowed,
                             "Import session " + p[3] + " is " + state + ": " + verb + " is not allowed in that state.",
                             {verb, state});
  }
  auto refused = co_await ctx_.import_action(p[3], action);
  if (refused) co_return std::move(*refused);
  co_return no_content();
}

std::string Router::metrics() const {
  std::string out;
  auto help = [&](const char* name, const char* type, const char* text) {
    out += "# HELP ";
    out += name;
    out += ' ';
    out += text;
    out += "\n# TYPE ";
    out += name;
    out += ' ';
    out += type;
    out += '\n';
  };
  const auto sessions = ctx_.sessions();
  struct Row {
    std::string id;
    replication::SessionStatus st;
  };
  std::vector<Row> rows;
  for (const auto* s : sessions) rows.push_back({s->id(), s->status()});
  auto label = [](const std::string& id) { return "{session=\"" + id + "\"}"; };
  help("tandem_session_state", "gauge", "1 for the session's current state (label state), 0 for the others.");
  for (const auto& r : rows) {
    for (int i = 0; i < replication::kStateCount; ++i) {
      const auto s = static_cast<State>(i);
      out += "tandem_session_state{session=\"" + r.id + "\",state=\"" + std::string(replication::state_name(s)) +
             "\"} " + (s == r.st.state ? "1" : "0") + "\n";
    }
  }
  help("tandem_session_connected", "gauge", "1 while the link to the peer is up (connection state).");
  for (const auto& r : rows)
    out += "tandem_session_connected" + label(r.id) + " " + (r.st.connected ? "1" : "0") + "\n";
  help("tandem_session_lag_bytes", "gauge", "Bytes written at the source and not yet committed at the destination.");
  for (const auto& r : rows)
    out += "tandem_session_lag_bytes" + label(r.id) + " " + std::to_string(r.st.lag_bytes) + "\n";
  help("tandem_session_lag_seconds", "gauge",
       "Age of the last committed cycle (the recovery point), in seconds; -1 before the first.");
  const auto now = std::chrono::system_clock::now();
  for (const auto& r : rows) {
    const double age = r.st.last_sync ? std::chrono::duration<double>(now - *r.st.last_sync).count() : -1.0;
    out += "tandem_session_lag_seconds" + label(r.id) + " " + std::to_string(age) + "\n";
  }
  help("tandem_session_last_cycle_duration_seconds", "gauge", "Duration of the last completed transfer.");
  for (const auto& r : rows) {
    out += "tandem_session_last_cycle_duration_seconds" + label(r.id) + " " +
           std::to_string(static_cast<double>(r.st.last_sync_duration_ms) / 1000.0) + "\n";
  }
  help("tandem_session_shipped_bytes_total", "counter", "Extent bytes sent to the peer.");
  for (const auto& r : rows)
    out += "tandem_session_shipped_bytes_total" + label(r.id) + " " + std::to_string(r.st.bytes_shipped) + "\n";
  help("tandem_session_reshipped_bytes_total", "counter", "Extent bytes sent again after a resume.");
  for (const auto& r : rows) {
    out += "tandem_session_reshipped_bytes_total" + label(r.id) + " " + std::to_string(r.st.bytes_reshipped) + "\n";
  }
  help("tandem_session_resumes_total", "counter", "Transfers resumed from a restart address (the re-ship count).");
  for (const auto& r : rows)
    out += "tandem_session_resumes_total" + label(r.id) + " " + std::to_string(r.st.resumes) + "\n";
  if (ctx_.extra_metrics) out += ctx_.extra_metrics();
  return out;
}

}  // namespace tandem::api

// tandemctl: the command line of tandem's control API (docs/api.md). It speaks HTTP/1.1 to
// tandemd's Unix socket, prints tables for people and JSON for scripts (--json), and exits
// non-zero with the daemon's message when an action is refused.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>

#include "tandem/common/units.h"

namespace {

namespace asio = boost::asio;
namespace http = boost::beast::http;
using json = nlohmann::json;
using local = asio::local::stream_protocol;

struct Reply {
  unsigned status = 0;
  std::string body;
};

// Exit codes: 0 done, 1 refused or failed (the daemon said why), 2 usage, 3 cannot reach tandemd.
constexpr int kRefused = 1;
constexpr int kUnreachable = 3;

std::optional<Reply> call(const std::string& socket, const std::string& method, const std::string& path,
                          const std::string& body, std::string& err) {
  try {
    asio::io_context ctx;
    local::socket s(ctx);
    s.connect(local::endpoint(socket));
    http::request<http::string_body> req{http::string_to_verb(method), path, 11};
    req.set(http::field::host, "tandemd");
    req.set(http::field::user_agent, "tandemctl");
    if (!body.empty()) {
      req.set(http::field::content_type, "application/json");
      req.body() = body;
    }
    req.prepare_payload();
    http::write(s, req);
    boost::beast::flat_buffer buf;
    http::response<http::string_body> res;
    http::read(s, buf, res);
    boost::system::error_code ec;
    s.shutdown(local::socket::shutdown_both, ec);
    return Reply{res.result_int(), res.body()};
  } catch (const boost::system::system_error& e) {
    err = "cannot reach tandemd at " + socket + ": " + e.code().message();  // without Boost's source location
    return std::nullopt;
  } catch (const std::exception& e) {
    err = "cannot reach tandemd at " + socket + ": " + e.what();
    return std::nullopt;
  }
}

std::string message_of(const Reply& r) {
  auto j = json::parse(r.body, nullptr, false);
  if (!j.is_discarded() && j.contains("messages") && j["messages"].is_array() && !j["messages"].empty()) {
    return j["messages"][0].value("message_l10n", std::string("(no message)"));
  }
  return "HTTP " + std::to_string(r.status);
}

std::string str(const json& j, const char* key) {
  if (!j.contains(key) || j[key].is_null()) return "-";
  if (j[key].is_string()) return j[key].get<std::string>();
  return j[key].dump();
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  char out[32];
  std::snprintf(out, sizeof out, u == 0 ? "%.0f %s" : "%.1f %s", b, units[u]);
  return out;
}

void print_table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<std::size_t> w;
  for (const auto& r : rows) {
    for (std::size_t i = 0; i < r.size(); ++i) {
      if (w.size() <= i) w.push_back(0);
      w[i] = std::max(w[i], r[i].size());
    }
  }
  for (const auto& r : rows) {
    std::string line;
    for (std::size_t i = 0; i < r.size(); ++i) {
      line += r[i];
      if (i + 1 < r.size()) line += std::string(w[i] - r[i].size() + 2, ' ');
    }
    std::cout << line << "\n";
  }
}

void print_sessions(const json& list) {
  std::vector<std::vector<std::string>> rows = {
      {"ID", "ROLE", "STATE", "PEER", "TRANSFER", "CONNECTION", "LAG", "LAST SYNC", "PROGRESS"}};
  for (const auto& s : list) {
    std::string state = str(s, "state");
    if (s.value("local_only_paused", false)) state += " (this site only)";
    const std::string progress = s["progress_percentage"].is_null() ? "-" : str(s, "progress_percentage") + "%";
    rows.push_back({str(s, "id"), str(s, "role"), state, str(s, "remote_system"), str(s, "data_transfer_state"),
                    str(s, "data_connection_state"), human_bytes(s.value("lag_bytes", 0.0)),
                    str(s, "last_sync_timestamp"), progress});
  }
  print_table(rows);
}

void print_session(const json& s) {
  std::vector<std::vector<std::string>> rows;
  for (const char* k : {"id",
                        "resource_type",
                        "role",
                        "state",
                        "local_only_paused",
                        "remote_system",
                        "data_transfer_state",
                        "data_connection_state",
                        "failover_test_in_progress",
                        "progress_percentage",
                        "estimated_completion_timestamp",
                        "last_sync_timestamp",
                        "last_sync_duration",
                        "next_sync_timestamp",
                        "rpo_seconds",
                        "restart_address",
                        "lag_bytes",
                        "diverged_blocks",
                        "error_code",
                        "error_message"}) {
    rows.push_back({std::string(k) + ":", str(s, k)});
  }
  std::string pairs;
  for (const auto& p : s["storage_element_pairs"]) {
    pairs += (pairs.empty() ? "" : ", ") + str(p, "local_id") + " -> " + str(p, "remote_id");
  }
  rows.push_back({"volumes:", pairs});
  print_table(rows);
}

void print_volumes(const json& list) {
  std::vector<std::vector<std::string>> rows = {{"ID", "SIZE", "ACCESS", "SESSION", "BACKING", "EXPORT"}};
  for (const auto& v : list) {
    rows.push_back({str(v, "id"), human_bytes(v.value("size", 0.0)), str(v, "access"), str(v, "replication_session_id"),
                    str(v, "backing"), v["exports"].empty() ? "-" : v["exports"][0].get<std::string>()});
  }
  print_table(rows);
}

// "1m05s", "42s".
std::string eta_text(double seconds) {
  const auto left = static_cast<long>(seconds + 0.5);
  return left >= 60 ? std::to_string(left / 60) + "m" + (left % 60 < 10 ? "0" : "") + std::to_string(left % 60) + "s"
                    : std::to_string(left) + "s";
}

// " [#####.....]  42%  12.5 MiB/s  ETA 1m05s" on a terminal, " 42% (ETA 1m05s)" otherwise.
std::string progress_text(bool tty, long pct, double rate, const std::string& eta) {
  char buf[160];
  if (tty) {
    std::string bar(static_cast<std::size_t>(std::clamp(pct, 0L, 100L) * 30 / 100), '#');
    bar.resize(30, '.');
    std::snprintf(buf, sizeof buf, " [%s] %3ld%%  %.1f MiB/s  ETA %s", bar.c_str(), pct, rate / (1024.0 * 1024.0),
                  eta.c_str());
  } else {
    std::snprintf(buf, sizeof buf, " %ld%% (ETA %s)", pct, eta.c_str());
  }
  return buf;
}

void print_imports(const json& list) {
  std::vector<std::vector<std::string>> rows = {
      {"ID", "NAME", "STATE", "VOLUME", "SOURCE", "PROGRESS", "COPIED", "SKIPPED", "SOURCE LINK"}};
  for (const auto& i : list) {
    char pct[16];
    std::snprintf(pct, sizeof pct, "%.1f%%", i.value("progress_percentage", 0.0));
    rows.push_back({str(i, "id"), str(i, "name"), str(i, "state"), str(i, "volume_id"), str(i["source"], "uri"), pct,
                    human_bytes(i.value("copied_bytes", 0.0)), human_bytes(i.value("skipped_bytes", 0.0)),
                    str(i, "data_connection_state")});
  }
  print_table(rows);
}

void print_import(const json& i) {
  std::vector<std::vector<std::string>> rows;
  for (const char* k : {"id", "name", "state", "volume_id", "automatic_cutover", "scheduled_timestamp", "rate_limit",
                        "progress_percentage", "estimated_completion_timestamp", "average_transfer_rate",
                        "current_transfer_rate", "copied_bytes", "skipped_bytes", "source_missing_blocks",
                        "data_connection_state", "last_update_timestamp", "error_code", "error_message"}) {
    rows.push_back({std::string(k) + ":", str(i, k)});
  }
  rows.insert(rows.begin() + 4,
              {"source:", str(i["source"], "uri") + " (" + human_bytes(i["source"].value("size", 0.0)) + ")"});
  rows.push_back({"restart_address:", str(i["restart_address"], "offset")});
  print_table(rows);
}

// Polls an import until it reaches `target` (or a state that means it never will), drawing its
// copy's progress: percentage, the copy's rate and the time left at the pace the restart
// address moves.
int wait_import(const std::string& socket, const std::string& id, const std::string& target, int timeout_s) {
  const bool tty = ::isatty(STDOUT_FILENO) != 0;
  const auto start = std::chrono::steady_clock::now();
  std::string last_line;
  std::optional<std::pair<std::chrono::steady_clock::time_point, double>> first;
  for (;;) {
    std::string err;
    auto r = call(socket, "GET", "/api/rest/import_session/" + id, "", err);
    if (!r) {
      std::cerr << "\ntandemctl: " << err << "\n";
      return kUnreachable;
    }
    if (r->status != 200) {
      std::cerr << "\ntandemctl: " << message_of(*r) << "\n";
      return kRefused;
    }
    const json i = json::parse(r->body);
    const std::string st = str(i, "state");
    if (st == target || (target == "Ready_For_Cutover" && st == "Import_Completed")) {
      if (tty) std::cout << "\r\033[K";
      std::cout << "import " << id << ": " << st << "\n";
      return 0;
    }
    if (st == "Cancel_Failed" || st == "Failed" || (st == "Cancelled" && target != "Cancelled")) {
      std::cerr << (tty ? "\n" : "") << "tandemctl: import " << id << " is " << st << ": " << str(i, "error_message")
                << "\n";
      return kRefused;
    }
    const auto now = std::chrono::steady_clock::now();
    std::string line = "import " + id + ": " + st;
    if (st == "Copy_In_Progress") {
      const double size = i["source"].value("size", 0.0);
      const double at = i["restart_address"].value("offset", 0.0);
      if (!first || at < first->second) first = {now, at};
      const double secs = std::chrono::duration<double>(now - first->first).count();
      const double pace = secs > 0.5 ? (at - first->second) / secs : 0;
      const double rate = i["current_transfer_rate"].is_number() ? i["current_transfer_rate"].get<double>() : 0;
      line += progress_text(tty, static_cast<long>(i.value("progress_percentage", 0.0)), rate,
                            pace > 0 ? eta_text((size - at) / pace) : "-");
    }
    if (st == "Paused" || !str(i, "error_message").empty()) {
      if (i["error_message"].is_string()) line += " (" + i["error_message"].get<std::string>() + ")";
    }
    if (tty) {
      std::cout << "\r\033[K" << line << std::flush;
    } else if (line != last_line) {
      std::cout << line << "\n" << std::flush;
    }
    last_line = line;
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(timeout_s)) {
      std::cerr << (tty ? "\n" : "") << "tandemctl: still not " << target << " after " << timeout_s << " s (state "
                << st << ")\n";
      return kRefused;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(tty ? 200 : 500));
  }
}

// Polls the session until `done` says so (or an error state), drawing progress: a bar with
// percentage, rate and ETA on a terminal, a plain line per change otherwise.
int wait_for(const std::string& socket, const std::string& id, const std::string& what,
             const std::function<bool(const json&)>& done, int timeout_s) {
  const bool tty = ::isatty(STDOUT_FILENO) != 0;
  const auto start = std::chrono::steady_clock::now();
  std::string last_line;
  std::optional<std::pair<std::chrono::steady_clock::time_point, double>> first_sample;
  for (;;) {
    std::string err;
    auto r = call(socket, "GET", "/api/rest/replication_session/" + id, "", err);
    if (!r) {
      std::cerr << "\ntandemctl: " << err << "\n";
      return kUnreachable;
    }
    if (r->status != 200) {
      std::cerr << "\ntandemctl: " << message_of(*r) << "\n";
      return kRefused;
    }
    const json s = json::parse(r->body);
    if (done(s)) {
      if (tty) std::cout << "\r\033[K";
      std::cout << what << ": done, " << str(s, "state") << " (" << str(s, "role") << ")\n";
      return 0;
    }
    if (s.value("state", "") == "Error") {
      std::cerr << (tty ? "\n" : "") << "tandemctl: session " << id << " is in Error: " << str(s, "error_message")
                << "\n";
      return kRefused;
    }
    const auto now = std::chrono::steady_clock::now();
    std::string line = what + ": " + str(s, "state");
    if (!s["progress_percentage"].is_null()) {
      const long pct = s["progress_percentage"].get<long>();
      const double done_bytes = s.value("transfer_bytes_done", 0.0);
      // A new transfer (less done than before) starts a new rate measurement.
      if (!first_sample || done_bytes < first_sample->second) first_sample = {now, done_bytes};
      const double secs = std::chrono::duration<double>(now - first_sample->first).count();
      const double rate = secs > 0.2 ? (done_bytes - first_sample->second) / secs : 0;  // bytes/s
      const double total = s.value("transfer_bytes_total", 0.0);
      // Time left at the rate seen so far ("-" until there is one).
      const std::string eta = rate > 0 && total >= done_bytes ? eta_text((total - done_bytes) / rate) : "-";
      line += progress_text(tty, pct, rate, eta);
    }
    if (tty) {
      std::cout << "\r\033[K" << line << std::flush;
    } else if (line != last_line) {
      std::cout << line << "\n" << std::flush;
    }
    last_line = line;
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(timeout_s)) {
      std::cerr << (tty ? "\n" : "") << "tandemctl: still not done after " << timeout_s << " s (state "
                << str(s, "state") << ")\n";
      return kRefused;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(tty ? 200 : 500));
  }
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tandemctl — drive tandemd's replication sessions (the control API, docs/api.md)."};
  app.require_subcommand(1);
  // --socket, --json and --timeout may come after the subcommands too.
  app.fallthrough();
  std::string socket = "/run/tandem/api.sock";
  bool as_json = false;
  int timeout_s = 3600;
  app.add_option("-s,--socket", socket, "tandemd's API socket")->capture_default_str()->envname("TANDEM_API_SOCKET");
  app.add_flag("--json", as_json, "print the daemon's JSON instead of tables");
  app.add_option("--timeout", timeout_s, "with --wait: give up after this many seconds")->capture_default_str();

  auto* session = app.add_subcommand("session", "replication sessions");
  session->require_subcommand(1);
  std::string id;
  bool wait = false, unplanned = false, reverse = false, force = false;
  session->add_subcommand("list", "every session on this node");
  auto* show = session->add_subcommand("show", "one session in full");
  show->add_option("id", id, "session id")->required();
  auto action = [&](const char* name, const char* help) {
    auto* c = session->add_subcommand(name, help);
    c->add_option("id", id, "session id")->required();
    return c;
  };
  action("pause", "pause both sites (this site only if the peer is unreachable)");
  action("resume", "resume a paused session");
  action("sync", "start a synchronization cycle now (source)")->add_flag("--wait", wait, "wait until it is done");
  auto* fo = action("failover",
                    "planned failover (on the source) or, with --unplanned, disaster recovery (on "
                    "the destination)");
  fo->add_flag("--unplanned", unplanned, "the source is lost: promote this destination from its last committed cycle");
  fo->add_flag("--reverse", reverse, "planned: go on into reprotect (replicate in the new direction)");
  fo->add_flag("--force", force, "unplanned: repeat on a session already Failed_Over, or promote an Initializing one");
  fo->add_flag("--wait", wait, "wait until the roles have swapped");
  action("reprotect", "after a failover, on the new source: resynchronize what differs and replicate")
      ->add_flag("--wait", wait, "wait until the session is OK");
  action("test-start", "destination: start a failover test (writable point-in-time image)");
  action("test-stop", "destination: stop the failover test, discarding its writes")
      ->add_flag("--force", force, "even if the peer is unreachable");
  auto* volume = app.add_subcommand("volume", "local volumes");
  volume->require_subcommand(1);
  volume->add_subcommand("list", "every volume on this node");
  auto* vshow = volume->add_subcommand("show", "one volume");
  vshow->add_option("id", id, "volume id")->required();
  std::string vpath, vsize, vsocket, vlisten;
  auto* vcreate = volume->add_subcommand("create", "open (or create) a volume and export it, without a restart");
  vcreate->add_option("id", id, "volume id")->required();
  vcreate->add_option("--path", vpath, "the block device or file (absolute)")->required();
  vcreate->add_option("--size", vsize, "create the file with this size (\"20GiB\"); without it, it must exist");
  vcreate->add_option("--nbd-socket", vsocket, "Unix socket of the NBD export");
  vcreate->add_option("--nbd-listen", vlisten, "host:port of the NBD export over TCP");
  auto* vdelete = volume->add_subcommand("delete", "withdraw a volume created at run time (its data stays)");
  vdelete->add_option("id", id, "volume id")->required();
  auto* import = app.add_subcommand("import", "import sessions: move a volume from foreign storage into tandem");
  import->require_subcommand(1);
  std::string iname, isource, ivolume, ipath, isocket, ilisten, iat, irate;
  bool iauto = false;
  import->add_subcommand("list", "every import on this node");
  auto* icreate = import->add_subcommand(
      "create", "import a volume from an NBD server (URI) or a local file/device while the host uses it");
  icreate->add_option("name", iname, "a name for the import")->required();
  icreate
      ->add_option("--source", isource, "nbd://host:port/export, nbds://..., nbd+unix:///export?socket=..., or a path")
      ->required();
  icreate->add_option("--volume", ivolume, "the tandem volume to fill: a new id (with --path), or an existing volume")
      ->required();
  icreate->add_option("--path", ipath, "backing file or device of a new volume (it gets the source's size)");
  icreate->add_option("--nbd-socket", isocket, "Unix socket to export the new volume on");
  icreate->add_option("--nbd-listen", ilisten, "host:port to export the new volume on");
  icreate->add_flag("--automatic-cutover", iauto, "cut over as soon as everything is copied");
  icreate->add_option("--at", iat, "start the copy at this UTC time (2026-12-02T22:00:00Z)");
  icreate->add_option("--rate-limit", irate, "bytes per second for the background copy (e.g. 100MiB); 0: unlimited");
  icreate->add_flag("--wait", wait, "wait until everything is copied, drawing progress");
  auto* ishow = import->add_subcommand("show", "one import in full");
  ishow->add_option("id", id, "import id")->required();
  auto iverb = [&](const char* name, const char* help) {
    auto* c = import->add_subcommand(name, help);
    c->add_option("id", id, "import id")->required();
    return c;
  };
  iverb("pause", "stop the background copy (host I/O goes on)");
  iverb("resume", "go on copying from the restart address")
      ->add_flag("--wait", wait, "wait until everything is copied");
  iverb("cutover", "detach the source: the volume is an ordinary tandem volume")
      ->add_flag("--wait", wait, "wait until the import is complete");
  auto* icancel = iverb("cancel", "give the import up; the host goes back to the source");
  icancel->add_flag("--force", force, "do not bring the source up to date first");
  icancel->add_flag("--wait", wait, "wait until it is cancelled");
  iverb("delete", "forget a finished import");
  std::string wait_state = "OK";
  auto* wt =
      session->add_subcommand("wait",
                              "wait until the session reaches a state (default OK), drawing the progress of a running "
                              "transfer: the way to follow an initial sync, which cannot be asked for with sync");
  wt->add_option("id", id, "session id")->required();
  wt->add_option("--state", wait_state, "the state to wait for")->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints help, or the error and a hint
    return rc == 0 ? 0 : 2;      // every usage error exits 2
  }

  std::string err;
  auto get = [&](const std::string& path) -> std::optional<json> {
    auto r = call(socket, "GET", path, "", err);
    if (!r) {
      std::cerr << "tandemctl: " << err << "\n";
      return std::nullopt;
    }
    if (r->status != 200) {
      std::cerr << "tandemctl: " << message_of(*r) << "\n";
      return std::nullopt;
    }
    return json::parse(r->body, nullptr, false);
  };
  if (vcreate->parsed() || vdelete->parsed()) {
    json body = json::object();
    if (vcreate->parsed()) {
      body = {{"id", id}, {"path", vpath}};
      if (!vsize.empty()) body["size"] = vsize;
      if (!vsocket.empty()) body["nbd_socket"] = vsocket;
      if (!vlisten.empty()) body["nbd_listen"] = vlisten;
    }
    auto r = vcreate->parsed() ? call(socket, "POST", "/api/rest/volume", body.dump(), err)
                               : call(socket, "DELETE", "/api/rest/volume/" + id, "", err);
    if (!r) {
      std::cerr << "tandemctl: " << err << "\n";
      return kUnreachable;
    }
    if (r->status != 201 && r->status != 204) {
      if (as_json) std::cout << r->body << "\n";
      std::cerr << "tandemctl: " << message_of(*r) << "\n";
      return kRefused;
    }
    if (as_json && r->status == 201) {
      std::cout << json::parse(r->body, nullptr, false).dump(2) << "\n";
    } else if (r->status == 201) {
      print_volumes(json::array({json::parse(r->body, nullptr, false)}));
    } else if (!as_json) {
      std::cout << "volume " << id << ": removed (its data stays)\n";
    }
    return 0;
  }
  if (volume->parsed()) {
    const bool one = vshow->parsed();
    auto j = get(one ? "/api/rest/volume/" + id : "/api/rest/volume");
    if (!j) return err.empty() ? kRefused : kUnreachable;
    if (as_json) {
      std::cout << j->dump(2) << "\n";
    } else {
      print_volumes(one ? json::array({*j}) : *j);
    }
    return 0;
  }
  if (import->parsed()) {
    auto* isub = import->get_subcommands()[0];
    const std::string iv = isub->get_name();
    if (iv == "list" || iv == "show") {
      auto j = get(iv == "list" ? "/api/rest/import_session" : "/api/rest/import_session/" + id);
      if (!j) return err.empty() ? kRefused : kUnreachable;
      if (as_json) {
        std::cout << j->dump(2) << "\n";
      } else if (iv == "list") {
        print_imports(*j);
      } else {
        print_import(*j);
      }
      return 0;
    }
    std::optional<Reply> r;
    if (iv == "create") {
      json vol = {{"id", ivolume}};
      if (!ipath.empty()) vol["path"] = ipath;
      if (!isocket.empty()) vol["nbd_socket"] = isocket;
      if (!ilisten.empty()) vol["nbd_listen"] = ilisten;
      json body = {{"name", iname}, {"source", {{"uri", isource}}}, {"volume", vol}, {"automatic_cutover", iauto}};
      if (!iat.empty()) body["scheduled_timestamp"] = iat;
      if (!irate.empty()) {
        auto bytes = irate == "0" ? std::optional<std::uint64_t>(0) : tandem::parse_bytes(irate);
        if (!bytes) {
          std::cerr << "tandemctl: --rate-limit: \"" << irate << "\" is not a size (100MiB, 1G, 4096)\n";
          return 2;
        }
        body["rate_limit"] = *bytes;
      }
      r = call(socket, "POST", "/api/rest/import_session", body.dump(), err);
    } else if (iv == "delete") {
      r = call(socket, "DELETE", "/api/rest/import_session/" + id, "", err);
    } else {
      const std::string b = iv == "cancel" && force ? R"({"force": true})" : "";
      r = call(socket, "POST", "/api/rest/import_session/" + id + "/" + iv, b, err);
    }
    if (!r) {
      std::cerr << "tandemctl: " << err << "\n";
      return kUnreachable;
    }
    if (r->status != 201 && r->status != 204) {
      if (as_json) std::cout << r->body << "\n";
      std::cerr << "tandemctl: " << message_of(*r) << "\n";
      return kRefused;
    }
    if (iv == "create") {
      const json made = json::parse(r->body, nullptr, false);
      id = str(made, "id");
      if (as_json) {
        std::cout << made.dump(2) << "\n";
      } else {
        print_imports(json::array({made}));
      }
    } else if (!as_json) {
      std::cout << "import " << id << ": " << iv << " done\n";
    }
    if (!wait) return 0;
    const std::string target = iv == "cutover"  ? "Import_Completed"
                               : iv == "cancel" ? "Cancelled"
                                                : "Ready_For_Cutover";
    return wait_import(socket, id, target, timeout_s);
  }
  auto* sub = session->get_subcommands()[0];
  const std::string verb = sub->get_name();
  if (verb == "list" || verb == "show") {
    auto j = get(verb == "list" ? "/api/rest/replication_session" : "/api/rest/replication_session/" + id);
    if (!j) return err.empty() ? kRefused : kUnreachable;
    if (as_json) {
      std::cout << j->dump(2) << "\n";
    } else if (verb == "list") {
      print_sessions(*j);
    } else {
      print_session(*j);
    }
    return 0;
  }
  if (verb == "wait") {
    return wait_for(
        socket, id, "wait for " + wait_state,
        [&](const json& s) { return s.value("state", "") == wait_state && s["progress_percentage"].is_null(); },
        timeout_s);
  }
  std::string api_verb = verb;
  json body = json::object();
  if (verb == "test-start") api_verb = "start_failover_test";
  if (verb == "test-stop") {
    api_verb = "stop_failover_test";
    if (force) body["force"] = true;
  }
  if (verb == "failover") {
    body["is_planned"] = !unplanned;
    if (reverse) body["reverse"] = true;
    if (force) body["force"] = true;
  }
  // Before the action: what "done" means for --wait.
  std::string before_sync;
  if (wait && verb == "sync") {
    auto j = get("/api/rest/replication_session/" + id);
    if (!j) return err.empty() ? kRefused : kUnreachable;
    before_sync = str(*j, "last_sync_timestamp");
  }
  auto r = call(socket, "POST", "/api/rest/replication_session/" + id + "/" + api_verb,
                body.empty() ? std::string() : body.dump(), err);
  if (!r) {
    std::cerr << "tandemctl: " << err << "\n";
    return kUnreachable;
  }
  if (r->status != 204) {
    if (as_json) std::cout << r->body << "\n";
    std::cerr << "tandemctl: " << message_of(*r) << "\n";
    return kRefused;
  }
  if (!as_json) std::cout << "session " << id << ": " << verb << " accepted\n";
  if (!wait) return 0;
  if (verb == "sync") {
    // Done when a synchronization has completed since (a newer last sync, back to OK).
    const auto t0 = std::chrono::system_clock::now();
    (void)t0;
    return wait_for(
        socket, id, "sync",
        [&](const json& s) {
          return s.value("state", "") == "OK" && str(s, "last_sync_timestamp") != before_sync &&
                 s["progress_percentage"].is_null();
        },
        timeout_s);
  }
  if (verb == "failover") {
    return wait_for(
        socket, id, "failover",
        [&](const json& s) {
          const std::string st = s.value("state", "");
          return reverse ? (st == "OK" && s.value("role", "") == "Destination") : st == "Failed_Over";
        },
        timeout_s);
  }
  return wait_for(
      socket, id, "reprotect", [](const json& s) { return s.value("state", "") == "OK"; }, timeout_s);
}

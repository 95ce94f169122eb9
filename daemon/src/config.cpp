#include "tandem/daemon/config.h"

#include <fmt/format.h>
#include <sys/stat.h>
#include <toml++/toml.h>

#include <cerrno>
#include <climits>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "tandem/common/endpoint.h"
#include "tandem/common/units.h"

namespace tandem::daemon {
namespace {

Error config_error(const std::string& msg) { return Error(std::make_error_code(std::errc::invalid_argument), msg); }

bool valid_id(std::string_view s) {
  if (s.empty() || s.size() > 64) return false;
  for (char c : s) {
    const bool ok =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
    if (!ok) return false;
  }
  return s != "." && s != "..";
}

// A "host:port" value as written and as parsed.
struct EndpointText {
  std::string text;
  Endpoint endpoint;
};

class Reader {
 public:
  Reader(const toml::table& t, std::string where) : t_(t), where_(std::move(where)) {}

  // Reports keys not in `known`.
  Status only(std::initializer_list<std::string_view> known) const {
    for (auto& [k, v] : t_) {
      bool found = false;
      for (auto kk : known) found = found || kk == k.str();
      if (!found) {
        return config_error(where_ + ": unknown key '" + std::string(k.str()) + "'" + at(v));
      }
    }
    return {};
  }

  Result<std::optional<std::string>> str(std::string_view key) const {
    const toml::node* n = t_.get(key);
    if (n == nullptr) return std::optional<std::string>{};
    if (!n->is_string()) return config_error(name(key) + ": must be a string" + at(*n));
    return std::optional<std::string>(n->as_string()->get());
  }

  Result<std::optional<std::uint64_t>> bytes(std::string_view key) const {
    const toml::node* n = t_.get(key);
    if (n == nullptr) return std::optional<std::uint64_t>{};
    if (n->is_integer()) {
      const auto v = n->as_integer()->get();
      if (v < 0) return config_error(name(key) + ": must not be negative" + at(*n));
      return std::optional<std::uint64_t>(static_cast<std::uint64_t>(v));
    }
    if (!n->is_string()) return config_error(name(key) + ": must be a size like \"1GiB\"" + at(*n));
    const std::string& s = n->as_string()->get();
    auto v = parse_bytes(s);
    if (!v) return config_error(name(key) + ": \"" + s + "\" is not a size (try \"512MiB\" or \"1GiB\")" + at(*n));
    return std::optional<std::uint64_t>(*v);
  }

  // A "host:port" or "[v6]:port" string (parse_endpoint).
  Result<std::optional<EndpointText>> endpoint(std::string_view key, EndpointUse use) const {
    const toml::node* n = t_.get(key);
    if (n == nullptr) return std::optional<EndpointText>{};
    if (!n->is_string()) return config_error(name(key) + ": must be a string like \"host:port\"" + at(*n));
    const std::string& s = n->as_string()->get();
    auto ep = parse_endpoint(s, use);
    if (!ep) return config_error(name(key) + ": \"" + s + "\" is not host:port (" + ep.error().context + ")" + at(*n));
    return std::optional<EndpointText>(EndpointText{s, std::move(ep).value()});
  }

  Result<std::optional<std::int64_t>> integer(std::string_view key) const {
    const toml::node* n = t_.get(key);
    if (n == nullptr) return std::optional<std::int64_t>{};
    if (!n->is_integer()) return config_error(name(key) + ": must be an integer" + at(*n));
    return std::optional<std::int64_t>(n->as_integer()->get());
  }

  std::string name(std::string_view key) const { return where_ + "." + std::string(key); }
  std::string at(const toml::node& n) const {
    const auto& src = n.source();
    if (src.begin.line == 0) return {};
    return " (line " + std::to_string(src.begin.line) + ")";
  }

 private:
  const toml::table& t_;
  std::string where_;
};

#define CFG_TRY_ASSIGN(var, expr)            \
  auto var##_r = (expr);                     \
  if (!var##_r.ok()) return var##_r.error(); \
  auto var = std::move(var##_r).value()

// TOML text, or an error naming the file, line and column.
Result<toml::table> parse_toml(std::string_view text, const std::string& src) {
  try {
    return toml::parse(text, src);
  } catch (const toml::parse_error& e) {
    std::ostringstream os;
    os << src << ":" << e.source().begin.line << ":" << e.source().begin.column << ": " << e.description();
    return config_error(os.str());
  }
}

// One [[volume]] table (of the config file, of the run-time volumes' file, or of an API
// request), checked against the volumes already known (`others`): ids, paths, metadata files,
// sockets and ports are each used once.
Result<VolumeConfig> parse_volume(const toml::table& t, std::string where, const std::string& state_dir,
                                  const std::vector<VolumeConfig>& others) {
  Reader pre(t, where);
  CFG_TRY_ASSIGN(id, pre.str("id"));
  if (!id) return config_error(where + ": id is required");
  if (!valid_id(*id))
    return config_error(where + ": id \"" + *id + "\": use letters, digits, '-', '_' and '.' (at most 64)");
  where += " (" + *id + ")";
  Reader r(t, where);
  TANDEM_TRY(r.only(
      {"id", "path", "size", "meta_path", "nbd_socket", "nbd_listen", "intent_region_size", "intent_regions_max"}));
  const auto used = [&others](auto field, const std::string& value) {
    return std::any_of(others.begin(), others.end(), [&](const VolumeConfig& o) { return field(o) == value; });
  };
  VolumeConfig v;
  v.id = *id;
  if (used([](const VolumeConfig& o) { return o.id; }, v.id)) return config_error(where + ": duplicate volume id");
  CFG_TRY_ASSIGN(path, r.str("path"));
  if (!path || path->empty() || path->front() != '/') {
    return config_error(where + ".path: an absolute path to a block device or file is required");
  }
  v.path = *path;
  if (used([](const VolumeConfig& o) { return o.path; }, v.path))
    return config_error(where + ".path: used by another volume");
  CFG_TRY_ASSIGN(size, r.bytes("size"));
  if (size) {
    if (*size == 0 || *size % 4096 != 0) {
      return config_error(where + ".size: must be a non-zero multiple of 4096 bytes");
    }
    v.size_bytes = *size;
  }
  CFG_TRY_ASSIGN(meta, r.str("meta_path"));
  v.meta_path = meta ? *meta : state_dir + "/" + v.id + ".meta";
  if (v.meta_path.empty() || v.meta_path.front() != '/')
    return config_error(where + ".meta_path: must be an absolute path");
  if (v.meta_path == v.path) return config_error(where + ".meta_path: must differ from path");
  if (used([](const VolumeConfig& o) { return o.meta_path; }, v.meta_path))
    return config_error(where + ".meta_path: used by another volume");
  CFG_TRY_ASSIGN(sock, r.str("nbd_socket"));
  if (sock) {
    if (sock->empty() || sock->front() != '/') return config_error(where + ".nbd_socket: must be an absolute path");
    if (sock->size() >= 108) return config_error(where + ".nbd_socket: longer than a Unix socket path may be (107)");
    if (*sock == v.path || *sock == v.meta_path)
      return config_error(where + ".nbd_socket: must differ from path and meta_path");
    if (used([](const VolumeConfig& o) { return o.nbd_socket; }, *sock))
      return config_error(where + ".nbd_socket: used by another volume");
    v.nbd_socket = *sock;
  }
  CFG_TRY_ASSIGN(listen, r.endpoint("nbd_listen", EndpointUse::listen));
  if (listen) {
    // Port 0 asks for a free port, so any number of volumes may ask for it.
    const std::string mine = listen->endpoint.to_string();
    const auto same = [&mine](const VolumeConfig& o) {
      if (o.nbd_listen.empty()) return false;
      auto ep = parse_endpoint(o.nbd_listen, EndpointUse::listen);
      return ep && ep->port != 0 && ep->to_string() == mine;
    };
    if (listen->endpoint.port != 0 && std::any_of(others.begin(), others.end(), same)) {
      return config_error(where + ".nbd_listen: used by another volume");
    }
    v.nbd_listen = listen->text;
  }
  if (v.nbd_socket.empty() && v.nbd_listen.empty()) {
    return config_error(where + ": needs nbd_socket or nbd_listen (how hosts reach the volume)");
  }
  CFG_TRY_ASSIGN(region, r.bytes("intent_region_size"));
  if (region) {
    if (*region < 4096 || *region > (1u << 30) || (*region & (*region - 1)) != 0) {
      return config_error(where + ".intent_region_size: must be a power of two from 4KiB to 1GiB");
    }
    v.intent_region_bytes = static_cast<std::uint32_t>(*region);
  }
  CFG_TRY_ASSIGN(hot, r.integer("intent_regions_max"));
  if (hot) {
    if (*hot < 1 || *hot > 8000) return config_error(where + ".intent_regions_max: must be from 1 to 8000");
    v.intent_regions_max = static_cast<std::uint32_t>(*hot);
  }
  return v;
}

}  // namespace

Result<Config> parse_config(std::string_view text, std::string_view source) {
  Config cfg;
  cfg.source = std::string(source);
  const std::string src(source);
  auto parsed = parse_toml(text, src);
  if (!parsed) return parsed.error();
  toml::table root = std::move(parsed).value();
  for (auto& [k, v] : root) {
    const std::string key(k.str());
    if (key != "node" && key != "volume" && key != "tls" && key != "peer" && key != "session") {
      return config_error(src + ": unknown section '" + key + "'");
    }
  }
  const toml::node* node = root.get("node");
  if (node == nullptr || !node->is_table()) return config_error(src + ": missing [node] section");
  {
    Reader r(*node->as_table(), src + ": node");
    TANDEM_TRY(r.only({"name", "state_dir", "log_level", "api_socket", "api_socket_group", "api_listen", "api_token",
                       "max_concurrent_imports"}));
    CFG_TRY_ASSIGN(imports_max, r.integer("max_concurrent_imports"));
    if (imports_max) {
      if (*imports_max < 1 || *imports_max > 64) {
        return config_error(src + ": node.max_concurrent_imports must be between 1 and 64");
      }
      cfg.node.max_concurrent_imports = static_cast<std::uint32_t>(*imports_max);
    }
    CFG_TRY_ASSIGN(name, r.str("name"));
    if (!name) return config_error(src + ": node.name is required (this site's name, e.g. \"site-a\")");
    if (!valid_id(*name)) return config_error(src + ": node.name: use letters, digits, '-', '_' and '.' (at most 64)");
    cfg.node.name = *name;
    CFG_TRY_ASSIGN(state_dir, r.str("state_dir"));
    if (state_dir) {
      if (state_dir->empty() || state_dir->front() != '/') {
        return config_error(src + ": node.state_dir must be an absolute path");
      }
      cfg.node.state_dir = *state_dir;
    }
    CFG_TRY_ASSIGN(level, r.str("log_level"));
    if (level) {
      static const std::set<std::string> kLevels = {"trace", "debug", "info", "warn", "error", "critical", "off"};
      if (!kLevels.contains(*level)) {
        return config_error(src + ": node.log_level: \"" + *level +
                            "\" is not one of trace, debug, info, warn, error, critical, off");
      }
      cfg.node.log_level = *level;
    }
    CFG_TRY_ASSIGN(api_socket, r.str("api_socket"));
    if (api_socket) {
      if (api_socket->empty() || api_socket->front() != '/' || api_socket->size() > 100) {
        return config_error(src + ": node.api_socket must be an absolute path of at most 100 bytes");
      }
      cfg.node.api_socket = *api_socket;
    }
    CFG_TRY_ASSIGN(api_group, r.str("api_socket_group"));
    if (api_group) cfg.node.api_socket_group = *api_group;
    CFG_TRY_ASSIGN(api_listen, r.endpoint("api_listen", EndpointUse::listen));
    CFG_TRY_ASSIGN(api_token, r.str("api_token"));
    if (api_listen) {
      if (!api_token || api_token->size() < 16) {
        return config_error(src + ": node.api_listen needs node.api_token, a secret of at least 16 characters");
      }
      cfg.node.api_listen = api_listen->text;
      cfg.node.api_token = *api_token;
    } else if (api_token) {
      return config_error(src + ": node.api_token is set but node.api_listen is not");
    }
  }
  const toml::node* vols = root.get("volume");
  if (vols == nullptr) return config_error(src + ": no [[volume]] is configured");
  if (!vols->is_array_of_tables()) return config_error(src + ": 'volume' must be written as [[volume]] tables");
  std::size_t index = 0;
  for (const auto& el : *vols->as_array()) {
    auto v = parse_volume(*el.as_table(), src + ": volume[" + std::to_string(index++) + "]", cfg.node.state_dir,
                          cfg.volumes);
    if (!v) return v.error();
    cfg.volumes.push_back(std::move(v).value());
  }
  std::set<std::string> ids;
  for (const auto& v : cfg.volumes) ids.insert(v.id);
  if (cfg.volumes.empty()) return config_error(src + ": no [[volume]] is configured");

  // Replication: [tls], [peer] and [[session]] go together.
  if (const toml::node* n = root.get("tls")) {
    if (!n->is_table()) return config_error(src + ": 'tls' must be a [tls] table");
    Reader r(*n->as_table(), src + ": tls");
    TANDEM_TRY(r.only({"ca", "cert", "key"}));
    TlsConfig t;
    for (auto [key, field] : {std::pair<const char*, std::string*>{"ca", &t.ca}, {"cert", &t.cert}, {"key", &t.key}}) {
      CFG_TRY_ASSIGN(v, r.str(key));
      if (!v || v->empty() || v->front() != '/') return config_error(r.name(key) + ": an absolute path is required");
      *field = *v;
    }
    cfg.tls = t;
  }
  if (const toml::node* n = root.get("peer")) {
    if (!n->is_table()) return config_error(src + ": 'peer' must be a [peer] table");
    Reader r(*n->as_table(), src + ": peer");
    TANDEM_TRY(r.only({"name", "address", "listen", "rate_limit", "keepalive_interval_ms", "peer_timeout_ms"}));
    PeerConfig p;
    CFG_TRY_ASSIGN(name, r.str("name"));
    if (!name || !valid_id(*name))
      return config_error(r.name("name") + ": the peer's name (as in its certificate) is required");
    if (*name == cfg.node.name) return config_error(r.name("name") + ": the peer cannot have this node's name");
    p.name = *name;
    CFG_TRY_ASSIGN(address, r.endpoint("address", EndpointUse::dial));
    if (!address) return config_error(r.name("address") + ": host:port of the peer is required");
    p.address = address->text;
    CFG_TRY_ASSIGN(listen, r.endpoint("listen", EndpointUse::listen));
    if (!listen) return config_error(r.name("listen") + ": host:port to listen on is required");
    p.listen = listen->text;
    CFG_TRY_ASSIGN(rate, r.bytes("rate_limit"));
    if (rate) p.rate_limit_bytes_per_s = *rate;
    CFG_TRY_ASSIGN(ka, r.integer("keepalive_interval_ms"));
    if (ka) {
      if (*ka < 50 || *ka > 60000) return config_error(r.name("keepalive_interval_ms") + ": must be from 50 to 60000");
      p.keepalive_interval_ms = static_cast<std::uint32_t>(*ka);
    }
    CFG_TRY_ASSIGN(to, r.integer("peer_timeout_ms"));
    if (to) {
      if (*to < 200 || *to > 600000) return config_error(r.name("peer_timeout_ms") + ": must be from 200 to 600000");
      p.peer_timeout_ms = static_cast<std::uint32_t>(*to);
    }
    if (p.keepalive_interval_ms >= p.peer_timeout_ms) {
      return config_error(src + ": peer.keepalive_interval_ms must be shorter than peer.peer_timeout_ms");
    }
    cfg.peer = p;
  }
  if (const toml::node* n = root.get("session")) {
    if (!n->is_array_of_tables()) return config_error(src + ": 'session' must be written as [[session]] tables");
    std::set<std::string> session_ids, used_volumes;
    std::size_t si = 0;
    for (const auto& el : *n->as_array()) {
      const auto& t = *el.as_table();
      std::string where = src + ": session[" + std::to_string(si++) + "]";
      Reader pre(t, where);
      CFG_TRY_ASSIGN(id, pre.str("id"));
      if (!id || !valid_id(*id)) return config_error(where + ": id is required (letters, digits, '-', '_', '.')");
      where += " (" + *id + ")";
      Reader r(t, where);
      TANDEM_TRY(r.only({"id", "volumes", "remote_volumes", "role", "rpo_seconds", "window", "rate_limit"}));
      SessionConfig sc;
      sc.id = *id;
      if (!session_ids.insert(sc.id).second) return config_error(where + ": duplicate session id");
      for (auto [key, out] : {std::pair<const char*, std::vector<std::string>*>{"volumes", &sc.volumes},
                              {"remote_volumes", &sc.remote_volumes}}) {
        const toml::node* arr = t.get(key);
        if (arr == nullptr || !arr->is_array() || arr->as_array()->empty()) {
          return config_error(r.name(key) + ": a non-empty list of volume ids is required");
        }
        for (const auto& v : *arr->as_array()) {
          if (!v.is_string() || !valid_id(v.as_string()->get()))
            return config_error(r.name(key) + ": volume ids are strings");
          out->push_back(v.as_string()->get());
        }
      }
      if (sc.volumes.size() != sc.remote_volumes.size()) {
        return config_error(where + ": volumes and remote_volumes must list the same number of volumes");
      }
      if (sc.volumes.size() > 16) return config_error(where + ": at most 16 volumes in one session");
      for (const auto& v : sc.volumes) {
        if (!ids.contains(v)) return config_error(r.name("volumes") + ": no [[volume]] has id \"" + v + "\"");
        if (!used_volumes.insert(v).second)
          return config_error(r.name("volumes") + ": volume \"" + v + "\" is in another session");
      }
      CFG_TRY_ASSIGN(role, r.str("role"));
      if (!role || (*role != "source" && *role != "destination")) {
        return config_error(r.name("role") + ": \"source\" or \"destination\" is required");
      }
      sc.role = *role;
      CFG_TRY_ASSIGN(rpo, r.integer("rpo_seconds"));
      if (rpo) {
        if (*rpo < 1 || *rpo > 86400) return config_error(r.name("rpo_seconds") + ": must be from 1 to 86400");
        sc.rpo_seconds = static_cast<std::uint32_t>(*rpo);
      }
      CFG_TRY_ASSIGN(window, r.bytes("window"));
      if (window) {
        if (*window < (1u << 20) || *window > (4ull << 30))
          return config_error(r.name("window") + ": must be from 1MiB to 4GiB");
        sc.window_bytes = *window;
      }
      CFG_TRY_ASSIGN(srate, r.bytes("rate_limit"));
      if (srate) sc.rate_limit_bytes_per_s = *srate;
      cfg.sessions.push_back(std::move(sc));
    }
  }
  if (!cfg.node.api_listen.empty() && !cfg.tls) {
    return config_error(src + ": node.api_listen serves TLS only: it needs the [tls] section (its cert and key)");
  }
  if (!cfg.sessions.empty() && (!cfg.tls || !cfg.peer)) {
    return config_error(src + ": sessions need a [tls] and a [peer] section");
  }
  return cfg;
}

namespace {

std::string rate_text(std::uint64_t bytes_per_s) {
  return bytes_per_s == 0 ? std::string("unlimited") : std::to_string(bytes_per_s) + " B/s";
}

// Appends `what` to `out` when the two values differ.
template <class T>
void differs(std::vector<std::string>& out, const T& a, const T& b, std::string what) {
  if (!(a == b)) out.push_back(std::move(what));
}

// Pairs the entries of `running` and `next` by id: `both(name, a, b)` for each id in both
// ("<kind> <id>" as name); the ids of those removed and added go to `removed` and `added`.
template <class T, class Both>
void by_id(const std::vector<T>& running, const std::vector<T>& next, const std::string& kind,
           std::vector<std::string>& removed, std::vector<std::string>& added, Both both) {
  auto find = [](const std::vector<T>& in, const std::string& id) -> const T* {
    for (const auto& x : in) {
      if (x.id == id) return &x;
    }
    return nullptr;
  };
  for (const auto& a : running) {
    const T* b = find(next, a.id);
    if (b == nullptr) {
      removed.push_back(a.id);
    } else {
      both(kind + " " + a.id, a, *b);
    }
  }
  for (const auto& b : next) {
    if (find(running, b.id) == nullptr) added.push_back(b.id);
  }
}

}  // namespace

ReloadPlan plan_reload(const Config& running, const Config& next) {
  ReloadPlan p;
  auto& r = p.needs_restart;
  const NodeConfig& a = running.node;
  const NodeConfig& b = next.node;
  if (a.log_level != b.log_level) p.applied.push_back("[node] log_level: " + a.log_level + " -> " + b.log_level);
  differs(r, a.name, b.name, "[node] name");
  differs(r, a.state_dir, b.state_dir, "[node] state_dir");
  differs(r, a.api_socket, b.api_socket, "[node] api_socket");
  differs(r, a.api_socket_group, b.api_socket_group, "[node] api_socket_group");
  differs(r, a.api_listen, b.api_listen, "[node] api_listen");
  differs(r, a.api_token, b.api_token, "[node] api_token");
  differs(r, a.max_concurrent_imports, b.max_concurrent_imports, "[node] max_concurrent_imports");

  by_id(running.volumes, next.volumes, "volume", p.volumes_removed, p.volumes_added,
        [&r](const std::string& name, const VolumeConfig& va, const VolumeConfig& vb) {
          differs(r, va.path, vb.path, name + " path");
          differs(r, va.size_bytes, vb.size_bytes, name + " size");
          differs(r, va.meta_path, vb.meta_path, name + " meta_path");
          differs(r, va.nbd_socket, vb.nbd_socket, name + " nbd_socket");
          differs(r, va.nbd_listen, vb.nbd_listen, name + " nbd_listen");
          differs(r, va.intent_region_bytes, vb.intent_region_bytes, name + " intent_region_size");
          differs(r, va.intent_regions_max, vb.intent_regions_max, name + " intent_regions_max");
        });

  if (running.tls.has_value() != next.tls.has_value()) {
    r.push_back("[tls]");
  } else if (running.tls) {
    differs(r, running.tls->ca, next.tls->ca, "[tls] ca");
    differs(r, running.tls->cert, next.tls->cert, "[tls] cert");
    differs(r, running.tls->key, next.tls->key, "[tls] key");
  }
  if (running.peer.has_value() != next.peer.has_value()) {
    r.push_back("[peer]");
  } else if (running.peer) {
    const PeerConfig& pa = *running.peer;
    const PeerConfig& pb = *next.peer;
    if (pa.rate_limit_bytes_per_s != pb.rate_limit_bytes_per_s) {
      p.applied.push_back("[peer] rate_limit: " + rate_text(pa.rate_limit_bytes_per_s) + " -> " +
                          rate_text(pb.rate_limit_bytes_per_s));
    }
    differs(r, pa.name, pb.name, "[peer] name");
    differs(r, pa.address, pb.address, "[peer] address");
    differs(r, pa.listen, pb.listen, "[peer] listen");
    differs(r, pa.keepalive_interval_ms, pb.keepalive_interval_ms, "[peer] keepalive_interval_ms");
    differs(r, pa.peer_timeout_ms, pb.peer_timeout_ms, "[peer] peer_timeout_ms");
  }

  by_id(running.sessions, next.sessions, "session", p.sessions_removed, p.sessions_added,
        [&r, &p](const std::string& name, const SessionConfig& sa, const SessionConfig& sb) {
          if (sa.rpo_seconds != sb.rpo_seconds) {
            p.applied.push_back(name + " rpo_seconds: " + std::to_string(sa.rpo_seconds) + " -> " +
                                std::to_string(sb.rpo_seconds));
          }
          if (sa.rate_limit_bytes_per_s != sb.rate_limit_bytes_per_s) {
            p.applied.push_back(name + " rate_limit: " + rate_text(sa.rate_limit_bytes_per_s) + " -> " +
                                rate_text(sb.rate_limit_bytes_per_s));
          }
          differs(r, sa.volumes, sb.volumes, name + " volumes");
          differs(r, sa.remote_volumes, sb.remote_volumes, name + " remote_volumes");
          differs(r, sa.role, sb.role, name + " role");
          differs(r, sa.window_bytes, sb.window_bytes, name + " window");
        });
  return p;
}

Status check_volume_unique(const VolumeConfig& v, const std::vector<VolumeConfig>& others) {
  for (const auto& o : others) {
    if (o.id == v.id) return config_error("volume " + v.id + ": its id is used by another volume");
    if (o.path == v.path || o.meta_path == v.path || o.nbd_socket == v.path)
      return config_error("volume " + v.id + ": path " + v.path + " is used by volume " + o.id);
    if (o.meta_path == v.meta_path)
      return config_error("volume " + v.id + ": meta_path " + v.meta_path + " is used by volume " + o.id);
    if (!v.nbd_socket.empty() && o.nbd_socket == v.nbd_socket)
      return config_error("volume " + v.id + ": nbd_socket " + v.nbd_socket + " is used by volume " + o.id);
    auto mine = parse_endpoint(v.nbd_listen, EndpointUse::listen);
    auto theirs = parse_endpoint(o.nbd_listen, EndpointUse::listen);
    if (mine && theirs && mine->port != 0 && mine->to_string() == theirs->to_string())
      return config_error("volume " + v.id + ": nbd_listen " + v.nbd_listen + " is used by volume " + o.id);
  }
  return {};
}

Status check_files(const Config& cfg) {
  namespace fs = std::filesystem;
  if (cfg.tls) {
    struct stat st {};
    if (::stat(cfg.tls->key.c_str(), &st) == 0 && (st.st_mode & S_IRWXO) != 0) {
      return config_error(cfg.source + ": tls.key: " + cfg.tls->key + " is accessible to every user (mode " +
                          fmt::format("{:04o}", st.st_mode & 07777) + "); chmod 600 it");
    }
  }
  auto socket_dir = [&cfg](const std::string& socket, const std::string& key) -> Status {
    if (socket.empty()) return {};
    const std::string dir = fs::path(socket).parent_path().string();
    struct stat st {};
    if (::stat(dir.empty() ? "." : dir.c_str(), &st) == 0 && (st.st_mode & S_IWOTH) != 0) {
      return config_error(cfg.source + ": " + key + ": directory " + dir + " is writable by every user (mode " +
                          fmt::format("{:04o}", st.st_mode & 07777) +
                          "): anyone could replace the socket; use one only tandemd can write, such as /run/tandem");
    }
    return {};
  };
  TANDEM_TRY(socket_dir(cfg.node.api_socket, "node.api_socket"));
  for (const auto& v : cfg.volumes) TANDEM_TRY(socket_dir(v.nbd_socket, "volume " + v.id + ".nbd_socket"));
  return {};
}

std::string systemd_dropin(const Config& cfg) {
  namespace fs = std::filesystem;
  std::vector<std::string> devices;
  std::vector<std::string> paths;
  auto add_path = [&paths](const std::string& p) {
    if (p.empty()) return;
    const std::string dir = fs::path(p).parent_path().string();
    for (const char* own : {"/var/lib/tandem", "/run/tandem"}) {
      if (dir == own || dir.rfind(std::string(own) + "/", 0) == 0) return;
    }
    if (std::find(paths.begin(), paths.end(), dir) == paths.end()) paths.push_back(dir);
  };
  add_path(cfg.node.state_dir + "/x");
  add_path(cfg.node.api_socket);
  for (const auto& v : cfg.volumes) {
    std::error_code ec;
    const bool is_device = v.path.rfind("/dev/", 0) == 0 || fs::is_block_file(v.path, ec);
    if (is_device) {
      // The path as configured: systemd resolves it (symlinks too) each time the unit starts,
      // while a kernel name (/dev/dm-3, /dev/sdb) may belong to another disk after a reboot.
      devices.push_back(v.path);
    } else {
      add_path(v.path);
    }
    add_path(v.meta_path);
    add_path(v.nbd_socket);
  }
  std::string out = "# tandemd.service drop-in for " + cfg.source +
                    "\n# Install: tandemd --systemd-dropin > /etc/systemd/system/tandemd.service.d/tandem.conf\n"
                    "#          systemctl daemon-reload\n[Service]\n";
  if (!devices.empty()) {
    out += "DeviceAllow=\n";  // an empty assignment drops the unit's device classes
    for (const auto& d : devices) out += "DeviceAllow=" + d + " rw\n";
  }
  // "-": a directory that does not exist yet (a socket's, under /run) does not fail the unit.
  for (const auto& p : paths) out += "ReadWritePaths=-" + p + "\n";
  return out;
}

Result<Config> load_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return errno_error(errno, "cannot read config " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  // A config is small; a huge file is a mistake (or an attack on the parser).
  constexpr std::size_t kConfigBytesMax = 1 << 20;
  const std::string text = ss.str();
  if (text.size() > kConfigBytesMax) return config_error(path + ": larger than 1 MiB; is this really a config?");
  return parse_config(text, path);
}

}  // namespace tandem::daemon

namespace tandem::daemon {

std::string runtime_volumes_path(const Config& cfg) { return cfg.node.state_dir + "/volumes.toml"; }

Result<std::vector<VolumeConfig>> parse_runtime_volumes(std::string_view text, std::string_view source,
                                                        const Config& cfg, std::vector<std::string>* skipped) {
  const std::string src(source);
  auto parsed = parse_toml(text, src);
  if (!parsed) return parsed.error();
  toml::table root = std::move(parsed).value();
  TANDEM_TRY(Reader(root, src).only({"volume"}));
  std::vector<VolumeConfig> out;
  const toml::node* vols = root.get("volume");
  if (vols == nullptr) return out;
  if (!vols->is_array_of_tables()) return config_error(src + ": 'volume' must be written as [[volume]] tables");
  std::size_t index = 0;
  for (const auto& el : *vols->as_array()) {
    const std::string where = src + ": volume[" + std::to_string(index++) + "]";
    auto v = parse_volume(*el.as_table(), where, cfg.node.state_dir, out);
    if (!v) return v.error();
    if (Status clash = check_volume_unique(*v, cfg.volumes); !clash) {
      // The configuration file took the id (or the path, a socket...) since: the file wins.
      if (skipped == nullptr) return config_error(where + ": " + clash.error().message());
      skipped->push_back(clash.error().message());
      continue;
    }
    out.push_back(std::move(v).value());
  }
  return out;
}

Result<std::vector<VolumeConfig>> load_runtime_volumes(const Config& cfg, std::vector<std::string>* skipped) {
  const std::string path = runtime_volumes_path(cfg);
  std::ifstream in(path);
  if (!in) {
    if (errno == ENOENT) return std::vector<VolumeConfig>{};
    return Error(std::error_code(errno, std::generic_category()), "cannot read " + path);
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_runtime_volumes(ss.str(), path, cfg, skipped);
}

Result<VolumeConfig> parse_volume_request(std::string_view json_body, const Config& cfg,
                                          const std::vector<VolumeConfig>& existing) {
  const auto j = nlohmann::json::parse(json_body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return config_error("volume: the body must be a JSON object");
  // The same rules as a [[volume]] of the configuration file: the object becomes such a table.
  toml::table t;
  for (const auto& [key, value] : j.items()) {
    if (value.is_string()) {
      t.insert(key, value.get<std::string>());
    } else if (value.is_number_unsigned() || value.is_number_integer()) {
      if (value.is_number_unsigned() && value.get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX))
        return config_error("volume." + key + ": too large");
      t.insert(key, value.get<std::int64_t>());
    } else if (value.is_null()) {
      continue;  // the same as leaving it out
    } else {
      return config_error("volume." + key + ": must be a string or an integer");
    }
  }
  return parse_volume(t, "volume", cfg.node.state_dir, existing);
}

std::optional<std::int64_t> parse_rfc3339_ms(std::string_view s) {
  // YYYY-MM-DDTHH:MM:SS[.fff...]Z
  if (s.size() < 20 || s.back() != 'Z' || s[4] != '-' || s[7] != '-' || (s[10] != 'T' && s[10] != 't') ||
      s[13] != ':' || s[16] != ':') {
    return std::nullopt;
  }
  auto num = [&](std::size_t at, std::size_t n) -> std::optional<int> {
    int v = 0;
    for (std::size_t i = at; i < at + n; ++i) {
      if (s[i] < '0' || s[i] > '9') return std::nullopt;
      v = v * 10 + (s[i] - '0');
    }
    return v;
  };
  auto y = num(0, 4), mo = num(5, 2), d = num(8, 2), h = num(11, 2), mi = num(14, 2), se = num(17, 2);
  if (!y || !mo || !d || !h || !mi || !se || *mo < 1 || *mo > 12 || *d < 1 || *h > 23 || *mi > 59 || *se > 60) {
    return std::nullopt;
  }
  std::int64_t ms = 0;
  std::size_t at = 19;
  if (at < s.size() - 1) {
    if (s[at] != '.') return std::nullopt;
    ++at;
    int digits = 0;
    for (; at < s.size() - 1; ++at, ++digits) {
      if (s[at] < '0' || s[at] > '9') return std::nullopt;
      if (digits < 3) ms = ms * 10 + (s[at] - '0');
    }
    if (digits == 0) return std::nullopt;
    for (; digits < 3; ++digits) ms *= 10;
  }
  const std::chrono::year_month_day ymd{std::chrono::year(*y), std::chrono::month(static_cast<unsigned>(*mo)),
                                        std::chrono::day(static_cast<unsigned>(*d))};
  if (!ymd.ok()) return std::nullopt;
  const auto days = std::chrono::sys_days(ymd).time_since_epoch().count();
  return ((static_cast<std::int64_t>(days) * 24 + *h) * 60 + *mi) * 60000 + static_cast<std::int64_t>(*se) * 1000 + ms;
}

Result<ImportRequest> parse_import_request(std::string_view json_body, const Config& cfg,
                                           const std::vector<VolumeConfig>& existing) {
  const auto j = nlohmann::json::parse(json_body, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return config_error("the body must be a JSON object");
  static const std::set<std::string> kKeys = {
      "name", "source", "volume", "automatic_cutover", "scheduled_timestamp", "rate_limit"};
  for (const auto& [key, value] : j.items()) {
    if (!kKeys.contains(key)) return config_error("unknown field '" + key + "'");
  }
  ImportRequest r;
  if (!j.contains("name") || !j["name"].is_string()) return config_error("name: required, a string");
  r.name = j["name"].get<std::string>();
  if (!valid_id(r.name)) return config_error("name: use letters, digits, '-', '_' and '.' (at most 64)");
  if (!j.contains("source") || !j["source"].is_object()) return config_error("source: required, an object");
  for (const auto& [key, value] : j["source"].items()) {
    if (key != "uri") return config_error("source: unknown field '" + key + "'");
  }
  if (!j["source"].contains("uri") || !j["source"]["uri"].is_string() ||
      j["source"]["uri"].get<std::string>().empty()) {
    return config_error("source.uri: required, an nbd://, nbds://, nbd+unix:// URI or an absolute path");
  }
  r.source_uri = j["source"]["uri"].get<std::string>();
  if (r.source_uri.size() > 4096) return config_error("source.uri: longer than 4096 bytes");
  if (j.contains("automatic_cutover")) {
    if (!j["automatic_cutover"].is_boolean()) return config_error("automatic_cutover: must be a boolean");
    r.automatic_cutover = j["automatic_cutover"].get<bool>();
  }
  if (j.contains("scheduled_timestamp") && !j["scheduled_timestamp"].is_null()) {
    if (!j["scheduled_timestamp"].is_string()) {
      return config_error("scheduled_timestamp: must be null or an RFC 3339 time in UTC (\"2026-12-02T16:00:00Z\")");
    }
    r.scheduled_ms = parse_rfc3339_ms(j["scheduled_timestamp"].get<std::string>());
    if (!r.scheduled_ms) {
      return config_error("scheduled_timestamp: not an RFC 3339 time in UTC (\"2026-12-02T16:00:00Z\")");
    }
  }
  if (j.contains("rate_limit") && !j["rate_limit"].is_null()) {
    if (!j["rate_limit"].is_number_unsigned() && !(j["rate_limit"].is_number_integer() && j["rate_limit"] >= 0)) {
      return config_error("rate_limit: must be a non-negative integer (bytes per second; 0: unlimited)");
    }
    r.rate_limit = j["rate_limit"].get<std::uint64_t>();
  }
  if (!j.contains("volume") || !j["volume"].is_object()) return config_error("volume: required, an object");
  const auto& v = j["volume"];
  if (!v.contains("id") || !v["id"].is_string()) return config_error("volume.id: required, a string");
  r.volume_id = v["id"].get<std::string>();
  const bool exists =
      std::any_of(existing.begin(), existing.end(), [&](const VolumeConfig& c) { return c.id == r.volume_id; });
  if (exists) {
    if (v.size() != 1) {
      return config_error("volume: " + r.volume_id + " exists; name it by its id alone to import into it");
    }
    return r;
  }
  if (v.contains("size")) return config_error("volume.size: not allowed; the volume gets the source's size");
  auto made = parse_volume_request(v.dump(), cfg, existing);
  if (!made) return made.error();
  r.new_volume = std::move(made).value();
  return r;
}

std::string render_runtime_volumes(const std::vector<VolumeConfig>& volumes) {
  toml::array list;
  for (const auto& v : volumes) {
    toml::table t;
    t.insert("id", v.id);
    t.insert("path", v.path);
    if (v.size_bytes) t.insert("size", static_cast<std::int64_t>(*v.size_bytes));
    t.insert("meta_path", v.meta_path);
    if (!v.nbd_socket.empty()) t.insert("nbd_socket", v.nbd_socket);
    if (!v.nbd_listen.empty()) t.insert("nbd_listen", v.nbd_listen);
    t.insert("intent_region_size", static_cast<std::int64_t>(v.intent_region_bytes));
    t.insert("intent_regions_max", static_cast<std::int64_t>(v.intent_regions_max));
    list.push_back(std::move(t));
  }
  toml::table root;
  if (!list.empty()) root.insert("volume", std::move(list));
  std::ostringstream os;
  os << "# Volumes created at run time through the control API (POST /api/rest/volume).\n"
     << "# tandemd writes this file; it opens these volumes at start beside the configured ones.\n\n"
     << root << "\n";
  return os.str();
}

}  // namespace tandem::daemon

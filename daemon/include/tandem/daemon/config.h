// The tandemd configuration: a TOML file, validated as a whole before anything starts.
//
// Parsing never throws: every problem is an Error whose message names the file, the key and
// what is wrong ("tandem.toml: volume[1] (vol0).size: \"1XB\" is not a size"), so an operator
// can fix a config without reading code. Unknown keys are errors too: a typo must not silently
// fall back to a default. Every key is documented in docs/configuration.md.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tandem/common/result.h"

namespace tandem::daemon {

struct NodeConfig {
  std::string name;
  std::string state_dir = "/var/lib/tandem";
  std::string log_level = "info";
  std::string api_socket = "/run/tandem/api.sock";  // the control API (HTTP over a Unix socket)
  std::string api_socket_group;                     // group of the API socket (mode 0660); empty: the daemon's
  std::string api_listen;  // optional TCP listener for the API, "host:port": TLS ([tls]) and api_token required
  std::string api_token;   // the bearer token TCP clients must send
  std::uint32_t max_concurrent_imports = 2;  // imports copying (or paused) at once; more wait Queued

  bool operator==(const NodeConfig&) const = default;
};

struct VolumeConfig {
  std::string id;
  std::string path;
  std::optional<std::uint64_t> size_bytes;
  std::string meta_path;   // defaults to <state_dir>/<id>.meta
  std::string nbd_socket;  // Unix socket for the NBD export
  std::string nbd_listen;  // host:port for the NBD export over TCP
  std::uint32_t intent_region_bytes = 4 * 1024 * 1024;
  std::uint32_t intent_regions_max = 1024;

  bool operator==(const VolumeConfig&) const = default;
};

struct TlsConfig {
  std::string ca, cert, key;

  bool operator==(const TlsConfig&) const = default;
};

struct PeerConfig {
  std::string name;                          // must match the peer certificate's name
  std::string address;                       // host:port where the peer listens
  std::string listen;                        // host:port where this node listens for the peer
  std::uint64_t rate_limit_bytes_per_s = 0;  // 0 = unlimited
  std::uint32_t keepalive_interval_ms = 1000;
  std::uint32_t peer_timeout_ms = 5000;

  bool operator==(const PeerConfig&) const = default;
};

struct SessionConfig {
  std::string id;
  std::vector<std::string> volumes;         // local volume ids; several make a consistency group
  std::vector<std::string> remote_volumes;  // the peer's volume ids, in the same order
  std::string role;                         // "source" | "destination" (initial role)
  std::uint32_t rpo_seconds = 10;
  std::uint64_t window_bytes = 64ull << 20;  // unacknowledged bytes in flight
  std::uint64_t rate_limit_bytes_per_s = 0;  // extent data this session ships; 0 = unlimited

  bool operator==(const SessionConfig&) const = default;
};

struct Config {
  std::string source;  // file name, for messages
  NodeConfig node;
  std::vector<VolumeConfig> volumes;
  std::optional<TlsConfig> tls;
  std::optional<PeerConfig> peer;
  std::vector<SessionConfig> sessions;

  bool operator==(const Config&) const = default;
};

// What a reload (SIGHUP) may change at run time, and what it may not.
//
// Reloadable: node.log_level, peer.rate_limit, each session's rpo_seconds and rate_limit,
// volumes added or removed (the daemon opens and exports, or withdraws and closes, them; it
// refuses to remove one a session or an NBD client uses), and sessions added or removed (an
// added one joins the running link to the peer). Everything else (a volume's keys, sockets,
// certificates, the peer's address, a session's volumes or role...) takes a restart: a reload
// keeps the running value and names the key.
struct ReloadPlan {
  std::vector<std::string> applied;           // "session s-vol0 rpo_seconds: 10 -> 4"
  std::vector<std::string> needs_restart;     // "volume vol0 path", "[tls] cert", "session s-x (added)"
  std::vector<std::string> volumes_added;     // ids, in the next configuration's order
  std::vector<std::string> volumes_removed;   // ids
  std::vector<std::string> sessions_added;    // ids
  std::vector<std::string> sessions_removed;  // ids
};
ReloadPlan plan_reload(const Config& running, const Config& next);

// What can be checked about the files a configuration names before anything starts: the TLS
// key must not be accessible to every user, and no socket may go into a directory every user
// can write (anyone could replace the socket). --check-config and the daemon's start both run
// it; a failure is a configuration error (exit 2, which the unit does not restart on).
Status check_files(const Config& cfg);

// A systemd drop-in ([Service] section) that lets the sandboxed unit reach what `cfg` uses:
// DeviceAllow= for each block device (the list replaces the unit's device classes), and
// ReadWritePaths= for regular-file volumes, metadata and sockets outside the unit's own
// StateDirectory (/var/lib/tandem) and RuntimeDirectory (/run/tandem).
std::string systemd_dropin(const Config& cfg);

// Volumes created at run time (POST /api/rest/volume) are kept across restarts in their own
// file, <state_dir>/volumes.toml, as [[volume]] tables with the configuration file's keys and
// rules; tandemd writes it and opens its volumes at start beside the configured ones. A volume
// there may use no id, path, metadata file, socket or port that a configured one uses.
// One that collides with a volume of the configuration file (it was copied there since) is an
// error, or, with `skipped`, left out and described there: the configuration file wins.
std::string runtime_volumes_path(const Config& cfg);
Result<std::vector<VolumeConfig>> parse_runtime_volumes(std::string_view text, std::string_view source,
                                                        const Config& cfg, std::vector<std::string>* skipped = nullptr);
// The file's volumes (none when it does not exist).
Result<std::vector<VolumeConfig>> load_runtime_volumes(const Config& cfg, std::vector<std::string>* skipped = nullptr);
std::string render_runtime_volumes(const std::vector<VolumeConfig>& volumes);
// The body of POST /api/rest/volume, a JSON object with the keys of a [[volume]] table, checked
// by the same rules and against the volumes that exist (`existing`).
Result<VolumeConfig> parse_volume_request(std::string_view json_body, const Config& cfg,
                                          const std::vector<VolumeConfig>& existing);

// The body of POST /api/rest/import_session, held to strict rules: known keys only, each of its
// type. The volume is either an existing one ({"id"} alone) or a new one with the keys of a
// [[volume]] table except size (the source's size is the volume's).
struct ImportRequest {
  std::string name;
  std::string source_uri;
  std::string volume_id;
  std::optional<VolumeConfig> new_volume;  // size unset until the source is known
  bool automatic_cutover = false;
  std::optional<std::int64_t> scheduled_ms;  // Unix ms
  std::uint64_t rate_limit = 0;              // bytes/s; 0: unlimited
};
Result<ImportRequest> parse_import_request(std::string_view json_body, const Config& cfg,
                                           const std::vector<VolumeConfig>& existing);
// "2026-12-02T16:00:00Z" or with fractional seconds ("…:00.250Z"): UTC only.
std::optional<std::int64_t> parse_rfc3339_ms(std::string_view s);

// Whether `v` uses an id, path, metadata file, socket or (non-zero) port of one of `others`.
Status check_volume_unique(const VolumeConfig& v, const std::vector<VolumeConfig>& others);

// Parses and validates configuration text. `source` names it in error messages.
Result<Config> parse_config(std::string_view text, std::string_view source);
// Reads and parses a file.
Result<Config> load_config(const std::string& path);

}  // namespace tandem::daemon

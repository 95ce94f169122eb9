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
};

struct Config {
  std::string source;  // file name, for messages
  NodeConfig node;
  std::vector<VolumeConfig> volumes;
};

// Parses and validates configuration text. `source` names it in error messages.
Result<Config> parse_config(std::string_view text, std::string_view source);
// Reads and parses a file.
Result<Config> load_config(const std::string& path);

}  // namespace tandem::daemon

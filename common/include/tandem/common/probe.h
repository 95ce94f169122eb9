// Named failure probes for tests (seastar/redpanda style): behaviour a test switches on by
// name through the environment, e.g. TANDEM_PROBES="corrupt_extent_every=7". Probes are read
// once at start; with no variable set every probe is off and costs one branch.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

namespace tandem::probe {

// The value of probe `name`, or 0 when it is not set.
inline std::uint64_t value(std::string_view name) {
  const char* env = std::getenv("TANDEM_PROBES");
  if (env == nullptr) return 0;
  std::string_view all(env);
  while (!all.empty()) {
    const auto comma = all.find(',');
    std::string_view item = all.substr(0, comma);
    const auto eq = item.find('=');
    if (item.substr(0, eq) == name) {
      return eq == std::string_view::npos ? 1 : std::strtoull(std::string(item.substr(eq + 1)).c_str(), nullptr, 10);
    }
    if (comma == std::string_view::npos) break;
    all.remove_prefix(comma + 1);
  }
  return 0;
}

}  // namespace tandem::probe

#include "tandem/common/units.h"

#include <cctype>
#include <cstdio>
#include <limits>

namespace tandem {

std::optional<std::uint64_t> parse_bytes(std::string_view text) {
  std::size_t i = 0;
  while (i < text.size() && text[i] == ' ') ++i;
  if (i == text.size() || !std::isdigit(static_cast<unsigned char>(text[i]))) return std::nullopt;
  std::uint64_t n = 0;
  for (; i < text.size() && std::isdigit(static_cast<unsigned char>(text[i])); ++i) {
    const auto d = static_cast<std::uint64_t>(text[i] - '0');
    if (n > (std::numeric_limits<std::uint64_t>::max() - d) / 10) return std::nullopt;
    n = n * 10 + d;
  }
  while (i < text.size() && text[i] == ' ') ++i;
  std::string suffix;
  for (; i < text.size(); ++i) {
    if (text[i] == ' ') continue;
    suffix.push_back(static_cast<char>(std::toupper(static_cast<unsigned char>(text[i]))));
  }
  std::uint64_t mult = 1;
  if (suffix.empty() || suffix == "B") {
    mult = 1;
  } else {
    const char unit = suffix[0];
    const std::string rest = suffix.substr(1);
    const bool binary = rest.empty() || rest == "IB";
    const bool decimal = rest == "B";
    if (!binary && !decimal) return std::nullopt;
    const std::uint64_t base = binary ? 1024 : 1000;
    int power = 0;
    switch (unit) {
      case 'K':
        power = 1;
        break;
      case 'M':
        power = 2;
        break;
      case 'G':
        power = 3;
        break;
      case 'T':
        power = 4;
        break;
      case 'P':
        power = 5;
        break;
      default:
        return std::nullopt;
    }
    for (int p = 0; p < power; ++p) mult *= base;
  }
  if (n != 0 && mult > std::numeric_limits<std::uint64_t>::max() / n) return std::nullopt;
  return n * mult;
}

std::string format_bytes(std::uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  double v = static_cast<double>(bytes);
  while (v >= 1024.0 && u < 5) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  if (u == 0 || v == static_cast<double>(static_cast<std::uint64_t>(v))) {
    std::snprintf(buf, sizeof buf, "%llu%s", static_cast<unsigned long long>(v), kUnits[u]);
  } else {
    std::snprintf(buf, sizeof buf, "%.1f%s", v, kUnits[u]);
  }
  return buf;
}

}  // namespace tandem

#include "tandem/replication/generation.h"

#include <algorithm>
#include <cstdio>

namespace tandem::replication {

const char* to_string(SyncDecision d) {
  switch (d) {
    case SyncDecision::in_sync:
      return "in sync";
    case SyncDecision::source_ahead:
      return "source ahead";
    case SyncDecision::destination_ahead:
      return "destination ahead (it was promoted)";
    case SyncDecision::split_brain:
      return "split brain";
    case SyncDecision::unrelated:
      return "unrelated volumes";
    case SyncDecision::initial_sync:
      return "initial sync";
  }
  return "unknown";
}

SyncDecision decide(const GenerationView& source, const GenerationView& destination) {
  if (!destination.paired) return SyncDecision::initial_sync;
  if (source.history.empty() || destination.history.empty()) return SyncDecision::unrelated;
  const std::uint64_t s = source.history.front();
  const std::uint64_t d = destination.history.front();
  if (s == d) return SyncDecision::in_sync;
  auto contains = [](const std::vector<std::uint64_t>& h, std::uint64_t id) {
    return std::find(h.begin() + 1, h.end(), id) != h.end();
  };
  if (contains(source.history, d)) return SyncDecision::source_ahead;
  if (contains(destination.history, s)) return SyncDecision::destination_ahead;
  for (auto id : source.history) {
    if (std::find(destination.history.begin(), destination.history.end(), id) != destination.history.end()) {
      return SyncDecision::split_brain;
    }
  }
  return SyncDecision::unrelated;
}

void push_generation(std::vector<std::uint64_t>& history, std::uint64_t id, std::size_t max) {
  history.insert(history.begin(), id);
  if (history.size() > max) history.resize(max);
}

std::string describe(const std::vector<std::uint64_t>& history) {
  std::string out;
  for (std::size_t i = 0; i < history.size() && i < 4; ++i) {
    char buf[24];
    std::snprintf(buf, sizeof buf, "%s%016llx", i ? "/" : "", static_cast<unsigned long long>(history[i]));
    out += buf;
  }
  if (history.size() > 4) out += "/…";
  return out;
}

}  // namespace tandem::replication

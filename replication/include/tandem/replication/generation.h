// Generation histories decide, on connect, which way data may flow.
//
// Each volume keeps a history of generation ids, newest first. A new generation starts whenever
// a side becomes writable without its peer (a promotion, an unplanned failover, or a source that
// writes while disconnected). The destination adopts the source's history when it commits a
// cycle. Comparing the two histories tells what happened since they last agreed (DRBD's
// data-generation UUIDs, simplified):
//   - same current generation              → in sync: resume where they stopped
//   - the destination's current is older   → the source wrote without its peer: ship its dirty
//     in the source's history                 blocks (the normal case after a disconnect)
//   - the source's current is older in the → the destination was promoted: it holds newer data;
//     destination's history                   refuse until an operator reprotects
//   - a common ancestor, both newer         → split brain: both sides written; refuse, report,
//                                              never discard data automatically
//   - nothing in common                     → unrelated volumes: refuse
// A destination that was never paired has nothing to protect: it gets an initial sync.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tandem::replication {

enum class SyncDecision {
  in_sync,
  source_ahead,
  destination_ahead,
  split_brain,
  unrelated,
  initial_sync,
};

const char* to_string(SyncDecision d);

struct GenerationView {
  std::vector<std::uint64_t> history;  // newest first; never empty for a paired volume
  bool paired = false;                 // has ever been part of this replication pair
};

SyncDecision decide(const GenerationView& source, const GenerationView& destination);

// Adds a new current generation (bounded history: the oldest falls off).
void push_generation(std::vector<std::uint64_t>& history, std::uint64_t id, std::size_t max);

// "a1b2…/c3d4…" for logs.
std::string describe(const std::vector<std::uint64_t>& history);

}  // namespace tandem::replication

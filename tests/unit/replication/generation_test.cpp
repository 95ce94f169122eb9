// Plan: every outcome of comparing generation histories, including the two that must never
// move data (split brain, unrelated) and the asymmetric cases (who wrote without the other).
#include <gtest/gtest.h>

#include "tandem/replication/generation.h"

namespace tandem::replication {
namespace {

GenerationView v(std::vector<std::uint64_t> h, bool paired = true) { return {std::move(h), paired}; }

TEST(Generation, Decisions) {
  EXPECT_EQ(decide(v({5, 4, 3}), v({9}, false)), SyncDecision::initial_sync);
  EXPECT_EQ(decide(v({5, 4, 3}), v({5, 4, 3})), SyncDecision::in_sync);
  EXPECT_EQ(decide(v({5, 4, 3}), v({5, 1})), SyncDecision::in_sync);  // only the current matters
  // The source wrote while disconnected: it started 6; the destination is still at 5.
  EXPECT_EQ(decide(v({6, 5, 4}), v({5, 4})), SyncDecision::source_ahead);
  // The destination was promoted (7 after 5) while the source stayed at 5.
  EXPECT_EQ(decide(v({5, 4}), v({7, 5, 4})), SyncDecision::destination_ahead);
  // Both went on from 5: split brain.
  EXPECT_EQ(decide(v({6, 5, 4}), v({7, 5, 4})), SyncDecision::split_brain);
  // Deeper divergence still shares an ancestor.
  EXPECT_EQ(decide(v({8, 6, 5}), v({9, 7, 5})), SyncDecision::split_brain);
  EXPECT_EQ(decide(v({1, 2}), v({3, 4})), SyncDecision::unrelated);
  EXPECT_EQ(decide(v({}), v({3})), SyncDecision::unrelated);
}

TEST(Generation, PushIsBounded) {
  std::vector<std::uint64_t> h = {1};
  for (std::uint64_t i = 2; i < 50; ++i) push_generation(h, i, 32);
  EXPECT_EQ(h.size(), 32u);
  EXPECT_EQ(h.front(), 49u);
  EXPECT_EQ(h.back(), 18u);
}

}  // namespace
}  // namespace tandem::replication

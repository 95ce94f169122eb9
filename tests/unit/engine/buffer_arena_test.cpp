// Plan: the buddy arena hands out page-aligned, non-overlapping buffers of at least the size
// asked, coalesces on release so the whole arena is free again, and falls back to the heap
// (never fails) when exhausted or asked for more than it holds.
#include <gtest/gtest.h>

#include <random>
#include <set>

#include "tandem/engine/io_buffer.h"

namespace tandem::engine {
namespace {

TEST(BufferArena, AlignedNonOverlappingAndCoalescing) {
  BufferArena arena(1 << 20);  // 256 pages
  std::mt19937 rng(1);
  std::vector<IoBuffer> held;
  for (int round = 0; round < 2000; ++round) {
    if (!held.empty() && (rng() % 3 == 0)) {
      held.erase(held.begin() + static_cast<long>(rng() % held.size()));
      continue;
    }
    const std::size_t want = 1 + rng() % (64 * 1024);
    IoBuffer b = arena.allocate(want);
    ASSERT_GE(b.capacity(), want);
    ASSERT_EQ(reinterpret_cast<std::uintptr_t>(b.data()) % 4096, 0u);
    held.push_back(std::move(b));
    // No two arena buffers overlap.
    std::set<std::pair<std::uintptr_t, std::uintptr_t>> spans;
    for (auto& h : held) {
      auto lo = reinterpret_cast<std::uintptr_t>(h.data());
      auto it = spans.lower_bound({lo, 0});
      if (it != spans.end()) {
        ASSERT_GE(it->first, lo + h.capacity());
      }
      if (it != spans.begin()) {
        ASSERT_LE(std::prev(it)->second, lo);
      }
      spans.insert({lo, lo + h.capacity()});
    }
  }
  held.clear();
  EXPECT_EQ(arena.pages_free(), 256u);
  // After full coalescing, the whole arena is one block again.
  IoBuffer all = arena.allocate(1 << 20);
  EXPECT_EQ(all.data(), arena.base());
}

TEST(BufferArena, FallsBackToHeapWhenExhausted) {
  BufferArena arena(64 * 1024);
  IoBuffer a = arena.allocate(64 * 1024);
  EXPECT_EQ(a.data(), arena.base());
  IoBuffer b = arena.allocate(4096);
  ASSERT_TRUE(b);
  EXPECT_EQ(b.buf_index(), -1);
  EXPECT_EQ(arena.heap_fallbacks(), 1u);
  IoBuffer huge = arena.allocate(1 << 20);
  EXPECT_GE(huge.capacity(), 1u << 20);
  EXPECT_EQ(arena.heap_fallbacks(), 2u);
}

TEST(BufferArena, MoveTransfersOwnership) {
  BufferArena arena(64 * 1024);
  IoBuffer a = arena.allocate(4096);
  std::byte* p = a.data();
  IoBuffer b = std::move(a);
  EXPECT_FALSE(a);
  EXPECT_EQ(b.data(), p);
  b.reset();
  EXPECT_EQ(arena.pages_free(), 16u);
}

}  // namespace
}  // namespace tandem::engine

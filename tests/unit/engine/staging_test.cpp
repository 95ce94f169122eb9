// Plan: the two stores that make cycles restartable. PreserveLog: preserved blocks read back,
// survive reopen, and after a power loss every preserve that completed is still there while
// torn or stale slots are ignored. CycleJournal: staged extents survive reopen as the longest
// valid prefix; after a power loss at any device operation the prefix contains every extent
// that was synced and nothing that was not appended; a corrupted record ends the prefix;
// apply() makes the volume hold exactly the staged extents.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "fault_env.h"
#include "run_sync.h"
#include "tandem/common/hash.h"
#include "tandem/engine/cycle_journal.h"
#include "tandem/engine/preserve_log.h"
#include "tandem/engine/volume.h"

namespace tandem::engine {
namespace {

std::vector<std::byte> block_of(std::uint64_t tag) {
  std::vector<std::byte> b(4096);
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<std::byte>(tag * 7 + i);
  return b;
}

TEST(PreserveLog, PreservesReopensAndIgnoresStaleCycles) {
  asio::io_context ctx;
  test::FaultEnv env;
  BlockBitmap frozen(1000);
  for (std::uint64_t b : std::vector<std::uint64_t>{3, 10, 11, 500, 999}) frozen.set(b);
  {
    auto log = test::run_sync(ctx, PreserveLog::open(env, "p", 7, frozen, false));
    ASSERT_TRUE(log.ok()) << log.error().message();
    auto b10 = block_of(10), b999 = block_of(999);
    ASSERT_TRUE(test::run_sync(ctx, (*log)->preserve(10, b10.data())).ok());
    ASSERT_TRUE(test::run_sync(ctx, (*log)->preserve(999, b999.data())).ok());
    // A second preserve of the same block keeps the first contents (the cycle's).
    auto other = block_of(1);
    ASSERT_TRUE(test::run_sync(ctx, (*log)->preserve(10, other.data())).ok());
    std::vector<std::byte> out(4096);
    ASSERT_TRUE(test::run_sync(ctx, (*log)->read(10, out.data())).ok());
    EXPECT_EQ(out, b10);
    EXPECT_EQ((*log)->preserved(), 2u);
  }
  auto again = test::run_sync(ctx, PreserveLog::open(env, "p", 7, frozen, true));
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE((*again)->contains(10));
  EXPECT_TRUE((*again)->contains(999));
  EXPECT_FALSE((*again)->contains(3));
  std::vector<std::byte> out(4096);
  ASSERT_TRUE(test::run_sync(ctx, (*again)->read(999, out.data())).ok());
  EXPECT_EQ(out, block_of(999));
  again->reset();
  // The same file seen as another cycle's log holds nothing.
  auto other = test::run_sync(ctx, PreserveLog::open(env, "p", 8, frozen, true));
  ASSERT_TRUE(other.ok());
  EXPECT_EQ((*other)->preserved(), 0u);
}

TEST(PreserveLog, PowerLossKeepsEveryCompletedPreserve) {
  for (std::uint64_t seed = 1; seed <= 60; ++seed) {
    std::mt19937_64 rng(seed);
    BlockBitmap frozen(4096);
    for (int i = 0; i < 300; ++i) frozen.set(rng() % 4096);
    std::vector<std::uint64_t> done;  // completed before the crash image was taken
    std::vector<std::byte> img;
    {
      asio::io_context ctx;
      test::FaultEnv env;
      auto log = test::run_sync(ctx, PreserveLog::open(env, "p", 1, frozen, false));
      ASSERT_TRUE(log.ok());
      const std::uint64_t crash_at = env.ops + 1 + rng() % 80;
      std::vector<std::uint64_t> done_at_crash;
      std::mt19937_64 crash_rng(seed);
      env.on_op = [&](std::uint64_t n) {
        if (n == crash_at) {
          img = env.disk("p")->crash_image(crash_rng);
          done_at_crash = done;
        }
      };
      for (std::uint64_t b = frozen.next_set(0); b < 4096 && done.size() < 60; b = frozen.next_set(b + 1)) {
        auto data = block_of(b);
        ASSERT_TRUE(test::run_sync(ctx, (*log)->preserve(b, data.data())).ok());
        done.push_back(b);
      }
      if (img.empty()) {
        img = env.disk("p")->durable;
        done_at_crash = done;
      }
      done = done_at_crash;
    }
    asio::io_context ctx;
    test::FaultEnv env;
    env.put("p", img);
    auto log = test::run_sync(ctx, PreserveLog::open(env, "p", 1, frozen, true));
    ASSERT_TRUE(log.ok());
    for (auto b : done) {
      ASSERT_TRUE((*log)->contains(b)) << "seed " << seed << ": completed preserve of block " << b << " lost";
      std::vector<std::byte> out(4096);
      ASSERT_TRUE(test::run_sync(ctx, (*log)->read(b, out.data())).ok());
      ASSERT_EQ(out, block_of(b));
    }
  }
}

struct Staged {
  std::vector<JournalExtent> extents;
  std::vector<std::vector<std::byte>> data;  // per extent (empty for zero extents)
};

Staged make_extents(std::mt19937_64& rng, int n) {
  Staged s;
  std::uint64_t off = 0;
  for (int i = 0; i < n; ++i) {
    off += (rng() % 4) * 4096;
    const std::uint32_t len = static_cast<std::uint32_t>((1 + rng() % 8) * 4096);
    const bool zero = rng() % 5 == 0;
    std::vector<std::byte> d;
    if (!zero) {
      d.resize(len);
      for (auto& x : d) x = static_cast<std::byte>(rng());
    }
    s.extents.push_back({off, len, zero, zero ? 0 : xxh3_64(d.data(), d.size())});
    s.data.push_back(std::move(d));
    off += len;
  }
  return s;
}

asio::awaitable<Status> append_all(CycleJournal& j, BufferArena& arena, const Staged& s, std::size_t from,
                                   std::size_t to, std::size_t per_record, bool sync_each) {
  for (std::size_t i = from; i < to; i += per_record) {
    const std::size_t n = std::min(per_record, to - i);
    std::size_t bytes = 0;
    for (std::size_t k = i; k < i + n; ++k) bytes += s.data[k].size();
    IoBuffer buf = arena.allocate(std::max<std::size_t>(bytes, 4096));
    std::size_t at = 0;
    for (std::size_t k = i; k < i + n; ++k) {
      if (!s.data[k].empty()) std::memcpy(buf.data() + at, s.data[k].data(), s.data[k].size());
      at += s.data[k].size();
    }
    TANDEM_CO_TRY(co_await j.append(std::span(s.extents).subspan(i, n), buf));
    if (sync_each) TANDEM_CO_TRY(co_await j.sync());
  }
  co_return Status{};
}

TEST(CycleJournal, StagesReopensAndApplies) {
  asio::io_context ctx;
  test::FaultEnv env;
  std::mt19937_64 rng(5);
  const Staged s = make_extents(rng, 50);
  {
    auto j = test::run_sync(ctx, CycleJournal::open(env, "j", 3, CycleJournal::capacity_for(4096), false));
    ASSERT_TRUE(j.ok()) << j.error().message();
    ASSERT_TRUE(test::run_sync(ctx, append_all(**j, env.buffers(), s, 0, 50, 7, true)).ok());
    EXPECT_EQ((*j)->extents(), s.extents);
  }
  auto j = test::run_sync(ctx, CycleJournal::open(env, "j", 3, CycleJournal::capacity_for(4096), true));
  ASSERT_TRUE(j.ok());
  EXPECT_EQ((*j)->extents(), s.extents);
  EXPECT_EQ((*j)->staged_end_offset(), s.extents.back().offset + s.extents.back().length);
  // Another cycle's view of the file sees nothing staged.
  auto other = test::run_sync(ctx, CycleJournal::open(env, "j2", 4, 1 << 20, true));
  ASSERT_TRUE(other.ok());
  EXPECT_TRUE((*other)->extents().empty());
  // Apply onto a volume that holds a different pattern everywhere.
  VolumeOptions vo{"v", "data", 16 << 20, "meta", {}};
  auto v = test::run_sync(ctx, Volume::open(env, vo));
  ASSERT_TRUE(v.ok());
  IoBuffer fill = env.buffers().allocate(16 << 20);
  std::memset(fill.data(), 0xee, 16 << 20);
  ASSERT_TRUE(test::run_sync(ctx, (*v)->write_replicated(0, 16 << 20, fill)).ok());
  ASSERT_TRUE(test::run_sync(ctx, (*j)->apply(**v)).ok());
  ASSERT_TRUE(test::run_sync(ctx, (*j)->apply(**v)).ok());  // idempotent
  IoBuffer r = env.buffers().allocate(16 << 20);
  ASSERT_TRUE(test::run_sync(ctx, (*v)->read(0, 16 << 20, r)).ok());
  std::vector<std::byte> expect(16 << 20, std::byte{0xee});
  for (std::size_t i = 0; i < s.extents.size(); ++i) {
    const auto& e = s.extents[i];
    if (e.zero) {
      std::memset(expect.data() + e.offset, 0, e.length);
    } else {
      std::memcpy(expect.data() + e.offset, s.data[i].data(), e.length);
    }
  }
  EXPECT_EQ(std::memcmp(r.data(), expect.data(), expect.size()), 0);
  ASSERT_TRUE(test::run_sync(ctx, (*v)->close()).ok());
}

TEST(CycleJournal, PowerLossKeepsExactlyAPrefixWithEverySyncedExtent) {
  for (std::uint64_t seed = 1; seed <= 50; ++seed) {
    std::mt19937_64 rng(seed);
    const Staged s = make_extents(rng, 40);
    std::vector<std::byte> img;
    std::size_t synced_at_crash = 0;
    {
      asio::io_context ctx;
      test::FaultEnv env;
      auto j = test::run_sync(ctx, CycleJournal::open(env, "j", 9, CycleJournal::capacity_for(1024), false));
      ASSERT_TRUE(j.ok());
      const std::uint64_t crash_at = env.ops + 1 + rng() % 30;
      std::size_t synced = 0;
      std::mt19937_64 crash_rng(seed * 3);
      env.on_op = [&](std::uint64_t n) {
        if (n == crash_at) {
          img = env.disk("j")->crash_image(crash_rng);
          synced_at_crash = synced;
        }
      };
      for (std::size_t i = 0; i < 40; i += 5) {
        ASSERT_TRUE(test::run_sync(ctx, append_all(**j, env.buffers(), s, i, i + 5, 5, false)).ok());
        if (i % 10 == 5) {
          ASSERT_TRUE(test::run_sync(ctx, (*j)->sync()).ok());
          synced = i + 5;
        }
      }
      if (img.empty()) {
        img = env.disk("j")->visible;
        synced_at_crash = synced;
      }
    }
    asio::io_context ctx;
    test::FaultEnv env;
    env.put("j", img);
    auto j = test::run_sync(ctx, CycleJournal::open(env, "j", 9, 0, true));
    ASSERT_TRUE(j.ok());
    const auto& got = (*j)->extents();
    ASSERT_GE(got.size(), synced_at_crash) << "seed " << seed << ": synced extents lost";
    ASSERT_LE(got.size(), s.extents.size());
    for (std::size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], s.extents[i]) << "seed " << seed;
  }
}

TEST(CycleJournal, CorruptDataEndsThePrefix) {
  asio::io_context ctx;
  test::FaultEnv env;
  std::mt19937_64 rng(11);
  Staged s = make_extents(rng, 20);
  for (auto& e : s.extents) e.zero = false;
  for (std::size_t i = 0; i < s.extents.size(); ++i) {
    s.data[i].resize(s.extents[i].length, std::byte{1});
    s.extents[i].hash = xxh3_64(s.data[i].data(), s.data[i].size());
  }
  {
    auto j = test::run_sync(ctx, CycleJournal::open(env, "j", 1, CycleJournal::capacity_for(4096), false));
    ASSERT_TRUE(j.ok());
    ASSERT_TRUE(test::run_sync(ctx, append_all(**j, env.buffers(), s, 0, 20, 4, true)).ok());
  }
  // Flip a byte in the data of the third record (extents 8..11).
  auto disk = env.disk("j");
  std::uint64_t pos = 0;
  for (int rec = 0; rec < 2; ++rec) {
    std::uint64_t bytes = 0;
    for (int k = rec * 4; k < rec * 4 + 4; ++k) bytes += s.extents[static_cast<std::size_t>(k)].length;
    pos += 4096 + bytes;
  }
  disk->visible[pos + 4096 + 100] ^= std::byte{0xff};
  auto j = test::run_sync(ctx, CycleJournal::open(env, "j", 1, 0, true));
  ASSERT_TRUE(j.ok());
  EXPECT_EQ((*j)->extents().size(), 8u);
}

}  // namespace
}  // namespace tandem::engine

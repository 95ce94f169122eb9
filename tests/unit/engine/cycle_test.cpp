// Plan: the engine's support for replication cycles. A cut (freeze, caller's durable record,
// drop_frozen) moves the dirty set into the frozen set and survives reopen; a power loss at any
// device operation during a cut never loses a block (it is in the dirty bitmap, or in the
// frozen set once the cut was recorded). hold_writes() waits for writes in flight and admits
// none until release; the write hook sees old contents before every host write and can refuse
// it; replicated writes need no host write access and are not dirty-tracked.
#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <cstring>
#include <random>
#include <set>

#include "fault_env.h"
#include "run_sync.h"
#include "tandem/engine/errc.h"
#include "tandem/engine/volume.h"

namespace tandem::engine {
namespace {

constexpr std::uint64_t kSize = 2 << 20;
constexpr std::uint64_t kBlocks = kSize / 4096;

VolumeOptions options() {
  VolumeOptions o{"v", "data", kSize, "meta", {}};
  o.dirty.region_bytes = 16 * 1024;
  o.dirty.intent_regions_max = 4;
  return o;
}

std::unique_ptr<Volume> open(asio::io_context& ctx, test::FaultEnv& env) {
  auto v = test::run_sync(ctx, Volume::open(env, options()));
  EXPECT_TRUE(v.ok()) << v.error().message();
  return std::move(v).value();
}

Status write_block(asio::io_context& ctx, test::FaultEnv& env, Volume& v, std::uint64_t b, std::uint8_t fill) {
  IoBuffer buf = env.buffers().allocate(4096);
  std::memset(buf.data(), fill, 4096);
  return test::run_sync(ctx, v.write(b * 4096, 4096, buf, false));
}

// The caller's durable record of a cut, as replication will keep it: the superblock's state.
asio::awaitable<Result<BlockBitmap>> do_cut(Volume& v) {
  co_await v.hold_writes();
  auto frozen = co_await v.dirty().freeze();
  if (frozen) {
    Superblock sb = v.meta().superblock();
    sb.session_state = 1;  // "a cut is recorded"
    Status st = co_await v.meta().write_superblock(sb);
    if (st) st = co_await v.dirty().drop_frozen(*frozen);
    if (!st) {
      v.release_writes();
      co_return st.error();
    }
  }
  v.release_writes();
  co_return frozen;
}

TEST(Cycle, CutMovesDirtySetToFrozenAndSurvivesReopen) {
  asio::io_context ctx;
  test::FaultEnv env;
  auto v = open(ctx, env);
  std::set<std::uint64_t> written = {0, 5, 17, 200, kBlocks - 1};
  for (auto b : written) ASSERT_TRUE(write_block(ctx, env, *v, b, 1).ok());
  auto frozen = test::run_sync(ctx, do_cut(*v));
  ASSERT_TRUE(frozen.ok()) << frozen.error().message();
  EXPECT_EQ(frozen->count(), written.size());
  for (auto b : written) EXPECT_TRUE(frozen->test(b));
  EXPECT_EQ(v->dirty().dirty_blocks(), 0u);
  // A write after the cut is dirty again, and only it.
  ASSERT_TRUE(write_block(ctx, env, *v, 5, 2).ok());
  EXPECT_EQ(v->dirty().dirty_blocks(), 1u);
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
  v.reset();
  auto v2 = open(ctx, env);
  EXPECT_EQ(v2->dirty().dirty_blocks(), 1u);
  EXPECT_TRUE(v2->dirty().is_dirty(5));
  auto again = test::run_sync(ctx, v2->dirty().load_frozen());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *frozen);
  // A second cut overwrites the first frozen set completely (no stale bits).
  auto f2 = test::run_sync(ctx, do_cut(*v2));
  ASSERT_TRUE(f2.ok());
  EXPECT_EQ(f2->count(), 1u);
  auto loaded = test::run_sync(ctx, v2->dirty().load_frozen());
  ASSERT_TRUE(loaded.ok());
  EXPECT_EQ(loaded->count(), 1u);
  ASSERT_TRUE(test::run_sync(ctx, v2->close()).ok());
}

TEST(Cycle, PowerLossDuringACutNeverLosesABlock) {
  for (std::uint64_t seed = 1; seed <= 120; ++seed) {
    std::mt19937_64 rng(seed);
    std::set<std::uint64_t> written;
    std::uint64_t crash_at = 0;
    std::vector<std::byte> data_img, meta_img;
    {
      asio::io_context ctx;
      test::FaultEnv env;
      auto v = open(ctx, env);
      for (int i = 0; i < 40; ++i) {
        const std::uint64_t b = rng() % kBlocks;
        ASSERT_TRUE(write_block(ctx, env, *v, b, 3).ok());
        written.insert(b);
      }
      const std::uint64_t before = env.ops;
      // Dry count of the cut's operations is not needed: crash anywhere in the next 40 ops.
      crash_at = before + 1 + rng() % 12;  // a cut of this volume is about ten operations
      std::mt19937_64 crash_rng(seed * 31);
      env.on_op = [&](std::uint64_t n) {
        if (n != crash_at) return;
        data_img = env.disk("data")->crash_image(crash_rng);
        meta_img = env.disk("meta")->crash_image(crash_rng);
      };
      ASSERT_TRUE(test::run_sync(ctx, do_cut(*v)).ok());
      ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
      if (meta_img.empty()) {  // the crash point fell after everything: take the final state
        data_img = env.disk("data")->durable;
        meta_img = env.disk("meta")->durable;
      }
    }
    asio::io_context ctx;
    test::FaultEnv env;
    env.put("data", data_img);
    env.put("meta", meta_img);
    auto v = open(ctx, env);
    const bool cut_recorded = v->meta().superblock().session_state == 1;
    BlockBitmap frozen(kBlocks);
    if (cut_recorded) {
      auto f = test::run_sync(ctx, v->dirty().load_frozen());
      ASSERT_TRUE(f.ok());
      frozen = *f;
    }
    for (auto b : written) {
      ASSERT_TRUE(v->dirty().is_dirty(b) || frozen.test(b))
          << "seed " << seed << " crash at op " << crash_at << ": block " << b
          << " lost (cut recorded: " << cut_recorded << ")";
    }
    ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
  }
}

// Regions of 4 blocks, room for all of them to stay hot: only cooling takes them off the log.
std::unique_ptr<Volume> open_roomy(asio::io_context& ctx, test::FaultEnv& env) {
  VolumeOptions o = options();
  o.dirty.intent_regions_max = 256;
  auto v = test::run_sync(ctx, Volume::open(env, std::move(o)));
  EXPECT_TRUE(v.ok()) << v.error().message();
  return std::move(v).value();
}

// What a restart finds dirty after a power loss that kept exactly what was flushed.
std::set<std::uint64_t> dirty_after_power_loss(test::FaultEnv& before) {
  asio::io_context ctx;
  test::FaultEnv env;
  env.put("data", before.disk("data")->durable);
  env.put("meta", before.disk("meta")->durable);
  auto v = open_roomy(ctx, env);
  std::set<std::uint64_t> out;
  for (std::uint64_t b = 0; b < kBlocks; ++b) {
    if (v->dirty().is_dirty(b)) out.insert(b);
  }
  EXPECT_TRUE(test::run_sync(ctx, v->close()).ok());
  return out;
}

TEST(Cycle, ACommittedCutCoolsItsRegionsSoACrashCountsOnlyLaterWrites) {
  asio::io_context ctx;
  test::FaultEnv env;
  auto v = open_roomy(ctx, env);
  const std::uint64_t rb = v->dirty().region_blocks();
  ASSERT_EQ(rb, 4u);
  // Writes all over the volume, cut (as a cycle), and committed at the peer.
  for (std::uint64_t r = 0; r < 40; ++r) ASSERT_TRUE(write_block(ctx, env, *v, r * 3 * rb, 1).ok());
  ASSERT_TRUE(test::run_sync(ctx, do_cut(*v)).ok());
  // A burst after the cut, in two regions; one of them was also written before it.
  ASSERT_TRUE(write_block(ctx, env, *v, 0, 2).ok());
  ASSERT_TRUE(write_block(ctx, env, *v, 500, 2).ok());
  ASSERT_EQ(v->dirty().hot_regions(), 41u);
  // Without cooling, a crash now counts all 41 regions as changed.
  EXPECT_EQ(dirty_after_power_loss(env).size(), 41 * rb);
  ASSERT_TRUE(test::run_sync(ctx, v->dirty().cool_committed()).ok());
  EXPECT_EQ(v->dirty().hot_regions(), 2u);
  EXPECT_EQ(v->dirty().cooled(), 39u);
  // With it, only the burst's two regions.
  std::set<std::uint64_t> expect;
  for (std::uint64_t b = 0; b < rb; ++b) expect.insert(b);
  for (std::uint64_t b = 500 / rb * rb; b < 500 / rb * rb + rb; ++b) expect.insert(b);
  EXPECT_EQ(dirty_after_power_loss(env), expect);
  // A write to a cooled region makes it hot again before it lands.
  ASSERT_TRUE(write_block(ctx, env, *v, 3 * rb, 3).ok());
  EXPECT_EQ(v->dirty().hot_regions(), 3u);
  EXPECT_TRUE(dirty_after_power_loss(env).contains(3 * rb));
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
}

TEST(Cycle, PowerLossWhileCoolingNeverLosesAWrite) {
  for (std::uint64_t seed = 1; seed <= 60; ++seed) {
    std::mt19937_64 rng(seed);
    std::set<std::uint64_t> after_cut;
    std::uint64_t crash_at = 0;
    std::vector<std::byte> data_img, meta_img;
    {
      asio::io_context ctx;
      test::FaultEnv env;
      auto v = open_roomy(ctx, env);
      for (int i = 0; i < 30; ++i) ASSERT_TRUE(write_block(ctx, env, *v, rng() % kBlocks, 1).ok());
      ASSERT_TRUE(test::run_sync(ctx, do_cut(*v)).ok());
      for (int i = 0; i < 5; ++i) {
        const std::uint64_t b = rng() % kBlocks;
        ASSERT_TRUE(write_block(ctx, env, *v, b, 2).ok());
        after_cut.insert(b);
      }
      crash_at = env.ops + 1 + rng() % 6;  // cooling is a few page writes, a flush and a record
      std::mt19937_64 crash_rng(seed * 17);
      env.on_op = [&](std::uint64_t n) {
        if (n != crash_at) return;
        data_img = env.disk("data")->crash_image(crash_rng);
        meta_img = env.disk("meta")->crash_image(crash_rng);
      };
      ASSERT_TRUE(test::run_sync(ctx, v->dirty().cool_committed()).ok());
      // A write racing the cooled log, to a region the cooling may just have dropped.
      const std::uint64_t b = rng() % kBlocks;
      ASSERT_TRUE(write_block(ctx, env, *v, b, 3).ok());
      if (meta_img.empty()) {  // else the crash came first: this write was never acknowledged
        after_cut.insert(b);
        data_img = env.disk("data")->durable;
        meta_img = env.disk("meta")->durable;
      }
    }
    asio::io_context ctx;
    test::FaultEnv env;
    env.put("data", data_img);
    env.put("meta", meta_img);
    auto v = open_roomy(ctx, env);
    for (auto b : after_cut) {
      ASSERT_TRUE(v->dirty().is_dirty(b))
          << "seed " << seed << " crash at op " << crash_at << ": block " << b << " written after the cut is not dirty";
    }
    ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
  }
}

// True if every byte of block b on the data disk is durable (a power loss keeps it).
bool durable(test::FaultEnv& env, std::uint64_t b) {
  auto d = env.disk("data");
  return std::memcmp(d->durable.data() + b * 4096, d->visible.data() + b * 4096, 4096) == 0;
}

// A region leaves the intent log only once its writes are durable on the data disk: a peer
// may hold a replicated block whole while a power loss drops or tears the source's copy, and
// the block must then still count as changed. Found by the replication simulation.
TEST(Cycle, ARegionLeavesTheIntentLogOnlyWithItsDataDurable) {
  asio::io_context ctx;
  test::FaultEnv env;
  auto v = open_roomy(ctx, env);
  const std::uint64_t rb = v->dirty().region_blocks();
  for (std::uint64_t r = 0; r < 10; ++r) ASSERT_TRUE(write_block(ctx, env, *v, r * 3 * rb, 1).ok());
  for (std::uint64_t r = 0; r < 10; ++r) EXPECT_FALSE(durable(env, r * 3 * rb)) << "no flush yet";
  ASSERT_TRUE(test::run_sync(ctx, do_cut(*v)).ok());
  const auto flushes = v->dirty().data_flushes();
  ASSERT_TRUE(test::run_sync(ctx, v->dirty().cool_committed()).ok());
  EXPECT_EQ(v->dirty().cooled(), 10u);
  EXPECT_EQ(v->dirty().data_flushes(), flushes + 1);
  for (std::uint64_t r = 0; r < 10; ++r) EXPECT_TRUE(durable(env, r * 3 * rb)) << "cooled region " << r * 3;
  // The host's own flush counts: nothing written since, so cooling needs no other.
  ASSERT_TRUE(write_block(ctx, env, *v, 1, 2).ok());
  ASSERT_TRUE(test::run_sync(ctx, do_cut(*v)).ok());
  ASSERT_TRUE(test::run_sync(ctx, v->flush()).ok());
  ASSERT_TRUE(test::run_sync(ctx, v->dirty().cool_committed()).ok());
  EXPECT_EQ(v->dirty().data_flushes(), flushes + 1);
  // Writing the map whole (a source becoming a destination) empties the log: the same rule.
  ASSERT_TRUE(write_block(ctx, env, *v, 7 * rb, 4).ok());
  ASSERT_TRUE(test::run_sync(ctx, do_cut(*v)).ok());
  EXPECT_FALSE(durable(env, 7 * rb));
  ASSERT_TRUE(test::run_sync(ctx, v->dirty().persist_all()).ok());
  EXPECT_EQ(v->dirty().hot_regions(), 0u);
  EXPECT_TRUE(durable(env, 7 * rb)) << "a block the log no longer covers";
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());

  // Eviction: four hot regions at most; a fifth evicts the least recently used. Without a cut
  // its bits go to disk and need no flush; after one, its data must be durable.
  test::FaultEnv env2;
  auto w = open(ctx, env2);
  const std::uint64_t rb2 = w->dirty().region_blocks();
  for (std::uint64_t r = 0; r < 5; ++r) ASSERT_TRUE(write_block(ctx, env2, *w, r * rb2, 1).ok());
  EXPECT_EQ(w->dirty().evictions(), 1u);
  EXPECT_EQ(w->dirty().data_flushes(), 0u);
  EXPECT_FALSE(durable(env2, rb2));
  ASSERT_TRUE(test::run_sync(ctx, do_cut(*w)).ok());
  ASSERT_TRUE(write_block(ctx, env2, *w, 6 * rb2, 1).ok());
  EXPECT_EQ(w->dirty().evictions(), 2u);
  EXPECT_EQ(w->dirty().data_flushes(), 1u);
  EXPECT_TRUE(durable(env2, rb2)) << "the evicted region's write, replicated by the cut";
  ASSERT_TRUE(test::run_sync(ctx, w->close()).ok());
}

TEST(Cycle, HoldWritesWaitsForInFlightAndAdmitsNoneUntilRelease) {
  asio::io_context ctx;
  test::FaultEnv env;
  auto v = open(ctx, env);
  IoBuffer buf = env.buffers().allocate(4096);
  std::memset(buf.data(), 7, 4096);
  std::vector<std::string> events;
  // A write starts, then a hold begins while it is in flight, then another write arrives.
  asio::co_spawn(ctx, v->write(0, 4096, buf, false), [&](std::exception_ptr, Status st) {
    EXPECT_TRUE(st.ok());
    events.push_back("w1 done");
  });
  asio::co_spawn(
      ctx,
      [](Volume& vol, std::vector<std::string>& ev) -> asio::awaitable<void> {
        co_await vol.hold_writes();
        ev.push_back("held");
        // While held, let the loop run: the second write must not complete.
        for (int i = 0; i < 50; ++i) co_await test::yield_once();
        ev.push_back("release");
        vol.release_writes();
      }(*v, events),
      [](std::exception_ptr e) { EXPECT_FALSE(e); });
  asio::co_spawn(ctx, v->write(8192, 4096, buf, false), [&](std::exception_ptr, Status st) {
    EXPECT_TRUE(st.ok());
    events.push_back("w2 done");
  });
  ctx.restart();
  ctx.run();
  ASSERT_EQ(events, (std::vector<std::string>{"w1 done", "held", "release", "w2 done"}));
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
}

TEST(Cycle, ASecondHoldWaitsForTheFirstsRelease) {
  asio::io_context ctx;
  test::FaultEnv env;
  auto v = open(ctx, env);
  std::vector<std::string> events;
  auto holder = [](Volume& vol, std::vector<std::string>& ev, std::string name) -> asio::awaitable<void> {
    co_await vol.hold_writes();
    ev.push_back(name + " held");
    for (int i = 0; i < 20; ++i) co_await test::yield_once();
    ev.push_back(name + " released");
    vol.release_writes();
  };
  asio::co_spawn(ctx, holder(*v, events, "a"), [](std::exception_ptr e) { EXPECT_FALSE(e); });
  asio::co_spawn(ctx, holder(*v, events, "b"), [](std::exception_ptr e) { EXPECT_FALSE(e); });
  ctx.restart();
  ctx.run();
  ASSERT_EQ(events, (std::vector<std::string>{"a held", "a released", "b held", "b released"}));
  ASSERT_TRUE(write_block(ctx, env, *v, 0, 1).ok());  // nothing left held
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
}

class RecordingHook : public WriteHook {
 public:
  RecordingHook(Volume& v, BufferArena& a) : v_(v), a_(a) {}
  asio::awaitable<Status> before_write(std::uint64_t first, std::uint64_t count) override {
    if (refuse) co_return errc::io_error;
    IoBuffer old = a_.allocate(count * 4096);
    TANDEM_CO_TRY(co_await v_.read(first * 4096, count * 4096, old));
    for (std::uint64_t i = 0; i < count; ++i) {
      seen.emplace_back(first + i, static_cast<std::uint8_t>(old.data()[i * 4096]));
    }
    co_return Status{};
  }
  bool refuse = false;
  std::vector<std::pair<std::uint64_t, std::uint8_t>> seen;

 private:
  Volume& v_;
  BufferArena& a_;
};

TEST(Cycle, WriteHookSeesOldContentsAndCanRefuse) {
  asio::io_context ctx;
  test::FaultEnv env;
  auto v = open(ctx, env);
  ASSERT_TRUE(write_block(ctx, env, *v, 3, 0x11).ok());
  RecordingHook hook(*v, env.buffers());
  v->set_write_hook(&hook);
  ASSERT_TRUE(write_block(ctx, env, *v, 3, 0x22).ok());
  // Unaligned writes and zeroes are hooked too, on every block they touch.
  IoBuffer small = env.buffers().allocate(100);
  std::memset(small.data(), 0x33, 100);
  ASSERT_TRUE(test::run_sync(ctx, v->write(3 * 4096 + 10, 100, small, false)).ok());
  ASSERT_TRUE(test::run_sync(ctx, v->write_zeroes(4 * 4096, 8192, true, false, false)).ok());
  const std::vector<std::pair<std::uint64_t, std::uint8_t>> expect = {{3, 0x11}, {3, 0x22}, {4, 0}, {5, 0}};
  EXPECT_EQ(hook.seen, expect);
  hook.refuse = true;
  EXPECT_FALSE(write_block(ctx, env, *v, 3, 0x44).ok());
  IoBuffer r = env.buffers().allocate(4096);
  ASSERT_TRUE(test::run_sync(ctx, v->read(3 * 4096, 4096, r)).ok());
  EXPECT_EQ(r.data()[0], std::byte{0x22});  // refused: nothing written
  v->set_write_hook(nullptr);
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
}

TEST(Cycle, ReplicatedWritesIgnoreHostAccessAndDirtyTracking) {
  asio::io_context ctx;
  test::FaultEnv env;
  auto v = open(ctx, env);
  v->set_access(Access::read_only);
  IoBuffer buf = env.buffers().allocate(8192);
  std::memset(buf.data(), 0x5e, 8192);
  ASSERT_TRUE(test::run_sync(ctx, v->write_replicated(4096, 8192, buf)).ok());
  ASSERT_TRUE(test::run_sync(ctx, v->zero_replicated(8192, 4096)).ok());
  EXPECT_EQ(v->dirty().dirty_blocks(), 0u);
  IoBuffer r = env.buffers().allocate(12288);
  ASSERT_TRUE(test::run_sync(ctx, v->read(0, 12288, r)).ok());
  EXPECT_EQ(r.data()[0], std::byte{0});
  EXPECT_EQ(r.data()[4096], std::byte{0x5e});
  EXPECT_EQ(r.data()[8192], std::byte{0});
  EXPECT_EQ(test::run_sync(ctx, v->write_replicated(kSize, 4096, buf)).code(), make_error_code(errc::no_space));
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
}

}  // namespace
}  // namespace tandem::engine

// Plan: power-loss crashes at random device operations never lose a flushed write nor forget a
// dirty block. A seeded random workload (concurrent aligned and unaligned writes, FUA writes,
// zeroes, trims, flushes) runs over fault-injecting disks; at a random device operation the
// disks' crash images are taken (unflushed writes dropped, kept or torn per 512-byte sector)
// together with the model's state at that instant. The volume is then reopened from the crash
// images and checked against the model:
//   - every sector holds its last durably acknowledged content, or the content of a write
//     issued after it (never anything else, never a mix within a sector);
//   - every block whose content is not zero, and every block of an acknowledged write, is in
//     the recovered dirty map.
// A failure prints the seed; TANDEM_CRASH_SEEDS raises the number of runs.
#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>

#include "fault_env.h"
#include "run_sync.h"
#include "tandem/common/units.h"
#include "tandem/engine/volume.h"

namespace tandem::engine {
namespace {

constexpr std::uint64_t kSize = 1 << 20;
constexpr std::uint64_t kSector = 512;
constexpr std::uint64_t kSectors = kSize / kSector;
constexpr std::uint64_t kBlocks = kSize / 4096;

// Sector content for write `id` (0 = zeros): the id, the sector number, then a pattern.
void stamp(std::byte* p, std::uint64_t id, std::uint64_t sector) {
  if (id == 0) {
    std::memset(p, 0, kSector);
    return;
  }
  auto* u = reinterpret_cast<unsigned char*>(p);
  put_le64(u, id);
  put_le64(u + 8, sector);
  for (std::size_t i = 16; i < kSector; ++i) u[i] = static_cast<unsigned char>(id * 131 + i);
}

// Returns the id a sector holds, or ~0 when it is not any write's exact content.
std::uint64_t identify(const std::byte* p, std::uint64_t sector) {
  std::byte expect[kSector];
  bool zero = true;
  for (std::size_t i = 0; i < kSector; ++i) zero = zero && p[i] == std::byte{0};
  if (zero) return 0;
  const std::uint64_t id = get_le64(reinterpret_cast<const unsigned char*>(p));
  stamp(expect, id, sector);
  return std::memcmp(expect, p, kSector) == 0 ? id : ~0ull;
}

struct Model {
  std::vector<std::uint64_t> durable = std::vector<std::uint64_t>(kSectors, 0);
  std::vector<std::vector<std::uint64_t>> later = std::vector<std::vector<std::uint64_t>>(kSectors);
  std::set<std::uint64_t> acked_blocks;

  void issued(std::uint64_t s0, std::uint64_t n, std::uint64_t id) {
    for (std::uint64_t s = s0; s < s0 + n; ++s) later[s].push_back(id);
  }
  void make_durable(std::uint64_t s0, std::uint64_t n, std::uint64_t id) {
    for (std::uint64_t s = s0; s < s0 + n; ++s) {
      auto& l = later[s];
      auto it = std::find(l.begin(), l.end(), id);
      if (it == l.end()) continue;  // already superseded by a newer durable write
      durable[s] = id;
      l.erase(l.begin(), it + 1);
    }
  }
};

struct Write {
  std::uint64_t id, s0, n;
};

struct Outcome {
  std::uint64_t ops = 0;
  bool crashed = false;
  std::vector<std::byte> data_img, meta_img;
  Model model_at_crash;
};

// Runs the seeded workload; takes the crash snapshot at device op `crash_at` (0 = never).
Outcome run_workload(std::uint64_t seed, std::uint64_t crash_at) {
  asio::io_context ctx;
  test::FaultEnv env;
  std::mt19937_64 rng(seed);
  std::mt19937_64 crash_rng(seed ^ 0x9e3779b97f4a7c15ull);
  Outcome out;
  Model model;
  VolumeOptions o{"v", "data", kSize, "meta", {}};
  o.dirty.region_bytes = 16 * 1024;  // 4-block regions
  o.dirty.intent_regions_max = 3;    // constant eviction
  env.on_op = [&](std::uint64_t n) {
    if (n != crash_at) return;
    out.crashed = true;
    out.data_img = env.disk("data")->crash_image(crash_rng);
    out.meta_img = env.disk("meta")->crash_image(crash_rng);
    out.model_at_crash = model;
  };
  auto vr = test::run_sync(ctx, Volume::open(env, o));
  EXPECT_TRUE(vr.ok()) << vr.error().message();
  auto v = std::move(vr).value();
  std::uint64_t next_id = 1;
  std::vector<Write> completed_since_flush_start;  // completed writes a flush will cover
  for (int batch = 0; batch < 24; ++batch) {
    // Disjoint block ranges within a batch: per-sector order is then the issue order.
    std::set<std::uint64_t> used_blocks;
    const int n = 1 + static_cast<int>(rng() % 6);
    int pending = 0;
    std::vector<Write> done_writes;
    for (int i = 0; i < n; ++i) {
      const int kind = static_cast<int>(rng() % 10);
      const bool aligned = rng() % 2 == 0;
      std::uint64_t s0 = rng() % (kSectors - 64);
      std::uint64_t ns = 1 + rng() % 40;
      if (aligned || kind >= 8) {
        s0 &= ~7ull;
        ns = (ns + 7) & ~7ull;
      }
      bool clash = false;
      for (std::uint64_t b = s0 / 8; b <= (s0 + ns - 1) / 8; ++b) clash = clash || used_blocks.contains(b);
      if (clash) continue;
      for (std::uint64_t b = s0 / 8; b <= (s0 + ns - 1) / 8; ++b) used_blocks.insert(b);
      const std::uint64_t id = (kind >= 8) ? 0 : next_id++;
      const bool fua = kind == 1;
      // Zero writes and trims all carry id 0 (their content is zeros).
      model.issued(s0, ns, id);
      ++pending;
      auto on_done = [&, id, s0, ns, fua](std::exception_ptr, Status st) {
        EXPECT_TRUE(st.ok()) << st.error().message();
        --pending;
        for (std::uint64_t b = s0 * kSector / 4096; b <= ((s0 + ns) * kSector - 1) / 4096; ++b) {
          model.acked_blocks.insert(b);
        }
        if (fua) model.make_durable(s0, ns, id);
        done_writes.push_back({id, s0, ns});
      };
      if (kind < 8) {
        auto buf = std::make_shared<IoBuffer>(env.buffers().allocate(ns * kSector));
        for (std::uint64_t s = 0; s < ns; ++s) stamp(buf->data() + s * kSector, id, s0 + s);
        asio::co_spawn(ctx, v->write(s0 * kSector, ns * kSector, *buf, fua),
                       [buf, on_done](std::exception_ptr e, Status st) { on_done(e, st); });
      } else if (kind == 8) {
        asio::co_spawn(ctx, v->write_zeroes(s0 * kSector, ns * kSector, rng() % 2 == 0, false, false), on_done);
      } else {
        asio::co_spawn(ctx, v->trim(s0 * kSector, ns * kSector, false), on_done);
      }
    }
    ctx.restart();
    ctx.run();
    EXPECT_EQ(pending, 0);
    for (auto& w : done_writes) completed_since_flush_start.push_back(w);
    if (rng() % 3 == 0) {
      // Everything completed before the flush starts is durable once it completes.
      auto covered = std::move(completed_since_flush_start);
      completed_since_flush_start.clear();
      Status st = test::run_sync(ctx, v->flush());
      EXPECT_TRUE(st.ok());
      for (auto& w : covered) model.make_durable(w.s0, w.n, w.id);
    }
  }
  EXPECT_TRUE(test::run_sync(ctx, v->close()).ok());  // crash points inside close count too
  env.on_op = nullptr;
  out.ops = env.ops;
  return out;
}

void check_recovery(std::uint64_t seed, const Outcome& o) {
  asio::io_context ctx;
  test::FaultEnv env;
  env.put("data", o.data_img);
  env.put("meta", o.meta_img);
  VolumeOptions opts{"v", "data", kSize, "meta", {}};
  opts.dirty.region_bytes = 16 * 1024;
  opts.dirty.intent_regions_max = 3;
  auto vr = test::run_sync(ctx, Volume::open(env, opts));
  ASSERT_TRUE(vr.ok()) << "seed " << seed << ": " << vr.error().message();
  auto& v = **vr;
  IoBuffer all = env.buffers().allocate(kSize);
  ASSERT_TRUE(test::run_sync(ctx, v.read(0, kSize, all)).ok());
  const Model& m = o.model_at_crash;
  for (std::uint64_t s = 0; s < kSectors; ++s) {
    const std::uint64_t id = identify(all.data() + s * kSector, s);
    ASSERT_NE(id, ~0ull) << "seed " << seed << ": sector " << s << " holds a mix of writes";
    const bool ok = id == m.durable[s] || std::find(m.later[s].begin(), m.later[s].end(), id) != m.later[s].end();
    ASSERT_TRUE(ok) << "seed " << seed << ": sector " << s << " holds write " << id << " but the durable write is "
                    << m.durable[s] << " (flushed data lost)";
  }
  for (std::uint64_t b = 0; b < kBlocks; ++b) {
    bool nonzero = false;
    for (std::uint64_t i = 0; i < 4096 && !nonzero; ++i) nonzero = all.data()[b * 4096 + i] != std::byte{0};
    if (nonzero || m.acked_blocks.contains(b)) {
      ASSERT_TRUE(v.dirty().is_dirty(b)) << "seed " << seed << ": block " << b
                                         << " changed but is not in the recovered dirty map";
    }
  }
  ASSERT_TRUE(test::run_sync(ctx, v.close()).ok());
}

TEST(Crash, RandomPowerLossKeepsFlushedDataAndDirtyBlocks) {
  std::uint64_t seeds = 150;
  if (const char* e = std::getenv("TANDEM_CRASH_SEEDS")) seeds = std::strtoull(e, nullptr, 10);
  std::uint64_t crashes = 0;
  for (std::uint64_t seed = 1; seed <= seeds; ++seed) {
    const Outcome dry = run_workload(seed, 0);
    ASSERT_GT(dry.ops, 0u);
    std::mt19937_64 pick(seed * 7919);
    const std::uint64_t at = 1 + pick() % dry.ops;
    const Outcome o = run_workload(seed, at);
    ASSERT_TRUE(o.crashed) << "seed " << seed;
    ++crashes;
    check_recovery(seed, o);
    if (::testing::Test::HasFatalFailure()) return;
  }
  EXPECT_EQ(crashes, seeds);
}

}  // namespace
}  // namespace tandem::engine

// Plan: the Volume's data path matches a byte-level model under random, concurrent,
// unaligned and overlapping requests (overlapping writes land in arrival order); errors are
// the documented codes; a failed flush turns the volume read-only for good and is never
// reported as success again; the dirty map covers every written block, the intent log stays
// within its bound, and everything survives close + reopen. Runs over the fault-injecting
// in-memory disk.
#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <cstring>
#include <random>

#include "fault_env.h"
#include "run_sync.h"
#include "tandem/engine/errc.h"
#include "tandem/engine/volume.h"

namespace tandem::engine {
namespace {

constexpr std::uint64_t kSize = 4 << 20;

class VolumeTest : public ::testing::Test {
 protected:
  asio::io_context ctx;
  test::FaultEnv env;

  std::unique_ptr<Volume> open(std::uint32_t region_bytes = 64 * 1024, std::uint32_t hot_max = 4) {
    VolumeOptions o;
    o.id = "v";
    o.path = "data";
    o.create_bytes = kSize;
    o.meta_path = "meta";
    o.dirty.region_bytes = region_bytes;
    o.dirty.intent_regions_max = hot_max;
    auto v = test::run_sync(ctx, Volume::open(env, o));
    EXPECT_TRUE(v.ok()) << v.error().message();
    return std::move(v).value();
  }
  IoBuffer filled(std::size_t len, std::uint8_t seed) {
    IoBuffer b = env.buffers().allocate(len);
    for (std::size_t i = 0; i < len; ++i) b.data()[i] = static_cast<std::byte>(seed + i * 31);
    return b;
  }
  std::vector<std::byte> read_all(Volume& v) {
    IoBuffer b = env.buffers().allocate(kSize);
    EXPECT_TRUE(test::run_sync(ctx, v.read(0, kSize, b)).ok());
    return {b.data(), b.data() + kSize};
  }
};

TEST_F(VolumeTest, RandomConcurrentUnalignedOverlappingRequestsMatchModel) {
  auto v = open();
  std::vector<std::byte> model(kSize);
  std::mt19937_64 rng(12345);
  for (int batch = 0; batch < 60; ++batch) {
    const int n = 1 + static_cast<int>(rng() % 16);
    int pending = 0;
    // Issue a batch concurrently; the model applies them in issue order, which is the order
    // the range lock grants overlapping writes.
    for (int i = 0; i < n; ++i) {
      // Cluster offsets in a small window so writes overlap often.
      const std::uint64_t off = (rng() % 2 ? 0 : (rng() % (kSize - 200000))) + rng() % 20000;
      const std::size_t len = 1 + rng() % 70000;
      const int kind = static_cast<int>(rng() % 10);
      ++pending;
      if (kind < 7) {
        auto buf = std::make_shared<IoBuffer>(filled(len, static_cast<std::uint8_t>(rng())));
        std::memcpy(model.data() + off, buf->data(), len);
        asio::co_spawn(ctx, v->write(off, len, *buf, kind == 0), [&, buf](std::exception_ptr, Status st) {
          EXPECT_TRUE(st.ok()) << st.error().message();
          --pending;
        });
      } else {
        std::memset(model.data() + off, 0, len);
        asio::co_spawn(ctx, v->write_zeroes(off, len, kind == 8, kind == 9, false), [&](std::exception_ptr, Status st) {
          EXPECT_TRUE(st.ok()) << st.error().message();
          --pending;
        });
      }
    }
    ctx.restart();
    ctx.run();
    ASSERT_EQ(pending, 0);
    if (batch % 10 == 9) {
      ASSERT_EQ(read_all(*v), model) << "batch " << batch;
    }
  }
  // Unaligned reads return exactly the model's bytes.
  for (int i = 0; i < 50; ++i) {
    const std::uint64_t off = rng() % (kSize - 10000);
    const std::size_t len = 1 + rng() % 9999;
    IoBuffer b = env.buffers().allocate(len);
    ASSERT_TRUE(test::run_sync(ctx, v->read(off, len, b)).ok());
    ASSERT_EQ(std::memcmp(b.data(), model.data() + off, len), 0);
  }
  EXPECT_GT(v->stats().rmw, 0u);
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
}

TEST_F(VolumeTest, ErrorsAreTheDocumentedCodes) {
  auto v = open();
  IoBuffer b = filled(8192, 1);
  auto code = [&](Status st) { return st.code(); };
  EXPECT_EQ(code(test::run_sync(ctx, v->read(kSize - 4096, 8192, b))), make_error_code(errc::out_of_range));
  EXPECT_EQ(code(test::run_sync(ctx, v->read(kSize + 1, 1, b))), make_error_code(errc::out_of_range));
  EXPECT_EQ(code(test::run_sync(ctx, v->write(kSize - 4096, 8192, b, false))), make_error_code(errc::no_space));
  EXPECT_EQ(code(test::run_sync(ctx, v->write_zeroes(kSize, 1, true, false, false))), make_error_code(errc::no_space));
  // The boundary itself is fine.
  EXPECT_TRUE(test::run_sync(ctx, v->write(kSize - 4096, 4096, b, false)).ok());
  v->set_access(Access::read_only);
  EXPECT_EQ(code(test::run_sync(ctx, v->write(0, 4096, b, false))), make_error_code(errc::read_only));
  EXPECT_EQ(code(test::run_sync(ctx, v->trim(0, 4096, false))), make_error_code(errc::read_only));
  EXPECT_TRUE(test::run_sync(ctx, v->read(0, 4096, b)).ok());
  v->set_access(Access::read_write);
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
  EXPECT_EQ(code(test::run_sync(ctx, v->write(0, 4096, b, false))), make_error_code(errc::shutting_down));
}

TEST_F(VolumeTest, FailedFlushIsStickyAndNeverRetriedIntoSuccess) {
  auto v = open();
  IoBuffer b = filled(4096, 3);
  ASSERT_TRUE(test::run_sync(ctx, v->write(0, 4096, b, false)).ok());
  env.disk("data")->fail_flush = true;
  Status st = test::run_sync(ctx, v->flush());
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.code(), make_error_code(errc::volume_failed));
  EXPECT_FALSE(v->failure().empty());
  EXPECT_NE(v->failure().find("fault injected"), std::string::npos);
  EXPECT_FALSE(v->writable());
  // The fault clears, but the volume does not pretend the lost data is durable.
  env.disk("data")->fail_flush = false;
  EXPECT_EQ(test::run_sync(ctx, v->flush()).code(), make_error_code(errc::volume_failed));
  EXPECT_EQ(test::run_sync(ctx, v->write(0, 4096, b, false)).code(), make_error_code(errc::volume_failed));
  EXPECT_TRUE(test::run_sync(ctx, v->read(0, 4096, b)).ok());
  EXPECT_FALSE(test::run_sync(ctx, v->close()).ok());
}

TEST_F(VolumeTest, DirtyMapCoversWritesAndIntentLogStaysBounded) {
  auto v = open(64 * 1024, 4);  // 16-block regions, at most 4 hot
  std::set<std::uint64_t> written;
  std::mt19937_64 rng(7);
  for (int i = 0; i < 200; ++i) {
    const std::uint64_t block = rng() % (kSize / 4096);
    IoBuffer b = filled(4096, static_cast<std::uint8_t>(i));
    ASSERT_TRUE(test::run_sync(ctx, v->write(block * 4096, 4096, b, false)).ok());
    written.insert(block);
    ASSERT_LE(v->dirty().hot_regions(), 4u);
  }
  EXPECT_GT(v->dirty().evictions(), 0u);
  for (auto blk : written) EXPECT_TRUE(v->dirty().is_dirty(blk)) << blk;
  EXPECT_EQ(v->dirty().dirty_blocks(), written.size());
  // Clearing (as replication will) forgets blocks, and the rest stays.
  const std::uint64_t first = *written.begin();
  v->dirty().clear(first, 1);
  EXPECT_FALSE(v->dirty().is_dirty(first));
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
  v.reset();
  // A clean reopen restores exactly the same dirty set: nothing extra, nothing lost.
  auto v2 = open(64 * 1024, 4);
  for (auto blk : written) EXPECT_EQ(v2->dirty().is_dirty(blk), blk != first) << blk;
  EXPECT_EQ(v2->dirty().dirty_blocks(), written.size() - 1);
  ASSERT_TRUE(test::run_sync(ctx, v2->close()).ok());
}

TEST_F(VolumeTest, TrimAndZeroesMarkDirtyAndReadZero) {
  auto v = open();
  IoBuffer b = filled(65536, 9);
  ASSERT_TRUE(test::run_sync(ctx, v->write(0, 65536, b, false)).ok());
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
  v.reset();
  auto v2 = open();
  // Clear the map so only the trim and zero below can dirty blocks.
  v2->dirty().clear(0, kSize / 4096);
  ASSERT_TRUE(test::run_sync(ctx, v2->trim(4096 + 100, 8192, false)).ok());  // whole block 2 only
  ASSERT_TRUE(test::run_sync(ctx, v2->write_zeroes(40000, 100, false, true, false)).ok());
  EXPECT_FALSE(v2->dirty().is_dirty(1));
  EXPECT_TRUE(v2->dirty().is_dirty(2));
  EXPECT_FALSE(v2->dirty().is_dirty(3));
  EXPECT_TRUE(v2->dirty().is_dirty(40000 / 4096));
  IoBuffer r = env.buffers().allocate(65536);
  ASSERT_TRUE(test::run_sync(ctx, v2->read(0, 65536, r)).ok());
  for (std::size_t i = 0; i < 65536; ++i) {
    const bool zero = (i >= 8192 && i < 12288) || (i >= 40000 && i < 40100);
    ASSERT_EQ(r.data()[i], zero ? std::byte{0} : b.data()[i]) << i;
  }
  ASSERT_TRUE(test::run_sync(ctx, v2->close()).ok());
}

}  // namespace
}  // namespace tandem::engine

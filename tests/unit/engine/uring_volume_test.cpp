// Plan: a Volume over a real file with the production io_uring env: the file is created at
// the configured size, data and the dirty map persist across close and reopen, an existing
// file whose size disagrees with the config is refused with a message naming both sizes, and
// a fast zero succeeds on a filesystem that can punch holes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "run_sync.h"
#include "tandem/engine/errc.h"
#include "tandem/engine/volume.h"

namespace tandem::engine {
namespace {

namespace fs = std::filesystem;

class UringVolumeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/var/tmp/tandem-vol-XXXXXX";
    dir = ::mkdtemp(tmpl);
    auto e = make_uring_env(ctx);
    ASSERT_TRUE(e.ok()) << e.error().message();
    env = std::move(e).value();
  }
  void TearDown() override {
    env->stop();
    ctx.restart();
    ctx.run();
    env.reset();
    fs::remove_all(dir);
  }
  VolumeOptions opts(std::uint64_t size) {
    return VolumeOptions{"vol0", (dir / "data.img").string(), size, (dir / "vol0.meta").string(), {}};
  }
  asio::io_context ctx;
  std::unique_ptr<DeviceEnv> env;
  fs::path dir;
};

TEST_F(UringVolumeTest, CreatesPersistsAndReopens) {
  {
    auto v = test::run_sync(ctx, Volume::open(*env, opts(16 << 20)));
    ASSERT_TRUE(v.ok()) << v.error().message();
    EXPECT_TRUE((*v)->created());
    EXPECT_EQ(fs::file_size(dir / "data.img"), 16u << 20);
    IoBuffer b = env->buffers().allocate(10000);
    std::memset(b.data(), 0x5c, 10000);
    ASSERT_TRUE(test::run_sync(ctx, (*v)->write(12345, 10000, b, true)).ok());
    ASSERT_TRUE(test::run_sync(ctx, (*v)->write_zeroes(1 << 20, 1 << 20, true, false, true)).ok());
    ASSERT_TRUE(test::run_sync(ctx, (*v)->flush()).ok());
    ASSERT_TRUE(test::run_sync(ctx, (*v)->close()).ok());
  }
  auto v = test::run_sync(ctx, Volume::open(*env, opts(16 << 20)));
  ASSERT_TRUE(v.ok()) << v.error().message();
  EXPECT_FALSE((*v)->created());
  IoBuffer r = env->buffers().allocate(10002);
  ASSERT_TRUE(test::run_sync(ctx, (*v)->read(12344, 10002, r)).ok());
  EXPECT_EQ(r.data()[0], std::byte{0});
  EXPECT_EQ(r.data()[1], std::byte{0x5c});
  EXPECT_EQ(r.data()[10000], std::byte{0x5c});
  EXPECT_EQ(r.data()[10001], std::byte{0});
  for (std::uint64_t b = 12345 / 4096; b <= (12345 + 9999) / 4096; ++b) EXPECT_TRUE((*v)->dirty().is_dirty(b));
  EXPECT_TRUE((*v)->dirty().is_dirty((1 << 20) / 4096));
  EXPECT_FALSE((*v)->dirty().is_dirty(100));
  ASSERT_TRUE(test::run_sync(ctx, (*v)->close()).ok());
}

TEST_F(UringVolumeTest, SizeDisagreementIsRefused) {
  {
    auto v = test::run_sync(ctx, Volume::open(*env, opts(8 << 20)));
    ASSERT_TRUE(v.ok());
    ASSERT_TRUE(test::run_sync(ctx, (*v)->close()).ok());
  }
  auto v = test::run_sync(ctx, Volume::open(*env, opts(16 << 20)));
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.error().code, make_error_code(errc::bad_config));
  EXPECT_NE(v.error().message().find("8388608"), std::string::npos) << v.error().message();
  EXPECT_NE(v.error().message().find("16777216"), std::string::npos) << v.error().message();
}

TEST_F(UringVolumeTest, UnalignedSizeIsRefused) {
  auto v = test::run_sync(ctx, Volume::open(*env, opts(1000)));
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.error().code, make_error_code(errc::bad_config));
}

}  // namespace
}  // namespace tandem::engine

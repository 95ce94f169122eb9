// Plan: the foreign sources against real servers. nbdkit's memory plugin (sparse, with block
// status) is read and written through libnbd's asynchronous API: data round-trips, writes with
// FUA, zeroes and flushes succeed, and block status tells written blocks from holes. Its
// error filter fails single requests without taking the source down; its delay filter past
// the timeout takes it down with the reason; killing the server fails the request in flight
// and every later one. Bad URIs, a missing socket and a size that is not a multiple of 4096 are
// clear errors. A local sparse file is a source too, with holes found by SEEK_DATA/SEEK_HOLE.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstring>
#include <filesystem>

#include "nbdkit_process.h"
#include "run_sync.h"
#include "tandem/engine/volume.h"
#include "tandem/importer/source.h"

namespace tandem::importer {
namespace {

namespace fs = std::filesystem;
using test::NbdkitProcess;

class SourceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/var/tmp/tandem-src-XXXXXX";
    dir = ::mkdtemp(tmpl);
    auto e = engine::make_uring_env(ctx);
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
  std::unique_ptr<ForeignSource> open(const std::string& uri, SourceOptions o = {}) {
    auto r = test::run_sync(ctx, open_source(ctx.get_executor(), *env, uri, o));
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.error().message());
    return r.ok() ? std::move(r).value() : nullptr;
  }
  Error open_error(const std::string& uri, SourceOptions o = {}) {
    auto r = test::run_sync(ctx, open_source(ctx.get_executor(), *env, uri, o));
    EXPECT_FALSE(r.ok());
    return r.ok() ? Error() : r.error();
  }
  void close(ForeignSource& s) { test::run_sync(ctx, s.close()); }
  engine::IoBuffer filled(std::size_t n, std::uint8_t v) {
    engine::IoBuffer b = env->buffers().allocate(n);
    std::memset(b.data(), v, n);
    return b;
  }
  static bool all(const engine::IoBuffer& b, std::size_t n, std::uint8_t v) {
    for (std::size_t i = 0; i < n; ++i) {
      if (b.data()[i] != std::byte{v}) return false;
    }
    return true;
  }

  asio::io_context ctx;
  std::unique_ptr<engine::DeviceEnv> env;
  fs::path dir;
};

TEST_F(SourceTest, MemoryServerRoundTripsAndReportsHoles) {
  NbdkitProcess kit(TANDEM_NBDKIT, dir / "s.sock", {"memory", "8M"});
  auto src = open(kit.uri());
  ASSERT_TRUE(src);
  EXPECT_EQ(src->size(), 8u << 20);
  EXPECT_TRUE(src->has_block_status());
  EXPECT_EQ(src->display_name(), "nbd+unix:///");
  auto w = filled(1 << 20, 0xab);
  ASSERT_TRUE(test::run_sync(ctx, src->write(2 << 20, 1 << 20, w, true)).ok());
  auto w2 = filled(4096, 0x11);
  ASSERT_TRUE(test::run_sync(ctx, src->write(6 << 20, 4096, w2, false)).ok());
  ASSERT_TRUE(test::run_sync(ctx, src->flush()).ok());
  auto r = filled(1 << 20, 0);
  ASSERT_TRUE(test::run_sync(ctx, src->read(2 << 20, 1 << 20, r)).ok());
  EXPECT_TRUE(all(r, 1 << 20, 0xab));

  auto ext = test::run_sync(ctx, src->extents(0, 8 << 20));
  ASSERT_TRUE(ext.ok()) << ext.error().message();
  // Holes and data alternate; the written ranges are data, the rest zero.
  std::uint64_t at = 0;
  std::uint64_t data = 0;
  for (const SourceExtent& e : *ext) {
    EXPECT_EQ(e.offset, at);
    EXPECT_EQ(e.offset % 4096, 0u);
    EXPECT_EQ(e.length % 4096, 0u);
    at += e.length;
    if (!e.zero) {
      data += e.length;
      const bool covers = (e.offset <= (2u << 20) && e.offset + e.length >= (3u << 20)) ||
                          (e.offset <= (6u << 20) && e.offset + e.length >= (6u << 20) + 4096);
      EXPECT_TRUE(covers) << "data extent at " << e.offset << "+" << e.length;
    }
  }
  EXPECT_GE(data, (1u << 20) + 4096);
  EXPECT_LT(data, 8u << 20);  // the holes were reported

  // Zeroing makes the range read as zeros and a hole again.
  ASSERT_TRUE(test::run_sync(ctx, src->zero(2 << 20, 1 << 20, false)).ok());
  ASSERT_TRUE(test::run_sync(ctx, src->read(2 << 20, 1 << 20, r)).ok());
  EXPECT_TRUE(all(r, 1 << 20, 0));
  ASSERT_TRUE(test::run_sync(ctx, src->read(6 << 20, 4096, r)).ok());
  EXPECT_TRUE(all(r, 4096, 0x11));
  EXPECT_FALSE(src->is_down());
  close(*src);
}

TEST_F(SourceTest, ManyRequestsInFlightAtOnce) {
  NbdkitProcess kit(TANDEM_NBDKIT, dir / "s.sock", {"memory", "16M"});
  auto src = open(kit.uri());
  ASSERT_TRUE(src);
  // 64 concurrent writes of distinct stamps, then 64 concurrent reads checking them.
  auto job = [&]() -> asio::awaitable<bool> {
    TaskGroup g(ctx.get_executor());
    std::vector<engine::IoBuffer> bufs;
    for (std::size_t i = 0; i < 64; ++i) bufs.push_back(filled(65536, static_cast<std::uint8_t>(i + 1)));
    for (std::size_t i = 0; i < 64; ++i)
      g.spawn(src->write(static_cast<std::uint64_t>(i) * 65536 * 4, 65536, bufs[i], false));
    if (Status st = co_await g.wait(); !st) {
      ADD_FAILURE() << st.error().message();
      co_return false;
    }
    std::vector<engine::IoBuffer> back;
    for (std::size_t i = 0; i < 64; ++i) back.push_back(filled(65536, 0));
    for (std::size_t i = 0; i < 64; ++i) g.spawn(src->read(static_cast<std::uint64_t>(i) * 65536 * 4, 65536, back[i]));
    if (Status st = co_await g.wait(); !st) {
      ADD_FAILURE() << st.error().message();
      co_return false;
    }
    for (std::size_t i = 0; i < 64; ++i) {
      if (!all(back[i], 65536, static_cast<std::uint8_t>(i + 1))) co_return false;
    }
    co_return true;
  };
  EXPECT_TRUE(test::run_sync(ctx, job()));
  close(*src);
}

TEST_F(SourceTest, ServerErrorFailsOneRequestOnly) {
  fs::path trigger = dir / "fail-reads";
  NbdkitProcess kit(TANDEM_NBDKIT, dir / "s.sock",
                    {"--filter=error", "memory", "1M", "error-pread=EIO", "error-pread-rate=100%",
                     "error-pread-file=" + trigger.string()});
  auto src = open(kit.uri());
  ASSERT_TRUE(src);
  auto b = filled(4096, 0x5a);
  ASSERT_TRUE(test::run_sync(ctx, src->write(0, 4096, b, false)).ok());
  {
    std::FILE* f = std::fopen(trigger.c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fclose(f);
  }
  Status st = test::run_sync(ctx, src->read(0, 4096, b));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.code(), std::error_code(EIO, std::generic_category())) << st.error().message();
  EXPECT_FALSE(src->is_down());
  fs::remove(trigger);
  std::memset(b.data(), 0, 4096);
  ASSERT_TRUE(test::run_sync(ctx, src->read(0, 4096, b)).ok());
  EXPECT_TRUE(all(b, 4096, 0x5a));
  close(*src);
}

TEST_F(SourceTest, NoAnswerWithinTheTimeoutTakesTheSourceDown) {
  NbdkitProcess kit(TANDEM_NBDKIT, dir / "s.sock", {"--filter=delay", "memory", "1M", "delay-read=10"});
  auto src = open(kit.uri(), SourceOptions{.timeout_ms = 300});
  ASSERT_TRUE(src);
  auto b = filled(4096, 0);
  const auto t0 = std::chrono::steady_clock::now();
  Status st = test::run_sync(ctx, src->read(0, 4096, b));
  ASSERT_FALSE(st.ok());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(9));  // not the server's answer
  EXPECT_EQ(st.code(), std::make_error_code(std::errc::not_connected));
  EXPECT_TRUE(src->is_down());
  EXPECT_NE(src->down_reason().find("no answer within 300 ms"), std::string::npos) << src->down_reason();
  // Every later request fails at once.
  EXPECT_EQ(test::run_sync(ctx, src->write(0, 4096, b, false)).code(), std::make_error_code(std::errc::not_connected));
  close(*src);
}

TEST_F(SourceTest, KilledServerFailsRequestsInFlightAndLater) {
  auto kit = std::make_unique<NbdkitProcess>(
      TANDEM_NBDKIT, dir / "s.sock", std::vector<std::string>{"--filter=delay", "memory", "1M", "delay-read=2"});
  auto src = open(kit->uri());
  ASSERT_TRUE(src);
  auto b = filled(4096, 0);
  auto job = [&]() -> asio::awaitable<Status> {
    asio::steady_timer t(ctx);
    t.expires_after(std::chrono::milliseconds(200));
    asio::co_spawn(
        ctx,
        [&]() -> asio::awaitable<void> {
          co_await t.async_wait(asio::use_awaitable);
          kit->stop(SIGKILL);
        },
        abort_on_exception);
    co_return co_await src->read(0, 4096, b);
  };
  Status st = test::run_sync(ctx, job());
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.code(), std::make_error_code(std::errc::not_connected)) << st.error().message();
  EXPECT_TRUE(src->is_down());
  EXPECT_FALSE(test::run_sync(ctx, src->flush()).ok());
  close(*src);
}

TEST_F(SourceTest, BadSourcesAreClearErrors) {
  EXPECT_EQ(open_error("http://example/x").code, std::make_error_code(std::errc::invalid_argument));
  EXPECT_EQ(open_error("relative/path").code, std::make_error_code(std::errc::invalid_argument));
  Error missing = open_error("nbd+unix:///?socket=" + (dir / "nobody.sock").string());
  EXPECT_NE(missing.message().find("nbd+unix:///"), std::string::npos) << missing.message();
  Error bad = open_error("nbd://[not-an-address");
  EXPECT_FALSE(bad.message().empty());
  NbdkitProcess kit(TANDEM_NBDKIT, dir / "odd.sock", {"memory", "5000"});
  Error odd = open_error(kit.uri());
  EXPECT_NE(odd.message().find("not a non-zero multiple of 4096"), std::string::npos) << odd.message();
  EXPECT_EQ(redact_uri("nbds://alice:pw@host:10809/lun7?tls-psk-file=/k"), "nbds://host:10809/lun7");
  EXPECT_EQ(redact_uri("nbd+unix:///exp?socket=/run/x.sock"), "nbd+unix:///exp");
}

TEST_F(SourceTest, LocalSparseFileIsASource) {
  const fs::path f = dir / "disk.img";
  {
    const int fd = ::open(f.c_str(), O_CREAT | O_RDWR, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, 64 << 20), 0);
    std::vector<char> d(1 << 20, 'x');
    ASSERT_EQ(::pwrite(fd, d.data(), d.size(), 16 << 20), static_cast<ssize_t>(d.size()));
    ::close(fd);
  }
  auto src = open(f.string());
  ASSERT_TRUE(src);
  EXPECT_EQ(src->size(), 64u << 20);
  auto ext = test::run_sync(ctx, src->extents(0, 64 << 20));
  ASSERT_TRUE(ext.ok());
  std::uint64_t data = 0;
  for (const auto& e : *ext) data += e.zero ? 0 : e.length;
  EXPECT_GE(data, 1u << 20);
  EXPECT_LE(data, 4u << 20);  // the filesystem may round allocation up, never to the whole file
  auto b = filled(4096, 0);
  ASSERT_TRUE(test::run_sync(ctx, src->read(16 << 20, 4096, b)).ok());
  EXPECT_TRUE(all(b, 4096, 'x'));
  close(*src);
}

}  // namespace
}  // namespace tandem::importer

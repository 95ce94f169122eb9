// Plan: an Import over a real volume (io_uring, a file) from a real nbdkit server (the file
// plugin, so the source's bytes can be checked on disk afterwards).
//   - The copy completes while the host writes and reads: afterwards the volume and the source
//     both hold exactly the source's old contents overlaid by the host's writes (unaligned
//     ones included), holes were skipped, and a host read never saw anything but those bytes.
//   - Pause stops the restart address; resume goes on from it; nothing is copied twice.
//   - The source killed: host writes are still acknowledged and recorded missing, reads of
//     blocks not yet copied fail with EIO; the source restarted: the missing blocks reach it,
//     then the copy finishes.
//   - cancel without force while the source is down fails (Cancel_Failed) and says why; once it
//     is back, cancel brings the source up to date; after Cancelled host I/O is refused.
//   - An import stopped part way (the record kept) and recovered goes on from its restart
//     address, and cutover removes the filter.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstring>
#include <filesystem>
#include <random>

#include "nbdkit_process.h"
#include "run_sync.h"
#include "tandem/common/file_util.h"
#include "tandem/engine/volume.h"
#include "tandem/importer/import.h"

namespace tandem::importer {
namespace {

namespace fs = std::filesystem;
using test::NbdkitProcess;

constexpr std::uint64_t kSize = 64ULL << 20;

class ImportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/var/tmp/tandem-imp-XXXXXX";
    dir = ::mkdtemp(tmpl);
    auto e = engine::make_uring_env(ctx);
    ASSERT_TRUE(e.ok()) << e.error().message();
    env = std::move(e).value();
    // The source: 64 MiB, data in the first 8 MiB and at 40 MiB, the rest holes.
    src_file = dir / "source.img";
    const int fd = ::open(src_file.c_str(), O_CREAT | O_RDWR, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(kSize)), 0);
    expected.assign(kSize, 0);
    std::mt19937_64 rng(7);
    for (std::uint64_t off : {std::uint64_t{0}, std::uint64_t{40} << 20}) {
      const std::uint64_t n = off == 0 ? (8ULL << 20) : (1ULL << 20);
      for (std::uint64_t i = 0; i < n; i += 8) {
        const std::uint64_t v = rng();
        std::memcpy(expected.data() + off + i, &v, 8);
      }
      ASSERT_EQ(::pwrite(fd, expected.data() + off, n, static_cast<off_t>(off)), static_cast<ssize_t>(n));
    }
    ::close(fd);
    imports = dir / "imports";
    fs::create_directories(imports);
  }
  void TearDown() override {
    kit.reset();
    env->stop();
    ctx.restart();
    ctx.run();
    env.reset();
    fs::remove_all(dir);
  }
  // filters: "--filter=delay" and its parameters ("delay-read=5ms"), which go after the plugin.
  void start_source(std::vector<std::string> filters = {}) {
    std::vector<std::string> args;
    std::vector<std::string> params;
    for (auto& f : filters) (f.starts_with("--") ? args : params).push_back(f);
    args.push_back("file");
    args.push_back(src_file.string());
    args.insert(args.end(), params.begin(), params.end());
    kit = std::make_unique<NbdkitProcess>(TANDEM_NBDKIT, dir / "src.sock", args);
  }
  std::unique_ptr<engine::Volume> open_volume() {
    auto v = test::run_sync(
        ctx,
        engine::Volume::open(
            *env, engine::VolumeOptions{"vol0", (dir / "vol.img").string(), kSize, (dir / "vol.meta").string(), {}}));
    EXPECT_TRUE(v.ok()) << v.error().message();
    return std::move(v).value();
  }
  ImportOptions options() {
    ImportOptions o;
    o.dir = imports.string();
    o.checkpoint_ms = 100;
    o.reconnect_min_ms = 50;
    o.reconnect_max_ms = 200;
    o.source.timeout_ms = 2000;
    return o;
  }
  ImportRecord record() {
    ImportRecord r;
    r.id = "imp1";
    r.name = "test";
    r.state = ImportState::queued;
    r.source_uri = kit->uri();
    r.source_size = kSize;
    r.volume_id = "vol0";
    r.volume_created = true;
    r.created_ms = unix_now_ms();
    r.rate_limit = rate_limit;
    return r;
  }
  std::unique_ptr<Import> create(engine::Volume& v, ImportOptions o) {
    auto src = test::run_sync(ctx, open_source(ctx.get_executor(), *env, kit->uri(), o.source));
    EXPECT_TRUE(src.ok()) << src.error().message();
    auto im = test::run_sync(
        ctx, Import::create(ctx.get_executor(), *env, v, record(), std::move(src).value(), o, v.data_created()));
    EXPECT_TRUE(im.ok()) << im.error().message();
    return std::move(im).value();
  }
  // Runs the loop until pred() holds (bounded).
  bool wait_for(const std::function<bool()>& pred, int seconds = 60) {
    auto job = [&]() -> asio::awaitable<bool> {
      asio::steady_timer t(ctx);
      for (int i = 0; i < seconds * 50; ++i) {
        if (pred()) co_return true;
        t.expires_after(std::chrono::milliseconds(20));
        co_await t.async_wait(asio::use_awaitable);
      }
      co_return pred();
    };
    return test::run_sync(ctx, job());
  }
  // A host write of `n` bytes of `v` at `off`, applied to `expected` when acknowledged.
  Status host_write(engine::Volume& v, std::uint64_t off, std::size_t n, std::uint8_t val) {
    engine::IoBuffer b = env->buffers().allocate(n);
    std::memset(b.data(), val, n);
    Status st = test::run_sync(ctx, v.write(off, n, b, false));
    if (st) std::memset(expected.data() + off, val, n);
    return st;
  }
  std::vector<std::uint8_t> read_file(const fs::path& p) {
    auto t = read_whole_file(p.string());
    EXPECT_TRUE(t.ok());
    return std::vector<std::uint8_t>(t->begin(), t->end());
  }
  std::vector<std::uint8_t> read_volume(engine::Volume& v) {
    std::vector<std::uint8_t> out(kSize);
    engine::IoBuffer b = env->buffers().allocate(4 << 20);
    for (std::uint64_t off = 0; off < kSize; off += 4 << 20) {
      EXPECT_TRUE(test::run_sync(ctx, v.read(off, 4 << 20, b)).ok());
      std::memcpy(out.data() + off, b.data(), 4 << 20);
    }
    return out;
  }
  static std::uint64_t first_difference(const std::vector<std::uint8_t>& a, const std::vector<std::uint8_t>& b) {
    for (std::uint64_t i = 0; i < std::min(a.size(), b.size()); ++i) {
      if (a[i] != b[i]) return i;
    }
    return a.size() == b.size() ? UINT64_MAX : std::min(a.size(), b.size());
  }
  void stop(Import& im) { test::run_sync(ctx, im.stop()); }

  asio::io_context ctx;
  std::unique_ptr<engine::DeviceEnv> env;
  std::unique_ptr<NbdkitProcess> kit;
  fs::path dir;
  fs::path src_file;
  fs::path imports;
  std::vector<std::uint8_t> expected;
  std::uint64_t rate_limit = 0;
};

TEST_F(ImportTest, CopiesWhileTheHostWritesAndReads) {
  start_source({"--filter=delay", "delay-read=5ms"});
  auto v = open_volume();
  auto o = options();
  o.chunk_bytes = 256 * 1024;
  rate_limit = 3ULL << 20;  // the copy lasts about 3 s: the host works all through it
  auto im = create(*v, o);
  im->start();
  // Before the copy starts, a host read of the source's data comes from the source.
  engine::IoBuffer r = env->buffers().allocate(8192);
  ASSERT_TRUE(test::run_sync(ctx, v->read(1 << 20, 8192, r)).ok());
  EXPECT_EQ(std::memcmp(r.data(), expected.data() + (1 << 20), 8192), 0);
  ASSERT_TRUE(test::run_sync(ctx, im->begin_copy()).ok());
  // Host writes across the whole volume while the copy runs: aligned, unaligned, over data and
  // holes, ahead of and behind the copy.
  std::mt19937_64 rng(11);
  int writes = 0;
  while (im->record().state == ImportState::copy_in_progress && writes < 5000) {
    const std::uint64_t off = rng() % (kSize - 20000);
    const std::size_t n = (rng() % 3 == 0) ? 4096 * (1 + rng() % 8) : 1 + rng() % 12000;
    const std::uint64_t at = (n % 4096 == 0) ? off / 4096 * 4096 : off;
    ASSERT_TRUE(host_write(*v, at, n, static_cast<std::uint8_t>(1 + writes % 250)).ok());
    // Reads anywhere see exactly what the host has written over the source.
    const std::uint64_t roff = rng() % (kSize - 8192);
    ASSERT_TRUE(test::run_sync(ctx, v->read(roff, 8192, r)).ok());
    ASSERT_EQ(std::memcmp(r.data(), expected.data() + roff, 8192), 0) << "read at " << roff;
    ++writes;
  }
  EXPECT_GT(writes, 50);
  ASSERT_TRUE(wait_for([&] { return im->record().state == ImportState::ready_for_cutover; }));
  ASSERT_TRUE(test::run_sync(ctx, v->flush()).ok());
  EXPECT_GE(im->record().skipped_bytes, 40ULL << 20) << "holes were not skipped";
  EXPECT_EQ(im->record().restart_address, kSize);
  // Both copies hold exactly the source's old bytes overlaid by every acknowledged write.
  EXPECT_EQ(first_difference(read_volume(*v), expected), UINT64_MAX);
  EXPECT_EQ(first_difference(read_file(src_file), expected), UINT64_MAX);
  ASSERT_TRUE(test::run_sync(ctx, im->cutover()).ok());
  EXPECT_EQ(im->record().state, ImportState::import_completed);
  EXPECT_EQ(v->host_filter(), nullptr);
  EXPECT_FALSE(fs::exists(imports / "imp1.map"));
  stop(*im);
  // After cutover a write reaches the volume only.
  ASSERT_TRUE(host_write(*v, 0, 4096, 0xee).ok());
  EXPECT_NE(read_file(src_file)[0], 0xee);
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
}

TEST_F(ImportTest, PauseKeepsTheRestartAddressAndResumeGoesOnFromIt) {
  start_source();
  auto v = open_volume();
  // 4 MiB/s over 9 MiB of data: slow enough to pause part way.
  rate_limit = 4ULL << 20;
  auto im = create(*v, options());
  im->start();
  ASSERT_TRUE(test::run_sync(ctx, im->begin_copy()).ok());
  ASSERT_TRUE(wait_for([&] { return im->status().record.restart_address >= (2ULL << 20); }));
  ASSERT_TRUE(test::run_sync(ctx, im->pause()).ok());
  ASSERT_TRUE(wait_for([&] { return im->status().record.restart_address == im->record().restart_address; }, 10));
  const std::uint64_t at = im->status().record.restart_address;
  const std::uint64_t copied = im->record().copied_bytes;
  EXPECT_LT(at, kSize);
  wait_for([] { return false; }, 1);  // a second paused
  EXPECT_EQ(im->status().record.restart_address, at);
  EXPECT_EQ(im->record().copied_bytes, copied);
  EXPECT_EQ(im->record().state, ImportState::paused);
  ASSERT_TRUE(test::run_sync(ctx, im->resume()).ok());
  ASSERT_TRUE(wait_for([&] { return im->record().state == ImportState::ready_for_cutover; }));
  // Every data byte moved once: copied + skipped is the volume, exactly.
  EXPECT_EQ(im->record().copied_bytes + im->record().skipped_bytes, kSize);
  EXPECT_EQ(first_difference(read_volume(*v), expected), UINT64_MAX);
  stop(*im);
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
}

TEST_F(ImportTest, SourceDownWritesGoOnAndReachItWhenItIsBack) {
  start_source();
  auto v = open_volume();
  auto im = create(*v, options());
  im->start();
  // Not copying yet: blocks at 4 MiB are not copied.
  kit->stop(SIGKILL);
  ASSERT_TRUE(host_write(*v, 1 << 20, 8192, 0x77).ok());  // mirrored fails: recorded missing
  EXPECT_FALSE(im->status().source_connected);
  EXPECT_EQ(im->status().record.source_missing_blocks, 2u);
  EXPECT_EQ(im->record().error_code, "source_unreachable");
  engine::IoBuffer r = env->buffers().allocate(4096);
  Status rs = test::run_sync(ctx, v->read(4 << 20, 4096, r));
  ASSERT_FALSE(rs.ok());
  EXPECT_NE(rs.error().message().find("unreachable"), std::string::npos) << rs.error().message();
  // The written blocks read back from the volume.
  ASSERT_TRUE(test::run_sync(ctx, v->read(1 << 20, 4096, r)).ok());
  EXPECT_EQ(r.data()[0], std::byte{0x77});
  // A flush succeeds: the volume has the data and the missing set is durable.
  ASSERT_TRUE(test::run_sync(ctx, v->flush()).ok());
  // cancel without force needs the source.
  Status c = test::run_sync(ctx, im->cancel(false));
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(im->record().state, ImportState::cancel_failed);
  EXPECT_FALSE(im->record().error_message.empty());
  // Back: the missing blocks are written to it.
  start_source();
  ASSERT_TRUE(
      wait_for([&] { return im->status().source_connected && im->status().record.source_missing_blocks == 0; }));
  auto on_source = read_file(src_file);
  EXPECT_EQ(on_source[1 << 20], 0x77);
  EXPECT_EQ(on_source[(1 << 20) + 8191], 0x77);
  // Now cancel works; afterwards host I/O to the volume is refused.
  ASSERT_TRUE(host_write(*v, 2 << 20, 4096, 0x78).ok());
  ASSERT_TRUE(test::run_sync(ctx, im->cancel(false)).ok());
  EXPECT_EQ(im->record().state, ImportState::cancelled);
  EXPECT_EQ(first_difference(read_file(src_file), expected), UINT64_MAX);
  EXPECT_FALSE(host_write(*v, 0, 4096, 1).ok());
  EXPECT_FALSE(test::run_sync(ctx, v->read(0, 4096, r)).ok());
  stop(*im);
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
}

TEST_F(ImportTest, KilledSourceMidCopyThenBackFinishes) {
  start_source({"--filter=delay", "delay-read=20ms"});
  auto v = open_volume();
  rate_limit = 4ULL << 20;  // still copying when the source is killed
  auto im = create(*v, options());
  im->start();
  ASSERT_TRUE(test::run_sync(ctx, im->begin_copy()).ok());
  ASSERT_TRUE(wait_for([&] { return im->status().record.restart_address >= (1ULL << 20); }));
  kit->stop(SIGKILL);
  ASSERT_TRUE(host_write(*v, 30 << 20, 4096, 0x42).ok());
  ASSERT_TRUE(wait_for([&] { return !im->status().source_connected; }));
  EXPECT_EQ(im->record().state, ImportState::copy_in_progress);
  start_source();
  ASSERT_TRUE(wait_for([&] { return im->record().state == ImportState::ready_for_cutover; }));
  EXPECT_EQ(first_difference(read_volume(*v), expected), UINT64_MAX);
  EXPECT_EQ(first_difference(read_file(src_file), expected), UINT64_MAX);
  EXPECT_TRUE(im->record().error_code.empty()) << im->record().error_message;
  stop(*im);
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
}

TEST_F(ImportTest, RecoveredImportGoesOnFromItsRestartAddress) {
  start_source({"--filter=delay", "delay-read=20ms"});
  auto v = open_volume();
  rate_limit = 4ULL << 20;  // still copying when it is stopped
  auto im = create(*v, options());
  im->start();
  ASSERT_TRUE(test::run_sync(ctx, im->begin_copy()).ok());
  ASSERT_TRUE(wait_for([&] { return im->record().restart_address >= (2ULL << 20); }));
  ASSERT_TRUE(host_write(*v, 50 << 20, 4096, 0x99).ok());
  stop(*im);  // like a crash, as far as the record goes: it is left as it was
  const std::uint64_t restart = im->record().restart_address;
  im.reset();
  auto text = read_whole_file((imports / "imp1.json").string());
  ASSERT_TRUE(text.ok());
  auto rec = parse_record(*text, "imp1.json");
  ASSERT_TRUE(rec.ok()) << rec.error().message();
  EXPECT_EQ(rec->state, ImportState::copy_in_progress);
  EXPECT_GE(rec->restart_address, restart);
  auto im2r = test::run_sync(ctx, Import::recover(ctx.get_executor(), *env, *v, *rec, options()));
  ASSERT_TRUE(im2r.ok()) << im2r.error().message();
  auto im2 = std::move(im2r).value();
  EXPECT_EQ(v->host_filter(), im2.get());
  im2->start();
  ASSERT_TRUE(wait_for([&] { return im2->record().state == ImportState::ready_for_cutover; }));
  EXPECT_EQ(first_difference(read_volume(*v), expected), UINT64_MAX);
  EXPECT_EQ(first_difference(read_file(src_file), expected), UINT64_MAX);
  stop(*im2);
  ASSERT_TRUE(test::run_sync(ctx, v->close()).ok());
}

TEST(ImportRecordTest, RoundTripsAndRejectsBadRecords) {
  ImportRecord r;
  r.id = "a";
  r.name = "n";
  r.state = ImportState::paused;
  r.source_uri = "nbd://h/x";
  r.source_size = 8192;
  r.volume_id = "v";
  r.scheduled_ms = 123;
  r.restart_address = 4096;
  auto back = parse_record(render_record(r), "x");
  ASSERT_TRUE(back.ok()) << back.error().message();
  EXPECT_EQ(back->state, ImportState::paused);
  EXPECT_EQ(back->scheduled_ms, 123);
  EXPECT_EQ(back->restart_address, 4096u);
  EXPECT_FALSE(parse_record("{", "x").ok());
  EXPECT_FALSE(parse_record("[]", "x").ok());
  std::string t = render_record(r);
  EXPECT_FALSE(parse_record(std::string(t).replace(t.find("Paused"), 6, "Sleepy"), "x").ok());
  r.restart_address = 5000;
  EXPECT_FALSE(parse_record(render_record(r), "x").ok());
}

TEST(ImportControlTest, TheContractsTable) {
  using S = ImportState;
  using A = ImportAction;
  EXPECT_TRUE(import_action_allowed(S::copy_in_progress, A::pause));
  EXPECT_FALSE(import_action_allowed(S::paused, A::pause));
  EXPECT_TRUE(import_action_allowed(S::paused, A::resume));
  EXPECT_FALSE(import_action_allowed(S::copy_in_progress, A::cutover));
  EXPECT_TRUE(import_action_allowed(S::ready_for_cutover, A::cutover));
  for (S s : {S::scheduled, S::queued, S::copy_in_progress, S::paused, S::ready_for_cutover, S::cancel_failed}) {
    EXPECT_TRUE(import_action_allowed(s, A::cancel)) << to_string(s);
    EXPECT_TRUE(import_action_allowed(s, A::cancel_force)) << to_string(s);
    EXPECT_FALSE(import_action_allowed(s, A::remove)) << to_string(s);
  }
  for (S s : {S::cutover_in_progress, S::cancel_in_progress}) {
    for (A a : {A::pause, A::resume, A::cutover, A::cancel, A::cancel_force, A::remove}) {
      EXPECT_FALSE(import_action_allowed(s, a)) << to_string(s) << " " << to_string(a);
    }
  }
  for (S s : {S::import_completed, S::cancelled, S::failed}) {
    EXPECT_TRUE(import_action_allowed(s, A::remove));
    EXPECT_FALSE(import_action_allowed(s, A::cancel));
  }
  EXPECT_EQ(import_state_from("Ready_For_Cutover"), S::ready_for_cutover);
  EXPECT_FALSE(import_state_from("ready_for_cutover").has_value());
}

}  // namespace
}  // namespace tandem::importer

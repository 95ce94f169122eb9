// FaultEnv: an in-memory DeviceEnv whose disks behave like real disks with volatile caches,
// for crash tests of the engine (leveldb's fault_injection_test, for block storage).
//
// Every write lands in the disk's visible image at once and is remembered as "unflushed"
// until a flush (or FUA) makes it durable. A crash, taken at any moment as a snapshot, keeps
// the durable image plus each unflushed write dropped, kept, or torn at 512-byte sector
// granularity, chosen by a seeded RNG. Flushes can be made to fail. Operations complete
// asynchronously (posted), so requests interleave as they do on io_uring.
//
// The crash hook runs inside the N-th device operation (before it takes effect), which puts
// crash points between every pair of device operations: between an intent-log write and its
// flush, between a data write and its acknowledgement, and so on.
#pragma once

#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "tandem/engine/block_device.h"
#include "tandem/engine/errc.h"

namespace tandem::test {

namespace asio = boost::asio;
using engine::BlockDevice;
using engine::BufferArena;
using engine::IoBuffer;

struct FaultDiskState {
  struct Pending {
    std::uint64_t offset;
    std::vector<std::byte> data;
  };
  std::vector<std::byte> durable;
  std::vector<std::byte> visible;
  std::vector<Pending> pending;
  bool fail_flush = false;
  std::uint64_t flushes = 0;
  std::uint64_t writes = 0;

  explicit FaultDiskState(std::uint64_t size) : durable(size), visible(size) {}

  // The image a power loss leaves right now. Does not change this state.
  std::vector<std::byte> crash_image(std::mt19937_64& rng) const {
    std::vector<std::byte> img = durable;
    for (const auto& p : pending) {
      const int fate = static_cast<int>(rng() % 3);  // 0 drop, 1 keep, 2 tear
      if (fate == 0) continue;
      for (std::size_t s = 0; s < p.data.size(); s += 512) {
        if (fate == 2 && (rng() & 1) == 0) continue;
        const std::size_t n = std::min<std::size_t>(512, p.data.size() - s);
        std::memcpy(img.data() + p.offset + s, p.data.data() + s, n);
      }
    }
    return img;
  }
};

class FaultEnv;

class FaultDisk final : public BlockDevice {
 public:
  FaultDisk(FaultEnv& env, std::shared_ptr<FaultDiskState> st, std::string path)
      : env_(env), st_(std::move(st)), path_(std::move(path)) {}
  std::uint64_t size_bytes() const override { return st_->visible.size(); }
  const std::string& path() const override { return path_; }
  bool is_block_device() const override { return false; }

  asio::awaitable<Status> read(std::uint64_t offset, std::size_t len, const IoBuffer& buf) override;
  asio::awaitable<Status> write(std::uint64_t offset, std::size_t len, const IoBuffer& buf, bool fua) override;
  asio::awaitable<Status> flush() override;
  asio::awaitable<Status> zero(std::uint64_t offset, std::uint64_t len, bool may_unmap) override;

 private:
  void check(std::uint64_t offset, std::uint64_t len) const {
    TANDEM_ASSERT(offset % 4096 == 0 && len % 4096 == 0);
    TANDEM_ASSERT(offset + len <= st_->visible.size());
  }
  void apply(std::uint64_t offset, const std::byte* data, std::size_t len, bool durable) {
    std::memcpy(st_->visible.data() + offset, data, len);
    if (durable) {
      std::memcpy(st_->durable.data() + offset, data, len);
      // The cache holds the newest data per sector: an older unflushed write to these bytes
      // can no longer land over the durable one, so it now carries the new bytes there.
      for (auto& p : st_->pending) {
        const std::uint64_t lo = std::max<std::uint64_t>(p.offset, offset);
        const std::uint64_t hi = std::min<std::uint64_t>(p.offset + p.data.size(), offset + len);
        if (lo < hi) std::memcpy(p.data.data() + (lo - p.offset), data + (lo - offset), hi - lo);
      }
    } else {
      st_->pending.push_back({offset, std::vector<std::byte>(data, data + len)});
    }
    ++st_->writes;
  }
  FaultEnv& env_;
  std::shared_ptr<FaultDiskState> st_;
  std::string path_;
};

class FaultEnv final : public engine::DeviceEnv {
 public:
  explicit FaultEnv(std::size_t arena_bytes = 8 * 1024 * 1024) : arena_(arena_bytes) {}

  Result<std::unique_ptr<BlockDevice>> open(const engine::OpenSpec& spec) override {
    if (dead) return errno_error(EIO, "process crashed: open " + spec.path);
    auto it = disks_.find(spec.path);
    if (it == disks_.end()) {
      if (!spec.create_bytes) return errno_error(ENOENT, spec.path);
      it = disks_.emplace(spec.path, std::make_shared<FaultDiskState>(*spec.create_bytes)).first;
    }
    return std::unique_ptr<BlockDevice>(new FaultDisk(*this, it->second, spec.path));
  }
  Status remove(const std::string& path) override {
    if (dead) return errno_error(EIO, "process crashed: remove " + path);
    disks_.erase(path);
    return {};
  }
  BufferArena& buffers() override { return arena_; }
  // A simulation's clock (time that moves when it says, numbers from its seed); unset: the
  // system's.
  engine::Clock* clock_override = nullptr;
  engine::Clock& clock() override { return clock_override != nullptr ? *clock_override : engine::system_clock(); }

  std::shared_ptr<FaultDiskState> disk(const std::string& path) { return disks_.at(path); }
  // Installs a disk image (e.g. a crash image) under a path.
  void put(const std::string& path, std::vector<std::byte> image) {
    auto st = std::make_shared<FaultDiskState>(0);
    st->durable = image;
    st->visible = std::move(image);
    disks_[path] = std::move(st);
  }
  const std::map<std::string, std::shared_ptr<FaultDiskState>>& disks() const { return disks_; }

  // A process crash (SIGKILL): from now on nothing done through this env reaches the disks and
  // every operation fails. What was written stays (a process's page cache outlives it), and
  // another env takes the disks over with adopt().
  bool dead = false;
  void adopt(const FaultEnv& other) { disks_ = other.disks_; }

  // Called at the start of every device operation with its sequence number.
  std::function<void(std::uint64_t)> on_op;
  std::uint64_t ops = 0;

  void tick() {
    ++ops;
    if (on_op) on_op(ops);
  }

 private:
  BufferArena arena_;
  std::map<std::string, std::shared_ptr<FaultDiskState>> disks_;
};

inline asio::awaitable<void> yield_once() {
  co_await asio::post(co_await asio::this_coro::executor, asio::use_awaitable);
}

inline asio::awaitable<Status> FaultDisk::read(std::uint64_t offset, std::size_t len, const IoBuffer& buf) {
  co_await yield_once();
  env_.tick();
  if (env_.dead) co_return errno_error(EIO, "process crashed: read " + path_);
  check(offset, len);
  std::memcpy(buf.data(), st_->visible.data() + offset, len);
  co_return Status{};
}

inline asio::awaitable<Status> FaultDisk::write(std::uint64_t offset, std::size_t len, const IoBuffer& buf, bool fua) {
  // The data is captured at submission, as the kernel does; completion comes later.
  check(offset, len);
  std::vector<std::byte> copy(buf.data(), buf.data() + len);
  co_await yield_once();
  env_.tick();
  if (env_.dead) co_return errno_error(EIO, "process crashed: write " + path_);
  apply(offset, copy.data(), len, fua);
  co_return Status{};
}

inline asio::awaitable<Status> FaultDisk::flush() {
  co_await yield_once();
  env_.tick();
  if (env_.dead) co_return errno_error(EIO, "process crashed: flush " + path_);
  ++st_->flushes;
  if (st_->fail_flush) {
    // Like Linux after a failed writeback: the unflushed data is gone from the cache's
    // point of view, and the error is reported once.
    st_->pending.clear();
    co_return errno_error(EIO, "fault injected: flush " + path_);
  }
  st_->durable = st_->visible;
  st_->pending.clear();
  co_return Status{};
}

inline asio::awaitable<Status> FaultDisk::zero(std::uint64_t offset, std::uint64_t len, bool) {
  check(offset, len);
  co_await yield_once();
  env_.tick();
  if (env_.dead) co_return errno_error(EIO, "process crashed: zero " + path_);
  std::vector<std::byte> zeros(len);
  apply(offset, zeros.data(), len, false);
  co_return Status{};
}

}  // namespace tandem::test

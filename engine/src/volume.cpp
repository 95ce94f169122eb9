#include "tandem/engine/volume.h"

#include <spdlog/spdlog.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/this_coro.hpp>

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "tandem/common/assert.h"
#include "tandem/common/units.h"
#include "tandem/engine/errc.h"

namespace tandem::engine {
namespace {

constexpr std::uint64_t kBlock = Volume::kBlockBytes;
constexpr std::uint64_t align_down(std::uint64_t v) { return v & ~(kBlock - 1); }
constexpr std::uint64_t align_up(std::uint64_t v) { return (v + kBlock - 1) & ~(kBlock - 1); }
// Zeroing by writing goes in chunks of this size: bounded memory per request.
constexpr std::uint64_t kZeroChunkBytes = 1024 * 1024;

// A filter's mirror of an aligned write, run beside the local write.
struct PendingMirror {
  bool done = false;
  Status st;
  WaitQueue wq;
};

asio::awaitable<void> run_mirror(std::shared_ptr<PendingMirror> p, HostIoFilter* f, std::uint64_t offset,
                                 std::uint64_t len, const IoBuffer* src, bool fua) {
  p->st = co_await f->mirror(offset, len, src, fua);
  p->done = true;
  p->wq.notify_all();
}

asio::awaitable<void> run_flush(std::shared_ptr<PendingMirror> p, HostIoFilter* f) {
  p->st = co_await f->flush();
  p->done = true;
  p->wq.notify_all();
}

}  // namespace

// Counts a request in flight so close() can wait for it.
class Volume::OpGuard {
 public:
  explicit OpGuard(Volume& v) : v_(v) { ++v_.ops_in_flight_; }
  ~OpGuard() {
    TANDEM_ASSERT(v_.ops_in_flight_ > 0);
    if (--v_.ops_in_flight_ == 0) v_.drained_.notify_all();
  }
  OpGuard(const OpGuard&) = delete;
  OpGuard& operator=(const OpGuard&) = delete;

 private:
  Volume& v_;
};

// Releases the count of a host write admitted by admit_write(), so hold_writes() can wait.
class Volume::WriteGuard {
 public:
  explicit WriteGuard(Volume& v) : v_(v) { TANDEM_ASSERT(v_.writes_in_flight_ > 0); }
  ~WriteGuard() {
    TANDEM_ASSERT(v_.writes_in_flight_ > 0);
    if (--v_.writes_in_flight_ == 0) v_.writes_drained_.notify_all();
  }
  WriteGuard(const WriteGuard&) = delete;
  WriteGuard& operator=(const WriteGuard&) = delete;

 private:
  Volume& v_;
};

asio::awaitable<void> Volume::admit_write() {
  while (writes_held_) co_await writes_released_.wait();
  // Counted before returning, with no suspension in between, so a hold that starts after this
  // point waits for this write.
  ++writes_in_flight_;
}

asio::awaitable<void> Volume::hold_writes() {
  // One hold at a time: another waits for its release (a cycle's commit and a planned
  // failover's drain can both want one; found by the replication simulation, seed 878).
  while (writes_held_) co_await writes_released_.wait();
  writes_held_ = true;
  while (writes_in_flight_ > 0) co_await writes_drained_.wait();
}

void Volume::release_writes() {
  TANDEM_ASSERT(writes_held_);
  writes_held_ = false;
  writes_released_.notify_all();
}

asio::awaitable<Result<std::unique_ptr<Volume>>> Volume::open(DeviceEnv& env, VolumeOptions opts) {
  const std::string who = "volume " + opts.id;
  if (opts.path.empty()) co_return Error(errc::bad_config, who + ": no path");
  if (opts.meta_path.empty()) co_return Error(errc::bad_config, who + ": no metadata path");
  if (opts.create_bytes && (*opts.create_bytes == 0 || *opts.create_bytes % kBlock != 0)) {
    co_return Error(errc::bad_config, who + ": size must be a non-zero multiple of 4096 bytes");
  }
  const auto region = opts.dirty.region_bytes;
  if (region < kBlock || (region & (region - 1)) != 0 || region > 1024 * kMiB) {
    co_return Error(errc::bad_config, who + ": intent region size must be a power of two from 4KiB to 1GiB");
  }
  std::unique_ptr<Volume> v(new Volume(env, std::move(opts)));
  std::error_code exists_ec;
  v->data_created_ = !std::filesystem::exists(v->opts_.path, exists_ec);
  auto data = env.open(OpenSpec{v->opts_.path, v->opts_.create_bytes});
  if (!data) co_return Error(data.error().code, who + ": " + data.error().message());
  v->data_ = std::move(data).value();
  v->size_ = v->data_->size_bytes();
  if (v->opts_.create_bytes && v->size_ != *v->opts_.create_bytes) {
    co_return Error(errc::bad_config, who + ": " + v->opts_.path + " exists with " + std::to_string(v->size_) +
                                          " bytes but size = " + std::to_string(*v->opts_.create_bytes) +
                                          " is configured; fix or remove `size`");
  }
  if (v->size_ == 0 || v->size_ % kBlock != 0) {
    co_return Error(errc::bad_config, who + ": " + v->opts_.path + " is " + std::to_string(v->size_) +
                                          " bytes; a volume must be a non-zero multiple of 4096");
  }
  const MetaLayout layout = MetaLayout::for_volume(v->size_, kBlock);
  auto meta_dev = env.open(OpenSpec{v->opts_.meta_path, layout.total_bytes});
  if (!meta_dev) co_return Error(meta_dev.error().code, who + ": metadata: " + meta_dev.error().message());
  Superblock fresh;
  fresh.volume_uuid = random_uuid(env.clock());
  fresh.size_bytes = v->size_;
  fresh.block_bytes = kBlock;
  fresh.region_bytes = region;
  fresh.generations = {env.clock().random_u64()};
  auto opened = co_await MetaStore::open(std::move(meta_dev).value(), env.buffers(), fresh);
  if (!opened) co_return Error(opened.error().code, who + ": " + opened.error().message());
  v->meta_ = std::move(opened->store);
  v->created_ = opened->created;
  DirtyMapOptions dopts = v->opts_.dirty;
  // The regions in the intent log are numbered in the size they were written with.
  dopts.region_bytes = v->meta_->superblock().region_bytes;
  Volume* self = v.get();
  v->dirty_ = std::make_unique<DirtyMap>(*v->meta_, dopts, [self]() { return self->flush_data(); });
  auto st = co_await v->dirty_->recover();
  if (!st) co_return Error(st.error().code, who + ": recovering dirty map: " + st.error().message());
  co_return v;
}

Volume::~Volume() { TANDEM_ASSERT_MSG(ops_in_flight_ == 0, "volume destroyed with requests in flight"); }

Status Volume::fail(const Error& e) {
  if (failure_.empty()) {
    failure_ = e.message();
    spdlog::error("volume {}: flush failed, volume is now read-only until restart: {}", opts_.id, failure_);
  }
  return Error(errc::volume_failed, failure_);
}

Status Volume::check_write(std::uint64_t offset, std::uint64_t len) const {
  if (closing_) return errc::shutting_down;
  if (!failure_.empty()) return Error(errc::volume_failed, failure_);
  if (access_ != Access::read_write) return errc::read_only;
  if (offset > size_ || len > size_ - offset) return errc::no_space;
  return {};
}

asio::awaitable<Status> Volume::read(std::uint64_t offset, std::size_t len, const IoBuffer& dst) {
  if (closing_) co_return errc::shutting_down;
  if (offset > size_ || len > size_ - offset) co_return errc::out_of_range;
  TANDEM_ASSERT(len <= dst.capacity());
  if (len == 0) co_return Status{};
  OpGuard g(*this);
  ++stats_.reads;
  Status st;
  std::optional<RangeLock::Guard> filtered;
  if (filter_ != nullptr) {
    // Blocks not yet copied are fetched first, under the lock a host write would take.
    HostIoFilter* f = filter_;
    const std::uint64_t first = align_down(offset) / kBlock;
    const std::uint64_t count = (align_up(offset + len) - align_down(offset)) / kBlock;
    filtered.emplace(co_await locks_.acquire(first, count));
    st = co_await f->before_read(first, count);
  }
  if (!st) {
    // the filter could not make the blocks current: nothing to read
  } else if (offset % kBlock == 0 && len % kBlock == 0) {
    st = co_await data_->read(offset, len, dst);
  } else {
    const std::uint64_t a0 = align_down(offset);
    const std::uint64_t a1 = align_up(offset + len);
    IoBuffer bounce = buffers().allocate(a1 - a0);
    st = co_await data_->read(a0, a1 - a0, bounce);
    if (st) std::memcpy(dst.data(), bounce.data() + (offset - a0), len);
  }
  if (st) {
    stats_.bytes_read += len;
  } else {
    ++stats_.errors;
  }
  co_return st;
}

asio::awaitable<Status> Volume::write(std::uint64_t offset, std::size_t len, const IoBuffer& src, bool fua) {
  TANDEM_CO_TRY(check_write(offset, len));
  TANDEM_ASSERT(len <= src.capacity());
  if (len == 0) co_return Status{};
  OpGuard g(*this);
  co_await admit_write();
  WriteGuard wg(*this);
  TANDEM_CO_TRY(check_write(offset, len));  // the role may have changed while held
  ++stats_.writes;
  Status st = co_await write_locked(offset, len, &src, fua);
  if (st) {
    stats_.bytes_written += len;
  } else {
    ++stats_.errors;
  }
  co_return st;
}

asio::awaitable<Status> Volume::write_locked(std::uint64_t offset, std::size_t len, const IoBuffer* src, bool fua) {
  const std::uint64_t a0 = align_down(offset);
  const std::uint64_t a1 = align_up(offset + len);
  const std::uint64_t first = a0 / kBlock;
  const std::uint64_t count = (a1 - a0) / kBlock;
  auto guard = co_await locks_.acquire(first, count);
  if (hook_ != nullptr) TANDEM_CO_TRY(co_await hook_->before_write(first, count));
  HostIoFilter* const f = filter_;
  if (f != nullptr) TANDEM_CO_TRY(co_await f->before_write(offset, len));
  TANDEM_CO_TRY(co_await dirty_->begin_write(first, count));
  Status st;
  Status mirrored;
  if (a0 == offset && a1 == offset + len) {
    std::shared_ptr<PendingMirror> pm;
    if (f != nullptr) {
      pm = std::make_shared<PendingMirror>();
      asio::co_spawn(co_await asio::this_coro::executor, run_mirror(pm, f, offset, len, src, fua),
                     AbortOnException{"a host write's mirror"});
    }
    st = co_await data_->write(offset, len, *src, fua);
    if (pm) {
      while (!pm->done) co_await pm->wq.wait();
      mirrored = pm->st;
    }
  } else {
    // Read-modify-write of the partial head and tail blocks, under the span lock.
    ++stats_.rmw;
    IoBuffer bounce = buffers().allocate(a1 - a0);
    IoBuffer block = buffers().allocate(kBlock);
    if (offset != a0) {
      st = co_await data_->read(a0, kBlock, block);
      if (st) std::memcpy(bounce.data(), block.data(), kBlock);
    }
    const std::uint64_t tail = a1 - kBlock;
    if (st && offset + len != a1 && !(tail == a0 && offset != a0)) {
      st = co_await data_->read(tail, kBlock, block);
      if (st) std::memcpy(bounce.data() + (tail - a0), block.data(), kBlock);
    }
    if (st) {
      std::memcpy(bounce.data() + (offset - a0), src->data(), len);
      st = co_await data_->write(a0, a1 - a0, bounce, fua);
    }
    // The other copy gets the whole blocks as the device now holds them.
    if (st && f != nullptr) mirrored = co_await f->mirror(a0, a1 - a0, &bounce, fua);
  }
  // Dirty even on failure: a failed write may still have changed some sectors.
  dirty_->end_write(first, count);
  if (f != nullptr) co_return co_await f->after_write(offset, len, std::move(st), std::move(mirrored));
  co_return st;
}

asio::awaitable<Status> Volume::write_zeroes(std::uint64_t offset, std::uint64_t len, bool may_unmap, bool fua,
                                             bool fast_only) {
  TANDEM_CO_TRY(check_write(offset, len));
  if (len == 0) co_return Status{};
  OpGuard g(*this);
  co_await admit_write();
  WriteGuard wg(*this);
  TANDEM_CO_TRY(check_write(offset, len));  // the role may have changed while held
  ++stats_.zeroes;
  Status st = co_await zero_locked(offset, len, may_unmap, fast_only, false);
  if (st && fua) st = co_await flush();
  if (!st) ++stats_.errors;
  co_return st;
}

asio::awaitable<Status> Volume::trim(std::uint64_t offset, std::uint64_t len, bool fua) {
  TANDEM_CO_TRY(check_write(offset, len));
  if (len == 0) co_return Status{};
  OpGuard g(*this);
  co_await admit_write();
  WriteGuard wg(*this);
  TANDEM_CO_TRY(check_write(offset, len));  // the role may have changed while held
  ++stats_.trims;
  // While filtered, a trim zeroes: both copies must read the same afterwards.
  Status st = co_await zero_locked(offset, len, true, false, filter_ == nullptr);
  if (st && fua) st = co_await flush();
  if (!st) ++stats_.errors;
  co_return st;
}

asio::awaitable<Status> Volume::zero_locked(std::uint64_t offset, std::uint64_t len, bool may_unmap, bool fast_only,
                                            bool trim_only) {
  const std::uint64_t a0 = align_down(offset);
  const std::uint64_t a1 = align_up(offset + len);
  const std::uint64_t i0 = align_up(offset);
  const std::uint64_t i1 = align_down(offset + len);
  if (trim_only && i1 <= i0) co_return Status{};  // no whole block to discard
  const std::uint64_t l0 = trim_only ? i0 : a0;
  const std::uint64_t l1 = trim_only ? i1 : a1;
  const std::uint64_t first = l0 / kBlock;
  const std::uint64_t count = (l1 - l0) / kBlock;
  auto guard = co_await locks_.acquire(first, count);
  if (hook_ != nullptr) TANDEM_CO_TRY(co_await hook_->before_write(first, count));
  HostIoFilter* const f = filter_;
  if (f != nullptr) TANDEM_CO_TRY(co_await f->before_write(offset, len));
  TANDEM_CO_TRY(co_await dirty_->begin_write(first, count));
  Status st;
  Status mirrored;
  // Whole blocks first, so a refused fast zero has changed nothing.
  if (i1 > i0) {
    st = co_await data_->zero(i0, i1 - i0, may_unmap);
    if (st.code() == make_error_code(errc::not_supported)) {
      if (trim_only) {
        st = {};  // discard is advisory
      } else if (fast_only) {
        dirty_->end_write(first, count);
        co_return errc::not_supported;
      } else {
        st = co_await zero_by_writing(i0, i1 - i0);
      }
    }
    if (st && f != nullptr) mirrored = co_await f->mirror(i0, i1 - i0, nullptr, false);
  }
  if (st && !trim_only) {
    // Partial head and tail: read, zero the covered bytes, write back.
    std::vector<std::uint64_t> edges;
    if (offset != a0) edges.push_back(a0);
    if (offset + len != a1 && (edges.empty() || edges.front() != a1 - kBlock)) {
      edges.push_back(a1 - kBlock);
    }
    IoBuffer block = buffers().allocate(kBlock);
    for (std::uint64_t b : edges) {
      const std::uint64_t lo = std::max(offset, b);
      const std::uint64_t hi = std::min(offset + len, b + kBlock);
      st = co_await data_->read(b, kBlock, block);
      if (!st) break;
      std::memset(block.data() + (lo - b), 0, hi - lo);
      st = co_await data_->write(b, kBlock, block, false);
      if (!st) break;
      if (f != nullptr && mirrored) mirrored = co_await f->mirror(b, kBlock, &block, false);
    }
  }
  dirty_->end_write(first, count);
  if (f != nullptr) co_return co_await f->after_write(offset, len, std::move(st), std::move(mirrored));
  co_return st;
}

asio::awaitable<Status> Volume::zero_by_writing(std::uint64_t offset, std::uint64_t len) {
  IoBuffer zeros = buffers().allocate(std::min(len, kZeroChunkBytes));
  std::memset(zeros.data(), 0, zeros.capacity());
  for (std::uint64_t done = 0; done < len;) {
    const std::uint64_t n = std::min(len - done, kZeroChunkBytes);
    TANDEM_CO_TRY(co_await data_->write(offset + done, n, zeros, false));
    done += n;
  }
  co_return Status{};
}

asio::awaitable<Status> Volume::write_replicated(std::uint64_t offset, std::size_t len, const IoBuffer& src) {
  if (closing_) co_return errc::shutting_down;
  TANDEM_ASSERT(offset % kBlock == 0 && len % kBlock == 0 && len <= src.capacity());
  if (offset > size_ || len > size_ - offset) co_return errc::no_space;
  if (len == 0) co_return Status{};
  OpGuard g(*this);
  auto guard = co_await locks_.acquire(offset / kBlock, len / kBlock);
  co_return co_await data_->write(offset, len, src, false);
}

asio::awaitable<Status> Volume::zero_replicated(std::uint64_t offset, std::uint64_t len) {
  if (closing_) co_return errc::shutting_down;
  TANDEM_ASSERT(offset % kBlock == 0 && len % kBlock == 0);
  if (offset > size_ || len > size_ - offset) co_return errc::no_space;
  if (len == 0) co_return Status{};
  OpGuard g(*this);
  auto guard = co_await locks_.acquire(offset / kBlock, len / kBlock);
  Status st = co_await data_->zero(offset, len, true);
  if (st.code() == make_error_code(errc::not_supported)) st = co_await zero_by_writing(offset, len);
  co_return st;
}

asio::awaitable<Status> Volume::flush() {
  if (!failure_.empty()) co_return Error(errc::volume_failed, failure_);
  OpGuard g(*this);
  ++stats_.flushes;
  HostIoFilter* const f = filter_;
  if (f == nullptr) co_return co_await flush_data();
  // Both copies at once; the host hears success only when both are durable.
  auto pm = std::make_shared<PendingMirror>();
  asio::co_spawn(co_await asio::this_coro::executor, run_flush(pm, f), AbortOnException{"a host flush's mirror"});
  Status st = co_await flush_data();
  while (!pm->done) co_await pm->wq.wait();
  if (!st) co_return st;
  co_return pm->st;
}

asio::awaitable<Status> Volume::read_locked(std::uint64_t offset, std::size_t len, const IoBuffer& dst) {
  TANDEM_ASSERT(offset % kBlock == 0 && len % kBlock == 0 && offset + len <= size_);
  co_return co_await data_->read(offset, len, dst);
}

asio::awaitable<Status> Volume::fill_locked(std::uint64_t offset, std::size_t len, const IoBuffer& src) {
  TANDEM_ASSERT(offset % kBlock == 0 && len % kBlock == 0 && offset + len <= size_);
  co_return co_await data_->write(offset, len, src, false);
}

asio::awaitable<Status> Volume::zero_fill_locked(std::uint64_t offset, std::uint64_t len) {
  TANDEM_ASSERT(offset % kBlock == 0 && len % kBlock == 0 && offset + len <= size_);
  Status st = co_await data_->zero(offset, len, true);
  if (st.code() == make_error_code(errc::not_supported)) st = co_await zero_by_writing(offset, len);
  co_return st;
}

asio::awaitable<Status> Volume::flush_data() {
  if (!failure_.empty()) co_return Error(errc::volume_failed, failure_);
  const std::uint64_t mark = dirty_->writes_ended();
  Status st = co_await data_->flush();
  if (!st) {
    ++stats_.errors;
    co_return fail(st.error());
  }
  dirty_->data_flushed(mark);
  co_return Status{};
}

asio::awaitable<Status> Volume::close() {
  if (closed_) co_return Status{};
  closing_ = true;
  while (ops_in_flight_ > 0) co_await drained_.wait();
  Status st = failure_.empty() ? Status{} : Status(Error(errc::volume_failed, failure_));
  if (failure_.empty()) st = co_await flush_data();
  // The dirty map is persisted even after a data failure: it only ever grows what must be
  // resynchronized.
  Status dst = co_await dirty_->persist_all();
  closed_ = true;
  if (!st) co_return st;
  co_return dst;
}

}  // namespace tandem::engine

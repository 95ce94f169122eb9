#include "tandem/engine/cycle_journal.h"

#include <boost/asio/this_coro.hpp>
#include <cstring>

#include "tandem/common/async.h"
#include "tandem/common/hash.h"
#include "tandem/common/units.h"
#include "tandem/engine/errc.h"
#include "tandem/engine/volume.h"

namespace tandem::engine {
namespace {

std::uint64_t header_checksum(unsigned char* p, std::uint32_t count) {
  const std::uint64_t saved = get_le64(p + 32);
  put_le64(p + 32, 0);
  const std::uint64_t sum = xxh3_64(p, CycleJournal::kFixedBytes + std::size_t{count} * CycleJournal::kDescriptorBytes);
  put_le64(p + 32, saved);
  return sum;
}

// Bytes moved per read while scanning or applying: bounds memory.
constexpr std::uint64_t kChunkBytes = 1 << 20;
constexpr std::size_t kApplyParallel = 128;  // extents written at once

}  // namespace

asio::awaitable<Result<std::unique_ptr<CycleJournal>>> CycleJournal::open(DeviceEnv& env, std::string path,
                                                                          std::uint64_t cycle,
                                                                          std::uint64_t capacity_bytes, bool recover) {
  std::unique_ptr<CycleJournal> j(new CycleJournal(env, std::move(path), cycle));
  capacity_bytes = (capacity_bytes + 4095) / 4096 * 4096;
  if (!recover) TANDEM_CO_TRY(env.remove(j->path_));
  auto dev = env.open(OpenSpec{j->path_, capacity_bytes});
  if (!dev) co_return dev.error();
  j->dev_ = std::move(dev).value();
  if (recover) TANDEM_CO_TRY(co_await j->scan());
  co_return j;
}

asio::awaitable<Status> CycleJournal::scan() {
  IoBuffer hdr = env_.buffers().allocate(kHeaderBytes);
  IoBuffer data = env_.buffers().allocate(kChunkBytes);
  for (;;) {
    if (pos_ + kHeaderBytes > dev_->size_bytes()) co_return Status{};
    TANDEM_CO_TRY(co_await dev_->read(pos_, kHeaderBytes, hdr));
    auto* p = reinterpret_cast<unsigned char*>(hdr.data());
    const std::uint32_t count = get_le32(p + 24);
    const std::uint32_t data_blocks = get_le32(p + 28);
    if (get_le64(p) != kMagic || get_le64(p + 8) != cycle_ || get_le64(p + 16) != seq_ || count == 0 ||
        count > kExtentsPerRecordMax || get_le64(p + 32) != header_checksum(p, count)) {
      co_return Status{};
    }
    std::vector<JournalExtent> exts;
    std::uint64_t data_bytes = 0;
    std::uint64_t last_end = end_offset_;
    for (std::uint32_t i = 0; i < count; ++i) {
      const unsigned char* d = p + kFixedBytes + i * kDescriptorBytes;
      JournalExtent e{get_le64(d), get_le32(d + 8), (get_le32(d + 12) & 1u) != 0, get_le64(d + 16)};
      if (e.length == 0 || e.length % 4096 != 0 || e.offset % 4096 != 0 || e.offset < last_end) co_return Status{};
      last_end = e.offset + e.length;
      if (!e.zero) data_bytes += e.length;
      exts.push_back(e);
    }
    if (data_bytes != std::uint64_t{data_blocks} * 4096 || pos_ + kHeaderBytes + data_bytes > dev_->size_bytes()) {
      co_return Status{};
    }
    // Every data hash must match: a record is staged only if all of it is.
    std::uint64_t at = pos_ + kHeaderBytes;
    for (const auto& e : exts) {
      if (e.zero) continue;
      if (e.length > kChunkBytes) co_return Status{};  // larger than any extent we write
      TANDEM_CO_TRY(co_await dev_->read(at, e.length, data));
      if (xxh3_64(data.data(), e.length) != e.hash) co_return Status{};
      at += e.length;
    }
    records_.push_back({pos_, extents_.size(), exts.size()});
    for (const auto& e : exts) {
      extents_.push_back(e);
      staged_bytes_ += e.length;
    }
    end_offset_ = last_end;
    pos_ = at;
    ++seq_;
  }
}

asio::awaitable<Status> CycleJournal::append(std::span<const JournalExtent> extents, const IoBuffer& data) {
  TANDEM_ASSERT(!extents.empty() && extents.size() <= kExtentsPerRecordMax);
  std::uint64_t data_bytes = 0;
  std::uint64_t last_end = end_offset_;
  for (const auto& e : extents) {
    TANDEM_ASSERT(e.length > 0 && e.length % 4096 == 0 && e.offset % 4096 == 0 && e.length <= kChunkBytes);
    TANDEM_ASSERT_MSG(e.offset >= last_end, "journal extents out of LBA order");
    last_end = e.offset + e.length;
    if (!e.zero) data_bytes += e.length;
  }
  TANDEM_ASSERT(data_bytes <= data.capacity());
  if (pos_ + kHeaderBytes + data_bytes > dev_->size_bytes()) {
    co_return Error(errc::no_space, path_ + ": cycle journal is full");
  }
  IoBuffer hdr = env_.buffers().allocate(kHeaderBytes);
  auto* p = reinterpret_cast<unsigned char*>(hdr.data());
  std::memset(p, 0, kHeaderBytes);
  put_le64(p, kMagic);
  put_le64(p + 8, cycle_);
  put_le64(p + 16, seq_);
  put_le32(p + 24, static_cast<std::uint32_t>(extents.size()));
  put_le32(p + 28, static_cast<std::uint32_t>(data_bytes / 4096));
  for (std::size_t i = 0; i < extents.size(); ++i) {
    unsigned char* d = p + kFixedBytes + i * kDescriptorBytes;
    put_le64(d, extents[i].offset);
    put_le32(d + 8, extents[i].length);
    put_le32(d + 12, extents[i].zero ? 1u : 0u);
    put_le64(d + 16, extents[i].hash);
  }
  put_le64(p + 32, header_checksum(p, static_cast<std::uint32_t>(extents.size())));
  TANDEM_CO_TRY(co_await dev_->write(pos_, kHeaderBytes, hdr, false));
  if (data_bytes > 0) TANDEM_CO_TRY(co_await dev_->write(pos_ + kHeaderBytes, data_bytes, data, false));
  records_.push_back({pos_, extents_.size(), extents.size()});
  for (const auto& e : extents) {
    extents_.push_back(e);
    staged_bytes_ += e.length;
  }
  end_offset_ = last_end;
  pos_ += kHeaderBytes + data_bytes;
  ++seq_;
  co_return Status{};
}

asio::awaitable<Status> CycleJournal::apply(Volume& volume) {
  // Each record's data is read in one I/O; its extents, which never overlap (each block is
  // staged once per cycle), are then written concurrently, a bounded number at a time. The
  // flush at the end covers them all.
  auto ex = co_await asio::this_coro::executor;
  TaskGroup copies(ex);
  auto write = [](Volume& vol, JournalExtent e, IoBuffer data) -> asio::awaitable<Status> {
    if (e.zero) co_return co_await vol.zero_replicated(e.offset, e.length);
    co_return co_await vol.write_replicated(e.offset, e.length, data);
  };
  for (const auto& r : records_) {
    std::uint64_t bytes = 0;
    for (std::size_t i = r.first_extent; i < r.first_extent + r.count; ++i) {
      if (!extents_[i].zero) bytes += extents_[i].length;
    }
    IoBuffer rec;
    if (bytes > 0) {
      rec = env_.buffers().allocate(bytes);
      TANDEM_CO_TRY(co_await dev_->read(r.pos + kHeaderBytes, bytes, rec));
    }
    std::uint64_t at = 0;
    for (std::size_t i = r.first_extent; i < r.first_extent + r.count; ++i) {
      const JournalExtent& e = extents_[i];
      IoBuffer data;
      if (!e.zero) {
        // Verify right after reading, before it becomes the volume's contents.
        if (xxh3_64(rec.data() + at, e.length) != e.hash) {
          (void)co_await copies.wait();
          co_return Error(errc::io_error, path_ + ": staged extent at " + std::to_string(e.offset) +
                                              " fails its hash; refusing to apply");
        }
        data = env_.buffers().allocate(e.length);
        std::memcpy(data.data(), rec.data() + at, e.length);
        at += e.length;
      }
      if (!copies.first_error()) co_return co_await copies.wait();  // the first failure, once all stopped
      co_await copies.wait_below(kApplyParallel);
      copies.spawn(write(volume, e, std::move(data)));
    }
  }
  TANDEM_CO_TRY(co_await copies.wait());
  co_return co_await volume.flush();
}

asio::awaitable<Status> CycleJournal::remove() {
  dev_.reset();
  co_return env_.remove(path_);
}

}  // namespace tandem::engine

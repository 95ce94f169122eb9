// DirtyMap: which 4 KiB blocks changed and are not yet replicated, kept so that a crash never
// loses track of a write.
//
// In memory it is a bitmap, one bit per block. On disk it is the bitmap plus a write-intent
// log of "hot" regions (DRBD's activity log): before a write to a region that is not hot is
// issued to the device, the region is added to the intent log durably. A crash therefore loses
// nothing: after restart, dirty = on-disk bitmap ∪ every block of every hot region. A burst of
// writes to one region costs one intent-log write, not one per write.
//
// The hot set is bounded (intent_regions_max): to make room, the least recently used region
// with no write in flight is evicted, and its bits are written to the on-disk bitmap and
// flushed before the intent record that drops it.
//
// A region leaves the intent log (evicted, or cooled once replicated) only once its writes
// whose bits a cut or clear() took away are durable on the data device (flushed since they
// ended): a write the disk still held in its volatile cache may be lost or torn by a power
// loss while the peer has the whole of it, so a block whose data is not durable must stay
// covered by the log or the bitmap. The extra resync work a crash can cost is
// therefore at most intent_regions_max × region_bytes (docs/metadata-format.md).
//
// Threading: one io_context thread. Concurrent begin_write() calls that need new hot regions
// share one intent-log write.
#pragma once

#include <algorithm>
#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <functional>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tandem/common/async.h"
#include "tandem/common/result.h"
#include "tandem/engine/bitmap.h"
#include "tandem/engine/metadata.h"

namespace tandem::engine {

struct DirtyMapOptions {
  std::uint32_t region_bytes = 4 * 1024 * 1024;
  std::uint32_t intent_regions_max = 1024;
};

struct DirtyExtent {
  std::uint64_t first_block = 0;
  std::uint64_t blocks = 0;
  bool operator==(const DirtyExtent&) const = default;
};

class DirtyMap {
 public:
  // Flushes the data device the tracked writes go to (the volume's).
  using DataFlush = std::function<asio::awaitable<Status>()>;
  DirtyMap(MetaStore& meta, DirtyMapOptions opts, DataFlush flush_data);

  // Loads the on-disk bitmap and intent log, folds every hot region into the bitmap, persists
  // the result and empties the intent log. Call once before any write.
  asio::awaitable<Status> recover();

  // Makes the regions covering [first, first+count) hot, durably, and pins them until
  // end_write(). Must complete before the data write is issued.
  asio::awaitable<Status> begin_write(std::uint64_t first_block, std::uint64_t count);
  // Marks the blocks dirty (the write may have reached the device, even if it failed) and
  // unpins the regions.
  void end_write(std::uint64_t first_block, std::uint64_t count);
  // The owner flushed the data device: every write ended before writes_ended() returned
  // `mark` is durable (spares the flush before the next intent record that drops regions).
  [[nodiscard]] std::uint64_t writes_ended() const { return ended_; }
  void data_flushed(std::uint64_t mark) { flushed_mark_ = std::max(flushed_mark_, mark); }

  // Replication forgets blocks once the peer has them durably.
  void clear(std::uint64_t first_block, std::uint64_t count);
  [[nodiscard]] bool is_dirty(std::uint64_t block) const;
  [[nodiscard]] std::uint64_t dirty_blocks() const { return dirty_count_; }
  [[nodiscard]] std::uint64_t blocks() const { return blocks_; }
  // Runs of dirty blocks in LBA order.
  [[nodiscard]] std::vector<DirtyExtent> extents() const;

  // Writes the whole bitmap, flushes, and empties the intent log (clean shutdown), once the data
  // the log covers is durable (see above).
  asio::awaitable<Status> persist_all();

  // A cycle cut moves every dirty bit into the frozen set of a new cycle, in two steps with
  // the caller's durable record of the cut between them, so a crash at any point leaves every
  // block in the dirty bitmap or in a frozen set the caller knows about:
  //   freeze()       writes the dirty bits to the metadata's cycle area, flushes, and returns
  //                  them; nothing else changes;
  //   (the caller records "cycle N cut" durably)
  //   drop_frozen()  clears those bits from the dirty bitmap, in memory and on disk, flushed.
  // Hot regions stay hot. The caller holds writes across both: none may be in flight.
  asio::awaitable<Result<BlockBitmap>> freeze();
  asio::awaitable<Status> drop_frozen(const BlockBitmap& frozen);
  // Once the cycle of the last cut is committed at the peer: every hot region not written
  // since that cut leaves the intent log (its bits, all cleared by the cut, are written first
  // where the disk may differ). Without it a region stays hot until evicted, and a crash counts
  // every block of it as changed long after it was replicated; with it, a crash costs only the
  // regions written since the last cut. Safe beside writes: a write to a cooled region makes it
  // hot again first, as for any cold region.
  asio::awaitable<Status> cool_committed();
  // The frozen set stored in the cycle area by the last cut (after a restart).
  asio::awaitable<Result<BlockBitmap>> load_frozen();
  // Folds a frozen set back into the dirty bits (a cycle given up); durable with persist_all()
  // or lazily as pages are written.
  void merge(const BlockBitmap& frozen);
  // The dirty bits as a bitmap (a copy).
  [[nodiscard]] BlockBitmap snapshot() const { return BlockBitmap(blocks_, bits_); }

  [[nodiscard]] std::size_t hot_regions() const { return hot_.size(); }
  [[nodiscard]] std::uint64_t evictions() const { return evictions_; }
  [[nodiscard]] std::uint64_t cooled() const { return cooled_; }
  [[nodiscard]] std::uint32_t region_blocks() const { return region_blocks_; }
  [[nodiscard]] std::uint32_t intent_regions_max() const { return hot_max_; }
  [[nodiscard]] std::uint64_t data_flushes() const { return data_flushes_; }

 private:
  struct Hot {
    std::uint32_t pins = 0;
    std::uint64_t last_use = 0;
  };
  void set_bits(std::uint64_t first, std::uint64_t count);
  // Before an intent record drops regions: their writes, all ended, made durable.
  asio::awaitable<Status> make_ended_writes_durable();
  asio::awaitable<Status> update_intent_log();
  // The bitmap pages covering `regions`, written and flushed where the disk may differ, before
  // an intent record that drops the regions.
  asio::awaitable<Status> write_region_pages(const std::vector<std::uint32_t>& regions);
  asio::awaitable<Status> write_pages(const std::vector<std::uint64_t>& words, std::uint64_t first, std::uint64_t count,
                                      MetaStore::BitmapArea area);
  [[nodiscard]] bool page_nonzero(const std::vector<std::uint64_t>& words, std::uint64_t page) const;

  MetaStore& meta_;
  DataFlush flush_data_;
  std::uint64_t ended_ = 0;           // end_write() calls so far
  std::uint64_t flushed_mark_ = 0;    // ended_ when the last data flush began
  std::uint64_t ended_at_clear_ = 0;  // ended_ at the last clear() or freeze()
  std::uint64_t data_flushes_ = 0;
  std::uint64_t blocks_;
  std::uint32_t region_blocks_;
  std::uint32_t hot_max_;
  std::vector<std::uint64_t> bits_;
  std::uint64_t dirty_count_ = 0;
  // Which on-disk pages may hold set bits, per area: a cut zeroes exactly those.
  std::vector<bool> disk_nonzero_;
  std::vector<bool> cycle_disk_nonzero_;
  std::unordered_map<std::uint32_t, Hot> hot_;               // durable in the intent log
  std::unordered_map<std::uint32_t, std::uint32_t> wanted_;  // region -> pins waiting for it
  std::uint64_t tick_ = 0;
  std::uint64_t cut_tick_ = 0;  // tick_ at the last freeze(): older uses were all cut
  std::uint64_t evictions_ = 0;
  std::uint64_t cooled_ = 0;
  bool writing_intent_ = false;
  WaitQueue intent_waiters_;
};

}  // namespace tandem::engine

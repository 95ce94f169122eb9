#include "tandem/engine/dirty_map.h"

#include <algorithm>
#include <bit>

#include "tandem/common/assert.h"
#include "tandem/engine/errc.h"

namespace tandem::engine {

DirtyMap::DirtyMap(MetaStore& meta, DirtyMapOptions opts, DataFlush flush_data)
    : meta_(meta),
      flush_data_(std::move(flush_data)),
      blocks_(meta.layout().blocks),
      region_blocks_(opts.region_bytes / meta.superblock().block_bytes),
      hot_max_(opts.intent_regions_max) {
  TANDEM_ASSERT(region_blocks_ > 0 && std::has_single_bit(region_blocks_));
  TANDEM_ASSERT(flush_data_);
  TANDEM_ASSERT(hot_max_ > 0 && hot_max_ <= MetaLayout::kIntentEntriesMax / 2);
  bits_.assign(meta.layout().bitmap_pages * (MetaLayout::kBitmapPageBytes / 8), 0);
  // Unknown until read: assume every page may hold bits.
  disk_nonzero_.assign(meta.layout().bitmap_pages, true);
  cycle_disk_nonzero_.assign(meta.layout().bitmap_pages, true);
}

bool DirtyMap::page_nonzero(const std::vector<std::uint64_t>& words, std::uint64_t page) const {
  constexpr std::uint64_t kWords = MetaLayout::kBitmapPageBytes / 8;
  for (std::uint64_t w = page * kWords; w < (page + 1) * kWords; ++w) {
    if (words[w] != 0) return true;
  }
  return false;
}

asio::awaitable<Status> DirtyMap::write_pages(const std::vector<std::uint64_t>& words, std::uint64_t first,
                                              std::uint64_t count, MetaStore::BitmapArea area) {
  TANDEM_CO_TRY(co_await meta_.write_bitmap_pages(words, first, count, area));
  auto& track = area == MetaStore::BitmapArea::dirty ? disk_nonzero_ : cycle_disk_nonzero_;
  for (std::uint64_t p = first; p < first + count; ++p) track[p] = page_nonzero(words, p);
  co_return Status{};
}

void DirtyMap::set_bits(std::uint64_t first, std::uint64_t count) {
  TANDEM_ASSERT(first <= blocks_ && count <= blocks_ - first);
  std::uint64_t b = first;
  const std::uint64_t end = first + count;
  while (b < end) {
    const std::uint64_t w = b / 64;
    const unsigned lo = static_cast<unsigned>(b % 64);
    const std::uint64_t n = std::min<std::uint64_t>(64 - lo, end - b);
    const std::uint64_t mask = (n == 64 ? ~0ull : ((1ull << n) - 1)) << lo;
    dirty_count_ += static_cast<std::uint64_t>(std::popcount(mask & ~bits_[w]));
    bits_[w] |= mask;
    b += n;
  }
}

void DirtyMap::clear(std::uint64_t first, std::uint64_t count) {
  TANDEM_ASSERT(first <= blocks_ && count <= blocks_ - first);
  ended_at_clear_ = ended_;
  std::uint64_t b = first;
  const std::uint64_t end = first + count;
  while (b < end) {
    const std::uint64_t w = b / 64;
    const unsigned lo = static_cast<unsigned>(b % 64);
    const std::uint64_t n = std::min<std::uint64_t>(64 - lo, end - b);
    const std::uint64_t mask = (n == 64 ? ~0ull : ((1ull << n) - 1)) << lo;
    dirty_count_ -= static_cast<std::uint64_t>(std::popcount(mask & bits_[w]));
    bits_[w] &= ~mask;
    b += n;
  }
}

bool DirtyMap::is_dirty(std::uint64_t block) const {
  TANDEM_ASSERT(block < blocks_);
  return ((bits_[block / 64] >> (block % 64)) & 1u) != 0;
}

std::vector<DirtyExtent> DirtyMap::extents() const {
  std::vector<DirtyExtent> out;
  std::uint64_t run_start = 0;
  bool in_run = false;
  for (std::uint64_t w = 0; w < bits_.size(); ++w) {
    const std::uint64_t word = bits_[w];
    if ((word == 0 && !in_run) || (word == ~0ull && in_run)) continue;
    for (unsigned i = 0; i < 64; ++i) {
      const bool d = ((word >> i) & 1u) != 0;
      const std::uint64_t b = w * 64 + i;
      if (d && !in_run) {
        run_start = b;
        in_run = true;
      } else if (!d && in_run) {
        out.push_back({run_start, b - run_start});
        in_run = false;
      }
    }
  }
  if (in_run) out.push_back({run_start, std::min<std::uint64_t>(bits_.size() * 64, blocks_) - run_start});
  return out;
}

asio::awaitable<Status> DirtyMap::recover() {
  TANDEM_ASSERT(hot_.empty() && wanted_.empty());
  TANDEM_CO_TRY(co_await meta_.read_bitmap(bits_));
  // Bits past the end of the volume are never set; a set one means the bitmap is not ours.
  for (std::uint64_t b = blocks_; b < bits_.size() * 64; ++b) {
    if (((bits_[b / 64] >> (b % 64)) & 1u) != 0) {
      co_return Error(errc::corrupt_metadata, "dirty bitmap has bits beyond the end of the volume");
    }
  }
  dirty_count_ = 0;
  for (auto w : bits_) dirty_count_ += static_cast<std::uint64_t>(std::popcount(w));
  auto intent = co_await meta_.read_intent();
  if (!intent) co_return intent.error();
  const std::uint64_t regions = (blocks_ + region_blocks_ - 1) / region_blocks_;
  for (auto r : intent->regions) {
    if (r >= regions) co_return Error(errc::corrupt_metadata, "intent log names a region beyond the volume");
    const std::uint64_t first = std::uint64_t{r} * region_blocks_;
    set_bits(first, std::min<std::uint64_t>(region_blocks_, blocks_ - first));
  }
  co_return co_await persist_all();
}

asio::awaitable<Status> DirtyMap::persist_all() {
  for (auto& [r, h] : hot_) TANDEM_ASSERT_MSG(h.pins == 0, "persist_all with writes in flight");
  TANDEM_ASSERT(wanted_.empty() && !writing_intent_);
  TANDEM_CO_TRY(co_await write_pages(bits_, 0, meta_.layout().bitmap_pages, MetaStore::BitmapArea::dirty));
  TANDEM_CO_TRY(co_await meta_.flush());
  // Only now may the intent log forget the hot regions: their bits are durable, and so is the
  // data whose bits a cut took away (else the log keeps covering it). A source that becomes a
  // destination writes its map whole without closing: its last writes, shipped, were only in
  // the disk's cache (found by the replication simulation, seed 1387 of the power-loss runs).
  TANDEM_CO_TRY(co_await make_ended_writes_durable());
  TANDEM_CO_TRY(co_await meta_.write_intent({}));
  hot_.clear();
  co_return Status{};
}

asio::awaitable<Status> DirtyMap::begin_write(std::uint64_t first_block, std::uint64_t count) {
  TANDEM_ASSERT(count > 0 && first_block < blocks_ && count <= blocks_ - first_block);
  const auto r0 = static_cast<std::uint32_t>(first_block / region_blocks_);
  const auto r1 = static_cast<std::uint32_t>((first_block + count - 1) / region_blocks_);
  std::vector<std::uint32_t> missing;
  for (std::uint32_t r = r0; r <= r1; ++r) {
    auto it = hot_.find(r);
    if (it != hot_.end()) {
      ++it->second.pins;
      it->second.last_use = ++tick_;
    } else {
      ++wanted_[r];
      missing.push_back(r);
    }
  }
  // A wanted region becomes durable when update_intent_log() moves its pins from wanted_ to
  // hot_; wait until none of ours is still wanted. Whoever finds no intent write running
  // starts one, and it carries every region wanted at that moment.
  Status failure;
  for (;;) {
    const bool pending =
        std::any_of(missing.begin(), missing.end(), [&](std::uint32_t r) { return wanted_.contains(r); });
    if (!pending) co_return Status{};
    if (writing_intent_) {
      co_await intent_waiters_.wait();
      continue;
    }
    writing_intent_ = true;
    Status st = co_await update_intent_log();
    writing_intent_ = false;
    intent_waiters_.notify_all();
    if (!st.ok()) {
      failure = st;
      break;
    }
  }
  // The intent log could not be written: undo every pin of ours, so the caller does not
  // write (and does not call end_write).
  for (std::uint32_t r = r0; r <= r1; ++r) {
    if (auto w = wanted_.find(r); w != wanted_.end() && std::find(missing.begin(), missing.end(), r) != missing.end()) {
      if (--w->second == 0) wanted_.erase(w);
    } else if (auto h = hot_.find(r); h != hot_.end()) {
      TANDEM_ASSERT(h->second.pins > 0);
      --h->second.pins;
    }
  }
  co_return failure;
}

asio::awaitable<Status> DirtyMap::make_ended_writes_durable() {
  // Writes ended since the last clear or cut still have their bits, which go to disk before
  // the record: only earlier ones, whose bits may be gone, need their data durable.
  if (flushed_mark_ >= ended_at_clear_) co_return Status{};
  const std::uint64_t mark = ended_;
  ++data_flushes_;
  TANDEM_CO_TRY(co_await flush_data_());
  data_flushed(mark);
  co_return Status{};
}

void DirtyMap::end_write(std::uint64_t first_block, std::uint64_t count) {
  ++ended_;
  set_bits(first_block, count);
  const auto r0 = static_cast<std::uint32_t>(first_block / region_blocks_);
  const auto r1 = static_cast<std::uint32_t>((first_block + count - 1) / region_blocks_);
  for (std::uint32_t r = r0; r <= r1; ++r) {
    auto it = hot_.find(r);
    TANDEM_ASSERT_MSG(it != hot_.end() && it->second.pins > 0, "end_write on a region not pinned");
    --it->second.pins;
  }
}

asio::awaitable<Status> DirtyMap::update_intent_log() {
  std::vector<std::uint32_t> batch;
  batch.reserve(wanted_.size());
  for (auto& [r, n] : wanted_) batch.push_back(r);
  // Choose victims: least recently used hot regions with no write in flight.
  std::vector<std::uint32_t> victims;
  const std::size_t want_total = hot_.size() + batch.size();
  if (want_total > hot_max_) {
    std::vector<std::pair<std::uint64_t, std::uint32_t>> idle;
    for (auto& [r, h] : hot_) {
      if (h.pins == 0) idle.emplace_back(h.last_use, r);
    }
    std::sort(idle.begin(), idle.end());
    const std::size_t excess = want_total - hot_max_;
    for (std::size_t i = 0; i < idle.size() && i < excess; ++i) victims.push_back(idle[i].second);
  }
  // Over the limit with everything pinned is allowed (the pins are bounded by in-flight
  // writes), up to what one intent slot can hold.
  if (want_total - victims.size() > MetaLayout::kIntentEntriesMax) co_return errc::intent_log_full;
  // Victims leave the in-memory hot set now, so no new write pins them while their bits are
  // being persisted; a write that wants one again waits for the next intent record.
  for (auto r : victims) hot_.erase(r);
  if (!victims.empty()) {
    TANDEM_CO_TRY(co_await make_ended_writes_durable());
    TANDEM_CO_TRY(co_await write_region_pages(victims));
    evictions_ += victims.size();
  }
  std::vector<std::uint32_t> record;
  record.reserve(hot_.size() + batch.size());
  for (auto& [r, h] : hot_) record.push_back(r);
  for (auto r : batch) {
    if (!hot_.contains(r)) record.push_back(r);
  }
  std::sort(record.begin(), record.end());
  TANDEM_CO_TRY(co_await meta_.write_intent(record));
  for (auto r : batch) {
    auto it = wanted_.find(r);
    TANDEM_ASSERT(it != wanted_.end());
    Hot& h = hot_[r];
    h.pins += it->second;
    h.last_use = ++tick_;
    wanted_.erase(it);
  }
  co_return Status{};
}

}  // namespace tandem::engine

namespace tandem::engine {

asio::awaitable<Status> DirtyMap::write_region_pages(const std::vector<std::uint32_t>& regions) {
  std::vector<std::uint64_t> pages;
  for (auto r : regions) {
    const std::uint64_t first = std::uint64_t{r} * region_blocks_;
    const std::uint64_t last = std::min<std::uint64_t>(first + region_blocks_, blocks_) - 1;
    // A region larger than a bitmap page spans several (eviction used to write only the first).
    constexpr std::uint64_t kPerPage = MetaLayout::kBlocksPerBitmapPage;
    for (std::uint64_t p = first / kPerPage; p <= last / kPerPage; ++p) pages.push_back(p);
  }
  std::sort(pages.begin(), pages.end());
  pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
  bool wrote = false;
  for (auto p : pages) {
    if (!disk_nonzero_[p] && !page_nonzero(bits_, p)) continue;  // zero on both sides already
    TANDEM_CO_TRY(co_await write_pages(bits_, p, 1, MetaStore::BitmapArea::dirty));
    wrote = true;
  }
  if (wrote) TANDEM_CO_TRY(co_await meta_.flush());
  co_return Status{};
}

asio::awaitable<Status> DirtyMap::cool_committed() {
  // One intent-log writer at a time: begin_write()'s update_intent_log() may be running.
  while (writing_intent_) co_await intent_waiters_.wait();
  std::vector<std::uint32_t> cold;
  for (auto& [r, h] : hot_) {
    if (h.pins == 0 && h.last_use <= cut_tick_) cold.push_back(r);
  }
  if (cold.empty()) co_return Status{};
  writing_intent_ = true;
  for (auto r : cold) hot_.erase(r);
  Status st = co_await make_ended_writes_durable();
  if (st) st = co_await write_region_pages(cold);
  if (st) {
    std::vector<std::uint32_t> record;
    record.reserve(hot_.size());
    for (auto& [r, h] : hot_) record.push_back(r);
    std::sort(record.begin(), record.end());
    st = co_await meta_.write_intent(record);
  }
  if (st) {
    cooled_ += cold.size();
  } else {
    // Still in the disk's intent log, and maybe with bits only in memory: hot again, so the
    // next intent record keeps them until their pages are written.
    for (auto r : cold) hot_.try_emplace(r, Hot{0, cut_tick_});
  }
  writing_intent_ = false;
  intent_waiters_.notify_all();
  co_return st;
}

asio::awaitable<Result<BlockBitmap>> DirtyMap::freeze() {
  for (auto& [r, h] : hot_) TANDEM_ASSERT_MSG(h.pins == 0, "cut with writes in flight");
  TANDEM_ASSERT(wanted_.empty() && !writing_intent_);
  cut_tick_ = tick_;
  ended_at_clear_ = ended_;
  const std::uint64_t pages = meta_.layout().bitmap_pages;
  // Every page that has bits now or had bits before (stale bits must not survive).
  for (std::uint64_t p = 0; p < pages; ++p) {
    if (cycle_disk_nonzero_[p] || page_nonzero(bits_, p)) {
      TANDEM_CO_TRY(co_await write_pages(bits_, p, 1, MetaStore::BitmapArea::cycle));
    }
  }
  TANDEM_CO_TRY(co_await meta_.flush());
  co_return BlockBitmap(blocks_, bits_);
}

asio::awaitable<Status> DirtyMap::drop_frozen(const BlockBitmap& frozen) {
  for (auto& [r, h] : hot_) TANDEM_ASSERT_MSG(h.pins == 0, "cut with writes in flight");
  TANDEM_ASSERT(frozen.blocks() == blocks_);
  const auto& fw = frozen.words();
  for (std::size_t i = 0; i < bits_.size(); ++i) bits_[i] &= ~fw[i];
  dirty_count_ = 0;
  for (auto w : bits_) dirty_count_ += static_cast<std::uint64_t>(std::popcount(w));
  bool wrote = false;
  for (std::uint64_t p = 0; p < meta_.layout().bitmap_pages; ++p) {
    if (disk_nonzero_[p]) {
      TANDEM_CO_TRY(co_await write_pages(bits_, p, 1, MetaStore::BitmapArea::dirty));
      wrote = true;
    }
  }
  if (wrote) TANDEM_CO_TRY(co_await meta_.flush());
  co_return Status{};
}

asio::awaitable<Result<BlockBitmap>> DirtyMap::load_frozen() {
  std::vector<std::uint64_t> words;
  TANDEM_CO_TRY(co_await meta_.read_bitmap(words, MetaStore::BitmapArea::cycle));
  for (std::uint64_t b = blocks_; b < words.size() * 64; ++b) {
    if (((words[b / 64] >> (b % 64)) & 1u) != 0) {
      co_return Error(errc::corrupt_metadata, "cycle bitmap has bits beyond the end of the volume");
    }
  }
  for (std::uint64_t p = 0; p < meta_.layout().bitmap_pages; ++p) cycle_disk_nonzero_[p] = page_nonzero(words, p);
  co_return BlockBitmap(blocks_, std::move(words));
}

void DirtyMap::merge(const BlockBitmap& frozen) {
  TANDEM_ASSERT(frozen.blocks() == blocks_);
  const auto& w = frozen.words();
  for (std::size_t i = 0; i < w.size() && i < bits_.size(); ++i) {
    dirty_count_ += static_cast<std::uint64_t>(std::popcount(w[i] & ~bits_[i]));
    bits_[i] |= w[i];
  }
}

}  // namespace tandem::engine

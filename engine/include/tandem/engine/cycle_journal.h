// CycleJournal: the destination's staging area that makes a cycle commit atomic.
//
// Extents of cycle N arrive in LBA order. They are appended to the journal in records (a 4 KiB
// header describing up to kExtentsPerRecordMax extents, followed by their data) and made
// durable with sync(); the end of the last durable extent is the cycle's restart address.
// Nothing touches the volume until the cycle is complete and its commit is recorded; then
// apply() copies every staged extent in place and flushes the volume. apply() is idempotent, so
// a crash mid-apply is repaired by applying again on restart. The volume is therefore always at
// exactly one committed cycle.
//
// Record grammar (all little-endian; docs/wire-protocol.md has the full picture):
//   record     = header:4096 data
//   header     = magic:u64 cycle:u64 seq:u64 count:u32 data_blocks:u32 checksum:u64
//                descriptor{count} zero-padding
//   descriptor = offset:u64 length:u32 flags:u32 hash:u64      ; flags bit 0: zero extent
//   data       = the non-zero extents' bytes, concatenated, data_blocks × 4096
// checksum = xxh3 of the header's fixed fields (checksum zeroed) and descriptors; hash = xxh3 of
// the extent's data. A scan keeps the longest prefix of records whose magic, cycle, sequence
// (0, 1, 2, ...), checksum and every data hash are right: a torn or stale record ends it.
//
// Threading: one io_context thread. Ownership: owns its BlockDevice.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "tandem/common/result.h"
#include "tandem/engine/block_device.h"

namespace tandem::engine {

class Volume;

struct JournalExtent {
  std::uint64_t offset = 0;
  std::uint32_t length = 0;  // multiple of 4096
  bool zero = false;         // reads as zeros; no data
  std::uint64_t hash = 0;    // xxh3 of the data (0 for zero extents)
  bool operator==(const JournalExtent&) const = default;
};

class CycleJournal {
 public:
  static constexpr std::uint64_t kMagic = 0x314e524a444e4154ull;  // "TANDJRN1"
  static constexpr std::size_t kHeaderBytes = 4096;
  static constexpr std::size_t kFixedBytes = 40;
  static constexpr std::size_t kDescriptorBytes = 24;
  static constexpr std::size_t kExtentsPerRecordMax = 160;  // 40 + 160 × 24 <= 4096
  // Capacity for a cycle of `blocks` frozen blocks: the data, plus one header per extent in the
  // worst case, plus slack.
  static std::uint64_t capacity_for(std::uint64_t blocks) { return blocks * 2 * 4096 + (1 << 20); }

  // recover = false: a fresh journal for `cycle` (any old file is replaced). recover = true:
  // reopen the journal of the cycle in progress and find its valid prefix.
  static asio::awaitable<Result<std::unique_ptr<CycleJournal>>> open(DeviceEnv& env, std::string path,
                                                                     std::uint64_t cycle, std::uint64_t capacity_bytes,
                                                                     bool recover);

  [[nodiscard]] std::uint64_t cycle() const { return cycle_; }
  [[nodiscard]] const std::vector<JournalExtent>& extents() const { return extents_; }
  // End of the last staged extent: where the cycle resumes.
  [[nodiscard]] std::uint64_t staged_end_offset() const { return end_offset_; }
  [[nodiscard]] std::uint64_t staged_bytes() const { return staged_bytes_; }
  [[nodiscard]] std::uint64_t records() const { return seq_; }

  // Appends one record. `data` holds the non-zero extents' bytes in order. Extents must follow
  // the last staged one in LBA order. Durable after sync().
  asio::awaitable<Status> append(std::span<const JournalExtent> extents, const IoBuffer& data);
  asio::awaitable<Status> sync() { return dev_->flush(); }
  // Copies every staged extent into the volume and flushes it.
  asio::awaitable<Status> apply(Volume& volume);
  asio::awaitable<Status> remove();

 private:
  CycleJournal(DeviceEnv& env, std::string path, std::uint64_t cycle)
      : env_(env), path_(std::move(path)), cycle_(cycle) {}
  asio::awaitable<Status> scan();

  struct RecordPos {
    std::uint64_t pos;         // byte offset of the header
    std::size_t first_extent;  // index into extents_
    std::size_t count;
  };
  DeviceEnv& env_;
  std::string path_;
  std::uint64_t cycle_;
  std::unique_ptr<BlockDevice> dev_;
  std::vector<JournalExtent> extents_;
  std::vector<RecordPos> records_;
  std::uint64_t pos_ = 0;  // append position
  std::uint64_t seq_ = 0;  // next record's sequence number
  std::uint64_t end_offset_ = 0;
  std::uint64_t staged_bytes_ = 0;
};

}  // namespace tandem::engine

// Volume metadata: the superblock, the write-intent log and the on-disk dirty bitmap, kept in
// one metadata file (or device) beside the volume's data. The layout and record grammar are in
// docs/metadata-format.md.
//
// Every record is written with a sequence number and an xxh3 checksum into one of two slots,
// alternating; a reader takes the valid slot with the highest sequence number. A torn write
// can therefore destroy only the slot being written, and the previous good copy is used.
// Every write here is followed by a flush before it is reported complete.
//
// Threading: one io_context thread. Ownership: MetaStore owns the metadata BlockDevice.
#pragma once

#include <array>
#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tandem/common/result.h"
#include "tandem/engine/block_device.h"

namespace tandem::engine {

enum class Role : std::uint32_t { none = 0, source = 1, destination = 2 };

struct RestartAddress {
  std::uint64_t cycle = 0;
  std::uint64_t offset = 0;
  bool operator==(const RestartAddress&) const = default;
};

using Uuid = std::array<std::uint8_t, 16>;
std::string uuid_to_string(const Uuid& u);
Uuid random_uuid(Clock& clock);  // version 4, from the clock's random source

struct Superblock {
  // Generations kept in the history, newest first (DRBD keeps 4; a few more help diagnose).
  static constexpr std::size_t kGenerationsMax = 32;
  // Opaque bytes the replication layer keeps with the superblock (session state).
  static constexpr std::size_t kSessionBlobBytesMax = 2048;

  std::uint64_t seq = 0;  // maintained by MetaStore
  Uuid volume_uuid{};
  std::uint64_t size_bytes = 0;
  std::uint32_t block_bytes = 4096;
  std::uint32_t region_bytes = 0;
  std::vector<std::uint64_t> generations;  // [0] is current
  Role role = Role::none;
  std::uint32_t session_state = 0;  // owned by replication; opaque here
  RestartAddress restart;
  std::vector<std::uint8_t> session_blob;
};

// Fixed layout of the metadata file, derived from the volume size.
struct MetaLayout {
  static constexpr std::uint64_t kSuperblockSlotBytes = 4096;
  // Each intent-log slot holds a header and up to 16 K region numbers (u32): far more than
  // any sensible hot-region limit, so the hot set is never limited by the slot.
  static constexpr std::uint64_t kIntentSlotBytes = 64 * 1024;
  static constexpr std::uint64_t kIntentEntriesMax = (kIntentSlotBytes - 64) / 4;
  static constexpr std::uint64_t kBitmapPageBytes = 4096;
  static constexpr std::uint64_t kBlocksPerBitmapPage = kBitmapPageBytes * 8;

  std::uint64_t blocks = 0;
  std::uint64_t intent_offset = 0;
  std::uint64_t bitmap_offset = 0;        // dirty bitmap (writes not yet in any cycle)
  std::uint64_t cycle_bitmap_offset = 0;  // frozen set of the cycle in progress
  std::uint64_t bitmap_pages = 0;         // pages in each bitmap area
  std::uint64_t total_bytes = 0;

  static MetaLayout for_volume(std::uint64_t size_bytes, std::uint32_t block_bytes);
};

// Record (de)serialization, exposed for tests and the fuzzer.
struct RecordHeader {
  static constexpr std::size_t kBytes = 32;
  std::uint64_t magic = 0;
  std::uint64_t seq = 0;
  std::uint32_t payload_bytes = 0;
  std::uint32_t version = 0;
  std::uint64_t checksum = 0;
};
static_assert(RecordHeader::kBytes == 8 + 8 + 4 + 4 + 8);

inline constexpr std::uint64_t kSuperblockMagic = 0x31424b53444e4154ull;  // "TANDSKB1"
inline constexpr std::uint64_t kIntentMagic = 0x31544e49444e4154ull;      // "TANDINT1"
inline constexpr std::uint32_t kFormatVersion = 1;

// Encodes a superblock into exactly kSuperblockSlotBytes.
void encode_superblock(const Superblock& sb, std::span<std::byte> out);
// Decodes and verifies; the error says which check failed.
Result<Superblock> decode_superblock(std::span<const std::byte> in);

struct IntentRecord {
  std::uint64_t seq = 0;
  std::vector<std::uint32_t> regions;
};
void encode_intent(const IntentRecord& r, std::span<std::byte> out);
Result<IntentRecord> decode_intent(std::span<const std::byte> in);

class MetaStore {
 public:
  struct Opened {
    std::unique_ptr<MetaStore> store;
    bool created = false;  // a fresh superblock was written
  };
  // Opens the metadata device, or initializes it when it has never been completed (no valid
  // superblock and no valid intent record). `fresh` supplies the identity for a new volume.
  static asio::awaitable<Result<Opened>> open(std::unique_ptr<BlockDevice> dev, BufferArena& arena, Superblock fresh);

  [[nodiscard]] const Superblock& superblock() const { return sb_; }
  [[nodiscard]] const MetaLayout& layout() const { return layout_; }

  // Writes `sb` to the other slot with the next sequence number, then flushes.
  asio::awaitable<Status> write_superblock(Superblock sb);
  // The newest valid intent record (empty if none).
  asio::awaitable<Result<IntentRecord>> read_intent();
  // Writes the hot-region set to the other slot, then flushes.
  asio::awaitable<Status> write_intent(const std::vector<std::uint32_t>& regions);
  enum class BitmapArea { dirty, cycle };
  // Reads a whole on-disk bitmap into words (one bit per block, LSB first).
  asio::awaitable<Status> read_bitmap(std::vector<std::uint64_t>& words, BitmapArea area = BitmapArea::dirty);
  // Writes bitmap pages [first, first+count) from words. Not flushed: call flush().
  asio::awaitable<Status> write_bitmap_pages(const std::vector<std::uint64_t>& words, std::uint64_t first_page,
                                             std::uint64_t count, BitmapArea area = BitmapArea::dirty);
  asio::awaitable<Status> flush() { return dev_->flush(); }

  [[nodiscard]] std::uint64_t intent_writes() const { return intent_writes_; }

 private:
  MetaStore(std::unique_ptr<BlockDevice> dev, BufferArena& arena, MetaLayout layout)
      : dev_(std::move(dev)), arena_(arena), layout_(layout) {}

  std::unique_ptr<BlockDevice> dev_;
  BufferArena& arena_;
  MetaLayout layout_;
  Superblock sb_;
  std::uint64_t intent_seq_ = 0;
  std::uint64_t intent_writes_ = 0;
};

}  // namespace tandem::engine

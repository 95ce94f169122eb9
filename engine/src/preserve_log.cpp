#include "tandem/engine/preserve_log.h"

#include <cstring>

#include "tandem/common/hash.h"
#include "tandem/common/units.h"
#include "tandem/engine/errc.h"

namespace tandem::engine {
namespace {

// Header: magic u64 | cycle u64 | block u64 | data_hash u64 | header_checksum u64 (xxh3 of the
// first 32 bytes).
constexpr std::size_t kHeaderFields = 32;

void encode_header(unsigned char* p, std::uint64_t cycle, std::uint64_t block, std::uint64_t hash) {
  std::memset(p, 0, 4096);
  put_le64(p, PreserveLog::kMagic);
  put_le64(p + 8, cycle);
  put_le64(p + 16, block);
  put_le64(p + 24, hash);
  put_le64(p + 32, xxh3_64(p, kHeaderFields));
}

bool valid_slot(const unsigned char* p, std::uint64_t cycle, std::uint64_t block) {
  return get_le64(p) == PreserveLog::kMagic && get_le64(p + 8) == cycle && get_le64(p + 16) == block &&
         get_le64(p + 32) == xxh3_64(p, kHeaderFields) && get_le64(p + 24) == xxh3_64(p + 4096, 4096);
}

}  // namespace

asio::awaitable<Result<std::unique_ptr<PreserveLog>>> PreserveLog::open(DeviceEnv& env, std::string path,
                                                                        std::uint64_t cycle, const BlockBitmap& frozen,
                                                                        bool recover) {
  std::unique_ptr<PreserveLog> log(new PreserveLog(env, std::move(path), cycle, frozen));
  const std::uint64_t bytes = std::max<std::uint64_t>(frozen.count(), 1) * kSlotBytes;
  if (!recover) TANDEM_CO_TRY(env.remove(log->path_));
  auto dev = env.open(OpenSpec{log->path_, bytes});
  if (!dev) co_return dev.error();
  log->dev_ = std::move(dev).value();
  if (log->dev_->size_bytes() != bytes) {
    // Not this cycle's file (a crash between remove and create, or a foreign file): start over.
    log->dev_.reset();
    TANDEM_CO_TRY(env.remove(log->path_));
    auto again = env.open(OpenSpec{log->path_, bytes});
    if (!again) co_return again.error();
    log->dev_ = std::move(again).value();
    co_return log;
  }
  if (recover) {
    // Scan in chunks; unwritten (sparse) slots read as zeros and fail the magic check.
    constexpr std::uint64_t kChunkSlots = 128;
    IoBuffer buf = env.buffers().allocate(kChunkSlots * kSlotBytes);
    std::uint64_t rank = 0;
    std::vector<std::uint64_t> blocks_in_chunk;
    for (std::uint64_t b = frozen.next_set(0); b < frozen.blocks();) {
      blocks_in_chunk.clear();
      const std::uint64_t first_rank = rank;
      while (b < frozen.blocks() && blocks_in_chunk.size() < kChunkSlots) {
        blocks_in_chunk.push_back(b);
        b = frozen.next_set(b + 1);
        ++rank;
      }
      const std::uint64_t len = blocks_in_chunk.size() * kSlotBytes;
      TANDEM_CO_TRY(co_await log->dev_->read(first_rank * kSlotBytes, len, buf));
      for (std::size_t i = 0; i < blocks_in_chunk.size(); ++i) {
        const auto* p = reinterpret_cast<const unsigned char*>(buf.data() + i * kSlotBytes);
        if (valid_slot(p, cycle, blocks_in_chunk[i])) log->preserved_.set(blocks_in_chunk[i]);
      }
    }
  }
  co_return log;
}

asio::awaitable<Status> PreserveLog::preserve(std::uint64_t block, const std::byte* data) {
  TANDEM_ASSERT(frozen_.test(block));
  if (preserved_.test(block)) co_return Status{};  // the first copy is the cycle's contents
  IoBuffer buf = env_.buffers().allocate(kSlotBytes);
  auto* p = reinterpret_cast<unsigned char*>(buf.data());
  std::memcpy(p + 4096, data, 4096);
  encode_header(p, cycle_, block, xxh3_64(p + 4096, 4096));
  TANDEM_CO_TRY(co_await dev_->write(frozen_.rank(block) * kSlotBytes, kSlotBytes, buf, false));
  TANDEM_CO_TRY(co_await batcher_.durable([this] { return dev_->flush(); }));
  preserved_.set(block);
  co_return Status{};
}

asio::awaitable<Status> PreserveLog::read(std::uint64_t block, std::byte* dst) {
  TANDEM_ASSERT(preserved_.test(block));
  IoBuffer buf = env_.buffers().allocate(kSlotBytes);
  TANDEM_CO_TRY(co_await dev_->read(frozen_.rank(block) * kSlotBytes, kSlotBytes, buf));
  const auto* p = reinterpret_cast<const unsigned char*>(buf.data());
  // Verify right after reading: a preserved block that fails its checks is data loss in the
  // making, not something to ship.
  if (!valid_slot(p, cycle_, block)) {
    co_return Error(errc::io_error, path_ + ": preserved block " + std::to_string(block) + " fails its checksum");
  }
  std::memcpy(dst, buf.data() + 4096, 4096);
  co_return Status{};
}

asio::awaitable<Status> PreserveLog::remove() {
  dev_.reset();
  co_return env_.remove(path_);
}

}  // namespace tandem::engine

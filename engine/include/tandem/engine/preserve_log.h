// PreserveLog: the source's copy-on-write store for one replication cycle.
//
// A cycle ships the frozen set exactly as it was at the cut. When a host overwrites a frozen
// block the peer does not have durably yet, the block's old contents are first copied here,
// durably, so the cycle can still ship (or, after a crash or a dropped link, re-ship) the
// point-in-time image. The file has one 8 KiB slot per frozen block, at the block's rank in
// the frozen set: a 4 KiB header (magic, cycle, block, data hash, header checksum) and the
// 4 KiB of data, written together. A slot is valid only if every check passes, so a torn or
// stale slot is simply "not preserved". The file is sparse: only preserved slots use space.
//
// Threading: one io_context thread. Ownership: owns its BlockDevice.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tandem/common/flush_batcher.h"
#include "tandem/common/result.h"
#include "tandem/engine/bitmap.h"
#include "tandem/engine/block_device.h"

namespace tandem::engine {

class PreserveLog {
 public:
  static constexpr std::uint64_t kSlotBytes = 8192;
  static constexpr std::uint64_t kMagic = 0x31565253444e4154ull;  // "TANDSRV1"

  // Creates a fresh log for `cycle` (recover = false: any old file is replaced), or reopens
  // the log of the cycle in progress after a restart (recover = true: valid slots of this
  // cycle are kept, everything else is ignored).
  static asio::awaitable<Result<std::unique_ptr<PreserveLog>>> open(DeviceEnv& env, std::string path,
                                                                    std::uint64_t cycle, const BlockBitmap& frozen,
                                                                    bool recover);

  [[nodiscard]] bool contains(std::uint64_t block) const { return preserved_.test(block); }
  [[nodiscard]] std::uint64_t preserved() const { return preserved_.count(); }
  [[nodiscard]] std::uint64_t cycle() const { return cycle_; }

  // Stores 4096 bytes as the cycle's contents of `block` (a frozen block), durably.
  asio::awaitable<Status> preserve(std::uint64_t block, const std::byte* data);
  // Reads the preserved contents of `block` into dst[0, 4096).
  asio::awaitable<Status> read(std::uint64_t block, std::byte* dst);
  // Deletes the file (the cycle is committed).
  asio::awaitable<Status> remove();

 private:
  PreserveLog(DeviceEnv& env, std::string path, std::uint64_t cycle, const BlockBitmap& frozen)
      : env_(env), path_(std::move(path)), cycle_(cycle), frozen_(frozen), preserved_(frozen.blocks()) {}

  DeviceEnv& env_;
  std::string path_;
  std::uint64_t cycle_;
  const BlockBitmap& frozen_;  // owned by the caller, unchanged for the cycle
  BlockBitmap preserved_;
  std::unique_ptr<BlockDevice> dev_;
  FlushBatcher batcher_;
};

}  // namespace tandem::engine

// Volume: one replicated block device as the engine sees it: its data device, its metadata
// (superblock, write-intent log, dirty bitmap) and the rules of the write path.
//
// Write path: bounds check → lock the aligned block span (orders overlapping writes and
// read-modify-write) → make the span's regions hot in the intent log, durably → write to the
// device through io_uring → mark the blocks dirty → complete. Requests need not be aligned:
// partial blocks are read, patched and written back under the span lock.
//
// Durability: flush() makes every completed write, and its dirtiness, durable. A flush that
// fails is never retried into success: the volume turns read-only (failed) and says why, until
// the daemon restarts.
//
// Threading: one io_context thread; all calls from it. Ownership: Volume owns its devices
// (through the env that opened them); the DeviceEnv must outlive it. close() must complete
// before destruction.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "tandem/common/async.h"
#include "tandem/common/result.h"
#include "tandem/engine/block_device.h"
#include "tandem/engine/dirty_map.h"
#include "tandem/engine/metadata.h"
#include "tandem/engine/range_lock.h"

namespace tandem::engine {

struct VolumeOptions {
  std::string id;
  std::string path;                           // block device or regular file
  std::optional<std::uint64_t> create_bytes;  // create a file of this size if missing
  std::string meta_path;                      // metadata file (created if missing)
  DirtyMapOptions dirty;
};

enum class Access { read_write, read_only };

// Sees every host write before it reaches the device (replication's copy-on-write of blocks a
// cycle still has to ship). Called under the write's block-range lock, so the blocks' old
// contents are stable while it runs; an error fails the host write before anything is written.
class WriteHook {
 public:
  virtual ~WriteHook() = default;
  virtual asio::awaitable<Status> before_write(std::uint64_t first_block, std::uint64_t count) = 0;
};

// Sees host I/O while the volume's contents still come from elsewhere (an import from foreign
// storage): it fills blocks not yet copied before the host reads or partly overwrites them, and
// mirrors every host change to the other copy, so both hold what the host wrote. Every call but
// flush() runs under the range lock of the aligned span, so the filter's own fills
// (fill_locked) can never race a host write to the same blocks.
class HostIoFilter {
 public:
  virtual ~HostIoFilter() = default;
  // Before a host read of blocks [first, first+count): make them current locally.
  virtual asio::awaitable<Status> before_read(std::uint64_t first, std::uint64_t count) = 0;
  // Before a host write, write-zeroes or trim of [offset, offset+len) reaches the device: make
  // partial edge blocks current locally (the read-modify-write keeps their other bytes) and
  // record the intent durably.
  virtual asio::awaitable<Status> before_write(std::uint64_t offset, std::uint64_t len) = 0;
  // The same change on the other copy, in whole blocks: src's data, or zeros when src is null.
  // For a block-aligned write it runs beside the local write; otherwise after it, with the
  // aligned span as the device now holds it.
  virtual asio::awaitable<Status> mirror(std::uint64_t offset, std::uint64_t len, const IoBuffer* src, bool fua) = 0;
  // Both sides are done: returns what the host is told, from the local result and the mirror's.
  virtual asio::awaitable<Status> after_write(std::uint64_t offset, std::uint64_t len, Status local,
                                              Status mirrored) = 0;
  // Beside a host flush: the other copy's flush, or what stands for it.
  virtual asio::awaitable<Status> flush() = 0;
};

struct VolumeStats {
  std::uint64_t reads = 0, writes = 0, flushes = 0, zeroes = 0, trims = 0;
  std::uint64_t bytes_read = 0, bytes_written = 0;
  std::uint64_t rmw = 0;     // writes that needed a read-modify-write of a partial block
  std::uint64_t errors = 0;  // requests that completed with an error
};

class Volume {
 public:
  static constexpr std::uint32_t kBlockBytes = 4096;

  static asio::awaitable<Result<std::unique_ptr<Volume>>> open(DeviceEnv& env, VolumeOptions opts);
  ~Volume();
  Volume(const Volume&) = delete;
  Volume& operator=(const Volume&) = delete;

  [[nodiscard]] const std::string& id() const { return opts_.id; }
  [[nodiscard]] std::uint64_t size_bytes() const { return size_; }
  [[nodiscard]] const std::string& path() const { return opts_.path; }
  [[nodiscard]] bool is_block_device() const { return data_->is_block_device(); }
  [[nodiscard]] Access access() const { return access_; }
  void set_access(Access a) { access_ = a; }
  // Non-empty once a flush failed: why the volume is read-only.
  [[nodiscard]] const std::string& failure() const { return failure_; }
  [[nodiscard]] bool writable() const { return access_ == Access::read_write && failure_.empty() && !closing_; }
  [[nodiscard]] bool created() const { return created_; }
  // The data file did not exist before this open (tandem created it empty): it holds nothing.
  [[nodiscard]] bool data_created() const { return data_created_; }

  BufferArena& buffers() { return env_.buffers(); }
  DirtyMap& dirty() { return *dirty_; }
  MetaStore& meta() { return *meta_; }
  [[nodiscard]] const VolumeStats& stats() const { return stats_; }

  // Reads [offset, offset+len) into dst[0, len). out_of_range beyond the end.
  asio::awaitable<Status> read(std::uint64_t offset, std::size_t len, const IoBuffer& dst);
  // Writes src[0, len) at offset. no_space beyond the end; read_only/volume_failed when not
  // writable. With fua the data is durable when this completes.
  asio::awaitable<Status> write(std::uint64_t offset, std::size_t len, const IoBuffer& src, bool fua);
  // Makes the range read as zeros. may_unmap lets the device deallocate; fast_only refuses
  // (not_supported) instead of writing zeros when the device cannot zero cheaply.
  asio::awaitable<Status> write_zeroes(std::uint64_t offset, std::uint64_t len, bool may_unmap, bool fua,
                                       bool fast_only);
  // Discards whole blocks inside the range (advisory; partial blocks are left alone). Trimmed
  // blocks read back as zeros on files and on devices that zero on discard.
  asio::awaitable<Status> trim(std::uint64_t offset, std::uint64_t len, bool fua);
  asio::awaitable<Status> flush();
  // The same for the volume's own needs, not counted as a host flush: the dirty map before its
  // intent log drops regions, replication before the peer commits what it shipped.
  asio::awaitable<Status> flush_data();
  // Refuses new requests, waits for those in flight, flushes data and metadata.
  asio::awaitable<Status> close();

  // Replication's own I/O. Aligned to 4 KiB. Not dirty-tracked and not hooked (the data comes
  // from the peer), allowed whatever the host access; ordered with host writes by the range lock.
  asio::awaitable<Status> write_replicated(std::uint64_t offset, std::size_t len, const IoBuffer& src);
  asio::awaitable<Status> zero_replicated(std::uint64_t offset, std::uint64_t len);

  // Stops admitting host writes and waits until none is in flight (a consistent cut across one
  // or many volumes); reads go on. release_writes() lets them through again. A second hold
  // waits for the first's release; holders of several volumes take them in one order.
  asio::awaitable<void> hold_writes();
  void release_writes();
  void set_write_hook(WriteHook* hook) { hook_ = hook; }

  // Host I/O filtering while the volume is being filled from elsewhere (see HostIoFilter): set
  // before host I/O starts, cleared (nullptr) once it is complete, with no host I/O in flight
  // that saw the old value (hold_writes() around the change covers writes; reads that saw it
  // finish under their own lock). During filtering a trim zeroes what it covers, so both
  // copies read the same.
  void set_host_filter(HostIoFilter* f) { filter_ = f; }
  [[nodiscard]] HostIoFilter* host_filter() const { return filter_; }
  // For the filter's owner: locks a block range as host writes do, so a fill is ordered with them.
  asio::awaitable<RangeLock::Guard> lock_blocks(std::uint64_t first, std::uint64_t count) {
    co_return co_await locks_.acquire(first, count);
  }
  // Raw device I/O for a caller that holds the blocks' range lock (a HostIoFilter's calls run
  // under it, or lock_blocks()): aligned to 4 KiB, not dirty-tracked, hooked or counted.
  asio::awaitable<Status> read_locked(std::uint64_t offset, std::size_t len, const IoBuffer& dst);
  asio::awaitable<Status> fill_locked(std::uint64_t offset, std::size_t len, const IoBuffer& src);
  asio::awaitable<Status> zero_fill_locked(std::uint64_t offset, std::uint64_t len);

 private:
  Volume(DeviceEnv& env, VolumeOptions opts) : env_(env), opts_(std::move(opts)) {}
  class OpGuard;
  class WriteGuard;
  asio::awaitable<void> admit_write();
  Status check_write(std::uint64_t offset, std::uint64_t len) const;
  asio::awaitable<Status> write_locked(std::uint64_t offset, std::size_t len, const IoBuffer* src, bool fua);
  asio::awaitable<Status> zero_locked(std::uint64_t offset, std::uint64_t len, bool may_unmap, bool fast_only,
                                      bool trim_only);
  asio::awaitable<Status> zero_by_writing(std::uint64_t offset, std::uint64_t len);
  Status fail(const Error& e);

  DeviceEnv& env_;
  VolumeOptions opts_;
  std::unique_ptr<BlockDevice> data_;
  std::unique_ptr<MetaStore> meta_;
  std::unique_ptr<DirtyMap> dirty_;
  RangeLock locks_;
  std::uint64_t size_ = 0;
  Access access_ = Access::read_write;
  std::string failure_;
  bool closing_ = false;
  bool closed_ = false;
  bool created_ = false;
  bool data_created_ = false;
  std::uint32_t ops_in_flight_ = 0;
  WaitQueue drained_;
  std::uint32_t writes_in_flight_ = 0;
  bool writes_held_ = false;
  WaitQueue writes_drained_;
  WaitQueue writes_released_;
  WriteHook* hook_ = nullptr;
  HostIoFilter* filter_ = nullptr;
  VolumeStats stats_;
};

}  // namespace tandem::engine

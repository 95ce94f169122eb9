// Import: one volume being filled from a foreign source while the host uses it.
//
// The import is the volume's HostIoFilter from creation until cutover or cancel:
//   - a host read of blocks not yet copied fetches them from the source first (and keeps them);
//   - a host write lands on the volume and is mirrored to the source, and is acknowledged when
//     both have it (FLUSH and FUA hold on both), so until cutover the source stays a complete,
//     current copy that a cancel can go back to;
//   - while the source does not answer, writes are acknowledged on the volume alone and the
//     blocks are recorded durably as "the source lacks these" (the missing set); reads of blocks
//     not yet copied fail with EIO. When the source is back the missing blocks are written to it
//     before anything else.
// Beside that, the background copy moves the source into the volume in offset order, one chunk
// at a time under the chunk's range lock (so it never overwrites a host write), skipping what
// block status reports as holes or zeros, and records its restart address durably: the volume's
// data is flushed before a restart address that covers it is written.
//
// Crash safety. A map file beside the record holds two bitmaps: the write-intent regions
// (a region is made hot durably before a host write into it is issued to either copy, and cools
// once both copies have flushed it) and the missing set. After a crash, every hot region is made
// equal on both sides before host I/O is served: blocks the volume is authoritative for (below
// the restart address, or missing) are written to the source, or recorded missing when it is
// down; the rest will be read from the source. So the host never reads back a block different
// from what it read before unless it wrote it.
//
// The states and the actions that move between them follow the import-session contract
// (import_control.h). This object runs the copy and the transitions; admission (how many copy at
// once, start times) is the ImportManager's.
//
// Threading: one io_context thread. stop() must complete before destruction.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cstdint>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>

#include "tandem/common/async.h"
#include "tandem/common/result.h"
#include "tandem/engine/bitmap.h"
#include "tandem/engine/block_device.h"
#include "tandem/engine/volume.h"
#include "tandem/importer/import_control.h"
#include "tandem/importer/source.h"

namespace tandem::importer {

// What is kept of an import in its record file (<dir>/<id>.json), and shown by the API.
struct ImportRecord {
  std::string id;
  std::string name;
  ImportState state = ImportState::queued;
  std::string source_uri;  // as given (may carry TLS options); shown only redacted
  std::uint64_t source_size = 0;
  std::string volume_id;
  bool volume_created = false;  // the import created the volume's data: cancel removes it
  bool automatic_cutover = false;
  std::optional<std::int64_t> scheduled_ms;  // Unix ms; Scheduled until then
  std::uint64_t rate_limit = 0;              // bytes/s of the background copy; 0: unlimited
  std::uint64_t restart_address = 0;
  std::uint64_t copied_bytes = 0;   // moved from the source by the background copy
  std::uint64_t skipped_bytes = 0;  // holes and zeros not moved
  std::uint64_t source_missing_blocks = 0;
  std::string error_code;
  std::string error_message;
  std::int64_t created_ms = 0;
  std::int64_t last_update_ms = 0;
};

std::string render_record(const ImportRecord& r);
// Strict: every field present with its type; an unknown state is an error.
Result<ImportRecord> parse_record(const std::string& text, const std::string& where);

struct ImportOptions {
  std::string dir;  // where <id>.json and <id>.map live
  SourceOptions source;
  std::uint32_t chunk_bytes = 1024 * 1024;   // one background copy request
  std::uint32_t copy_depth = 8;              // chunks in flight
  std::uint32_t region_bytes = 1024 * 1024;  // write-intent granularity
  std::uint32_t checkpoint_ms = 1000;        // restart address written at least this often
  std::uint32_t reconnect_min_ms = 500;
  std::uint32_t reconnect_max_ms = 10'000;
};

// The live figures beside the record.
struct ImportStatus {
  ImportRecord record;
  bool source_connected = false;
  std::optional<double> average_rate;  // bytes/s since the copy (re)started; Copy_In_Progress only
  std::optional<double> current_rate;  // over the last few seconds
  std::optional<std::int64_t> eta_ms;  // Unix ms
  double progress = 0;                 // 0..100
  std::uint64_t host_reads_from_source = 0;
  std::uint64_t host_writes_mirrored = 0;
};

class Import final : public engine::HostIoFilter {
 public:
  using Clock = std::function<std::int64_t()>;  // Unix ms
  // What the owner does when the import reaches a final state of its own accord or by action:
  // Cancelled (withdraw and remove the volume) and Import_Completed (it is ordinary now).
  struct Hooks {
    MoveFunction<void(Import&)> changed;  // any state change, after it is durable
  };

  // A new import of `source` into `volume` (already open, its size equal to the source's). Writes
  // the record and the map file before returning; installs itself as the volume's filter.
  static asio::awaitable<Result<std::unique_ptr<Import>>> create(asio::any_io_executor ex, engine::DeviceEnv& env,
                                                                 engine::Volume& volume, ImportRecord rec,
                                                                 std::unique_ptr<ForeignSource> source,
                                                                 ImportOptions opts, bool volume_reads_zero);
  // An import found in its record after a restart. Hot regions are made equal (or recorded
  // missing) before this returns, so the caller may export the volume afterwards. The source may
  // be unreachable: the import then starts disconnected and keeps trying.
  static asio::awaitable<Result<std::unique_ptr<Import>>> recover(asio::any_io_executor ex, engine::DeviceEnv& env,
                                                                  engine::Volume& volume, ImportRecord rec,
                                                                  ImportOptions opts);
  // A finished import (Import_Completed, Cancelled, Failed) known only by its record: listed
  // and deleted, nothing else.
  static std::unique_ptr<Import> record_only(asio::any_io_executor ex, ImportRecord rec, ImportOptions opts);
  ~Import() override;

  void set_hooks(Hooks h) { hooks_ = std::move(h); }
  // Starts the background work (reconnects, catch-up, and the copy while the state allows).
  void start();
  // Stops the background work and closes the source; the record stays as it is (a restart goes
  // on from it). The volume's filter is removed when this returns and the volume is not touched
  // again (it may be closed). Call with host I/O stopped, or in a final state (Cancelled: the
  // filter is removed and the volume's owner withdraws it). Idempotent.
  asio::awaitable<void> stop();

  // The manager's admission: Scheduled/Queued → Copy_In_Progress.
  asio::awaitable<Status> begin_copy();
  // Queued from Scheduled when its time comes (the manager decides).
  asio::awaitable<Status> set_queued();

  // Actions (import_control.h says which states allow them; the caller checked).
  asio::awaitable<Status> pause();
  asio::awaitable<Status> resume();
  // Ready_For_Cutover → Cutover_In_Progress → Import_Completed: the source is flushed and
  // detached; the volume's filter is removed. Host writes are held across the switch.
  asio::awaitable<Status> cutover();
  // Cancel: without force, writes the missing blocks to the source and flushes it first
  // (Cancel_Failed when that fails); with force, ends at once. Ends Cancelled; the filter is
  // removed and host writes to the volume are refused from then on (the owner withdraws it).
  asio::awaitable<Status> cancel(bool force);

  [[nodiscard]] const ImportRecord& record() const { return rec_; }
  [[nodiscard]] ImportStatus status() const;
  [[nodiscard]] bool copying() const { return rec_.state == ImportState::copy_in_progress; }

  // Removes the record and map files (a deleted import).
  Status remove_files();

  // HostIoFilter
  asio::awaitable<Status> before_read(std::uint64_t first, std::uint64_t count) override;
  asio::awaitable<Status> before_write(std::uint64_t offset, std::uint64_t len) override;
  asio::awaitable<Status> mirror(std::uint64_t offset, std::uint64_t len, const engine::IoBuffer* src,
                                 bool fua) override;
  asio::awaitable<Status> after_write(std::uint64_t offset, std::uint64_t len, Status local, Status mirrored) override;
  asio::awaitable<Status> flush() override;

 private:
  Import(asio::any_io_executor ex, engine::DeviceEnv* env, engine::Volume* vol, ImportRecord rec, ImportOptions opts);
  struct Hot {
    std::uint32_t pins = 0;
    std::uint64_t last_write = 0;  // write sequence number
  };

  asio::awaitable<Status> open_map(bool create);
  asio::awaitable<Status> recover_hot_regions();
  asio::awaitable<Status> persist_record();
  asio::awaitable<Status> set_state(ImportState s);
  void set_error(const std::string& code, const std::string& message);
  void clear_error();

  [[nodiscard]] bool is_copied(std::uint64_t block) const;
  // Blocks of [first, first+count) not current locally and not missing, as runs.
  [[nodiscard]] std::vector<std::pair<std::uint64_t, std::uint64_t>> uncopied_runs(std::uint64_t first,
                                                                                   std::uint64_t count) const;
  // Fetches runs from the source into the volume; caller holds the range lock.
  asio::awaitable<Status> fetch_locked(std::uint64_t first, std::uint64_t count);

  // Intent log
  asio::awaitable<Status> pin_regions(std::uint64_t first_block, std::uint64_t count);
  void unpin_regions(std::uint64_t first_block, std::uint64_t count);
  asio::awaitable<Status> write_intent();
  // Missing set
  asio::awaitable<Status> add_missing(std::uint64_t first_block, std::uint64_t count);
  asio::awaitable<Status> write_missing_pages(std::uint64_t first_page, std::uint64_t last_page);

  // Background work
  asio::awaitable<void> run();
  asio::awaitable<void> ticker();
  asio::awaitable<void> reconnect();
  asio::awaitable<void> reconnect_once();
  asio::awaitable<Status> catch_up();
  asio::awaitable<void> copy();
  asio::awaitable<Status> copy_chunk(std::uint64_t offset, std::uint64_t len, bool zero);
  asio::awaitable<Status> checkpoint();
  void source_failed(const Error& e);
  asio::awaitable<Status> unflushed_to_missing();
  [[nodiscard]] std::string map_path() const;
  [[nodiscard]] std::string record_path() const;
  void wake() { wake_.notify_all(); }
  asio::awaitable<void> sleep_ms(std::uint64_t ms);

  asio::any_io_executor ex_;
  engine::DeviceEnv* env_;  // null for a record kept after the import ended
  engine::Volume* vol_;     // null for a record kept after the import ended (record_only)
  ImportRecord rec_;
  ImportOptions opts_;
  Hooks hooks_;
  std::shared_ptr<ForeignSource> src_;  // shared: a call in flight keeps a replaced one alive
  bool connected_ = false;
  std::uint64_t blocks_ = 0;
  bool reads_zero_ = false;  // the volume's unwritten blocks read as zeros (created by us)

  engine::BlockBitmap copied_;     // current locally beyond the restart address
  engine::BlockBitmap missing_;    // the source lacks these (durable)
  engine::BlockBitmap unflushed_;  // mirrored since the source's last flush
  std::unique_ptr<engine::BlockDevice> map_;
  AsyncMutex map_mu_;
  std::uint64_t intent_pages_ = 0;
  std::uint64_t missing_pages_ = 0;
  std::uint32_t region_blocks_ = 0;
  std::map<std::uint64_t, Hot> hot_;  // region -> pins, last write
  std::set<std::uint64_t> durable_hot_;
  std::uint64_t write_seq_ = 0;
  std::uint64_t flushed_seq_ = 0;  // both copies flushed every write up to here

  // The copy
  std::uint64_t next_ = 0;             // next chunk to dispatch
  std::set<std::uint64_t> in_flight_;  // chunk offsets being copied
  // Background copy reads from the source in flight outside the range lock; a host write to
  // their blocks marks them stale (before_write runs under the lock).
  struct ReadAhead {
    std::uint64_t first = 0;
    std::uint64_t count = 0;
    bool stale = false;
  };
  std::list<ReadAhead> reads_ahead_;
  std::uint64_t durable_restart_ = 0;
  std::uint64_t last_checkpoint_bytes_ = 0;
  bool checkpoint_asked_ = false;      // the copy went checkpoint_bytes past the last one
  std::vector<SourceExtent> extents_;  // block status ahead of next_
  double pace_next_ms_ = 0;            // rate limit

  // Rates
  std::int64_t rate_started_ms_ = 0;
  std::uint64_t rate_started_bytes_ = 0;
  std::deque<std::pair<std::int64_t, std::uint64_t>> samples_;       // bytes moved or skipped
  std::deque<std::pair<std::int64_t, std::uint64_t>> scan_samples_;  // the restart address
  std::uint64_t host_reads_from_source_ = 0;
  std::uint64_t host_writes_mirrored_ = 0;

  bool detached_ = false;  // stop() ran: vol_ is not touched again
  bool started_ = false;
  bool stopping_ = false;
  std::uint32_t loops_ = 0;
  bool reconnecting_ = false;
  WaitQueue reconnected_;
  WaitQueue wake_;
  WaitQueue loops_done_;
  AsyncMutex ckpt_mu_;
  asio::steady_timer run_timer_;
  asio::steady_timer tick_timer_;
};

std::int64_t unix_now_ms();

}  // namespace tandem::importer

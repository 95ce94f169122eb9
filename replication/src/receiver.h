// Receiver: the destination's side of a session, from a transfer's sync_begin to its end.
//
// An initial sync is written in place, with durable checkpoints (each acknowledged: the
// restart address). A cycle is verified against its hashes and staged in the cycle journal,
// acknowledged in durable batches; at its end the commit record is written, the journal is
// applied to the volumes (observers first see what the apply overwrites), the volumes are
// flushed and the commit is answered. The volumes are therefore always exactly at a committed
// cycle; a crash in the middle of an apply is repaired by recover(), which applies again.
//
// A session has a receiver while it is a destination and none while it is a source: a role
// change destroys one side and builds the other. The receiver does not own the volumes, the
// state store or the link; its session does, and outlives it. Threading: the session's one
// io_context thread. Its callers serialize its entry points (the session's destination lock).
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "tandem/common/async.h"
#include "tandem/common/result.h"
#include "tandem/engine/clock.h"
#include "tandem/engine/cycle_journal.h"
#include "tandem/engine/volume.h"
#include "tandem/replication/messages.h"
#include "tandem/replication/state_store.h"

namespace tandem::replication {

// Sees each committed cycle's extents of a member just before they are applied to it (a
// failover test keeps the blocks its image still needs).
class ApplyObserver {
 public:
  virtual ~ApplyObserver() = default;
  virtual asio::awaitable<Status> before_apply(std::size_t member, std::span<const engine::JournalExtent> extents) = 0;
};

struct ReceiverMember {
  engine::Volume* volume = nullptr;
  engine::DeviceEnv* env = nullptr;  // opens the journal, allocates buffers
  std::string journal_path;
  std::uint64_t base = 0;  // global offset of the member's first byte
};

struct ReceiverOptions {
  std::string session_id;
  std::string peer_name;
  std::uint64_t stage_batch_bytes = 8ull << 20;          // staged bytes per acknowledgement
  std::uint64_t initial_checkpoint_bytes = 16ull << 20;  // initial-sync bytes per checkpoint
};

// A committed cycle in place on the volumes.
struct Applied {
  std::uint64_t cycle = 0;
  std::uint64_t bytes = 0;
  std::chrono::system_clock::time_point at;
  // From the transfer's beginning here to the apply; unknown for an apply finished after a restart.
  std::optional<std::chrono::milliseconds> took;
  bool also = false;  // ReceiverHooks::apply_also changed the state with it
};

struct ReceiverHooks {
  // Sends a frame to the peer on the current link.
  std::function<asio::awaitable<Status>(MsgType, std::vector<std::byte>)> send;
  // What the session changes in the same durable write as a cycle's apply (a reprotect
  // completes with the first cycle applied); returns whether it changed anything.
  std::function<bool(SessionState&)> apply_also;
  // After every apply.
  std::function<void(const Applied&)> applied;
};

class Receiver {
 public:
  Receiver(asio::any_io_executor ex, ReceiverOptions opts, std::vector<ReceiverMember> members, StateStore& store,
           engine::Clock& clock, ReceiverHooks hooks);
  ~Receiver();
  Receiver(const Receiver&) = delete;
  Receiver& operator=(const Receiver&) = delete;

  // After a restart: finishes the apply of a committed cycle, reopens a staged one.
  asio::awaitable<Status> recover();

  // The peer's data frames. `link` names the link the frame came on (it changes with every
  // connect and disconnect); frames of a transfer begun on another link are refused.
  asio::awaitable<Status> on_sync_begin(const SyncBegin& m, std::uint64_t link);
  asio::awaitable<Status> on_extent(const Extent& m, std::uint64_t link);
  asio::awaitable<Status> on_extent_hash(const ExtentHash& m, std::uint64_t link);
  asio::awaitable<Status> on_cycle_end(const CycleEnd& m, std::uint64_t link);

  // A pause: everything received becomes durable (it is the restart address) and is
  // acknowledged if its transfer came on `link`.
  asio::awaitable<Status> make_durable(std::uint64_t link);
  // Nothing more will arrive (an unplanned failover): writes in flight land, and a committed
  // cycle is applied. A staged, uncommitted one stays staged (the role change drops it).
  asio::awaitable<Status> settle();
  // Before the receiver is destroyed by a role change: writes in flight land, the staged
  // journal is removed.
  asio::awaitable<void> discard();
  // Initial-sync writes in flight land (stopping).
  asio::awaitable<Status> wait_writes() { return writes_.wait(); }

  // A transfer is being received (its sync_begin came, its end did not).
  [[nodiscard]] bool receiving() const { return recv_.has_value(); }
  // The global offset up to which the staged cycle is durable (0: none staged).
  [[nodiscard]] std::uint64_t staged_end() const;

  void observe(ApplyObserver* o);
  void unobserve(ApplyObserver* o);

 private:
  struct Pending {
    std::size_t member;
    engine::JournalExtent e;
    engine::IoBuffer data;
  };
  // The transfer being received, from its sync_begin to its end. A new sync_begin replaces it.
  struct Receiving {
    TransferMode mode = TransferMode::cycle;
    std::uint64_t cycle = 0;
    std::uint64_t link = 0;
    std::uint64_t next = 0;           // where the next extent must start (at least)
    std::uint64_t processed_end = 0;  // initial sync: everything below is written or matched
    std::uint64_t since_checkpoint = 0;
    std::uint64_t batch = 0;       // staged bytes per acknowledgement (within the source's window)
    std::uint64_t checkpoint = 0;  // initial-sync bytes per checkpoint
    std::chrono::steady_clock::time_point started;
    std::vector<Pending> pending;  // received, not yet written to the journal
    std::uint64_t pending_bytes = 0;
    std::set<std::uint64_t> awaiting_data;  // compare mode: extents that differed, not received yet
  };

  asio::awaitable<Status> open_journals(std::uint64_t cycle, std::uint64_t capacity, bool existing);
  asio::awaitable<Status> stage_flush(std::uint64_t link);  // write pending, sync, acknowledge
  asio::awaitable<Status> stage_write();                    // write pending as journal records
  asio::awaitable<Status> initial_checkpoint(std::uint64_t link);
  asio::awaitable<Status> apply_committed(std::uint64_t cycle);
  asio::awaitable<Status> send(MsgType t, std::vector<std::byte> bytes);
  [[nodiscard]] std::uint64_t total_bytes() const;
  [[nodiscard]] std::pair<std::size_t, std::uint64_t> locate(std::uint64_t global) const;

  asio::any_io_executor ex_;
  ReceiverOptions opts_;
  std::vector<ReceiverMember> members_;
  std::vector<std::unique_ptr<engine::CycleJournal>> journals_;  // per member, while a cycle is staged
  StateStore& store_;
  const SessionState& state_ = store_.state();
  engine::Clock& clock_;
  ReceiverHooks hooks_;
  std::vector<ApplyObserver*> observers_;
  std::optional<Receiving> recv_;
  std::uint64_t unsynced_bytes_ = 0;  // staged in records, not yet synced/acknowledged
  std::uint64_t received_high_ = 0;   // furthest initial-sync byte received since this process started
  // Initial-sync writes in flight: the receive loop goes on to the next frame while they run;
  // a checkpoint (and every change of transfer) waits for them first.
  static constexpr std::size_t kWritesMax = 16;
  TaskGroup writes_{ex_};
};

}  // namespace tandem::replication

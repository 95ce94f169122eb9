// SessionState: what a replication session keeps durably, in the superblock of its first
// member volume (its session blob, checksummed with the superblock). The generation history
// lives in each member's superblock proper.
//
// Every change that matters to recovery is written before it is acted on: a cut before the
// dirty bitmap forgets the frozen blocks, a commit record before the journal is applied, an
// initial-sync checkpoint after the data before it is acknowledged.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "tandem/common/result.h"
#include "tandem/replication/control.h"
#include "tandem/replication/messages.h"

namespace tandem::replication {

// Where a failover stands (version 2).
enum class Phase : std::uint8_t {
  none = 0,
  failing_over = 1,         // source: planned failover under way (host writes refused)
  failing_over_for_dr = 2,  // destination: unplanned failover under way
  failed_over = 3,          // roles swapped; replication waits for reprotect
  reprotecting = 4,         // the new source resynchronizes the union of both sides' changes
};

struct SessionState {
  static constexpr std::uint8_t kVersion = 2;  // 1: without the control flags (read as unpaused)

  Role role = Role::source;
  bool paired = false;                        // has been part of this pair
  InitialState initial = InitialState::none;  // destination: initial sync progress
  std::uint64_t initial_offset = 0;           // destination: durable restart address of it
  std::uint64_t committed_cycle = 0;          // last cycle both sides agree is committed
  // Source: the cycle whose frozen set is in the cycle area (cut, not yet committed).
  // Destination: the cycle being staged in the journal. 0 = none.
  std::uint64_t transfer_cycle = 0;
  std::uint64_t applying_cycle = 0;  // destination: commit record (journal being applied)
  std::uint64_t next_cycle = 1;      // source: number of the next cut
  // When the last cycle committed (Unix time, ms; 0 = never): last_sync_timestamp, kept across
  // restarts so that the age of a destination's image is known before an unplanned failover.
  // In what was version 1's reserved sixth word, always written 0 before.
  std::uint64_t last_sync_unix_ms = 0;
  // Control state (version 2).
  bool paused = false;             // an operator paused the session (here, and the peer unless local_only)
  bool local_only_paused = false;  // the pause did not reach the peer
  bool resume_to_sync = false;     // the pause interrupted a synchronization: resume goes on with it
  bool reverse = false;            // planned failover: go on into reprotect by itself
  bool initial_compare = false;    // destination: the running initial sync compares hashes
  Phase phase = Phase::none;
  std::uint64_t failover_gen = 0;  // the generation both sides shared when the roles swapped
  bool operator==(const SessionState&) const = default;
};

// What a session is doing, as far as the state it shows goes (kept in memory only; the phase
// and the pause, which are durable, are in SessionState).
enum class Activity : std::uint8_t {
  initializing,   // the initial copy is due or under way: the destination is not consistent
  ok,             // in step with the peer
  synchronizing,  // a cycle ships
  link_lost,      // the link to the peer went down (System_Paused until its next hello)
  refused,        // the session was refused (split brain, wrong sizes, ...): Error
};

// Everything the shown state depends on.
struct StateFacts {
  Activity activity = Activity::ok;
  Phase phase = Phase::none;
  bool paused = false;       // paused by an operator (durable)
  bool connected = false;    // the link is up
  bool peer_paused = false;  // the peer's hello said it is paused
  bool peer_ndu = false;     // the peer announced a maintenance shutdown
};

// The state the control API shows, in order of precedence: Error; a failover phase; Paused;
// Initializing; System_Paused (paused on the peer only, or the link lost); Paused_For_NDU (the
// peer is down for maintenance); else OK or Synchronizing.
State shown_state(const StateFacts& f);

std::vector<std::uint8_t> encode_state(const SessionState& s);
// An empty blob (never written) gives the defaults for `role`.
Result<SessionState> decode_state(std::span<const std::uint8_t> blob, Role role);

}  // namespace tandem::replication

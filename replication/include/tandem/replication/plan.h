// What a source does when its destination says hello: a pure function of the two sides'
// states, so every case is tested as a table (tests/unit/replication/plan_test.cpp).
//
// The source refuses (touching nothing) when the two sides cannot be a pair: both sources,
// different volumes, or generation histories that say data would be lost (split brain,
// unrelated volumes, a destination promoted since). After a failover the direction was decided
// by the failover: it waits for reprotect. Otherwise it picks up where the two left off: an
// initial sync (resumed at the destination's checkpoint, in the mode it began in), a cycle in
// flight (resumed at the destination's staged end, or finished when the destination committed
// it and only the acknowledgement was lost), or nothing to do until the next cut.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tandem/replication/errc.h"
#include "tandem/replication/generation.h"
#include "tandem/replication/messages.h"
#include "tandem/replication/session_state.h"

namespace tandem::replication {

// The source's side of the decision.
struct SourceView {
  std::string session_id;
  std::vector<MemberInfo> members;  // volume id and size, in order
  std::vector<std::uint64_t> generations;
  Phase phase = Phase::none;
  std::uint64_t transfer_cycle = 0;  // a cut cycle not yet committed (0 = none)
};

struct SourcePlan {
  enum class Kind : std::uint8_t {
    refuse,           // send `refuse` with `code` and `why`; nothing else
    await_reprotect,  // after a failover: paired, nothing ships before reprotect
    initial,          // an initial sync in `mode` from `start`
    cycle,            // the cut cycle ships from `start`
    finish,           // the destination committed the cut cycle: forget it here
    idle,             // in step: the next cut ships what is written from now on
  };
  Kind kind = Kind::idle;
  errc code = errc::not_allowed_in_state;         // refuse
  std::string why;                                // refuse
  TransferMode mode = TransferMode::cycle;        // initial
  std::uint64_t start = 0;                        // initial, cycle
  bool cut_now = false;                           // idle: the destination has no cycle yet; cut one at once
  SyncDecision decision = SyncDecision::in_sync;  // what the histories said (for the log)
  bool operator==(const SourcePlan&) const = default;
};

SourcePlan plan(const SourceView& local, const SessionHello& peer);

// Two sources meet (both say hello as sources) after a failover. The one whose failover is
// older, or that never failed over, steps down to a destination; the other waits for it. A
// failover is newer when it started from a generation the other side wrote after its own
// failover point (a second unplanned failover before reprotect was seen to finish, say).
enum class SourcesMeet : std::uint8_t {
  step_down,      // this side demotes itself
  wait_for_peer,  // the peer demotes itself when it sees this side's hello
  neither,        // no failover explains it: the hello goes on to plan() (which refuses)
};
SourcesMeet when_sources_meet(Phase mine, std::uint64_t my_failover_gen, const std::vector<std::uint64_t>& my_history,
                              Phase peers, std::uint64_t peer_failover_gen);

}  // namespace tandem::replication

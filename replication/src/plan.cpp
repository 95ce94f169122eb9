#include "tandem/replication/plan.h"

#include <algorithm>
#include <optional>

namespace tandem::replication {

namespace {
SourcePlan refusal(errc code, std::string why, SyncDecision d = SyncDecision::in_sync) {
  SourcePlan p;
  p.kind = SourcePlan::Kind::refuse;
  p.code = code;
  p.why = std::move(why);
  p.decision = d;
  return p;
}
}  // namespace

SourcePlan plan(const SourceView& local, const SessionHello& peer) {
  const std::string& id = local.session_id;
  if (peer.role != Role::destination) {
    return refusal(errc::wrong_role, "the peer's side of session " + id + " is also a source");
  }
  if (peer.members.size() != local.members.size()) {
    return refusal(errc::mismatched_volumes, "the peer has " + std::to_string(peer.members.size()) +
                                                 " volumes in session " + id + ", this side " +
                                                 std::to_string(local.members.size()));
  }
  for (std::size_t i = 0; i < local.members.size(); ++i) {
    if (peer.members[i].size_bytes != local.members[i].size_bytes) {
      return refusal(errc::mismatched_volumes, "volume " + local.members[i].volume_id + " is " +
                                                   std::to_string(local.members[i].size_bytes) +
                                                   " bytes but the peer's " + peer.members[i].volume_id + " is " +
                                                   std::to_string(peer.members[i].size_bytes));
    }
  }
  SourcePlan p;
  const auto resume_cycle = [&] {
    if (peer.committed_cycle >= local.transfer_cycle) {
      // The destination committed it; the acknowledgement was lost.
      p.kind = SourcePlan::Kind::finish;
    } else {
      p.kind = SourcePlan::Kind::cycle;
      p.start = peer.staged_cycle == local.transfer_cycle ? peer.staged_offset : 0;
    }
  };
  if (local.phase == Phase::failed_over || local.phase == Phase::reprotecting) {
    // The failover decided the direction; the histories meet again with reprotect's first
    // cycle. Nothing ships before reprotect has the union of both sides' changes, but a cycle
    // cut after it (reprotect's own) goes on where it stopped: cutting another over it would
    // drop its blocks. Found by the simulation (seed 27 of the failover runs).
    if (local.transfer_cycle != 0) {
      resume_cycle();
    } else {
      p.kind = SourcePlan::Kind::await_reprotect;
    }
    return p;
  }
  const SyncDecision d = decide(GenerationView{local.generations, true}, GenerationView{peer.generations, peer.paired});
  switch (d) {
    case SyncDecision::split_brain:
      return refusal(errc::split_brain,
                     "split brain: both sides were written since they last agreed (local " +
                         describe(local.generations) + ", peer " + describe(peer.generations) +
                         "); nothing was changed on either side. Choose the side to keep",
                     d);
    case SyncDecision::unrelated:
      return refusal(errc::unrelated_volumes,
                     "unrelated volumes: no common generation (local " + describe(local.generations) + ", peer " +
                         describe(peer.generations) + "); nothing was changed",
                     d);
    case SyncDecision::destination_ahead:
      return refusal(errc::destination_ahead,
                     "the peer holds newer data (it was promoted: peer " + describe(peer.generations) + ", local " +
                         describe(local.generations) + "); reprotect is needed",
                     d);
    case SyncDecision::in_sync:
    case SyncDecision::source_ahead:
    case SyncDecision::initial_sync:
      break;
  }
  p.decision = d;
  if (peer.initial == InitialState::running) {
    // Resumed in the mode it started in: a compare goes on comparing (what the destination
    // already holds beyond the restart address is not shipped again).
    p.kind = SourcePlan::Kind::initial;
    p.mode = peer.initial_compare ? TransferMode::initial_compare : TransferMode::initial_full;
    p.start = peer.initial_offset;
  } else if (d == SyncDecision::initial_sync) {
    p.kind = SourcePlan::Kind::initial;
    p.mode = peer.blank ? TransferMode::initial_full : TransferMode::initial_compare;
    p.start = 0;
  } else if (local.transfer_cycle != 0) {
    resume_cycle();
  } else {
    p.kind = SourcePlan::Kind::idle;
    p.cut_now = peer.committed_cycle == 0;  // the first cycle makes the destination consistent
  }
  return p;
}

SourcesMeet when_sources_meet(Phase mine, std::uint64_t my_failover_gen, const std::vector<std::uint64_t>& my_history,
                              Phase peers, std::uint64_t peer_failover_gen) {
  const auto failed_over = [](Phase p) {
    return p == Phase::failed_over || p == Phase::reprotecting || p == Phase::failing_over_for_dr;
  };
  const bool i_did = failed_over(mine);
  const bool peer_did = peers == Phase::failed_over || peers == Phase::reprotecting;
  const auto age = [&](std::uint64_t g) {  // 0 = my current generation; larger = older
    const auto it = std::find(my_history.begin(), my_history.end(), g);
    return it == my_history.end() ? std::optional<std::size_t>{} : std::optional<std::size_t>(it - my_history.begin());
  };
  const auto peers_point = age(peer_failover_gen);
  if (i_did && !peer_did) return SourcesMeet::wait_for_peer;  // the old source steps down
  if (!i_did && peer_did) return peers_point ? SourcesMeet::step_down : SourcesMeet::neither;
  if (i_did && peer_did && peers_point) {
    // Both failed over: the peer's is the newer one when it started from a generation newer
    // than the point this side failed over from.
    const auto my_point = age(my_failover_gen);
    if (!my_point || *peers_point < *my_point) return SourcesMeet::step_down;
    if (*peers_point > *my_point) return SourcesMeet::wait_for_peer;
  }
  return SourcesMeet::neither;
}

}  // namespace tandem::replication

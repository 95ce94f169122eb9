// Plan: what a source does on its destination's hello, one row per case of the decision: the
// refusals (role, volumes, generation histories) with their codes, the wait after a failover,
// the initial sync (new, resumed in its mode, compare for a destination not blank), a cycle in
// flight (resumed at the staged end or from 0, or finished when only the acknowledgement was
// lost), and nothing to do (with the first cycle cut at once on a fresh pair).
#include <gtest/gtest.h>

#include "tandem/replication/plan.h"

namespace tandem::replication {
namespace {

using Kind = SourcePlan::Kind;

SourceView source(std::uint64_t transfer_cycle = 0, Phase phase = Phase::none) {
  SourceView v;
  v.session_id = "s-vol0";
  v.members = {{"vol0", 1 << 20}, {"vol1", 2 << 20}};
  v.generations = {0xb, 0xa};
  v.phase = phase;
  v.transfer_cycle = transfer_cycle;
  return v;
}

SessionHello destination() {
  SessionHello h;
  h.session_id = "s-vol0";
  h.role = Role::destination;
  h.members = {{"dvol0", 1 << 20}, {"dvol1", 2 << 20}};
  h.generations = {0xb, 0xa};
  h.paired = true;
  h.initial = InitialState::done;
  h.committed_cycle = 7;
  return h;
}

TEST(Plan, RefusesWhatCannotBeAPair) {
  struct Row {
    const char* name;
    void (*change)(SessionHello&);
    errc code;
    const char* says;
  };
  const Row rows[] = {
      {"both sources", [](SessionHello& h) { h.role = Role::source; }, errc::wrong_role, "also a source"},
      {"member count", [](SessionHello& h) { h.members.pop_back(); }, errc::mismatched_volumes, "has 1 volumes"},
      {"member size", [](SessionHello& h) { h.members[1].size_bytes = 4 << 20; }, errc::mismatched_volumes,
       "volume vol1 is 2097152 bytes but the peer's dvol1 is 4194304"},
      {"split brain",
       [](SessionHello& h) {
         h.generations = {0xc, 0xa};
       },
       errc::split_brain, "split brain"},
      {"unrelated",
       [](SessionHello& h) {
         h.generations = {0xe, 0xd};
       },
       errc::unrelated_volumes, "unrelated"},
      {"promoted",
       [](SessionHello& h) {
         h.generations = {0xc, 0xb, 0xa};
       },
       errc::destination_ahead, "newer data"},
  };
  for (const auto& r : rows) {
    SessionHello h = destination();
    r.change(h);
    const SourcePlan p = plan(source(3), h);
    EXPECT_EQ(p.kind, Kind::refuse) << r.name;
    EXPECT_EQ(p.code, r.code) << r.name;
    EXPECT_NE(p.why.find(r.says), std::string::npos) << r.name << ": " << p.why;
  }
}

TEST(Plan, AfterAFailoverWaitsForReprotectWhateverTheHistories) {
  for (Phase ph : {Phase::failed_over, Phase::reprotecting}) {
    SessionHello h = destination();
    h.generations = {0xc, 0xa};  // would be split brain
    const SourcePlan p = plan(source(0, ph), h);
    EXPECT_EQ(p.kind, Kind::await_reprotect);
  }
  // A cycle cut for reprotect (after the exchange) goes on where it stopped, or is finished.
  SessionHello staged = destination();
  staged.generations = {0xc, 0xa};
  staged.staged_cycle = 9;
  staged.staged_offset = 8192;
  SourcePlan p = plan(source(9, Phase::reprotecting), staged);
  EXPECT_EQ(p.kind, Kind::cycle);
  EXPECT_EQ(p.start, 8192u);
  staged.committed_cycle = 9;
  EXPECT_EQ(plan(source(9, Phase::reprotecting), staged).kind, Kind::finish);
  // But never with volumes that differ.
  SessionHello h = destination();
  h.members[0].size_bytes = 1;
  EXPECT_EQ(plan(source(0, Phase::failed_over), h).kind, Kind::refuse);
}

TEST(Plan, Table) {
  struct Row {
    const char* name;
    std::uint64_t transfer_cycle;
    void (*change)(SessionHello&);
    Kind kind;
    TransferMode mode;
    std::uint64_t start;
    bool cut_now;
    SyncDecision decision;
  };
  const auto same = [](SessionHello&) {};
  const Row rows[] = {
      {"in step", 0, same, Kind::idle, TransferMode::cycle, 0, false, SyncDecision::in_sync},
      {"in step, no cycle yet", 0, [](SessionHello& h) { h.committed_cycle = 0; }, Kind::idle, TransferMode::cycle, 0,
       true, SyncDecision::in_sync},
      {"source wrote alone", 0, [](SessionHello& h) { h.generations = {0xa}; }, Kind::idle, TransferMode::cycle, 0,
       false, SyncDecision::source_ahead},
      {"new, blank", 0,
       [](SessionHello& h) {
         h.paired = false;
         h.blank = true;
         h.generations = {};
         h.initial = InitialState::none;
       },
       Kind::initial, TransferMode::initial_full, 0, false, SyncDecision::initial_sync},
      {"new, pre-seeded", 0,
       [](SessionHello& h) {
         h.paired = false;
         h.generations = {};
         h.initial = InitialState::none;
       },
       Kind::initial, TransferMode::initial_compare, 0, false, SyncDecision::initial_sync},
      {"initial resumed, full", 0,
       [](SessionHello& h) {
         h.initial = InitialState::running;
         h.initial_offset = 1 << 20;
       },
       Kind::initial, TransferMode::initial_full, 1 << 20, false, SyncDecision::in_sync},
      {"initial resumed, compare", 0,
       [](SessionHello& h) {
         h.initial = InitialState::running;
         h.initial_compare = true;
         h.initial_offset = 8192;
       },
       Kind::initial, TransferMode::initial_compare, 8192, false, SyncDecision::in_sync},
      {"cycle resumed at the staged end", 8,
       [](SessionHello& h) {
         h.staged_cycle = 8;
         h.staged_offset = 40960;
       },
       Kind::cycle, TransferMode::cycle, 40960, false, SyncDecision::in_sync},
      {"cycle staged is another one: from 0", 8,
       [](SessionHello& h) {
         h.staged_cycle = 6;
         h.staged_offset = 40960;
       },
       Kind::cycle, TransferMode::cycle, 0, false, SyncDecision::in_sync},
      {"cycle nothing staged", 8, same, Kind::cycle, TransferMode::cycle, 0, false, SyncDecision::in_sync},
      {"cycle committed, ack lost", 7, same, Kind::finish, TransferMode::cycle, 0, false, SyncDecision::in_sync},
  };
  for (const auto& r : rows) {
    SessionHello h = destination();
    r.change(h);
    const SourcePlan p = plan(source(r.transfer_cycle), h);
    EXPECT_EQ(p.kind, r.kind) << r.name;
    EXPECT_EQ(p.decision, r.decision) << r.name;
    EXPECT_EQ(p.cut_now, r.cut_now) << r.name;
    if (r.kind == Kind::initial) {
      EXPECT_EQ(p.mode, r.mode) << r.name;
    }
    if (r.kind == Kind::initial || r.kind == Kind::cycle) {
      EXPECT_EQ(p.start, r.start) << r.name;
    }
  }
}

}  // namespace
}  // namespace tandem::replication

namespace tandem::replication {
namespace {

// Two sources meet after failovers: the older failover (or the side that never failed over)
// steps down, the newer waits; nothing explains two plain sources.
TEST(SourcesMeet, TheNewerFailoverWins) {
  // This side's history, newest first: it failed over from 0xa (to 0xb), then wrote alone (0xc).
  const std::vector<std::uint64_t> mine = {0xc, 0xb, 0xa, 0x9};
  // Never failed over; the peer failed over from a generation this side has: step down.
  EXPECT_EQ(when_sources_meet(Phase::none, 0, mine, Phase::failed_over, 0xb), SourcesMeet::step_down);
  EXPECT_EQ(when_sources_meet(Phase::none, 0, mine, Phase::reprotecting, 0xc), SourcesMeet::step_down);
  // ... from a generation this side never had: nothing explains it.
  EXPECT_EQ(when_sources_meet(Phase::none, 0, mine, Phase::failed_over, 0x77), SourcesMeet::neither);
  // This side failed over, the peer did not: the peer steps down.
  EXPECT_EQ(when_sources_meet(Phase::failed_over, 0xa, mine, Phase::none, 0), SourcesMeet::wait_for_peer);
  EXPECT_EQ(when_sources_meet(Phase::failing_over_for_dr, 0xa, mine, Phase::none, 0), SourcesMeet::wait_for_peer);
  // Both failed over: the peer from 0xb or 0xc, newer than this side's point 0xa: its failover
  // came later (this side's reprotect never finished as far as it knows): step down.
  EXPECT_EQ(when_sources_meet(Phase::reprotecting, 0xa, mine, Phase::failed_over, 0xb), SourcesMeet::step_down);
  EXPECT_EQ(when_sources_meet(Phase::reprotecting, 0xa, mine, Phase::reprotecting, 0xc), SourcesMeet::step_down);
  // The peer failed over from an older point than this side's: it steps down.
  EXPECT_EQ(when_sources_meet(Phase::failed_over, 0xb, mine, Phase::failed_over, 0x9), SourcesMeet::wait_for_peer);
  // The same point on both sides: neither can be told apart (refused by plan()).
  EXPECT_EQ(when_sources_meet(Phase::failed_over, 0xa, mine, Phase::failed_over, 0xa), SourcesMeet::neither);
  // Neither failed over: plain sources, refused by plan().
  EXPECT_EQ(when_sources_meet(Phase::none, 0, mine, Phase::none, 0), SourcesMeet::neither);
}

}  // namespace
}  // namespace tandem::replication

// Plan: the session state kept in each member's superblock round-trips every field; what older
// versions wrote still decodes (v1 without the control flags; v1 and v2 wrote 0 where the last
// sync time now is); anything else is refused rather than guessed at.
#include <gtest/gtest.h>

#include "tandem/replication/session_state.h"

namespace tandem::replication {
namespace {

TEST(SessionState, EveryFieldRoundTrips) {
  SessionState s;
  s.role = Role::destination;
  s.paired = true;
  s.initial = InitialState::running;
  s.initial_offset = 1ull << 33;
  s.committed_cycle = 41;
  s.transfer_cycle = 42;
  s.applying_cycle = 41;
  s.next_cycle = 43;
  s.last_sync_unix_ms = 1'796'150'400'123ull;
  s.paused = true;
  s.local_only_paused = true;
  s.resume_to_sync = true;
  s.reverse = true;
  s.initial_compare = true;
  s.phase = Phase::reprotecting;
  s.failover_gen = 0x0123456789abcdefull;
  const auto blob = encode_state(s);
  auto d = decode_state(blob, Role::source);
  ASSERT_TRUE(d.ok()) << d.error().message();
  EXPECT_EQ(*d, s);
}

TEST(SessionState, OlderVersionsDecodeAndGarbageIsRefused) {
  SessionState s;
  s.role = Role::source;
  s.committed_cycle = 7;
  s.paused = true;
  auto blob = encode_state(s);
  // Version 1: the first 52 bytes, without flags, phase and failover generation.
  std::vector<std::uint8_t> v1(blob.begin(), blob.begin() + 52);
  v1[0] = 1;
  auto d = decode_state(v1, Role::destination);
  ASSERT_TRUE(d.ok()) << d.error().message();
  EXPECT_EQ(d->committed_cycle, 7u);
  EXPECT_FALSE(d->paused);  // v1 had no pause
  EXPECT_EQ(d->last_sync_unix_ms, 0u);
  // Never written: the defaults for the configured role.
  auto e = decode_state({}, Role::destination);
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->role, Role::destination);
  // A version from the future, a truncated blob, a bad phase: refused.
  auto future = blob;
  future[0] = 9;
  EXPECT_FALSE(decode_state(future, Role::source).ok());
  EXPECT_FALSE(decode_state(std::span(blob).first(blob.size() - 1), Role::source).ok());
  auto phase = blob;
  phase[53] = 5;
  EXPECT_FALSE(decode_state(phase, Role::source).ok());
}

// The shown state: one row per rule of precedence, then every combination of facts checked
// against the properties the control API documents.
TEST(ShownState, Table) {
  struct Row {
    Activity activity;
    Phase phase;
    bool paused, connected, peer_paused, peer_ndu;
    State want;
  };
  const Row rows[] = {
      {Activity::ok, Phase::none, false, true, false, false, State::ok},
      {Activity::synchronizing, Phase::none, false, true, false, false, State::synchronizing},
      {Activity::initializing, Phase::none, false, true, false, false, State::initializing},
      {Activity::link_lost, Phase::none, false, false, false, false, State::system_paused},
      {Activity::refused, Phase::none, false, true, false, false, State::error},
      // Error wins over everything, even a failover phase and a pause.
      {Activity::refused, Phase::failed_over, true, false, true, true, State::error},
      // A failover phase wins over the pause and the link.
      {Activity::ok, Phase::failing_over, true, true, true, false, State::failing_over},
      {Activity::link_lost, Phase::failing_over_for_dr, false, false, false, false, State::failing_over_for_dr},
      {Activity::synchronizing, Phase::failed_over, false, true, false, false, State::failed_over},
      {Activity::initializing, Phase::reprotecting, false, true, false, false, State::reprotecting},
      // Paused wins over Initializing and the peer's pause.
      {Activity::initializing, Phase::none, true, true, true, false, State::paused},
      {Activity::link_lost, Phase::none, true, false, false, true, State::paused},
      // Initializing wins over the link and the peer.
      {Activity::initializing, Phase::none, false, true, true, false, State::initializing},
      {Activity::initializing, Phase::none, false, false, false, true, State::initializing},
      // Paused on the peer only, while connected.
      {Activity::ok, Phase::none, false, true, true, false, State::system_paused},
      {Activity::synchronizing, Phase::none, false, true, true, true, State::system_paused},
      // The peer down for maintenance, while the link is down; with the link up it is back.
      {Activity::link_lost, Phase::none, false, false, false, true, State::paused_for_ndu},
      {Activity::ok, Phase::none, false, true, false, true, State::ok},
      // A peer's pause seen before the link dropped no longer counts once it is down.
      {Activity::link_lost, Phase::none, false, false, true, false, State::system_paused},
      {Activity::ok, Phase::none, false, false, true, false, State::ok},
  };
  for (const auto& r : rows) {
    const StateFacts f{r.activity, r.phase, r.paused, r.connected, r.peer_paused, r.peer_ndu};
    EXPECT_EQ(shown_state(f), r.want) << "activity " << static_cast<int>(r.activity) << " phase "
                                      << static_cast<int>(r.phase) << " paused " << r.paused << " connected "
                                      << r.connected << " peer_paused " << r.peer_paused << " peer_ndu " << r.peer_ndu;
  }
}

TEST(ShownState, EveryCombinationKeepsThePrecedence) {
  const Activity activities[] = {Activity::initializing, Activity::ok, Activity::synchronizing, Activity::link_lost,
                                 Activity::refused};
  const Phase phases[] = {Phase::none, Phase::failing_over, Phase::failing_over_for_dr, Phase::failed_over,
                          Phase::reprotecting};
  int seen[kStateCount] = {};
  for (Activity a : activities) {
    for (Phase p : phases) {
      for (int bits = 0; bits < 16; ++bits) {
        const StateFacts f{a, p, (bits & 1) != 0, (bits & 2) != 0, (bits & 4) != 0, (bits & 8) != 0};
        const State s = shown_state(f);
        ++seen[static_cast<int>(s)];
        EXPECT_EQ(s == State::error, a == Activity::refused);
        if (a != Activity::refused && p != Phase::none) {
          EXPECT_TRUE(s == State::failing_over || s == State::failing_over_for_dr || s == State::failed_over ||
                      s == State::reprotecting);
        }
        if (a != Activity::refused && p == Phase::none) {
          EXPECT_EQ(s == State::paused, f.paused);
          if (!f.paused) {
            EXPECT_EQ(s == State::initializing, a == Activity::initializing);
          }
          if (s == State::ok || s == State::synchronizing) {
            EXPECT_FALSE(f.connected && f.peer_paused);
          }
          if (s == State::paused_for_ndu) {
            EXPECT_FALSE(f.connected);
          }
        }
      }
    }
  }
  for (int i = 0; i < kStateCount; ++i) EXPECT_GT(seen[i], 0) << "state " << i << " is never shown";
}

}  // namespace
}  // namespace tandem::replication

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

}  // namespace
}  // namespace tandem::replication

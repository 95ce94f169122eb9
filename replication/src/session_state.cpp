#include "tandem/replication/session_state.h"

#include "tandem/common/units.h"
#include "tandem/replication/errc.h"

namespace tandem::replication {

namespace {
constexpr std::size_t kBytesV1 = 1 + 1 + 1 + 1 + 8 * 6;
// v2 = v1 + flags:u8 (bit 0 paused, 1 local only, 2 resume to sync, 3 reverse, 4 initial
// compare) + phase:u8 +
// failover_gen:u64
constexpr std::size_t kBytes = kBytesV1 + 1 + 1 + 8;
}  // namespace

std::vector<std::uint8_t> encode_state(const SessionState& s) {
  std::vector<std::uint8_t> b(kBytes);
  b[0] = SessionState::kVersion;
  b[1] = static_cast<std::uint8_t>(s.role);
  b[2] = s.paired ? 1 : 0;
  b[3] = static_cast<std::uint8_t>(s.initial);
  unsigned char* p = b.data() + 4;
  for (std::uint64_t v :
       {s.initial_offset, s.committed_cycle, s.transfer_cycle, s.applying_cycle, s.next_cycle, s.last_sync_unix_ms}) {
    put_le64(p, v);
    p += 8;
  }
  b[kBytesV1] =
      static_cast<std::uint8_t>((s.paused ? 1 : 0) | (s.local_only_paused ? 2 : 0) | (s.resume_to_sync ? 4 : 0) |
                                (s.reverse ? 8 : 0) | (s.initial_compare ? 16 : 0));
  b[kBytesV1 + 1] = static_cast<std::uint8_t>(s.phase);
  put_le64(b.data() + kBytesV1 + 2, s.failover_gen);
  return b;
}

Result<SessionState> decode_state(std::span<const std::uint8_t> blob, Role role) {
  SessionState s;
  s.role = role;
  if (blob.empty()) return s;
  const bool v1 = blob.size() == kBytesV1 && blob[0] == 1;
  const bool v2 = blob.size() == kBytes && blob[0] == 2 && blob[kBytesV1] <= 31 && blob[kBytesV1 + 1] <= 4;
  if ((!v1 && !v2) || (blob[1] != 1 && blob[1] != 2) || blob[2] > 1 || blob[3] > 2) {
    return Error(errc::bad_message, "session state in the superblock is not understood");
  }
  s.role = static_cast<Role>(blob[1]);
  s.paired = blob[2] == 1;
  s.initial = static_cast<InitialState>(blob[3]);
  const unsigned char* p = blob.data() + 4;
  s.initial_offset = get_le64(p);
  s.committed_cycle = get_le64(p + 8);
  s.transfer_cycle = get_le64(p + 16);
  s.applying_cycle = get_le64(p + 24);
  s.next_cycle = get_le64(p + 32);
  if (s.next_cycle == 0) s.next_cycle = 1;
  s.last_sync_unix_ms = get_le64(p + 40);
  if (v2) {
    s.paused = (blob[kBytesV1] & 1) != 0;
    s.local_only_paused = (blob[kBytesV1] & 2) != 0;
    s.resume_to_sync = (blob[kBytesV1] & 4) != 0;
    s.reverse = (blob[kBytesV1] & 8) != 0;
    s.initial_compare = (blob[kBytesV1] & 16) != 0;
    s.phase = static_cast<Phase>(blob[kBytesV1 + 1]);
    s.failover_gen = get_le64(blob.data() + kBytesV1 + 2);
  }
  return s;
}

State shown_state(const StateFacts& f) {
  if (f.activity == Activity::refused) return State::error;
  switch (f.phase) {
    case Phase::failing_over:
      return State::failing_over;
    case Phase::failing_over_for_dr:
      return State::failing_over_for_dr;
    case Phase::failed_over:
      return State::failed_over;
    case Phase::reprotecting:
      return State::reprotecting;
    case Phase::none:
      break;
  }
  if (f.paused) return State::paused;
  if (f.activity == Activity::initializing) return State::initializing;
  if (f.connected && f.peer_paused) return State::system_paused;
  if (!f.connected && f.peer_ndu) return State::paused_for_ndu;
  switch (f.activity) {
    case Activity::ok:
      return State::ok;
    case Activity::synchronizing:
      return State::synchronizing;
    case Activity::link_lost:
      return State::system_paused;
    case Activity::initializing:
    case Activity::refused:
      break;
  }
  return State::error;  // not reached: both were returned above
}

}  // namespace tandem::replication

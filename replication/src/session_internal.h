// What the parts of Session (session*.cpp) share and nobody else needs.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>

#include "tandem/common/async.h"
#include "tandem/engine/clock.h"
#include "tandem/replication/messages.h"
#include "tandem/replication/session.h"

namespace tandem::replication {

inline constexpr std::uint64_t kBlock = 4096;

inline std::uint64_t unix_ms(std::chrono::system_clock::time_point t) {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count());
}

// A control request waiting for the peer's answer.
struct Session::PendingControl {
  std::optional<ControlReply> reply;
  bool lost = false;  // timed out, or the link went down
  WaitQueue wq;
  std::unique_ptr<engine::Timer> timer;
};

// Logs a state change when a coroutine step ends, whichever way it leaves.
struct Session::NoteOnExit {
  Session* s;
  ~NoteOnExit() { s->note_state(); }
};

}  // namespace tandem::replication

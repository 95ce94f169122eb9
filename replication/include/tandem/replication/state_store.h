// StateStore: a session's durable state (SessionState, and the generation history of its
// volumes) and the one way it changes.
//
// Every change is a named transition: the edit is made to a copy, the copy is written to the
// volumes' superblocks, and only then does the session see it. A write that fails leaves the
// state as it was, in memory as on disk, so the session never acts on a state that a restart
// would not find. Transitions run one at a time, each on the state the one before left (two
// asked at once both take effect: neither writes over the other's copy).
//
// Member 0's superblock is authoritative for SessionState (its session blob, with the role in
// the superblock proper). A new generation history goes to every member, member 0 last: it is
// the one read on start.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tandem/common/async.h"
#include "tandem/common/result.h"
#include "tandem/replication/session_state.h"

namespace tandem::engine {
class Volume;
}

namespace tandem::replication {

class StateStore {
 public:
  using Edit = std::function<void(SessionState&)>;

  StateStore() = default;
  StateStore(const StateStore&) = delete;
  StateStore& operator=(const StateStore&) = delete;

  // Once, when the session opens: what its first member's superblock holds.
  void load(std::vector<engine::Volume*> volumes, SessionState state, std::vector<std::uint64_t> generations);

  [[nodiscard]] const SessionState& state() const { return state_; }
  [[nodiscard]] const std::vector<std::uint64_t>& generations() const { return generations_; }

  // The transition `name`: `edit` applied to the current state, written, then current.
  asio::awaitable<Status> change(std::string_view name, const Edit& edit);
  // The same with a new generation history, written with it (to every member).
  asio::awaitable<Status> change(std::string_view name, std::vector<std::uint64_t> generations, const Edit& edit);

  // For logs and tests: the last transition that took effect, and how many have.
  [[nodiscard]] const std::string& last_transition() const { return last_; }
  [[nodiscard]] std::uint64_t transitions() const { return count_; }

 private:
  // By value: the caller's arguments may be temporaries that end at its first suspension.
  asio::awaitable<Status> change_impl(std::string name, std::optional<std::vector<std::uint64_t>> generations,
                                      Edit edit);
  asio::awaitable<Status> write(const SessionState& next, const std::vector<std::uint64_t>* generations);

  std::vector<engine::Volume*> volumes_;
  SessionState state_;
  std::vector<std::uint64_t> generations_;
  std::string last_;
  std::uint64_t count_ = 0;
  bool writing_ = false;
  WaitQueue turn_;
};

}  // namespace tandem::replication

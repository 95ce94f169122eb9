// The control API's rules for a replication session: its states, the operator's actions, and
// the transition table that says which action each state allows (docs/api.md prints it), in one
// place. Pure functions, no I/O: the session asks decide() before acting, the HTTP layer only
// renders what it says, and the table-driven tests check every cell of the same table.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "tandem/replication/messages.h"

namespace tandem::replication {

enum class State : std::uint8_t {
  initializing,
  ok,
  synchronizing,
  system_paused,
  paused,
  paused_for_ndu,
  failing_over,
  failing_over_for_dr,
  failed_over,
  reprotecting,
  error,
};
inline constexpr int kStateCount = 11;

enum class Action : std::uint8_t {
  pause,
  resume,
  sync,
  failover_planned,
  failover_unplanned,
  reprotect,
  start_test,
  stop_test,
};
inline constexpr int kActionCount = 8;

// "Initializing", "OK", "System_Paused", ... as the API spells them.
std::string_view state_name(State s);
std::optional<State> state_from_name(std::string_view name);
// "pause", "resume", "sync", "failover", "failover", "reprotect", "start_failover_test",
// "stop_failover_test": the verb of the API path.
std::string_view action_name(Action a);
std::string_view role_name(Role r);  // "Source" | "Destination"

// Everything the rules look at.
struct Situation {
  State state = State::ok;
  Role role = Role::source;
  bool local_only_paused = false;  // a pause reached only this site
  bool peer_reachable = true;      // the link to the peer is up now
  bool test_running = false;       // a failover test is in progress (destination)
  bool resume_to_sync = false;     // paused while a synchronization was interrupted
  // Destination: its image is a committed cycle (the initial sync and the first cycle are done).
  // A paused or disconnected destination may not be, whatever the state shows.
  bool consistent = true;
  bool force = false;  // the action's force flag
};

enum class Verdict : std::uint8_t {
  accept,       // 204: act; the state becomes `next`
  wrong_role,   // 400: this action belongs to the other site
  not_allowed,  // 422: not in this state (or not now)
  failed,       // 422: accepted, then failed on the way (an I/O error persisting it, the peer gone)
};

struct Decision {
  Verdict verdict = Verdict::accept;
  State next = State::ok;  // when accepted
  std::string message;     // when refused: for message_l10n, names the action and the state
};

Decision decide(Action a, const Situation& s);

}  // namespace tandem::replication

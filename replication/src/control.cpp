#include "tandem/replication/control.h"

#include <array>

namespace tandem::replication {

namespace {

constexpr std::array<std::string_view, kStateCount> kStateNames = {
    "Initializing",        "OK",          "Synchronizing", "System_Paused", "Paused", "Paused_For_NDU", "Failing_Over",
    "Failing_Over_For_DR", "Failed_Over", "Reprotecting",  "Error",
};

Decision accept(State next) { return Decision{Verdict::accept, next, {}}; }

Decision not_allowed(Action a, State s) {
  std::string m = "Operation ";
  m += action_name(a);
  m += " is not allowed when the replication session is in state ";
  m += state_name(s);
  m += ".";
  return Decision{Verdict::not_allowed, s, std::move(m)};
}

Decision wrong_role(Action a, Role r) {
  std::string m = "Operation ";
  m += action_name(a);
  if (a == Action::failover_planned) m += " (planned)";
  if (a == Action::failover_unplanned) m += " (unplanned)";
  m += " is not allowed on the ";
  m += r == Role::source ? "source" : "destination";
  m += " of a replication session; issue it on the ";
  m += r == Role::source ? "destination" : "source";
  m += ".";
  return Decision{Verdict::wrong_role, State::ok, std::move(m)};
}

Decision local_only(Action a, State s) {
  Decision d = not_allowed(a, s);
  d.message = "Operation " + std::string(action_name(a)) +
              " is not allowed while the pause reached only this site (the peer was unreachable); "
              "issue pause again once the peer is reachable.";
  return d;
}

bool is_one_of(State s, std::initializer_list<State> set) {
  for (State x : set) {
    if (x == s) return true;
  }
  return false;
}

}  // namespace

std::string_view state_name(State s) { return kStateNames[static_cast<std::size_t>(s)]; }

std::optional<State> state_from_name(std::string_view name) {
  for (std::size_t i = 0; i < kStateNames.size(); ++i) {
    if (kStateNames[i] == name) return static_cast<State>(i);
  }
  return std::nullopt;
}

std::string_view action_name(Action a) {
  switch (a) {
    case Action::pause:
      return "pause";
    case Action::resume:
      return "resume";
    case Action::sync:
      return "sync";
    case Action::failover_planned:
    case Action::failover_unplanned:
      return "failover";
    case Action::reprotect:
      return "reprotect";
    case Action::start_test:
      return "start_failover_test";
    case Action::stop_test:
      return "stop_failover_test";
  }
  return "?";
}

std::string_view role_name(Role r) { return r == Role::source ? "Source" : "Destination"; }

Decision decide(Action a, const Situation& s) {
  using enum State;
  const bool source = s.role == Role::source;
  // Roles first: an action on the wrong site is a bad request whatever the state (400).
  switch (a) {
    case Action::sync:
    case Action::failover_planned:
      if (!source) return wrong_role(a, s.role);
      break;
    case Action::failover_unplanned:
      // The site that failed over is the source now; it may repeat the failover (force).
      if (source && s.state != failed_over) return wrong_role(a, s.role);
      break;
    case Action::reprotect:
      if (!source && s.state == failed_over) return wrong_role(a, s.role);
      break;
    case Action::start_test:
    case Action::stop_test:
      if (source) return wrong_role(a, s.role);
      break;
    case Action::pause:
    case Action::resume:
      break;
  }
  // A running failover test blocks failover and a second test; the rest follows the row.
  if (s.test_running && (a == Action::failover_planned || a == Action::failover_unplanned || a == Action::start_test)) {
    Decision d = not_allowed(a, s.state);
    d.message = "Operation " + std::string(action_name(a)) +
                " is not allowed while a failover test is in progress; stop the test first.";
    return d;
  }
  // A destination without a consistent image cannot show it in a test, and fails over to it only
  // when forced (the state may say Paused or System_Paused, which hide Initializing).
  if (!source && !s.consistent && (a == Action::start_test || (a == Action::failover_unplanned && !s.force))) {
    Decision d = not_allowed(a, s.state);
    d.message = "Operation " + std::string(action_name(a)) +
                " is not allowed: this destination has no consistent image yet (its initial sync and first cycle "
                "have not completed)" +
                (a == Action::failover_unplanned ? "; use force to fail over to it anyway." : ".");
    return d;
  }
  const bool paused_local = s.state == paused && s.local_only_paused;
  switch (a) {
    case Action::pause:
      if (is_one_of(s.state, {ok, synchronizing, system_paused})) return accept(paused);
      if (paused_local && s.peer_reachable) return accept(paused);
      if (paused_local) {
        Decision d = not_allowed(a, s.state);
        d.message = "Operation pause cannot reach the peer: the session stays paused on this site only.";
        return d;
      }
      return not_allowed(a, s.state);
    case Action::resume:
      if (paused_local) return local_only(a, s.state);
      if (s.state == paused) return accept(s.resume_to_sync ? synchronizing : ok);
      return not_allowed(a, s.state);
    case Action::sync:
      if (paused_local) return local_only(a, s.state);
      if (is_one_of(s.state, {ok, system_paused})) return accept(synchronizing);
      return not_allowed(a, s.state);
    case Action::failover_planned:
      if (paused_local) return local_only(a, s.state);
      if (is_one_of(s.state, {ok, synchronizing, system_paused})) return accept(failing_over);
      return not_allowed(a, s.state);
    case Action::failover_unplanned:
      if (is_one_of(s.state, {ok, synchronizing, system_paused, paused, paused_for_ndu, failing_over})) {
        return accept(failing_over_for_dr);
      }
      if ((s.state == initializing || s.state == failed_over) && s.force) return accept(failing_over_for_dr);
      return not_allowed(a, s.state);
    case Action::reprotect:
      if (s.state == failed_over) return accept(reprotecting);
      return not_allowed(a, s.state);
    case Action::start_test:
      if (is_one_of(s.state, {ok, synchronizing, paused, system_paused})) return accept(s.state);
      return not_allowed(a, s.state);
    case Action::stop_test:
      if (!s.test_running) {
        Decision d = not_allowed(a, s.state);
        d.message = "Operation stop_failover_test is not allowed: no failover test is in progress.";
        return d;
      }
      if (!s.peer_reachable && !s.force) {
        Decision d = not_allowed(a, s.state);
        d.message =
            "Operation stop_failover_test is not allowed while the peer is unreachable; use force to stop "
            "the test anyway.";
        return d;
      }
      return accept(s.state);
  }
  return not_allowed(a, s.state);
}

}  // namespace tandem::replication

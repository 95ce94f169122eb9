// Plan: the transition table of the control-API contract, copied here as the spec prints it, is
// checked cell by cell against decide(): for each (state, action) the verdict and the next
// state, on the role the column names (and the other role gets 400 where the action belongs to
// one side). Then the notes under the table: a running failover test, local-only pause, force.
#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <vector>

#include "tandem/replication/control.h"

namespace tandem::replication {
namespace {

// The spec's table, verbatim (rows: state; columns: P R S PF UF RP T+ T-).
constexpr const char* kTable = R"(
| Initializing | 422 | 422 | 422 | 422 | 422 unless force | 422 | 422 | 422 |
| OK | →Paused | 422 | →Synchronizing | →Failing_Over | →Failing_Over_For_DR | 422 | test on | 422 |
| Synchronizing | →Paused (keeps restart address) | 422 | 422 | →Failing_Over | →Failing_Over_For_DR | 422 | test on | 422 |
| System_Paused | →Paused (keeps restart address) | 422 | →Synchronizing | →Failing_Over | →Failing_Over_For_DR | 422 | test on | 422 |
| Paused (both sites) | 422 | →OK or →Synchronizing | 422 | 422 | →Failing_Over_For_DR | 422 | test on | 422 |
| Paused, local only | →Paused both if peer reachable, else 422 | 422 | 422 | 422 | →Failing_Over_For_DR | 422 | test on | 422 |
| Paused_For_NDU | 422 | 422 | 422 | 422 | →Failing_Over_For_DR | 422 | 422 | 422 |
| Failing_Over | 422 | 422 | 422 | 422 | →Failing_Over_For_DR | 422 | 422 | 422 |
| Failing_Over_For_DR | 422 | 422 | 422 | 422 | 422 | 422 | 422 | 422 |
| Failed_Over | 422 | 422 | 422 | 422 | force only | →Reprotecting (source side) | 422 | 422 |
| Reprotecting | 422 | 422 | 422 | 422 | 422 | 422 | 422 | 422 |
| Error | 422 | 422 | 422 | 422 | 422 | 422 | 422 | 422 |
)";

constexpr Action kColumns[] = {
    Action::pause,     Action::resume,     Action::sync,     Action::failover_planned, Action::failover_unplanned,
    Action::reprotect, Action::start_test, Action::stop_test};

// The role a column's action is issued on (the spec's column headings), for the cell's check.
Role column_role(Action a) {
  switch (a) {
    case Action::failover_unplanned:
    case Action::start_test:
    case Action::stop_test:
      return Role::destination;
    default:
      return Role::source;
  }
}

std::string trim(std::string s) {
  while (!s.empty() && s.front() == ' ') s.erase(s.begin());
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s;
}

struct Row {
  std::string label;
  std::vector<std::string> cells;
};

std::vector<Row> parse_table() {
  std::vector<Row> rows;
  std::istringstream in(kTable);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    std::vector<std::string> parts;
    std::string cur;
    for (char c : line.substr(1)) {
      if (c == '|') {
        parts.push_back(trim(cur));
        cur.clear();
      } else {
        cur += c;
      }
    }
    Row r{parts.at(0), {parts.begin() + 1, parts.end()}};
    rows.push_back(std::move(r));
  }
  return rows;
}

Situation row_situation(const std::string& label) {
  Situation s;
  if (label == "Paused (both sites)") {
    s.state = State::paused;
  } else if (label == "Paused, local only") {
    s.state = State::paused;
    s.local_only_paused = true;
  } else {
    auto st = state_from_name(label);
    EXPECT_TRUE(st.has_value()) << label;
    s.state = st.value_or(State::error);
  }
  return s;
}

std::string where(const Row& r, Action a, const Situation& s) {
  return r.label + " / " + std::string(action_name(a)) + (a == Action::failover_unplanned ? " (unplanned)" : "") +
         " on " + std::string(role_name(s.role)) + (s.force ? " force" : "") +
         (s.peer_reachable ? "" : " peer unreachable");
}

void expect_refused(const Row& r, Action a, const Situation& s) {
  Decision d = decide(a, s);
  EXPECT_EQ(d.verdict, Verdict::not_allowed) << where(r, a, s);
  EXPECT_NE(d.message.find(std::string(action_name(a))), std::string::npos) << d.message;
}

void expect_accepted(const Row& r, Action a, const Situation& s, State next) {
  Decision d = decide(a, s);
  EXPECT_EQ(d.verdict, Verdict::accept) << where(r, a, s) << ": " << d.message;
  EXPECT_EQ(d.next, next) << where(r, a, s) << ": next " << state_name(d.next);
}

TEST(ControlRules, EveryCellOfTheSpecTable) {
  const auto rows = parse_table();
  ASSERT_EQ(rows.size(), 12u);
  int checked = 0;
  for (const Row& r : rows) {
    ASSERT_EQ(r.cells.size(), 8u) << r.label;
    for (std::size_t c = 0; c < 8; ++c) {
      const Action a = kColumns[c];
      const std::string& cell = r.cells[c];
      Situation s = row_situation(r.label);
      s.role = column_role(a);
      if (a == Action::reprotect) s.role = Role::source;  // "(source side)"
      ++checked;
      if (cell == "422") {
        expect_refused(r, a, s);
        s.force = true;  // force changes nothing but unplanned failover
        if (a != Action::failover_unplanned) expect_refused(r, a, s);
      } else if (cell == "422 unless force" || cell == "force only") {
        expect_refused(r, a, s);
        s.force = true;
        if (cell == "force only") s.role = Role::source;  // repeated on the site that failed over
        expect_accepted(r, a, s, State::failing_over_for_dr);
        if (cell == "force only") {
          s.role = Role::destination;  // the other site, now a destination, may force it too
          expect_accepted(r, a, s, State::failing_over_for_dr);
        }
      } else if (cell == "test on") {
        expect_accepted(r, a, s, s.state);  // the state does not change
      } else if (cell == "→OK or →Synchronizing") {
        expect_accepted(r, a, s, State::ok);
        s.resume_to_sync = true;
        expect_accepted(r, a, s, State::synchronizing);
        s.role = Role::destination;  // resume works from either site
        expect_accepted(r, a, s, State::synchronizing);
      } else if (cell == "→Paused both if peer reachable, else 422") {
        expect_accepted(r, a, s, State::paused);
        s.peer_reachable = false;
        expect_refused(r, a, s);
      } else {
        ASSERT_EQ(cell.rfind("→", 0), 0u) << "unexpected cell " << cell;
        std::string target = cell.substr(std::string("→").size());
        target = target.substr(0, target.find(' '));
        auto next = state_from_name(target);
        ASSERT_TRUE(next.has_value()) << cell;
        expect_accepted(r, a, s, *next);
        if (a == Action::pause) {  // issued on either site
          s.role = Role::destination;
          expect_accepted(r, a, s, *next);
        }
      }
    }
  }
  EXPECT_EQ(checked, 96);
}

TEST(ControlRules, WrongRoleIsABadRequestInAnyState) {
  for (int i = 0; i < kStateCount; ++i) {
    Situation s;
    s.state = static_cast<State>(i);
    s.role = Role::destination;
    EXPECT_EQ(decide(Action::sync, s).verdict, Verdict::wrong_role) << state_name(s.state);
    EXPECT_EQ(decide(Action::failover_planned, s).verdict, Verdict::wrong_role) << state_name(s.state);
    s.role = Role::source;
    EXPECT_EQ(decide(Action::start_test, s).verdict, Verdict::wrong_role) << state_name(s.state);
    EXPECT_EQ(decide(Action::stop_test, s).verdict, Verdict::wrong_role) << state_name(s.state);
    if (s.state != State::failed_over) {
      EXPECT_EQ(decide(Action::failover_unplanned, s).verdict, Verdict::wrong_role) << state_name(s.state);
    }
  }
  Situation fo;
  fo.state = State::failed_over;
  fo.role = Role::destination;
  EXPECT_EQ(decide(Action::reprotect, fo).verdict, Verdict::wrong_role);
  EXPECT_NE(decide(Action::reprotect, fo).message.find("source"), std::string::npos);
}

TEST(ControlRules, RunningTestBlocksFailoverAndASecondTestOnly) {
  for (State st : {State::ok, State::synchronizing, State::system_paused, State::paused}) {
    Situation s;
    s.state = st;
    s.role = Role::destination;
    s.test_running = true;
    EXPECT_EQ(decide(Action::failover_unplanned, s).verdict, Verdict::not_allowed) << state_name(st);
    EXPECT_EQ(decide(Action::start_test, s).verdict, Verdict::not_allowed) << state_name(st);
    EXPECT_EQ(decide(Action::stop_test, s).verdict, Verdict::accept) << state_name(st);
    // Pause follows the row.
    EXPECT_EQ(decide(Action::pause, s).verdict, st == State::paused ? Verdict::not_allowed : Verdict::accept);
    s.force = true;
    EXPECT_EQ(decide(Action::failover_unplanned, s).verdict, Verdict::not_allowed) << state_name(st);
  }
}

// A destination whose image is not a committed cycle yet (initial sync or first cycle not done)
// shows Paused or System_Paused when paused or cut off: the rows would allow a test and an
// unplanned failover there. Neither may show or promote a half-copied image (found by the
// simulation: seed 27, then seed 34 of the failover runs); force still promotes it.
TEST(ControlRules, InconsistentDestinationRefusesATestAndAnUnforcedFailover) {
  for (State st : {State::ok, State::synchronizing, State::system_paused, State::paused, State::paused_for_ndu}) {
    Situation s;
    s.state = st;
    s.role = Role::destination;
    s.consistent = false;
    Decision d = decide(Action::failover_unplanned, s);
    EXPECT_EQ(d.verdict, Verdict::not_allowed) << state_name(st);
    EXPECT_NE(d.message.find("no consistent image"), std::string::npos) << d.message;
    EXPECT_EQ(decide(Action::start_test, s).verdict, Verdict::not_allowed) << state_name(st);
    EXPECT_EQ(decide(Action::pause, s).verdict, decide(Action::pause, Situation{st, Role::destination}).verdict);
    s.force = true;
    EXPECT_EQ(decide(Action::failover_unplanned, s).verdict, Verdict::accept) << state_name(st);
    EXPECT_EQ(decide(Action::start_test, s).verdict, Verdict::not_allowed) << state_name(st);
    s.consistent = true;
    s.force = false;
    EXPECT_EQ(decide(Action::failover_unplanned, s).verdict, Verdict::accept) << state_name(st);
  }
}

TEST(ControlRules, StopTestNeedsThePeerOrForce) {
  Situation s;
  s.state = State::ok;
  s.role = Role::destination;
  s.test_running = true;
  s.peer_reachable = false;
  Decision d = decide(Action::stop_test, s);
  EXPECT_EQ(d.verdict, Verdict::not_allowed);
  EXPECT_NE(d.message.find("force"), std::string::npos);
  s.force = true;
  EXPECT_EQ(decide(Action::stop_test, s).verdict, Verdict::accept);
}

TEST(ControlRules, LocalOnlyPauseRefusesResumeSyncAndPlannedFailover) {
  Situation s;
  s.state = State::paused;
  s.local_only_paused = true;
  s.role = Role::source;
  for (Action a : {Action::resume, Action::sync, Action::failover_planned}) {
    Decision d = decide(a, s);
    EXPECT_EQ(d.verdict, Verdict::not_allowed) << action_name(a);
    EXPECT_NE(d.message.find("only this site"), std::string::npos) << d.message;
  }
  s.role = Role::destination;
  EXPECT_EQ(decide(Action::failover_unplanned, s).verdict, Verdict::accept);
}

TEST(ControlRules, MessagesNameTheActionAndTheState) {
  Situation s;
  s.state = State::failed_over;
  s.role = Role::source;
  Decision d = decide(Action::pause, s);
  EXPECT_EQ(d.message, "Operation pause is not allowed when the replication session is in state Failed_Over.");
  for (int i = 0; i < kStateCount; ++i) {
    EXPECT_EQ(state_from_name(state_name(static_cast<State>(i))), static_cast<State>(i));
  }
  EXPECT_FALSE(state_from_name("Bogus").has_value());
}

}  // namespace
}  // namespace tandem::replication

// Session, the operator's actions: the control table's verdict, pause and resume on both sites,
// and the control requests between the peers that carry them, answered by request id.
#include <spdlog/spdlog.h>

#include <boost/asio/co_spawn.hpp>

#include "receiver.h"
#include "session_internal.h"
#include "tandem/replication/errc.h"

namespace tandem::replication {

namespace {
// How long a control request waits for the peer's answer. The peer answers a pause only once
// its transfer stopped at an extent boundary (at most a window of acknowledgements away).
constexpr std::chrono::seconds kControlTimeout{10};
}  // namespace

asio::awaitable<std::optional<ControlReply>> Session::request(ControlOp op, bool resume_to_sync, std::uint64_t value) {
  if (!conn_) co_return std::nullopt;
  const std::uint64_t id = next_request_++;
  auto p = std::make_shared<PendingControl>();
  p->timer = clock_.make_timer(ex_);
  control_waits_[id] = p;
  asio::co_spawn(
      ex_,
      [](std::shared_ptr<PendingControl> pc) -> asio::awaitable<void> {
        if (!co_await pc->timer->wait_for(kControlTimeout)) co_return;  // cancelled: answered
        pc->lost = true;
        pc->wq.notify_all();
      }(p),
      abort_on_exception);
  const Control msg{opts_.id, id, op, resume_to_sync, value};
  std::vector<std::byte> bytes = encode(msg);
  Status st = co_await send(MsgType::control, std::move(bytes));
  if (!st) p->lost = true;
  while (!p->reply && !p->lost) co_await p->wq.wait();
  p->timer->cancel();
  control_waits_.erase(id);
  co_return p->reply;
}

asio::awaitable<Status> Session::on_control_reply(const ControlReply& r) {
  auto it = control_waits_.find(r.request_id);
  if (it == control_waits_.end()) co_return Status{};  // answered too late: the asker gave up
  it->second->reply = r;
  it->second->wq.notify_all();
  co_return Status{};
}

asio::awaitable<Status> Session::reply_control(const Control& c, bool ok, std::uint64_t restart, std::string message,
                                               std::uint64_t value) {
  const ControlReply r{opts_.id, c.request_id, ok, restart, std::move(message), value};
  std::vector<std::byte> bytes = encode(r);
  co_return co_await send(MsgType::control_reply, std::move(bytes));
}

asio::awaitable<Status> Session::pause_here(bool resume_to_sync) {
  TANDEM_CO_TRY(co_await store_.change("paused", [resume_to_sync](SessionState& s) {
    if (!s.paused) s.resume_to_sync = resume_to_sync;
    s.paused = true;
  }));
  if (state_.role == Role::source) {
    // The transfer stops at the next extent boundary; wait until it has.
    wake_.notify_all();
    while (busy_) co_await idle_.wait();
  } else {
    // Not in the middle of a data message: what it stages is whole.
    auto held = co_await dest_mu_.scoped();
    // Everything received becomes durable and acknowledged: it is the restart address.
    if (receiver_) TANDEM_CO_TRY(co_await receiver_->make_durable(conn_gen_));
  }
  co_return Status{};
}

asio::awaitable<Status> Session::on_control(const Control& c) {
  if (c.op == ControlOp::resume) {
    if (pausing_) {
      // This site's pause crossed the peer's resume: the pause wins on both sites. Found by the
      // simulation (seed 1517, the mirror case).
      co_return co_await reply_control(c, false, 0, "a pause asked on " + opts_.peer_name + " is under way");
    }
    if (!state_.paused) {
      // Already running here: a resume whose answer was lost with the link (this side resumed,
      // the asker did not hear it) is asked again, and must not leave the asker paused for good.
      // Found by the simulation (seed 5032).
      spdlog::info("session {}: resume asked by the peer: not paused here", opts_.id);
      peer_paused_ = false;
      wake_.notify_all();
      co_return co_await reply_control(c, true, 0, {});
    }
    TANDEM_CO_TRY(co_await store_.change("resumed by the peer", [](SessionState& s) {
      s.paused = false;
      s.local_only_paused = false;
    }));
    peer_paused_ = false;
    spdlog::info("session {}: resumed by the peer", opts_.id);
    wake_.notify_all();
    co_return co_await reply_control(c, true, 0, {});
  }
  if (state_.phase == Phase::failing_over_for_dr || state_.phase == Phase::failed_over ||
      state_.phase == Phase::reprotecting) {
    // Roles swapped or swapping here: a pause set now would hold reprotect's cycle in states
    // where resume is not allowed. Found by the simulation (seed 299 of the failover runs): a
    // pause asked before a role change reached the new source in Reprotecting, which then
    // waited for a resume nobody could give. (A planned failover still in Failing_Over takes
    // the pause: the asker's resume lifts it.)
    std::string why = "this side is " + std::string(state_name(state())) + ": no pause during a failover";
    co_return co_await reply_control(c, false, 0, std::move(why));
  }
  ++peer_pauses_;
  if (state_.role == Role::destination) {
    // From the source, which has stopped shipping: make what arrived durable and say where
    // the transfer goes on.
    TANDEM_CO_TRY(co_await pause_here(c.resume_to_sync));
    TANDEM_CO_TRY(co_await store_.change("paused by the peer", [](SessionState& s) { s.local_only_paused = false; }));
    peer_paused_ = true;
    // The initial sync's checkpoint while it runs; else the staged end of the cycle in flight,
    // or 0: no cycle is staged here, so the next one starts at its beginning (the initial sync's
    // final checkpoint, the volume's end, is no place to start a cycle).
    const std::uint64_t restart = state_.initial != InitialState::done ? state_.initial_offset
                                  : state_.transfer_cycle != 0         ? staged_end()
                                                                       : 0;
    spdlog::info("session {}: paused by the peer; restart address offset {}", opts_.id, restart);
    co_return co_await reply_control(c, true, restart, {});
  }
  // A source asked by its destination: stopping the transfer waits for acknowledgements this
  // receive loop must go on delivering, so the pause runs beside it and answers when done.
  side_tasks_.spawn([](Session* self, Control req) -> asio::awaitable<Status> {
    ActionResult r = co_await self->do_pause(req.resume_to_sync);
    std::string message = r.message;
    (void)co_await self->reply_control(req, r.ok() && !self->state_.local_only_paused, 0, std::move(message));
    co_return Status{};  // the outcome is the reply (and logged by do_pause)
  }(this, c));
  co_return Status{};
}

asio::awaitable<ActionResult> Session::do_pause(bool resume_to_sync) {
  struct Pausing {
    bool& flag;
    explicit Pausing(bool& f) : flag(f) { flag = true; }
    ~Pausing() { flag = false; }
    Pausing(const Pausing&) = delete;
    Pausing& operator=(const Pausing&) = delete;
  } pausing{pausing_};
  Status st = co_await pause_here(resume_to_sync);
  if (!st) co_return ActionResult{Verdict::failed, "pause failed: " + st.error().message()};
  bool both = false;
  if (conn_) {
    auto reply = co_await request(ControlOp::pause, state_.resume_to_sync);
    both = reply && reply->ok;
    if (both && state_.role == Role::source && (src_.plan == Plan::initial || src_.plan == Plan::cycle)) {
      src_.plan_start = reply->restart_offset;  // the destination's durable point: resume there
    }
    if (reply && !reply->ok) {
      // The peer is in a failover: no pause holds on either side now, not even one that held
      // here alone before (it could never be resumed: found by the simulation, seed 2 of the
      // failover runs).
      spdlog::warn("session {}: the peer refused the pause: {}", opts_.id, reply->message);
      st = co_await store_.change("pause refused by the peer", [](SessionState& s) {
        s.paused = false;
        s.local_only_paused = false;
        s.resume_to_sync = false;
      });
      wake_.notify_all();
      if (!st) co_return ActionResult{Verdict::failed, "pause failed: " + st.error().message()};
      // The peer may still count this side as paused (a hello from when it was): tell it that
      // nothing is paused here, or it would wait for a resume that never comes (found by the
      // simulation, seed 46 of the crash runs).
      (void)co_await request(ControlOp::resume, false);
      co_return ActionResult{Verdict::not_allowed, "Operation pause is not allowed: the peer refused it (" +
                                                       reply->message + "); the session is not paused."};
    }
  }
  if (!state_.paused) {
    // A role change lifted the pause while the peer was asked (it belongs to the replication
    // the role change ended): nothing is paused now.
    co_return ActionResult{Verdict::failed, "pause failed: the roles changed meanwhile; the session is not paused"};
  }
  st = co_await store_.change(both ? "pause reached the peer" : "paused here alone",
                              [both](SessionState& s) { s.local_only_paused = !both; });
  if (both && st) peer_paused_ = true;
  if (!st) co_return ActionResult{Verdict::failed, "pause failed: " + st.error().message()};
  if (both) {
    spdlog::info("session {}: paused on both sites{}", opts_.id,
                 state_.resume_to_sync ? " (a synchronization will go on from its restart address)" : "");
  } else {
    spdlog::warn("session {}: paused on this site only: the peer {} is unreachable", opts_.id, opts_.peer_name);
  }
  co_return ActionResult{};
}

asio::awaitable<ActionResult> Session::do_resume() {
  const std::uint64_t pauses_before = peer_pauses_;
  auto reply = co_await request(ControlOp::resume, false);
  if (!reply || !reply->ok) {
    std::string why = reply ? reply->message : "the peer " + opts_.peer_name + " did not answer";
    co_return ActionResult{Verdict::failed, "Operation resume failed: " + why + "."};
  }
  if (peer_pauses_ != pauses_before) {
    // The peer resumed, then paused again before this side did (its pause was handled while
    // the answer was on its way): the later pause holds on both sites. Found by the
    // simulation (seed 1517: the source stayed paused, the destination resumed).
    spdlog::info("session {}: resume overtaken by a pause from {}; paused on both sites", opts_.id, opts_.peer_name);
    co_return ActionResult{Verdict::failed, "Operation resume was overtaken: " + opts_.peer_name +
                                                " paused the session again meanwhile; it stays paused."};
  }
  Status st = co_await store_.change("resumed", [](SessionState& s) {
    s.paused = false;
    s.local_only_paused = false;
  });
  if (!st) co_return ActionResult{Verdict::failed, "resume failed: " + st.error().message()};
  peer_paused_ = false;
  spdlog::info("session {}: resumed on both sites", opts_.id);
  wake_.notify_all();
  co_return ActionResult{};
}

asio::awaitable<ActionResult> Session::act(Action a, ActionArgs args) {
  NoteOnExit note{this};
  // One action at a time per session: the second waits for the first, then is judged on the
  // state the first left.
  while (control_busy_) co_await control_idle_.wait();
  control_busy_ = true;
  struct Release {
    Session* s;
    ~Release() {
      s->control_busy_ = false;
      s->control_idle_.notify_one();
    }
  } release{this};
  Situation sit;
  sit.state = state();
  sit.role = state_.role;
  sit.local_only_paused = state_.local_only_paused;
  sit.peer_reachable = conn_ != nullptr;
  sit.resume_to_sync = state_.resume_to_sync;
  sit.force = args.force;
  sit.test_running = test_running();
  sit.consistent = state_.role == Role::source || (state_.initial == InitialState::done && state_.committed_cycle > 0);
  Decision d = decide(a, sit);
  if (d.verdict == Verdict::accept && a == Action::failover_planned && conn_) {
    // A failover test on the destination is the peer's state: ask before accepting, then judge
    // again on the state after the wait (the peer may have gone meanwhile).
    auto reply = co_await request(ControlOp::failover_check, false, 0);
    if (!reply) {
      d.verdict = Verdict::failed;
      d.message = "Operation " + std::string(action_name(a)) + " failed: the peer " + opts_.peer_name +
                  " did not answer whether it can take over; try again.";
    } else if (!reply->ok) {
      d.verdict = Verdict::not_allowed;
      d.message = "Operation " + std::string(action_name(a)) + " is not allowed: " + reply->message + ".";
    } else {
      sit.state = state();
      sit.peer_reachable = conn_ != nullptr;
      sit.local_only_paused = state_.local_only_paused;
      d = decide(a, sit);
    }
  }
  if (d.verdict != Verdict::accept) {
    spdlog::info("session {}: {} refused: {}", opts_.id, action_name(a), d.message);
    co_return ActionResult{d.verdict, d.message};
  }
  spdlog::info("session {}: {} accepted in state {}", opts_.id, action_name(a), state_name(sit.state));
  switch (a) {
    case Action::pause: {
      const bool was_syncing = sit.state == State::synchronizing || sit.state == State::system_paused ||
                               (sit.state == State::paused && state_.resume_to_sync);
      co_return co_await do_pause(was_syncing);
    }
    case Action::resume:
      co_return co_await do_resume();
    case Action::sync:
      request_sync();
      co_return ActionResult{};
    case Action::failover_planned: {
      Status st = co_await store_.change("planned failover begins", [reverse = args.reverse](SessionState& s) {
        s.phase = Phase::failing_over;
        s.reverse = reverse;
      });
      if (!st) co_return ActionResult{Verdict::failed, "failover failed: " + st.error().message()};
      start_background(run_planned_failover());
      co_return ActionResult{};
    }
    case Action::failover_unplanned:
      co_return co_await unplanned_failover();
    case Action::start_test:
      co_return co_await start_test();
    case Action::stop_test:
      co_return co_await stop_test();
    case Action::reprotect: {
      src_.exchange_done = false;
      Status st = co_await store_.change("reprotect begins", [](SessionState& s) { s.phase = Phase::reprotecting; });
      if (!st) co_return ActionResult{Verdict::failed, "reprotect failed: " + st.error().message()};
      start_background(run_reprotect());
      co_return ActionResult{};
    }
  }
  TANDEM_ASSERT(false && "an action without a case");
  co_return ActionResult{Verdict::failed, "unknown action"};
}

}  // namespace tandem::replication

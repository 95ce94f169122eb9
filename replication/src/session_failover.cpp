// Session: failover (planned and unplanned), role swaps, and reprotect.
//
// Planned (on the source): host writes are refused (the export turns read-only), every dirty
// block ships in cycles until nothing is left and the last cycle is committed; then the
// destination is told to take over. It starts a new generation, becomes the source (writable,
// Failed_Over) and answers with the generation; the old source adopts it (the histories are
// equal: nothing diverged) and becomes the destination (Failed_Over). `reverse` goes on into
// reprotect by itself.
//
// Unplanned (on the destination): a staged, uncommitted cycle is dropped (a committed one was
// applied already: the image is exactly the last committed cycle), a new generation starts,
// and this side becomes the source in Failed_Over, whether or not the old source is alive.
// When the old source next connects, its hello meets ours: we are a source that failed over
// from a generation in its history, so it demotes itself to a destination in Failed_Over,
// counting the blocks it wrote after the failover point.
//
// Reprotect (on the new source, in Failed_Over): the new destination sends the runs of blocks
// it changed since the failover point (its dirty map and any cycle it had in flight); they are
// merged, durably, into our dirty map, which already holds our own changes since the failover:
// the union. Then the destination forgets its runs, and the next cycle ships the union. OK.
//
// Every step's phase is durable in the session state; a daemon restarted mid-way picks the
// step up again (each is idempotent).
#include <spdlog/spdlog.h>

#include <boost/asio/co_spawn.hpp>

#include "failover_test.h"
#include "receiver.h"
#include "tandem/engine/metadata.h"
#include "tandem/replication/errc.h"
#include "tandem/replication/session.h"
#include "transfer.h"

namespace tandem::replication {

// Before asking the peer again (it could not answer yet, or said not now).
asio::awaitable<void> Session::retry_pause() {
  constexpr auto kRetryPause = std::chrono::milliseconds(500);
  auto t = clock_.make_timer(ex_);
  (void)co_await t->wait_for(kRetryPause);
}

bool Session::replication_held() const {
  switch (state_.phase) {
    case Phase::failing_over_for_dr:
    case Phase::failed_over:
      return true;
    case Phase::reprotecting:
      return !src_.exchange_done;
    case Phase::none:
    case Phase::failing_over:
      return false;
  }
  return false;
}

std::uint64_t Session::diverged_blocks() const {
  if (state_.role != Role::destination || (state_.phase != Phase::failed_over && state_.phase != Phase::reprotecting)) {
    return 0;
  }
  std::uint64_t n = 0;
  for (const auto& m : members_) n += m.m.volume->dirty().dirty_blocks();
  return n;
}

void Session::start_background(asio::awaitable<void> task) {
  ++background_;
  asio::co_spawn(
      ex_,
      [](Session* self, asio::awaitable<void> t) -> asio::awaitable<void> {
        co_await std::move(t);
        --self->background_;
        self->done_.notify_all();
      }(this, std::move(task)),
      abort_on_exception);
}

void Session::start_source_tasks() {
  if (!running_) {
    running_ = true;
    asio::co_spawn(ex_, run_source(), abort_on_exception);
  }
  if (!timer_running_) {
    timer_running_ = true;
    if (!timer_) timer_ = clock_.make_timer(ex_);
    asio::co_spawn(ex_, run_timer(), abort_on_exception);
  }
}

void Session::forget_for_role_change() {
  // A pause belongs to the replication that the role change ends. Kept, it would hold
  // reprotect's cycles while the state shows the failover phase, where resume is not allowed:
  // reprotect would never finish. Found by the simulation (seed 12 of the failover runs).
  if (state_.paused) spdlog::info("session {}: the pause from before the role change is lifted", opts_.id);
  peer_paused_ = false;
  // The source's run state goes whole, and with it the last reprotect's exchange: the next
  // reprotect asks the peer again. (Kept, a failback with "reverse" skipped the exchange and
  // left the old source Failed_Over for good: found by the simulation, seed 432 of the failover
  // runs.) A source's loops have wound down by now (become_destination() waits for them); a
  // destination runs none.
  src_ = SourceSide{};
}

namespace {
// The durable half of forget_for_role_change(): the pause is lifted.
void lift_pause(SessionState& s) {
  s.paused = false;
  s.local_only_paused = false;
  s.resume_to_sync = false;
}
}  // namespace

asio::awaitable<Status> Session::become_source(std::string_view transition, StateStore::Edit also) {
  // The destination side goes (its callers hold the destination lock: no data frame is using
  // it); the source side is built below.
  if (receiver_) {
    if (test_) receiver_->unobserve(test_.get());
    co_await receiver_->discard();
    receiver_.reset();
  }
  forget_for_role_change();
  Status changed = co_await store_.change(transition, [&also](SessionState& s) {
    s.role = Role::source;
    s.transfer_cycle = 0;
    s.applying_cycle = 0;
    s.initial = InitialState::done;
    s.next_cycle = std::max(s.next_cycle, s.committed_cycle + 1);
    lift_pause(s);
    if (also) also(s);
  });
  if (!changed) {
    make_receiver();  // still a destination: one that receives (its staged cycle is gone)
    co_return changed;
  }
  set_source_hooks(true);
  for (auto& m : members_) m.m.volume->set_access(engine::Access::read_write);
  src_.need_new_generation = false;  // the caller started one
  src_.peer_committed = state_.committed_cycle;
  start_source_tasks();
  co_return Status{};
}

asio::awaitable<Status> Session::become_destination(std::string_view transition, StateStore::Edit also) {
  // Host writes stop first; then the source loop winds down (it checks acting_source() each
  // turn). The role goes to disk once it has.
  for (auto& m : members_) m.m.volume->set_access(engine::Access::read_only);
  leaving_source_ = true;
  wake_.notify_all();
  if (src_.transfer) src_.transfer->interrupt();
  done_.notify_all();
  if (timer_) timer_->cancel();
  while (running_ || busy_) co_await done_.wait();
  // Host writes already past the access check finish first (their dirty bits land, their
  // intent regions unpin) before the hooks go and the dirty maps are written whole.
  for (auto& m : members_) co_await m.m.volume->hold_writes();
  set_source_hooks(false);
  Status st;
  for (auto& m : members_) {
    if (!st) break;
    // A cycle this side had in flight never reached the peer's image: its blocks are changes
    // of this side, like the dirty ones.
    if (m.frozen) m.m.volume->dirty().merge(*m.frozen);
    m.preserve.reset();
    m.frozen.reset();
    st = co_await m.m.volume->dirty().persist_all();
  }
  for (auto& m : members_) m.m.volume->release_writes();  // they find the volume read-only
  TANDEM_CO_TRY(st);
  forget_for_role_change();
  TANDEM_CO_TRY(co_await store_.change(transition, [&also](SessionState& s) {
    s.role = Role::destination;
    s.transfer_cycle = 0;
    s.initial = InitialState::done;
    lift_pause(s);
    if (also) also(s);
  }));
  make_receiver();
  leaving_source_ = false;
  co_return Status{};
}

asio::awaitable<void> Session::run_planned_failover() {
  for (auto& m : members_) m.m.volume->set_access(engine::Access::read_only);
  // Writes already past the access check are acknowledged to their hosts: let them land (and
  // mark their blocks dirty) before "nothing left to ship" can be true.
  for (auto& m : members_) co_await m.m.volume->hold_writes();
  for (auto& m : members_) m.m.volume->release_writes();
  spdlog::info("session {}: planned failover: host writes refused; shipping the rest", opts_.id);
  while (!stopping_ && state_.phase == Phase::failing_over && state_.role == Role::source) {
    if (!conn_ || !src_.peer_ready || state_.paused || peer_paused_) {
      co_await progress_.wait();
      continue;
    }
    bool left = state_.transfer_cycle != 0 || src_.plan != Plan::wait || busy_;
    for (auto& m : members_) left = left || m.m.volume->dirty().dirty_blocks() > 0;
    if (left) {
      request_sync();
      co_await progress_.wait();
      continue;
    }
    // Everything is committed at the destination, and nothing can be written here any more.
    auto reply = co_await request(ControlOp::failover, false, state_.reverse ? 1 : 0);
    if (!reply || !reply->ok) {
      if (reply) spdlog::warn("session {}: the peer cannot take over yet: {}", opts_.id, reply->message);
      co_await retry_pause();
      continue;
    }
    auto gens = generations_;
    push_generation(gens, reply->value, engine::Superblock::kGenerationsMax);
    const std::uint64_t from = generations_.empty() ? 0 : generations_.front();
    Status st = co_await become_destination("planned failover: demoted", [from](SessionState& s) {
      s.failover_gen = from;
      s.phase = Phase::failed_over;
    });
    if (st) st = co_await store_.change("planned failover: the peer's generation", gens, {});
    if (!st) {
      spdlog::error("session {}: planned failover: cannot become the destination: {}", opts_.id, st.error().message());
      error_ = st.error().message();
      activity_ = Activity::refused;
      break;
    }
    spdlog::info(
        "session {}: planned failover complete: {} is the source now; this side is its destination "
        "(generations {})",
        opts_.id, opts_.peer_name, describe(generations_));
    if (conn_) conn_->close("roles swapped");  // both sides say hello again in their new roles
    break;
  }
  note_state();
  progress_.notify_all();
}

asio::awaitable<ActionResult> Session::unplanned_failover() {
  Status st = co_await store_.change("unplanned failover begins",
                                     [](SessionState& s) { s.phase = Phase::failing_over_for_dr; });
  if (st && conn_) conn_->close("unplanned failover");  // no more data from the old source
  // A message being handled (an apply, say) finishes first, and so do the initial sync's
  // writes: none of them may land once the volume is the host's.
  auto held = co_await dest_mu_.scoped();
  if (receiver_) {
    // A committed cycle is applied; the initial sync's writes in flight land.
    if (Status w = co_await receiver_->settle(); st && !w) st = w;
  }
  if (st && state_.transfer_cycle != 0) {
    spdlog::warn("session {}: unplanned failover: dropping staged, uncommitted cycle {}", opts_.id,
                 state_.transfer_cycle);
  }
  if (!st) co_return ActionResult{Verdict::failed, "failover failed: " + st.error().message()};
  if (state_.initial != InitialState::done) {
    spdlog::warn(
        "session {}: unplanned failover forced on a destination whose initial sync did not finish: "
        "its image is not consistent",
        opts_.id);
  }
  const std::uint64_t from = generations_.empty() ? 0 : generations_.front();
  auto gens = generations_;
  push_generation(gens, clock_.random_u64(), engine::Superblock::kGenerationsMax);
  // Drops the staged journal.
  st = co_await become_source("unplanned failover: promoted", [from](SessionState& s) { s.failover_gen = from; });
  if (st) {
    st = co_await store_.change("unplanned failover: new generation", gens,
                                [](SessionState& s) { s.phase = Phase::failed_over; });
  }
  if (!st) co_return ActionResult{Verdict::failed, "failover failed: " + st.error().message()};
  spdlog::warn(
      "session {}: unplanned failover: this side is the source now, writable from committed cycle {} "
      "(generations {}); the old source becomes a destination when it returns",
      opts_.id, state_.committed_cycle, describe(generations_));
  progress_.notify_all();
  co_return ActionResult{};
}

asio::awaitable<Status> Session::demote_by_hello(const SessionHello& h) {
  TANDEM_CO_TRY(co_await become_destination("demoted by the peer's failover", [&h](SessionState& s) {
    s.phase = Phase::failed_over;
    s.failover_gen = h.failover_gen;
  }));
  const std::uint64_t diverged = diverged_blocks();
  spdlog::warn(
      "session {}: {} failed over from generation {:016x} and is the source now; this side is its "
      "destination (Failed_Over). {} block(s) written here after the failover point will be "
      "overwritten by reprotect",
      opts_.id, opts_.peer_name, h.failover_gen, diverged);
  if (conn_) conn_->close("demoted after the peer's failover");
  progress_.notify_all();
  co_return Status{};
}

namespace {
constexpr const char* kTestRunningHere = "a failover test is running on the destination; stop it there first";
}  // namespace

asio::awaitable<Status> Session::on_failover_control(const Control& c) {
  switch (c.op) {
    case ControlOp::failover_check: {
      // Named locals: GCC 12 destroys temporaries inside co_await expressions twice.
      std::string why;
      if (state_.role != Role::destination) why = "this side is not a destination";
      if (why.empty() && test_running()) why = kTestRunningHere;
      const bool ok = why.empty();
      co_return co_await reply_control(c, ok, 0, std::move(why));
    }
    case ControlOp::failover: {
      // Judged and carried out under the destination lock: a failover test cannot start
      // between the check and the role change.
      auto held = co_await dest_mu_.scoped();
      if (state_.role != Role::destination || test_running()) {
        std::string why = state_.role != Role::destination ? "this side is not a destination" : kTestRunningHere;
        co_return co_await reply_control(c, false, 0, std::move(why));
      }
      if (state_.initial != InitialState::done || (receiver_ && receiver_->receiving()) || state_.transfer_cycle != 0 ||
          state_.applying_cycle != 0) {
        co_return co_await reply_control(c, false, 0, "a transfer is still under way here");
      }
      const std::uint64_t from = generations_.empty() ? 0 : generations_.front();
      auto gens = generations_;
      const std::uint64_t g = clock_.random_u64();
      push_generation(gens, g, engine::Superblock::kGenerationsMax);
      // The role goes to disk with the new generation, in one write of member 0's superblock:
      // a destination that crashed between the two came back a Failed_Over destination with a
      // newer generation, which its source then refused as promoted (found by the simulation,
      // seed 1214 of the crash runs). (Nothing is staged here: the check above made sure.)
      TANDEM_CO_TRY(co_await store_.change("planned failover: promoted", gens, [from](SessionState& s) {
        s.failover_gen = from;
        s.phase = Phase::failed_over;
        s.reverse = false;
        s.role = Role::source;
      }));
      TANDEM_CO_TRY(co_await become_source("planned failover: source side up", {}));
      spdlog::info(
          "session {}: planned failover: this side is the source now, at committed cycle {} "
          "(generations {})",
          opts_.id, state_.committed_cycle, describe(generations_));
      if (c.value == 1) {
        TANDEM_CO_TRY(co_await store_.change("reprotect begins (reverse)",
                                             [](SessionState& s) { s.phase = Phase::reprotecting; }));
        start_background(run_reprotect());
      }
      co_return co_await reply_control(c, true, 0, {}, g);
    }
    case ControlOp::reprotect: {
      if (state_.role != Role::destination)
        co_return co_await reply_control(c, false, 0, "this side is not a destination");
      // Every block changed here since the failover point, in runs, per member; the reply
      // follows them on the same link.
      std::uint64_t total = 0;
      for (std::size_t i = 0; i < members_.size(); ++i) {
        ChangedBlocks msg{opts_.id, static_cast<std::uint8_t>(i), {}};
        for (const auto& e : members_[i].m.volume->dirty().extents()) {
          std::uint64_t first = e.first_block;
          std::uint64_t left = e.blocks;
          while (left > 0) {
            const auto n = static_cast<std::uint32_t>(std::min<std::uint64_t>(left, 1u << 30));
            msg.runs.push_back({first, n});
            first += n;
            left -= n;
            total += n;
            if (msg.runs.size() == kRunsPerMessageMax) {
              std::vector<std::byte> bytes = encode(msg);
              TANDEM_CO_TRY(co_await send(MsgType::changed_blocks, std::move(bytes)));
              msg.runs.clear();
            }
          }
        }
        if (!msg.runs.empty()) {
          std::vector<std::byte> bytes = encode(msg);
          TANDEM_CO_TRY(co_await send(MsgType::changed_blocks, std::move(bytes)));
        }
      }
      // A pause from before the failover goes with it, as on a role change: kept, it would hold
      // reprotect's cycle in a state where resume is not allowed (found by the simulation, seed
      // 993 of the power-loss runs: a destination paused alone while its peer was down).
      if (state_.paused) spdlog::info("session {}: the pause from before the failover is lifted", opts_.id);
      TANDEM_CO_TRY(co_await store_.change("reprotect: changes sent", [](SessionState& s) {
        s.phase = Phase::reprotecting;
        lift_pause(s);
      }));
      spdlog::info("session {}: reprotect: sent {} changed block(s) to {}", opts_.id, total, opts_.peer_name);
      co_return co_await reply_control(c, true, 0, {}, total);
    }
    case ControlOp::reprotect_commit: {
      if (state_.role != Role::destination)
        co_return co_await reply_control(c, false, 0, "this side is not a destination");
      // The new source holds our changes durably in its dirty map: forget them here.
      for (auto& m : members_) {
        const auto blocks = m.m.volume->dirty().blocks();
        m.m.volume->dirty().clear(0, blocks);
        TANDEM_CO_TRY(co_await m.m.volume->dirty().persist_all());
      }
      // Still Reprotecting: this image holds what it wrote alone until reprotect's first cycle
      // overwrites it (apply_committed ends the phase), so it is no image to fail over to yet.
      // Found by the simulation (seed 25 of the failover runs): an unplanned failover here
      // promoted writes the first failover had discarded.
      TANDEM_CO_TRY(co_await store_.change("reprotect: changes handed over",
                                           [](SessionState& s) { s.phase = Phase::reprotecting; }));
      activity_ = Activity::ok;
      co_return co_await reply_control(c, true, 0, {});
    }
    case ControlOp::pause:
    case ControlOp::resume:
    case ControlOp::going_down:
      break;  // handle() takes these elsewhere
  }
  co_return Error(errc::bad_message, "unexpected control op");
}

asio::awaitable<Status> Session::on_changed_blocks(const ChangedBlocks& m) {
  if (state_.role != Role::source || state_.phase != Phase::reprotecting) {
    co_return Error(errc::bad_message, "changed blocks outside a reprotect");
  }
  if (m.member >= members_.size()) co_return Error(errc::bad_message, "changed blocks of an unknown member");
  if (src_.incoming.size() != members_.size()) {
    src_.incoming.clear();
    for (const auto& mem : members_) src_.incoming.emplace_back(mem.m.volume->dirty().blocks());
  }
  auto& bm = src_.incoming[m.member];
  for (const auto& r : m.runs) {
    if (r.first_block + r.blocks > bm.blocks())
      co_return Error(errc::bad_message, "changed blocks past the volume end");
    bm.set_range(r.first_block, r.blocks);
  }
  co_return Status{};
}

asio::awaitable<void> Session::run_reprotect() {
  spdlog::info("session {}: reprotect: waiting for {} to exchange changed blocks", opts_.id, opts_.peer_name);
  while (!stopping_ && state_.role == Role::source && state_.phase == Phase::reprotecting) {
    if (src_.exchange_done) {
      // The union is in our dirty map; the cycles of the run loop ship it. OK once one commits.
      co_await progress_.wait();
      continue;
    }
    if (!conn_ || !src_.peer_ready) {
      co_await progress_.wait();
      continue;
    }
    src_.incoming.clear();
    auto reply = co_await request(ControlOp::reprotect);
    if (!reply || !reply->ok) {
      if (reply) spdlog::warn("session {}: reprotect: the peer refused: {}", opts_.id, reply->message);
      co_await retry_pause();
      continue;
    }
    std::uint64_t ours = 0;
    std::uint64_t theirs = 0;
    Status st;
    for (std::size_t i = 0; i < members_.size() && st; ++i) {
      auto& dm = members_[i].m.volume->dirty();
      ours += dm.dirty_blocks();
      if (i < src_.incoming.size()) {
        theirs += src_.incoming[i].count();
        dm.merge(src_.incoming[i]);
      }
      st = co_await dm.persist_all();
    }
    std::uint64_t uni = 0;
    for (auto& m : members_) uni += m.m.volume->dirty().dirty_blocks();
    if (!st) {
      spdlog::error("session {}: reprotect: cannot persist the merged dirty map: {}", opts_.id, st.error().message());
      continue;
    }
    auto commit = co_await request(ControlOp::reprotect_commit);
    if (!commit || !commit->ok) continue;  // asked again on the next connection; merging twice is harmless
    spdlog::info("session {}: reprotect: {} block(s) changed here, {} there, {} to ship (the union)", opts_.id, ours,
                 theirs, uni);
    src_.exchange_done = true;
    peer_paused_ = false;  // the peer lifted any pause of its own with the exchange
    request_sync();
  }
}

asio::awaitable<ActionResult> Session::start_test() {
  if (!opts_.export_test) co_return ActionResult{Verdict::not_allowed, "failover tests are not configured here"};
  // Not in the middle of a cycle's apply: the image is exactly a committed cycle.
  auto held = co_await dest_mu_.scoped();
  if (state_.role != Role::destination) {
    co_return ActionResult{Verdict::not_allowed, "start_failover_test: this side is no longer a destination"};
  }
  // The image must be a committed cycle. Before the initial sync and its first cycle are done
  // the base is not one, and the initial sync writes it in place (no apply to preserve from),
  // so the image would change under the test. Found by the simulation (seed 27), where the
  // link was down and the state showed System_Paused, which the table allows.
  if (state_.initial != InitialState::done || state_.committed_cycle == 0) {
    co_return ActionResult{Verdict::not_allowed,
                           "Operation start_failover_test is not allowed: this destination has no consistent image "
                           "yet (its initial sync and first cycle have not completed)."};
  }
  Status st = co_await open_test(false);
  if (!st) co_return ActionResult{Verdict::failed, "start_failover_test failed: " + st.error().message()};
  spdlog::info(
      "session {}: failover test started: a writable image of committed cycle {} is exported; "
      "replication goes on underneath",
      opts_.id, state_.committed_cycle);
  co_return ActionResult{};
}

asio::awaitable<Status> Session::open_test(bool resume) {
  auto t = co_await FailoverTest::open(opts_.id, opts_.members, resume);
  if (!t) co_return t.error();
  test_ = std::move(t).value();
  receiver_->observe(test_.get());  // it keeps what the apply overwrites
  Status st;
  if (opts_.export_test) st = co_await opts_.export_test(test_->exports());
  if (!st) co_await close_test_volumes();  // withdraws what was exported, closes the images
  co_return st;
}

asio::awaitable<void> Session::close_test_volumes() {
  if (opts_.unexport_test) co_await opts_.unexport_test();
  if (receiver_ && test_) receiver_->unobserve(test_.get());
  if (test_) co_await test_->close();
  test_.reset();
}

asio::awaitable<ActionResult> Session::stop_test() {
  // A cycle's apply may be preserving blocks into the image: it finishes first (it holds the
  // lock for the whole apply), then the image goes.
  auto held = co_await dest_mu_.scoped();
  if (!test_) co_return ActionResult{};  // stopped meanwhile (a restart cleaned it up)
  const std::uint64_t written = test_->overlay_blocks();
  co_await close_test_volumes();
  spdlog::info(
      "session {}: failover test stopped: the test image and its writes are discarded ({} overlay "
      "block(s))",
      opts_.id, written);
  co_return ActionResult{};
}

}  // namespace tandem::replication

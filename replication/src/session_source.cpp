// Session, the source's side: what a destination's hello starts (plan()), the run loop that
// cuts cycles and ships them (one Transfer each), the cycle timer, copy-on-write of frozen
// blocks, and the end of a committed cycle.
#include <spdlog/spdlog.h>

#include "session_internal.h"
#include "tandem/replication/errc.h"
#include "tandem/replication/plan.h"
#include "transfer.h"

namespace tandem::replication {

asio::awaitable<Status> Session::on_peer_hello(const SessionHello& h) {
  SourceView local{opts_.id, {}, generations_, state_.phase, state_.transfer_cycle};
  for (const auto& m : members_) local.members.push_back({m.m.volume->id(), m.m.volume->size_bytes()});
  const SourcePlan p = plan(local, h);
  const bool after_failover = state_.phase == Phase::failed_over || state_.phase == Phase::reprotecting;
  const bool histories_compared =
      !after_failover && (p.kind != SourcePlan::Kind::refuse || p.decision != SyncDecision::in_sync);
  if (histories_compared) {
    spdlog::info("session {}: connected to {}: local generations {}, peer {}: {}", opts_.id, opts_.peer_name,
                 describe(generations_), describe(h.generations), to_string(p.decision));
  }
  switch (p.kind) {
    case SourcePlan::Kind::refuse: {
      error_ = p.why;
      activity_ = Activity::refused;
      src_.plan = Plan::refused;
      spdlog::error("session {}: refusing to replicate to {}: {}", opts_.id, opts_.peer_name, p.why);
      const Refuse msg{opts_.id, static_cast<std::uint16_t>(p.code), p.why};
      std::vector<std::byte> bytes = encode(msg);
      (void)co_await send(MsgType::refuse, std::move(bytes));
      co_return Status{};
    }
    case SourcePlan::Kind::await_reprotect:
      spdlog::info("session {}: connected to {} after a failover ({}): waiting for reprotect", opts_.id,
                   opts_.peer_name, state_.phase == Phase::failed_over ? "Failed_Over" : "Reprotecting");
      src_.plan = Plan::wait;
      src_.peer_ready = true;
      activity_ = Activity::ok;  // shown as the phase until reprotect completes
      src_.peer_committed = std::max<std::uint64_t>(src_.peer_committed, 1);
      wake_.notify_all();
      co_return co_await note_paired();
    case SourcePlan::Kind::initial:
      src_.plan = Plan::initial;
      src_.plan_mode = p.mode;
      src_.plan_start = p.start;
      break;
    case SourcePlan::Kind::cycle:
      src_.plan = Plan::cycle;
      src_.plan_start = p.start;
      break;
    case SourcePlan::Kind::finish:
      // Only the run loop touches the cycle's frozen sets and preserve logs: it finishes it.
      src_.plan = Plan::finish;
      break;
    case SourcePlan::Kind::idle:
      src_.plan = Plan::wait;
      if (p.cut_now) sync_requested_ = true;
      break;
  }
  error_.clear();
  src_.need_new_generation = false;  // connected: writes are tracked for this peer
  src_.peer_committed = h.committed_cycle;
  src_.peer_ready = true;
  if (activity_ != Activity::initializing) activity_ = src_.plan == Plan::wait ? Activity::ok : Activity::synchronizing;
  wake_.notify_all();
  co_return co_await note_paired();
}

asio::awaitable<Status> Session::note_paired() {
  if (state_.paired) co_return Status{};
  co_return co_await store_.change("paired with the peer", [](SessionState& s) { s.paired = true; });
}

void Session::set_rpo_seconds(std::uint32_t seconds) {
  if (seconds == opts_.rpo_seconds) return;
  opts_.rpo_seconds = seconds;
  if (timer_) timer_->cancel();  // run_timer() starts over with the new period
}

void Session::set_rate_limit(std::uint64_t bytes_per_s) {
  opts_.rate_limit_bytes_per_s = bytes_per_s;
  limiter_.set_rate(bytes_per_s, clock_.steady_now());
  if (pacing_ != nullptr) pacing_->cancel();
}

asio::awaitable<void> Session::run_timer() {
  while (!stopping_ && acting_source()) {
    const auto period = std::chrono::milliseconds(std::max<std::uint64_t>(opts_.rpo_seconds * 500ull, 100));
    const bool expired = co_await timer_->wait_for(period);
    if (stopping_ || !acting_source()) break;
    if (!expired) continue;  // cancelled by a role change that did not happen after all
    request_sync();
  }
  timer_running_ = false;
  done_.notify_all();  // stop() waits for this loop: it uses the session
}

namespace {
TransferOutcome step_outcome(Status st) {
  if (st) return TransferOutcome{TransferEnd::committed, {}};
  return TransferOutcome{TransferEnd::failed, std::move(st)};
}
}  // namespace

asio::awaitable<void> Session::run_source() {
  while (!stopping_) {
    if (busy_) {  // the previous step is over, whichever way it left
      busy_ = false;
      idle_.notify_all();
    }
    progress_.notify_all();  // whoever waits for a step to end (failover, reprotect)
    note_state();
    if (!acting_source()) break;
    if (!src_.peer_ready || src_.plan == Plan::refused || state_.paused || peer_paused_ || replication_held()) {
      co_await wake_.wait();
      continue;
    }
    const std::uint64_t gen = conn_gen_;
    TransferOutcome out;
    busy_ = true;
    if (src_.plan == Plan::initial) {
      out = co_await ship(src_.plan_mode, 0, src_.plan_start);
      if (out.end == TransferEnd::committed && gen == conn_gen_) {
        const std::uint64_t at = counters_.last_sync ? unix_ms(*counters_.last_sync) : 0;
        out = step_outcome(co_await store_.change("initial sync complete", [at](SessionState& s) {
          s.initial = InitialState::done;
          if (at != 0) s.last_sync_unix_ms = at;
        }));
        src_.plan = Plan::wait;
        sync_requested_ = true;  // the first cycle makes the destination consistent
      }
    } else if (src_.plan == Plan::cycle) {
      out = co_await ship(TransferMode::cycle, state_.transfer_cycle, src_.plan_start);
      if (out.end == TransferEnd::committed && gen == conn_gen_) src_.plan = Plan::wait;
    } else if (src_.plan == Plan::finish) {
      out = step_outcome(co_await finish_cycle(state_.transfer_cycle));
      if (out.end == TransferEnd::committed) {
        // The destination had committed it before the link went: nothing left to ship (the
        // hello showed this side Synchronizing until now; found by the simulation, seed 191 of
        // the power-loss runs).
        src_.plan = Plan::wait;
        if (activity_ == Activity::synchronizing) activity_ = Activity::ok;
      }
    } else if (sync_requested_) {
      sync_requested_ = false;
      bool dirty = false;
      for (auto& m : members_) dirty = dirty || m.m.volume->dirty().dirty_blocks() > 0;
      // Reprotect ends with a cycle even when nothing changed on either side since the
      // failover: its commit is what tells the destination its image is a copy again.
      const bool reprotect_due = state_.phase == Phase::reprotecting && src_.exchange_done;
      if (!dirty && src_.peer_committed > 0 && !reprotect_due) {
        counters_.last_sync = clock_.system_now();
        continue;
      } else {
        out = step_outcome(co_await cut());
        if (out.end == TransferEnd::committed) {
          src_.plan = Plan::cycle;
          src_.plan_start = 0;
          continue;
        }
      }
    } else {
      busy_ = false;
      idle_.notify_all();
      co_await wake_.wait();
      continue;
    }
    switch (out.end) {
      case TransferEnd::committed:
        break;
      case TransferEnd::paused:
        // Stopped at an extent boundary for a pause: the link stays; the pause handshake asks
        // the destination for the restart address.
        spdlog::info("session {}: transfer paused at offset {}", opts_.id,
                     src_.transfer ? src_.transfer->sent_end() : 0);
        break;
      case TransferEnd::link_lost:
        break;  // the next connection's hello says where to go on
      case TransferEnd::failed:
        if (stopping_ || gen != conn_gen_) break;
        spdlog::warn("session {}: transfer failed: {}; closing the link to resume on reconnect", opts_.id,
                     out.error.error().message());
        error_ = out.error.error().message();
        if (conn_) conn_->close("transfer failed: " + out.error.error().message());
        // Nothing more until the next connection's hello: never retry on a dead link.
        src_.peer_ready = false;
        break;
    }
  }
  busy_ = false;
  idle_.notify_all();
  running_ = false;
  done_.notify_all();
}

asio::awaitable<Result<std::vector<engine::BlockBitmap>>> Session::freeze_all() {
  // Step one of a cut on every member (writes are held by the caller): their frozen sets.
  std::vector<engine::BlockBitmap> frozen;
  for (auto& m : members_) {
    auto f = co_await m.m.volume->dirty().freeze();
    if (!f) co_return f.error();
    frozen.push_back(std::move(f).value());
  }
  co_return frozen;
}

asio::awaitable<Status> Session::cut() {
  TANDEM_ASSERT(state_.role == Role::source && state_.transfer_cycle == 0);
  const std::uint64_t cycle = state_.next_cycle;
  for (auto& m : members_) co_await m.m.volume->hold_writes();
  auto frozen_r = co_await freeze_all();
  Status st = frozen_r.ok() ? Status{} : Status(frozen_r.error());
  std::vector<engine::BlockBitmap> frozen =
      frozen_r.ok() ? std::move(frozen_r).value() : std::vector<engine::BlockBitmap>{};
  if (st) {
    for (std::size_t i = 0; i < members_.size(); ++i) {
      // The log keeps a reference to the frozen set: store it in the member first.
      members_[i].frozen = std::move(frozen[i]);
      std::string path = preserve_path(members_[i]);
      auto log =
          co_await engine::PreserveLog::open(*members_[i].m.env, std::move(path), cycle, *members_[i].frozen, false);
      if (!log) {
        st = log.error();
        break;
      }
      members_[i].preserve = std::move(log).value();
    }
  }
  if (st) {
    // The cut is recorded: now the dirty maps may forget.
    st = co_await store_.change("cycle cut", [cycle](SessionState& s) {
      s.transfer_cycle = cycle;
      s.next_cycle = cycle + 1;
    });
  }
  if (st) {
    for (std::size_t i = 0; i < members_.size() && st; ++i) {
      st = co_await members_[i].m.volume->dirty().drop_frozen(*members_[i].frozen);
    }
  }
  for (auto& m : members_) m.m.volume->release_writes();
  if (!st && state_.transfer_cycle != cycle) {
    // Not recorded: the dirty maps still hold everything; forget the half-made cycle.
    for (auto& m : members_) {
      m.preserve.reset();
      m.frozen.reset();
    }
  }
  if (st) {
    std::uint64_t blocks = 0;
    for (auto& m : members_) blocks += m.frozen->count();
    spdlog::debug("session {}: cycle {} cut: {} blocks", opts_.id, cycle, blocks);
  }
  co_return st;
}

asio::awaitable<Status> Session::cow(std::size_t mi, std::uint64_t first, std::uint64_t count) {
  if (state_.role != Role::source) co_return Status{};
  if (src_.need_new_generation && state_.paired) {
    // The first write without the peer starts a new generation, durably, before it lands.
    while (bumping_) co_await bump_done_.wait();
    if (src_.need_new_generation) {
      bumping_ = true;
      auto gens = generations_;
      push_generation(gens, clock_.random_u64(), engine::Superblock::kGenerationsMax);
      Status st = co_await store_.change("written without the peer (new generation)", gens, {});
      bumping_ = false;
      bump_done_.notify_all();
      if (!st) co_return st;
      src_.need_new_generation = false;
      spdlog::info("session {}: written without the peer: new generation {}", opts_.id, describe(generations_));
    }
  }
  Member& m = members_[mi];
  if (!m.frozen || !m.preserve) co_return Status{};
  engine::IoBuffer buf;
  for (std::uint64_t b = first; b < first + count; ++b) {
    if (!m.frozen->test(b) || m.preserve->contains(b)) continue;
    if (m.base + b * kBlock < src_.restart.offset && src_.restart.cycle == state_.transfer_cycle)
      continue;  // durable there
    if (!buf) buf = m.m.env->buffers().allocate(kBlock);
    TANDEM_CO_TRY(co_await m.m.volume->read(b * kBlock, kBlock, buf));
    TANDEM_CO_TRY(co_await m.preserve->preserve(b, buf.data()));
  }
  co_return Status{};
}

asio::awaitable<Status> Session::begin_initial() {
  // The whole volume ships now: what the dirty maps hold is covered. Cut them (the frozen sets
  // are discarded) so only writes from now on go into the first cycle.
  for (auto& m : members_) co_await m.m.volume->hold_writes();
  auto frozen_r = co_await freeze_all();
  Status st = frozen_r.ok() ? Status{} : Status(frozen_r.error());
  std::vector<engine::BlockBitmap> frozen =
      frozen_r.ok() ? std::move(frozen_r).value() : std::vector<engine::BlockBitmap>{};
  if (st) {
    st = co_await store_.change("initial sync begins", [](SessionState& s) { s.initial = InitialState::running; });
  }
  for (std::size_t i = 0; st && i < members_.size(); ++i) {
    st = co_await members_[i].m.volume->dirty().drop_frozen(frozen[i]);
  }
  for (auto& m : members_) m.m.volume->release_writes();
  co_return st;
}

asio::awaitable<TransferOutcome> Session::ship(TransferMode mode, std::uint64_t cycle, std::uint64_t start) {
  TANDEM_ASSERT(state_.role == Role::source && (mode != TransferMode::cycle || cycle == state_.transfer_cycle));
  const bool is_cycle = mode == TransferMode::cycle;
  if (!is_cycle && start == 0 && state_.initial != InitialState::running) {
    Status st = co_await begin_initial();
    if (!st) co_return TransferOutcome{TransferEnd::failed, std::move(st)};
  }
  if (!is_cycle && state_.initial != InitialState::done) {
    activity_ = Activity::initializing;
  } else if (activity_ != Activity::initializing) {
    activity_ = Activity::synchronizing;
  }
  const auto started = clock_.steady_now();
  auto t = std::make_shared<Transfer>(*this, mode, cycle, start);
  src_.transfer = t;
  src_.restart = {cycle, start};
  TransferOutcome out = co_await t->run();
  if (out.end != TransferEnd::committed) co_return out;
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(clock_.steady_now() - started);
  counters_.last_sync_ms = static_cast<std::uint64_t>(ms.count());
  counters_.transfer_total = 0;  // no progress to show until the next transfer
  counters_.transfer_done = 0;
  counters_.last_sync = clock_.system_now();  // durable with the cycle's end (finish_cycle) or the initial's
  if (is_cycle) {
    Status st = co_await finish_cycle(cycle);
    if (!st) co_return TransferOutcome{TransferEnd::failed, std::move(st)};
    spdlog::info("session {}: cycle {} committed: {} blocks in {} ms ({} bytes shipped, {} re-shipped in all)",
                 opts_.id, cycle, t->frozen_blocks(), ms.count(), counters_.bytes_shipped, counters_.bytes_reshipped);
  } else {
    spdlog::info("session {}: initial sync complete in {} ms ({} bytes shipped, {} re-shipped)", opts_.id, ms.count(),
                 counters_.bytes_shipped, counters_.bytes_reshipped);
  }
  activity_ = Activity::ok;
  co_return out;
}

asio::awaitable<Status> Session::finish_cycle(std::uint64_t cycle) {
  TANDEM_ASSERT(state_.transfer_cycle == cycle);
  // Host writes may be inside the copy-on-write hook, using the preserve logs: let them finish
  // and hold new ones while the cycle's frozen sets and logs go away.
  for (auto& m : members_) co_await m.m.volume->hold_writes();
  src_.peer_committed = cycle;
  // A cycle cut after reprotect's exchange ships the union: its commit completes reprotect, in
  // the same write. This is the one place a commit is recorded, whether the answer came or was
  // lost and the next hello told it (a destination that crashed after the commit: left
  // Reprotecting, this side took itself for a failed-over source and refused the next
  // failover's new source instead of stepping down; found by the simulation, seed 190 of the
  // crash runs).
  const bool reprotected = state_.phase == Phase::reprotecting && src_.exchange_done;
  const std::uint64_t at = counters_.last_sync ? unix_ms(*counters_.last_sync) : 0;
  Status st = co_await store_.change("cycle committed", [cycle, reprotected, at](SessionState& s) {
    s.committed_cycle = cycle;
    s.transfer_cycle = 0;
    if (at != 0) s.last_sync_unix_ms = at;
    if (reprotected) {
      s.phase = Phase::none;
      s.failover_gen = 0;
    }
  });
  if (st && reprotected) activity_ = Activity::ok;
  if (st && reprotected) {
    spdlog::info("session {}: reprotect complete: replicating to {} in the new direction", opts_.id, opts_.peer_name);
  }
  std::vector<std::unique_ptr<engine::PreserveLog>> logs;
  if (st) {
    for (auto& m : members_) {
      logs.push_back(std::move(m.preserve));
      m.frozen.reset();
    }
  }
  for (auto& m : members_) m.m.volume->release_writes();
  for (auto& log : logs) {
    if (log) TANDEM_CO_TRY(co_await log->remove());
  }
  if (st) {
    // Every block written before the cut is at the peer now: regions not written since leave
    // the write-intent log, so a crash from here on counts only later writes as changed (and a
    // reprotect after it ships those, not every region the volume ever had hot).
    for (auto& m : members_) {
      Status cooled = co_await m.m.volume->dirty().cool_committed();
      if (!cooled) {
        spdlog::warn(
            "session {}: volume {}: cannot cool the write-intent regions of cycle {}: {} (they stay "
            "counted as changed until the next cycle)",
            opts_.id, m.m.volume->id(), cycle, cooled.error().message());
      }
    }
  }
  co_return st;
}

}  // namespace tandem::replication

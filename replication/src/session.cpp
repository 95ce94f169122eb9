// Session: opening (recovery of a cycle or an apply a crash interrupted), the durable state,
// the link (hello, attach, detach), the dispatch of the peer's messages to the side that
// handles them, the shown state and the status, and stopping.
#include "tandem/replication/session.h"

#include <spdlog/spdlog.h>

#include "failover_test.h"
#include "receiver.h"
#include "session_internal.h"
#include "tandem/engine/errc.h"
#include "tandem/replication/errc.h"
#include "tandem/replication/plan.h"
#include "transfer.h"

namespace tandem::replication {

// Copy-on-write: sees each host write to a member before it reaches the device.
class Session::CowHook final : public engine::WriteHook {
 public:
  CowHook(Session& s, std::size_t mi) : s_(s), mi_(mi) {}
  asio::awaitable<Status> before_write(std::uint64_t first, std::uint64_t count) override {
    return s_.cow(mi_, first, count);
  }

 private:
  Session& s_;
  std::size_t mi_;
};

Session::Session(asio::any_io_executor ex, SessionOptions opts)
    : ex_(std::move(ex)),
      opts_(std::move(opts)),
      clock_(opts_.members.front().env->clock()),
      limiter_(opts_.rate_limit_bytes_per_s) {}

asio::awaitable<void> Session::pace(std::uint64_t bytes) {
  if (!limiter_.limited()) co_return;
  for (;;) {
    const auto wait = limiter_.delay(clock_.steady_now());
    if (wait == transport::RateLimiter::Clock::duration::zero()) break;
    auto t = clock_.make_timer(ex_);
    pacing_ = t.get();  // a new rate (set_rate_limit) cuts the wait short and it is priced again
    (void)co_await t->wait_for(wait);
    pacing_ = nullptr;
    if (stopping_) co_return;
  }
  limiter_.consume(bytes, clock_.steady_now());
}

void Session::set_source_hooks(bool on) {
  for (std::size_t i = 0; i < members_.size(); ++i) {
    auto& m = members_[i];
    m.m.volume->set_write_hook(nullptr);
    m.hook.reset();
    if (on) {
      m.hook = std::make_unique<CowHook>(*this, i);
      m.m.volume->set_write_hook(m.hook.get());
    }
  }
}

Session::~Session() {
  for (auto& m : members_) m.m.volume->set_write_hook(nullptr);
}

asio::awaitable<Result<std::unique_ptr<Session>>> Session::open(asio::any_io_executor ex, SessionOptions opts) {
  TANDEM_ASSERT(!opts.members.empty() && opts.members.size() <= kMembersMax);
  std::unique_ptr<Session> s(new Session(ex, std::move(opts)));
  std::uint64_t base = 0;
  for (const auto& sm : s->opts_.members) {
    Member m;
    m.m = sm;
    m.base = base;
    base += sm.volume->size_bytes();
    s->members_.push_back(std::move(m));
  }
  const auto& sb = s->members_[0].m.volume->meta().superblock();
  auto st = decode_state(sb.session_blob, s->opts_.role);
  if (!st) co_return Error(st.error().code, "session " + s->opts_.id + ": " + st.error().message());
  std::vector<engine::Volume*> volumes;
  for (const auto& m : s->members_) volumes.push_back(m.m.volume);
  s->store_.load(std::move(volumes), *st, sb.generations);
  if (s->state_.role == Role::destination) s->make_receiver();
  if (s->state_.role != s->opts_.role) {
    spdlog::warn("session {}: configured as {} but its volumes say {}; keeping {}", s->opts_.id,
                 s->opts_.role == Role::source ? "source" : "destination",
                 s->state_.role == Role::source ? "source" : "destination",
                 s->state_.role == Role::source ? "source" : "destination");
  }
  TANDEM_CO_TRY(co_await s->recover());
  // A failover test that was running when the daemon stopped goes on: its overlay and its
  // volume's metadata are on disk (the test is over only when stop_failover_test says so).
  if (s->state_.role == Role::destination && FailoverTest::left_behind(s->opts_.members)) {
    TANDEM_CO_TRY(co_await s->open_test(true));
    spdlog::info("session {}: the failover test that was running goes on; its image is exported again", s->opts_.id);
  } else {
    TANDEM_CO_TRY(FailoverTest::remove_leftovers(s->opts_.members));  // of a test that was not whole
  }
  for (std::size_t i = 0; i < s->members_.size(); ++i) {
    auto& m = s->members_[i];
    if (s->state_.role == Role::source) {
      m.hook = std::make_unique<CowHook>(*s, i);
      m.m.volume->set_write_hook(m.hook.get());
      m.m.volume->set_access(engine::Access::read_write);
    } else {
      m.m.volume->set_access(engine::Access::read_only);
    }
  }
  if (s->state_.last_sync_unix_ms != 0) {
    s->counters_.last_sync =
        std::chrono::system_clock::time_point(std::chrono::milliseconds(s->state_.last_sync_unix_ms));
  }
  const bool initializing = s->state_.role == Role::destination ? s->state_.committed_cycle == 0 : !s->state_.paired;
  s->activity_ = initializing ? Activity::initializing : Activity::ok;
  if (s->state_.role == Role::source) s->start_source_tasks();
  // A failover step the daemon was killed in goes on.
  if (s->state_.phase == Phase::failing_over && s->state_.role == Role::source) {
    s->start_background(s->run_planned_failover());
  } else if (s->state_.phase == Phase::reprotecting && s->state_.role == Role::source) {
    s->start_background(s->run_reprotect());
  } else if (s->state_.phase == Phase::failing_over_for_dr) {
    // Whichever role it had reached: a crash may come after become_source() persisted the role
    // and before the new generation was.
    auto r = co_await s->unplanned_failover();
    if (!r.ok()) co_return Error(errc::not_allowed_in_state, "session " + s->opts_.id + ": " + r.message);
  }
  co_return s;
}

asio::awaitable<Status> Session::set_role_offline(SessionOptions opts, Role role) {
  auto& meta0 = opts.members[0].volume->meta();
  auto st = decode_state(meta0.superblock().session_blob, opts.role);
  if (!st) co_return st.error();
  SessionState s = *st;
  if (s.applying_cycle != 0) {
    co_return Error(errc::not_allowed_in_state,
                    "cycle " + std::to_string(s.applying_cycle) +
                        " is committed but not applied yet; start the daemon once to finish it");
  }
  if (s.role == Role::source && s.transfer_cycle != 0) {
    for (auto& m : opts.members) {
      auto f = co_await m.volume->dirty().load_frozen();
      if (!f) co_return f.error();
      m.volume->dirty().merge(*f);
      TANDEM_CO_TRY(co_await m.volume->dirty().persist_all());
    }
  }
  s.transfer_cycle = 0;
  auto gens = meta0.superblock().generations;
  if (role == Role::source && s.role != Role::source) {
    push_generation(gens, opts.members.front().env->clock().random_u64(), engine::Superblock::kGenerationsMax);
  }
  s.role = role;
  for (std::size_t i = opts.members.size(); i-- > 0;) {
    auto& meta = opts.members[i].volume->meta();
    engine::Superblock sb = meta.superblock();
    sb.generations = gens;
    sb.role = role == Role::source ? engine::Role::source : engine::Role::destination;
    if (i == 0) sb.session_blob = encode_state(s);
    TANDEM_CO_TRY(co_await meta.write_superblock(std::move(sb)));
  }
  spdlog::info("session {}: role set to {} (generations {})", opts.id, role == Role::source ? "source" : "destination",
               describe(gens));
  co_return Status{};
}

std::string Session::journal_path(const Member& m) const { return m.m.state_dir + "/" + m.m.volume->id() + ".journal"; }
std::string Session::preserve_path(const Member& m) const {
  return m.m.state_dir + "/" + m.m.volume->id() + ".preserve";
}

std::uint64_t Session::total_bytes() const { return members_.back().base + members_.back().m.volume->size_bytes(); }

std::pair<std::size_t, std::uint64_t> Session::locate(std::uint64_t global) const {
  for (std::size_t i = members_.size(); i-- > 0;) {
    if (global >= members_[i].base) return {i, global - members_[i].base};
  }
  return {0, global};
}

asio::awaitable<Status> Session::recover() {
  if (state_.role == Role::source) {
    if (state_.transfer_cycle != 0) {
      for (auto& m : members_) {
        auto f = co_await m.m.volume->dirty().load_frozen();
        if (!f) co_return f.error();
        m.frozen = std::move(f).value();
        std::string path = preserve_path(m);
        auto log =
            co_await engine::PreserveLog::open(*m.m.env, std::move(path), state_.transfer_cycle, *m.frozen, true);
        if (!log) co_return log.error();
        m.preserve = std::move(log).value();
      }
      spdlog::info("session {}: resuming cycle {} after restart ({} frozen blocks)", opts_.id, state_.transfer_cycle,
                   members_[0].frozen->count());
    }
    co_return Status{};
  }
  co_return co_await receiver_->recover();
}

void Session::make_receiver() {
  std::vector<ReceiverMember> ms;
  for (const auto& m : members_) ms.push_back({m.m.volume, m.m.env, journal_path(m), m.base});
  ReceiverOptions o{opts_.id, opts_.peer_name, opts_.stage_batch_bytes, opts_.initial_checkpoint_bytes};
  ReceiverHooks hooks;
  hooks.send = [this](MsgType t, std::vector<std::byte> bytes) { return send(t, std::move(bytes)); };
  // Reprotect's first cycle: the union of both sides' changes is in place, this side is a copy
  // of the new source again; the phase ends in the same write as the apply.
  hooks.apply_also = [](SessionState& s) {
    if (s.phase != Phase::reprotecting) return false;
    s.phase = Phase::none;
    s.failover_gen = 0;
    return true;
  };
  hooks.applied = [this](const Applied& a) {
    counters_.last_sync = a.at;
    if (a.took) counters_.last_sync_ms = static_cast<std::uint64_t>(a.took->count());
    if (a.also) {
      spdlog::info("session {}: reprotect complete: this side is a destination of {} again", opts_.id, opts_.peer_name);
    }
    activity_ = Activity::ok;
  };
  receiver_ = std::make_unique<Receiver>(ex_, std::move(o), std::move(ms), store_, clock_, std::move(hooks));
}

std::uint64_t Session::staged_end() const { return receiver_ ? receiver_->staged_end() : 0; }

SessionHello Session::make_hello() const {
  SessionHello h;
  h.session_id = opts_.id;
  h.role = state_.role;
  for (const auto& m : members_) h.members.push_back({m.m.volume->id(), m.m.volume->size_bytes()});
  h.generations = generations_;
  h.paired = state_.paired;
  // Blank: tandem created the destination's file just now. A device, or a file that was there
  // before (pre-seeded), may hold the data already: the initial sync compares hashes.
  h.blank = members_[0].m.volume->created() && members_[0].m.volume->data_created() && !state_.paired;
  h.committed_cycle = state_.committed_cycle;
  h.staged_cycle = state_.role == Role::destination ? state_.transfer_cycle : 0;
  h.staged_offset = h.staged_cycle != 0 ? staged_end() : 0;
  h.initial = state_.initial;
  h.initial_offset = state_.initial_offset;
  h.paused = state_.paused;
  h.phase = static_cast<std::uint8_t>(state_.phase);
  h.failover_gen = state_.failover_gen;
  h.initial_compare = state_.initial == InitialState::running && state_.initial_compare;
  return h;
}

asio::awaitable<Status> Session::send(MsgType t, std::vector<std::byte> payload, std::span<const std::byte> data) {
  auto conn = conn_;  // the channel stays alive for this send even if detach() drops it
  if (!conn) co_return Error(errc::peer_unreachable, "not connected");
  co_return co_await conn->send(t, payload, data);
}

void Session::attach(std::shared_ptr<PeerChannel> conn) {
  conn_ = std::move(conn);
  ++conn_gen_;
  src_.peer_ready = false;
  src_.plan = Plan::wait;
  if (src_.transfer) src_.transfer->interrupt();  // one still running on the old link ends
  src_.transfer.reset();
  side_tasks_.spawn([](Session* self, std::uint64_t gen) -> asio::awaitable<Status> {
    // Named locals: GCC 12 destroys temporaries inside co_await expressions twice.
    const SessionHello hello = self->make_hello();
    std::vector<std::byte> bytes = encode(hello);
    auto st = co_await self->send(MsgType::session_hello, std::move(bytes));
    if (!st && gen == self->conn_gen_) {
      spdlog::warn("session {}: cannot send hello: {}", self->opts_.id, st.error().message());
    }
    co_return Status{};  // logged here; a lost link is the receive loop's news
  }(this, conn_gen_));
  wake_.notify_all();
  note_state();
}

void Session::detach(const std::string& reason) {
  if (!conn_) return;
  spdlog::info("session {}: link to {} lost: {}", opts_.id, opts_.peer_name, reason);
  conn_.reset();
  ++conn_gen_;
  src_.peer_ready = false;
  // Writes from now on happen without the peer: the first one starts a new generation.
  if (state_.role == Role::source) src_.need_new_generation = true;
  if (activity_ != Activity::refused) activity_ = Activity::link_lost;
  // Control requests in flight will get no answer on this link.
  for (auto& [id, p] : control_waits_) p->lost = true;
  for (auto& [id, p] : control_waits_) p->wq.notify_all();
  if (src_.transfer) src_.transfer->interrupt();
  done_.notify_all();
  wake_.notify_all();
  note_state();
}

void Session::request_sync() {
  sync_requested_ = true;
  wake_.notify_all();
}

asio::awaitable<void> Session::announce_shutdown() {
  // A request, answered once the peer has handled it: a frame only written to the socket can
  // still be lost when the link closes right after (a close with acknowledgements left unread
  // sends a reset, and the peer's kernel drops what its reader had not taken yet).
  auto reply = co_await request(ControlOp::going_down, false, 0);
  if (!reply && conn_) {
    spdlog::warn("session {}: {} did not confirm the maintenance notice; it will show the link as lost", opts_.id,
                 opts_.peer_name);
  }
}

asio::awaitable<void> Session::stop() {
  stopping_ = true;
  if (timer_) timer_->cancel();
  if (pacing_ != nullptr) pacing_->cancel();
  wake_.notify_all();
  if (src_.transfer) src_.transfer->interrupt();
  done_.notify_all();
  progress_.notify_all();
  while (running_ || background_ > 0 || timer_running_) co_await done_.wait();
  // Messages being handled finish (a new one is refused now that stopping_ is set), and with
  // them the destination's apply; then nothing else uses the staged cycle or the test image.
  while (handling_ > 0) co_await handled_.wait();
  if (receiver_) (void)co_await receiver_->wait_writes();
  (void)co_await sends_.wait();
  (void)co_await side_tasks_.wait();
  {
    auto held = co_await dest_mu_.scoped();
    if (test_) co_await close_test_volumes();
  }
  for (auto& m : members_) m.m.volume->set_write_hook(nullptr);
}

void Session::note_state() {
  const State now = state();
  if (logged_state_ == now) return;
  const std::optional<State> before = logged_state_;
  logged_state_ = now;
  if (!before) return;  // the state at start is in the start-up lines
  const auto routine = [](State x) { return x == State::ok || x == State::synchronizing; };
  const bool alarming = now == State::system_paused || now == State::error || now == State::paused_for_ndu;
  const auto level = routine(*before) && routine(now) ? spdlog::level::debug
                     : alarming                       ? spdlog::level::warn
                                                      : spdlog::level::info;
  const std::string why = (now == State::error || now == State::system_paused) && !error_.empty() ? ": " + error_ : "";
  spdlog::log(level, "session {}: state {} -> {} ({}){}", opts_.id, state_name(*before), state_name(now),
              state_.role == Role::source ? "source" : "destination", why);
}

State Session::state() const {
  return shown_state(StateFacts{activity_, state_.phase, state_.paused, conn_ != nullptr, peer_paused_, peer_ndu_});
}

SessionStatus Session::status() const {
  SessionStatus s;
  s.state = state();
  s.role = state_.role;
  s.connected = conn_ != nullptr;
  s.local_only_paused = state_.paused && state_.local_only_paused;
  s.test_running = test_running();
  s.peer_paused = peer_paused_;
  s.initial_sync = state_.role == Role::source ? (src_.plan == Plan::initial || !state_.paired)
                                               : state_.initial != InitialState::done;
  s.transferring = busy_;
  s.committed_cycle = state_.committed_cycle;
  s.transfer_cycle = state_.transfer_cycle;
  if (state_.role == Role::source) {
    s.restart = {state_.transfer_cycle, src_.restart.offset};
    std::uint64_t lag = 0;
    for (const auto& m : members_) {
      lag += m.m.volume->dirty().dirty_blocks() * kBlock;
      if (m.frozen) lag += m.frozen->count() * kBlock;
    }
    s.lag_bytes = lag;
  } else {
    s.restart = {state_.transfer_cycle, state_.transfer_cycle ? staged_end() : state_.initial_offset};
  }
  s.bytes_shipped = counters_.bytes_shipped;
  s.bytes_reshipped = counters_.bytes_reshipped;
  s.transfer_bytes_total = counters_.transfer_total;
  s.transfer_bytes_done = counters_.transfer_done;
  s.transfer_started = counters_.transfer_started;
  s.resumes = counters_.resumes;
  s.diverged_blocks = diverged_blocks();
  s.last_sync = counters_.last_sync;
  s.last_sync_duration_ms = counters_.last_sync_ms;
  s.error = error_;
  if (s.error.empty() && s.state == State::system_paused) {
    s.error = conn_ ? "the session is paused on the peer" : "the peer " + opts_.peer_name + " is unreachable";
  }
  s.generations = generations_;
  return s;
}

asio::awaitable<Status> Session::handle(MsgType type, std::span<const std::byte> payload) {
  NoteOnExit note{this};
  struct Handling {
    Session* s;
    explicit Handling(Session* x) : s(x) { ++s->handling_; }
    ~Handling() {
      --s->handling_;
      s->handled_.notify_all();
    }
    Handling(const Handling&) = delete;
    Handling& operator=(const Handling&) = delete;
  } handling{this};
  if (stopping_) co_return Error(errc::peer_unreachable, "session " + opts_.id + " is stopping");
  // A destination's data messages stage and apply cycles: they hold the destination lock, so an
  // operator's action (stopping a failover test, an unplanned failover, a pause) waits for the
  // one being handled and never frees what it uses.
  std::optional<AsyncMutex::Guard> held;
  if (type == MsgType::sync_begin || type == MsgType::extent || type == MsgType::extent_hash ||
      type == MsgType::cycle_end) {
    held.emplace(co_await dest_mu_.scoped());
    if (stopping_) co_return Error(errc::peer_unreachable, "session " + opts_.id + " is stopping");
  }
  switch (type) {
    case MsgType::session_hello: {
      auto h = decode_session_hello(payload);
      if (!h) co_return h.error();
      peer_paused_ = h->paused;
      if (peer_ndu_) spdlog::info("session {}: {} is back from maintenance", opts_.id, opts_.peer_name);
      peer_ndu_ = false;
      progress_.notify_all();
      if (state_.role == Role::source && h->role == Role::source) {
        switch (when_sources_meet(state_.phase, state_.failover_gen, generations_, static_cast<Phase>(h->phase),
                                  h->failover_gen)) {
          case SourcesMeet::wait_for_peer:
            spdlog::info("session {}: {} is still a source; it steps down when it sees this side failed over", opts_.id,
                         opts_.peer_name);
            co_return Status{};
          case SourcesMeet::step_down:
            co_return co_await demote_by_hello(*h);
          case SourcesMeet::neither:
            break;
        }
      }
      if (state_.role == Role::source) co_return co_await on_peer_hello(*h);
      // A destination back in touch with its source is OK again (System_Paused was the link).
      if (activity_ == Activity::link_lost) {
        activity_ = state_.initial == InitialState::running ? Activity::initializing : Activity::ok;
      }
      if (h->role != Role::source) {
        error_ = "both sides of session " + opts_.id + " are destinations";
        spdlog::error("session {}: {}", opts_.id, error_);
      }
      co_return Status{};
    }
    case MsgType::refuse: {
      auto r = decode_refuse(payload);
      if (!r) co_return r.error();
      error_ = r->message;
      activity_ = Activity::refused;
      // The code is a replication::errc; one this version does not know is shown as a number.
      spdlog::error("session {}: the peer refused the session ({}): {}", opts_.id,
                    make_error_code(static_cast<errc>(r->code)).message(), r->message);
      co_return Status{};
    }
    case MsgType::ack: {
      auto a = decode_ack(payload);
      if (!a) co_return a.error();
      if (state_.role != Role::source) co_return Error(errc::bad_message, "ack sent to a destination");
      if (!src_.transfer) {
        co_return Error(errc::bad_message,
                        "ack for cycle " + std::to_string(a->cycle) + " with no transfer begun on this link");
      }
      if (std::string why = src_.transfer->on_ack(*a); !why.empty()) co_return Error(errc::bad_message, why);
      src_.restart = {src_.transfer->cycle(), src_.transfer->acked_offset()};
      co_return Status{};
    }
    case MsgType::hash_result: {
      auto r = decode_hash_result(payload);
      if (!r) co_return r.error();
      if (!src_.transfer) {
        co_return Error(errc::bad_message,
                        "hash result at offset " + std::to_string(r->offset) + " with no hash asked");
      }
      if (std::string why = src_.transfer->on_hash_result(*r); !why.empty()) co_return Error(errc::bad_message, why);
      co_return Status{};
    }
    case MsgType::committed: {
      auto c = decode_committed(payload);
      if (!c) co_return c.error();
      if (!src_.transfer) {
        co_return Error(errc::bad_message, "committed cycle " + std::to_string(c->cycle) + " with no cycle end sent");
      }
      if (std::string why = src_.transfer->on_committed(*c); !why.empty()) co_return Error(errc::bad_message, why);
      progress_.notify_all();
      co_return Status{};
    }
    case MsgType::sync_begin:
    case MsgType::extent:
    case MsgType::extent_hash:
    case MsgType::cycle_end:
      co_return co_await on_data(type, payload);
    case MsgType::control: {
      auto m = decode_control(payload);
      if (!m) co_return m.error();
      if (m->op == ControlOp::going_down) {
        peer_ndu_ = true;
        spdlog::info("session {}: {} is shutting down for maintenance; the session waits for it (Paused_For_NDU)",
                     opts_.id, opts_.peer_name);
        std::string none;  // a named local: GCC 12 destroys temporaries inside co_await twice
        co_return co_await reply_control(*m, true, 0, std::move(none));
      }
      if (m->op != ControlOp::pause && m->op != ControlOp::resume) co_return co_await on_failover_control(*m);
      co_return co_await on_control(*m);
    }
    case MsgType::changed_blocks: {
      auto m = decode_changed_blocks(payload);
      if (!m) co_return m.error();
      co_return co_await on_changed_blocks(*m);
    }
    case MsgType::control_reply: {
      auto m = decode_control_reply(payload);
      if (!m) co_return m.error();
      co_return co_await on_control_reply(*m);
    }
  }
  co_return Error(errc::bad_message, "unknown message type " + std::to_string(static_cast<int>(type)));
}

asio::awaitable<Status> Session::on_data(MsgType type, std::span<const std::byte> payload) {
  if (!receiver_) co_return Error(errc::wrong_role, "a data frame sent to a source");
  if (type == MsgType::sync_begin) {
    if (state_.phase == Phase::failing_over_for_dr) co_return Error(errc::not_allowed_in_state, "failing over");
    auto m = decode_sync_begin(payload);
    if (!m) co_return m.error();
    TANDEM_CO_TRY(co_await receiver_->on_sync_begin(*m, conn_gen_));
    if (m->mode != TransferMode::cycle) {
      activity_ = Activity::initializing;
    } else if (activity_ != Activity::initializing) {
      activity_ = Activity::synchronizing;
    }
    co_return Status{};
  }
  if (type == MsgType::extent) {
    auto m = decode_extent(payload);
    if (!m) co_return m.error();
    co_return co_await receiver_->on_extent(*m, conn_gen_);
  }
  if (type == MsgType::extent_hash) {
    auto m = decode_extent_hash(payload);
    if (!m) co_return m.error();
    co_return co_await receiver_->on_extent_hash(*m, conn_gen_);
  }
  TANDEM_ASSERT(type == MsgType::cycle_end);
  auto m = decode_cycle_end(payload);
  if (!m) co_return m.error();
  co_return co_await receiver_->on_cycle_end(*m, conn_gen_);
}

}  // namespace tandem::replication

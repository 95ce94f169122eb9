#include "tandem/replication/session.h"

#include <spdlog/spdlog.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstring>
#include <filesystem>

#include "tandem/common/hash.h"
#include "tandem/engine/errc.h"
#include "tandem/replication/errc.h"

namespace tandem::replication {
namespace {

constexpr std::uint64_t kBlock = 4096;

bool all_zero(const std::byte* p, std::size_t n) {
  // Word-wise: the initial sync runs this over the whole volume.
  const auto* w = reinterpret_cast<const std::uint64_t*>(p);
  for (std::size_t i = 0; i < n / 8; ++i) {
    if (w[i] != 0) return false;
  }
  return true;
}

}  // namespace

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

struct Session::PendingControl {
  std::optional<ControlReply> reply;
  bool lost = false;  // timed out, or the link went down
  WaitQueue wq;
  std::unique_ptr<engine::Timer> timer;
};

Session::Session(asio::any_io_executor ex, SessionOptions opts)
    : ex_(std::move(ex)), opts_(std::move(opts)), clock_(opts_.members.front().env->clock()),
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
  s->state_ = *st;
  s->generations_ = sb.generations;
  if (s->state_.role != s->opts_.role) {
    spdlog::warn("session {}: configured as {} but its volumes say {}; keeping {}", s->opts_.id,
                 s->opts_.role == Role::source ? "source" : "destination",
                 s->state_.role == Role::source ? "source" : "destination",
                 s->state_.role == Role::source ? "source" : "destination");
  }
  TANDEM_CO_TRY(co_await s->recover());
  // A failover test that was running when the daemon stopped goes on: its overlay and its
  // volume's metadata are on disk (the test is over only when stop_failover_test says so).
  bool test_left = s->state_.role == Role::destination;
  for (auto& m : s->members_) {
    test_left = test_left && std::filesystem::exists(m.m.state_dir + "/" + m.m.volume->id() + ".test-overlay");
  }
  if (test_left) {
    TANDEM_CO_TRY(co_await s->open_test(true));
    spdlog::info("session {}: the failover test that was running goes on; its image is exported again", s->opts_.id);
  } else {
    for (auto& m : s->members_) {  // leftovers of a test that was not whole
      TANDEM_CO_TRY(m.m.env->remove(m.m.state_dir + "/" + m.m.volume->id() + ".test-overlay"));
      TANDEM_CO_TRY(m.m.env->remove(m.m.state_dir + "/" + m.m.volume->id() + ".test-meta"));
    }
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
    s->last_sync_ = std::chrono::system_clock::time_point(std::chrono::milliseconds(s->state_.last_sync_unix_ms));
  }
  s->state_name_ = s->state_.role == Role::destination && s->state_.committed_cycle == 0 ? "Initializing"
                   : s->state_.role == Role::source && !s->state_.paired             ? "Initializing"
                                                                                     : "OK";
  if (s->state_.role == Role::source) s->start_source_tasks();
  // A failover step the daemon was killed in goes on.
  if (s->state_.phase == Phase::failing_over && s->state_.role == Role::source) {
    s->start_background(s->run_planned_failover());
  } else if (s->state_.phase == Phase::reprotecting && s->state_.role == Role::source) {
    s->start_background(s->run_reprotect());
  } else if (s->state_.phase == Phase::failing_over_for_dr && s->state_.role == Role::destination) {
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
    co_return Error(errc::not_allowed_in_state, "cycle " + std::to_string(s.applying_cycle) +
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

std::string Session::journal_path(const Member& m) const {
  return m.m.state_dir + "/" + m.m.volume->id() + ".journal";
}
std::string Session::preserve_path(const Member& m) const {
  return m.m.state_dir + "/" + m.m.volume->id() + ".preserve";
}

std::uint64_t Session::total_bytes() const {
  return members_.back().base + members_.back().m.volume->size_bytes();
}

std::pair<std::size_t, std::uint64_t> Session::locate(std::uint64_t global) const {
  for (std::size_t i = members_.size(); i-- > 0;) {
    if (global >= members_[i].base) return {i, global - members_[i].base};
  }
  return {0, global};
}

asio::awaitable<Status> Session::persist() {
  // Member 0's superblock is authoritative for the session state.
  auto& meta = members_[0].m.volume->meta();
  engine::Superblock sb = meta.superblock();
  sb.session_blob = encode_state(state_);
  sb.role = state_.role == Role::source ? engine::Role::source : engine::Role::destination;
  co_return co_await meta.write_superblock(std::move(sb));
}

asio::awaitable<Status> Session::persist_generations(std::vector<std::uint64_t> gens) {
  // Members first, member 0 last: it is the one read on start.
  for (std::size_t i = members_.size(); i-- > 0;) {
    auto& meta = members_[i].m.volume->meta();
    engine::Superblock sb = meta.superblock();
    sb.generations = gens;
    if (i == 0) sb.session_blob = encode_state(state_);
    TANDEM_CO_TRY(co_await meta.write_superblock(std::move(sb)));
  }
  generations_ = std::move(gens);
  co_return Status{};
}

asio::awaitable<Status> Session::recover() {
  if (state_.role == Role::source) {
    if (state_.transfer_cycle != 0) {
      for (auto& m : members_) {
        auto f = co_await m.m.volume->dirty().load_frozen();
        if (!f) co_return f.error();
        m.frozen = std::move(f).value();
        std::string path = preserve_path(m);
        auto log = co_await engine::PreserveLog::open(*m.m.env, std::move(path), state_.transfer_cycle, *m.frozen, true);
        if (!log) co_return log.error();
        m.preserve = std::move(log).value();
      }
      spdlog::info("session {}: resuming cycle {} after restart ({} frozen blocks)", opts_.id,
                   state_.transfer_cycle, members_[0].frozen->count());
    }
    co_return Status{};
  }
  if (state_.applying_cycle != 0) {
    // A commit record without the apply finished: apply again (idempotent).
    spdlog::info("session {}: finishing the apply of committed cycle {} after restart", opts_.id,
                 state_.applying_cycle);
    for (auto& m : members_) {
      std::string path = journal_path(m);
      auto j = co_await engine::CycleJournal::open(*m.m.env, std::move(path), state_.applying_cycle, 0, true);
      if (!j) co_return j.error();
      m.journal = std::move(j).value();
    }
    TANDEM_CO_TRY(co_await apply_committed(state_.applying_cycle));
  } else if (state_.transfer_cycle != 0) {
    for (auto& m : members_) {
      std::string path = journal_path(m);
      auto j = co_await engine::CycleJournal::open(*m.m.env, std::move(path), state_.transfer_cycle, 0, true);
      if (!j) co_return j.error();
      m.journal = std::move(j).value();
    }
    spdlog::info("session {}: cycle {} staged up to offset {} before restart", opts_.id, state_.transfer_cycle,
                 staged_global_end());
  }
  co_return Status{};
}

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
  h.staged_offset = h.staged_cycle != 0 ? staged_global_end() : 0;
  h.initial = state_.initial;
  h.initial_offset = state_.initial_offset;
  h.paused = state_.paused;
  h.phase = static_cast<std::uint8_t>(state_.phase);
  h.failover_gen = state_.failover_gen;
  h.initial_compare = state_.initial == InitialState::running && state_.initial_compare;
  return h;
}

std::uint64_t Session::staged_global_end() const {
  std::uint64_t end = 0;
  for (const auto& m : members_) {
    if (m.journal && !m.journal->extents().empty()) end = std::max(end, m.base + m.journal->staged_end_offset());
  }
  return end;
}

asio::awaitable<Status> Session::send(MsgType t, std::vector<std::byte> payload, std::span<const std::byte> data) {
  auto conn = conn_;  // the channel stays alive for this send even if detach() drops it
  if (!conn) co_return Error(errc::peer_unreachable, "not connected");
  co_return co_await conn->send(t, payload, data);
}

void Session::attach(std::shared_ptr<PeerChannel> conn) {
  conn_ = std::move(conn);
  ++conn_gen_;
  peer_ready_ = false;
  plan_ = Plan::wait;
  shipping_cycle_.reset();
  awaiting_commit_.reset();
  issued_end_ = 0;
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
  peer_ready_ = false;
  // Writes from now on happen without the peer: the first one starts a new generation.
  if (state_.role == Role::source) need_new_generation_ = true;
  if (state_name_ != "Error") state_name_ = "System_Paused";
  // Control requests in flight will get no answer on this link.
  for (auto& [id, p] : control_waits_) p->lost = true;
  for (auto& [id, p] : control_waits_) p->wq.notify_all();
  window_.notify_all();
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
    spdlog::warn("session {}: {} did not confirm the maintenance notice; it will show the link as lost",
                 opts_.id, opts_.peer_name);
  }
}

asio::awaitable<void> Session::stop() {
  stopping_ = true;
  if (timer_) timer_->cancel();
  if (pacing_ != nullptr) pacing_->cancel();
  wake_.notify_all();
  window_.notify_all();
  done_.notify_all();
  progress_.notify_all();
  while (running_ || background_ > 0 || timer_running_) co_await done_.wait();
  // Messages being handled finish (a new one is refused now that stopping_ is set), and with
  // them the destination's apply; then nothing else uses the staged cycle or the test image.
  while (handling_ > 0) co_await handled_.wait();
  (void)co_await dwrites_.wait();
  (void)co_await sends_.wait();
  (void)co_await side_tasks_.wait();
  {
    auto held = co_await dest_mu_.scoped();
    if (test_running_) co_await close_test_volumes();
  }
  while (reads_in_flight_ > 0) co_await reads_done_.wait();
  for (auto& m : members_) m.m.volume->set_write_hook(nullptr);
}

namespace {
std::uint64_t unix_ms(std::chrono::system_clock::time_point t) {
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count());
}
}  // namespace

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

// Logs a state change when a coroutine step ends, whichever way it leaves.
struct Session::NoteOnExit {
  Session* s;
  ~NoteOnExit() { s->note_state(); }
};

State Session::state() const {
  const auto named = state_from_name(state_name_).value_or(State::ok);
  if (named == State::error) return State::error;
  switch (state_.phase) {
    case Phase::failing_over: return State::failing_over;
    case Phase::failing_over_for_dr: return State::failing_over_for_dr;
    case Phase::failed_over: return State::failed_over;
    case Phase::reprotecting: return State::reprotecting;
    case Phase::none: break;
  }
  if (state_.paused) return State::paused;
  if (named == State::initializing) return named;
  if (conn_ && peer_paused_) return State::system_paused;  // paused on the peer only
  if (!conn_ && peer_ndu_) return State::paused_for_ndu;
  return named;
}

SessionStatus Session::status() const {
  SessionStatus s;
  s.state = state();
  s.role = state_.role;
  s.connected = conn_ != nullptr;
  s.local_only_paused = state_.paused && state_.local_only_paused;
  s.test_running = test_running_;
  s.peer_paused = peer_paused_;
  s.initial_sync = state_.role == Role::source ? (plan_ == Plan::initial || !state_.paired)
                                               : state_.initial != InitialState::done;
  s.transferring = busy_;
  s.committed_cycle = state_.committed_cycle;
  s.transfer_cycle = state_.transfer_cycle;
  if (state_.role == Role::source) {
    s.restart = {state_.transfer_cycle, acked_offset_};
    std::uint64_t lag = 0;
    for (const auto& m : members_) {
      lag += m.m.volume->dirty().dirty_blocks() * kBlock;
      if (m.frozen) lag += m.frozen->count() * kBlock;
    }
    s.lag_bytes = lag;
  } else {
    s.restart = {state_.transfer_cycle, state_.transfer_cycle ? staged_global_end() : state_.initial_offset};
  }
  s.bytes_shipped = bytes_shipped_;
  s.bytes_reshipped = bytes_reshipped_;
  s.transfer_bytes_total = transfer_total_;
  s.transfer_bytes_done = transfer_done_;
  s.transfer_started = transfer_started_;
  s.resumes = resumes_;
  s.diverged_blocks = diverged_blocks();
  s.last_sync = last_sync_;
  s.last_sync_duration_ms = last_sync_ms_;
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
        const bool i_failed_over = state_.phase == Phase::failed_over || state_.phase == Phase::reprotecting ||
                                   state_.phase == Phase::failing_over_for_dr;
        const bool peer_failed_over = h->phase == static_cast<std::uint8_t>(Phase::failed_over) ||
                                      h->phase == static_cast<std::uint8_t>(Phase::reprotecting);
        if (i_failed_over && !peer_failed_over) {
          // The old source: it demotes itself when it sees our hello.
          spdlog::info("session {}: {} is still a source; it steps down when it sees this side failed over", opts_.id,
                       opts_.peer_name);
          co_return Status{};
        }
        if (!i_failed_over && peer_failed_over &&
            std::find(generations_.begin(), generations_.end(), h->failover_gen) != generations_.end()) {
          co_return co_await demote_by_hello(*h);
        }
      }
      if (state_.role == Role::source) co_return co_await on_peer_hello(*h);
      // A destination back in touch with its source is OK again (System_Paused was the link).
      if (state_name_ == "System_Paused") state_name_ = state_.initial == InitialState::running ? "Initializing" : "OK";
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
      state_name_ = "Error";
      spdlog::error("session {}: the peer refused the session: {}", opts_.id, r->message);
      co_return Status{};
    }
    case MsgType::ack: {
      auto a = decode_ack(payload);
      if (!a) co_return a.error();
      if (state_.role != Role::source) co_return Error(errc::bad_message, "ack sent to a destination");
      if (std::string why = check_answer(*a); !why.empty()) co_return Error(errc::bad_message, why);
      acked_offset_ = std::max(acked_offset_, a->durable_offset);
      while (!unacked_.empty() && unacked_.front().first <= acked_offset_) {
        unacked_bytes_ -= unacked_.front().second;
        unacked_.pop_front();
      }
      acked_cycle_ = a->cycle;
      window_.notify_all();
      co_return Status{};
    }
    case MsgType::hash_result: {
      auto r = decode_hash_result(payload);
      if (!r) co_return r.error();
      if (std::string why = check_answer(*r); !why.empty()) co_return Error(errc::bad_message, why);
      --pending_hashes_;
      if (!r->match) resend_.emplace_back(r->offset, r->length);
      window_.notify_all();
      co_return Status{};
    }
    case MsgType::committed: {
      auto c = decode_committed(payload);
      if (!c) co_return c.error();
      if (std::string why = check_answer(*c); !why.empty()) co_return Error(errc::bad_message, why);
      awaiting_commit_.reset();
      committed_seen_ = c->cycle;
      done_.notify_all();
      progress_.notify_all();
      co_return Status{};
    }
    case MsgType::sync_begin: {
      if (state_.phase == Phase::failing_over_for_dr) co_return Error(errc::not_allowed_in_state, "failing over");
      auto m = decode_sync_begin(payload);
      if (!m) co_return m.error();
      co_return co_await on_sync_begin(*m);
    }
    case MsgType::extent: {
      auto m = decode_extent(payload);
      if (!m) co_return m.error();
      co_return co_await on_extent(*m);
    }
    case MsgType::extent_hash: {
      auto m = decode_extent_hash(payload);
      if (!m) co_return m.error();
      co_return co_await on_extent_hash(*m);
    }
    case MsgType::cycle_end: {
      auto m = decode_cycle_end(payload);
      if (!m) co_return m.error();
      co_return co_await on_cycle_end(*m);
    }
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

// ---------------------------------------------------------------------------------------------
// Source

asio::awaitable<Status> Session::on_peer_hello(const SessionHello& h) {
  auto refuse = [&](std::uint16_t code, std::string why) -> asio::awaitable<Status> {
    error_ = why;
    state_name_ = "Error";
    plan_ = Plan::refused;
    spdlog::error("session {}: refusing to replicate to {}: {}", opts_.id, opts_.peer_name, why);
    const Refuse msg{opts_.id, code, why};
    std::vector<std::byte> bytes = encode(msg);
    (void)co_await send(MsgType::refuse, std::move(bytes));
    co_return Status{};
  };
  if (h.role != Role::destination) {
    {
      std::string why = "the peer's side of session " + opts_.id + " is also a source";
      co_return co_await refuse(1, std::move(why));
    }
  }
  if (h.members.size() != members_.size()) {
    {
      std::string why = "the peer has " + std::to_string(h.members.size()) + " volumes in session " +
                                     opts_.id + ", this side " + std::to_string(members_.size());
      co_return co_await refuse(2, std::move(why));
    }
  }
  for (std::size_t i = 0; i < members_.size(); ++i) {
    if (h.members[i].size_bytes != members_[i].m.volume->size_bytes()) {
      {
      std::string why = "volume " + members_[i].m.volume->id() + " is " +
                                       std::to_string(members_[i].m.volume->size_bytes()) + " bytes but the peer's " +
                                       h.members[i].volume_id + " is " + std::to_string(h.members[i].size_bytes);
      co_return co_await refuse(3, std::move(why));
    }
    }
  }
  if (state_.phase == Phase::failed_over || state_.phase == Phase::reprotecting) {
    // The failover decided the direction; the histories meet again with reprotect's first
    // cycle. Nothing ships before reprotect has the union of both sides' changes.
    spdlog::info("session {}: connected to {} after a failover ({}): waiting for reprotect", opts_.id,
                 opts_.peer_name, state_.phase == Phase::failed_over ? "Failed_Over" : "Reprotecting");
    plan_ = Plan::wait;
    state_.paired = true;
    peer_ready_ = true;
    state_name_ = "OK";  // shown as the phase until reprotect completes
    peer_committed_ = std::max<std::uint64_t>(peer_committed_, 1);
    wake_.notify_all();
    co_return Status{};
  }
  const SyncDecision d = decide(GenerationView{generations_, true}, GenerationView{h.generations, h.paired});
  spdlog::info("session {}: connected to {}: local generations {}, peer {}: {}", opts_.id, opts_.peer_name,
               describe(generations_), describe(h.generations), to_string(d));
  switch (d) {
    case SyncDecision::split_brain: {
      std::string why = "split brain: both sides were written since they last agreed (local " +
                        describe(generations_) + ", peer " + describe(h.generations) +
                        "); nothing was changed on either side. Choose the side to keep";
      co_return co_await refuse(10, std::move(why));
    }
    case SyncDecision::unrelated: {
      std::string why = "unrelated volumes: no common generation (local " + describe(generations_) + ", peer " +
                        describe(h.generations) + "); nothing was changed";
      co_return co_await refuse(11, std::move(why));
    }
    case SyncDecision::destination_ahead: {
      std::string why = "the peer holds newer data (it was promoted: peer " + describe(h.generations) +
                        ", local " + describe(generations_) + "); reprotect is needed";
      co_return co_await refuse(12, std::move(why));
    }
    default:
      break;
  }
  error_.clear();
  need_new_generation_ = false;  // connected: writes are tracked for this peer
  peer_committed_ = h.committed_cycle;
  if (h.initial == InitialState::running) {
    // Resumed in the mode it started in: a compare goes on comparing (what the destination
    // already holds beyond the restart address is not shipped again).
    plan_ = Plan::initial;
    plan_mode_ = h.initial_compare ? TransferMode::initial_compare : TransferMode::initial_full;
    plan_start_ = h.initial_offset;
  } else if (d == SyncDecision::initial_sync) {
    plan_ = Plan::initial;
    plan_mode_ = h.blank ? TransferMode::initial_full : TransferMode::initial_compare;
    plan_start_ = 0;
  } else if (state_.transfer_cycle != 0) {
    if (h.committed_cycle >= state_.transfer_cycle) {
      // The destination committed it; we missed the acknowledgement. The run loop finishes it
      // (only it touches the cycle's frozen sets and preserve logs).
      plan_ = Plan::finish;
    } else {
      plan_ = Plan::cycle;
      plan_start_ = h.staged_cycle == state_.transfer_cycle ? h.staged_offset : 0;
    }
  } else {
    plan_ = Plan::wait;
    if (h.committed_cycle == 0) sync_requested_ = true;  // the first cycle makes it consistent
  }
  state_.paired = true;
  peer_ready_ = true;
  if (state_name_ != "Initializing") state_name_ = plan_ == Plan::wait ? "OK" : "Synchronizing";
  wake_.notify_all();
  co_return Status{};
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
  while (!stopping_ && state_.role == Role::source) {
    const auto period = std::chrono::milliseconds(std::max<std::uint64_t>(opts_.rpo_seconds * 500ull, 100));
    const bool expired = co_await timer_->wait_for(period);
    if (stopping_ || state_.role != Role::source) break;
    if (!expired) continue;  // cancelled by a role change that did not happen after all
    request_sync();
  }
  timer_running_ = false;
  done_.notify_all();  // stop() waits for this loop: it uses the session
}

asio::awaitable<void> Session::run_source() {
  while (!stopping_) {
    if (busy_) {  // the previous step is over, whichever way it left
      busy_ = false;
      idle_.notify_all();
    }
    progress_.notify_all();  // whoever waits for a step to end (failover, reprotect)
    note_state();
    if (state_.role != Role::source) break;
    if (!peer_ready_ || plan_ == Plan::refused || state_.paused || peer_paused_ || replication_held()) {
      co_await wake_.wait();
      continue;
    }
    const std::uint64_t gen = conn_gen_;
    Status st;
    busy_ = true;
    if (plan_ == Plan::initial) {
      st = co_await ship(plan_mode_, 0, plan_start_);
      if (st && gen == conn_gen_) {
        state_.initial = InitialState::done;
        st = co_await persist();
        plan_ = Plan::wait;
        sync_requested_ = true;  // the first cycle makes the destination consistent
      }
    } else if (plan_ == Plan::cycle) {
      st = co_await ship(TransferMode::cycle, state_.transfer_cycle, plan_start_);
      if (st && gen == conn_gen_) plan_ = Plan::wait;
      if (st && state_.phase == Phase::reprotecting && exchange_done_) {
        state_.phase = Phase::none;
        state_.failover_gen = 0;
        state_name_ = "OK";
        st = co_await persist();
        spdlog::info("session {}: reprotect complete: replicating to {} in the new direction", opts_.id,
                     opts_.peer_name);
      }
    } else if (plan_ == Plan::finish) {
      st = co_await finish_cycle(state_.transfer_cycle);
      if (st) plan_ = Plan::wait;
    } else if (sync_requested_) {
      sync_requested_ = false;
      bool dirty = false;
      for (auto& m : members_) dirty = dirty || m.m.volume->dirty().dirty_blocks() > 0;
      if (!dirty && peer_committed_ > 0) {
        last_sync_ = clock_.system_now();
        if (state_.phase == Phase::reprotecting && exchange_done_) {
          // Nothing changed on either side since the failover: reprotected already.
          state_.phase = Phase::none;
          state_.failover_gen = 0;
          state_name_ = "OK";
          st = co_await persist();
          if (st) spdlog::info("session {}: reprotect complete (nothing to ship): replicating to {} in the new direction",
                               opts_.id, opts_.peer_name);
        }
        if (st) continue;
      } else {
        st = co_await cut();
        if (st) {
          plan_ = Plan::cycle;
          plan_start_ = 0;
          continue;
        }
      }
    } else {
      busy_ = false;
      idle_.notify_all();
      co_await wake_.wait();
      continue;
    }
    if (!st && st.code() == make_error_code(errc::paused)) {
      // Stopped at an extent boundary for a pause: the link stays; the pause handshake asks
      // the destination for the restart address.
      spdlog::info("session {}: transfer paused at offset {}", opts_.id, sent_end_);
      continue;
    }
    if (!st && !stopping_) {
      if (gen == conn_gen_) {
        spdlog::warn("session {}: transfer failed: {}; closing the link to resume on reconnect", opts_.id,
                     st.error().message());
        error_ = st.error().message();
        if (conn_) conn_->close("transfer failed: " + st.error().message());
      }
      // Nothing more until the next connection's hello: never retry on a dead link.
      if (gen == conn_gen_) peer_ready_ = false;
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
  const std::uint64_t cycle = state_.next_cycle;
  for (auto& m : members_) co_await m.m.volume->hold_writes();
  auto frozen_r = co_await freeze_all();
  Status st = frozen_r.ok() ? Status{} : Status(frozen_r.error());
  std::vector<engine::BlockBitmap> frozen = frozen_r.ok() ? std::move(frozen_r).value() : std::vector<engine::BlockBitmap>{};
  if (st) {
    for (std::size_t i = 0; i < members_.size(); ++i) {
      // The log keeps a reference to the frozen set: store it in the member first.
      members_[i].frozen = std::move(frozen[i]);
      std::string path = preserve_path(members_[i]);
      auto log = co_await engine::PreserveLog::open(*members_[i].m.env, std::move(path), cycle,
                                                    *members_[i].frozen, false);
      if (!log) {
        st = log.error();
        break;
      }
      members_[i].preserve = std::move(log).value();
    }
  }
  if (st) {
    state_.transfer_cycle = cycle;
    state_.next_cycle = cycle + 1;
    st = co_await persist();  // the cut is recorded: now the dirty maps may forget
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
  if (need_new_generation_ && state_.paired) {
    // The first write without the peer starts a new generation, durably, before it lands.
    while (bumping_) co_await bump_done_.wait();
    if (need_new_generation_) {
      bumping_ = true;
      auto gens = generations_;
      push_generation(gens, clock_.random_u64(), engine::Superblock::kGenerationsMax);
      Status st = co_await persist_generations(gens);
      bumping_ = false;
      bump_done_.notify_all();
      if (!st) co_return st;
      need_new_generation_ = false;
      spdlog::info("session {}: written without the peer: new generation {}", opts_.id, describe(generations_));
    }
  }
  Member& m = members_[mi];
  if (!m.frozen || !m.preserve) co_return Status{};
  engine::IoBuffer buf;
  for (std::uint64_t b = first; b < first + count; ++b) {
    if (!m.frozen->test(b) || m.preserve->contains(b)) continue;
    if (m.base + b * kBlock < acked_offset_ && acked_cycle_ == state_.transfer_cycle) continue;  // durable there
    if (!buf) buf = m.m.env->buffers().allocate(kBlock);
    TANDEM_CO_TRY(co_await m.m.volume->read(b * kBlock, kBlock, buf));
    TANDEM_CO_TRY(co_await m.preserve->preserve(b, buf.data()));
  }
  co_return Status{};
}

// The source's checks of the destination's answers: each names a transfer this side began on
// this link and a place it has sent. A peer that says otherwise (a bug, or a peer not to be
// trusted) is refused: the link closes with the reason, and the transfer resumes from its
// restart address on the next connection.
std::string Session::check_answer(const Ack& a) const {
  if (!shipping_cycle_) return "ack for cycle " + std::to_string(a.cycle) + " with no transfer begun on this link";
  if (a.cycle != *shipping_cycle_) {
    return "ack for cycle " + std::to_string(a.cycle) + " during the transfer of cycle " +
           std::to_string(*shipping_cycle_);
  }
  if (a.durable_offset > issued_end_) {
    return "ack up to offset " + std::to_string(a.durable_offset) + " beyond the " + std::to_string(issued_end_) +
           " sent";
  }
  return {};
}

std::string Session::check_answer(const HashResult& r) const {
  if (pending_hashes_ == 0) return "hash result at offset " + std::to_string(r.offset) + " with no hash asked";
  // A mismatch makes this side read and send the extent again: it must be one it could have
  // asked about (whole blocks within one member, at most one extent, below what was sent).
  const auto [mi, local] = locate(r.offset);
  if (r.length == 0 || r.length % kBlock != 0 || r.offset % kBlock != 0 || r.length > opts_.extent_bytes ||
      r.offset + r.length > issued_end_ || local + r.length > members_[mi].m.volume->size_bytes()) {
    return "hash result for " + std::to_string(r.length) + " bytes at offset " + std::to_string(r.offset) +
           " that was never asked";
  }
  return {};
}

std::string Session::check_answer(const Committed& c) const {
  if (!awaiting_commit_) return "committed cycle " + std::to_string(c.cycle) + " with no cycle end sent";
  if (c.cycle != *awaiting_commit_) {
    return "committed cycle " + std::to_string(c.cycle) + " while cycle " + std::to_string(*awaiting_commit_) +
           " awaits its commit";
  }
  return {};
}

asio::awaitable<Status> Session::wait_window(std::uint64_t gen) {
  // The window counts bytes, not offsets: a sparse frozen set jumps far ahead in offset while
  // only a little data is in flight.
  while (gen == conn_gen_ && !stopping_ && unacked_bytes_ > opts_.window_bytes) co_await window_.wait();
  if (gen != conn_gen_ || stopping_) co_return Error(errc::peer_unreachable, "link lost during transfer");
  co_return Status{};
}

asio::awaitable<Status> Session::read_extent(std::size_t mi, std::uint64_t offset, std::uint32_t len,
                                             const engine::IoBuffer& buf, bool frozen_view) {
  Member& m = members_[mi];
  TANDEM_CO_TRY(co_await m.m.volume->read(offset, len, buf));
  if (frozen_view && m.preserve) {
    // Checked after the read: a host write that landed during it preserved the block first.
    for (std::uint64_t i = 0; i < len / kBlock; ++i) {
      const std::uint64_t b = offset / kBlock + i;
      if (m.preserve->contains(b)) TANDEM_CO_TRY(co_await m.preserve->read(b, buf.data() + i * kBlock));
    }
  }
  co_return Status{};
}

std::shared_ptr<Session::AheadRead> Session::start_read(std::size_t mi, std::uint64_t off, std::uint32_t len,
                                                        bool frozen_view) {
  auto r = std::make_shared<AheadRead>();
  r->mi = mi;
  r->off = off;
  r->len = len;
  r->buf = members_[mi].m.env->buffers().allocate(len);
  ++reads_in_flight_;
  // The coroutine holds the read: a transfer that stops early drops its queue, and stop()
  // waits for reads_in_flight_ before the volumes may go.
  auto read = [](Session* self, std::shared_ptr<AheadRead> rd, bool frozen) -> asio::awaitable<void> {
    rd->status = co_await self->read_extent(rd->mi, rd->off, rd->len, rd->buf, frozen);
    rd->done = true;
    --self->reads_in_flight_;
    self->reads_done_.notify_all();
  };
  asio::co_spawn(ex_, read(this, r, frozen_view), abort_on_exception);
  return r;
}

asio::awaitable<Status> Session::ship(TransferMode mode, std::uint64_t cycle, std::uint64_t start) {
  Status st = co_await ship_extents(mode, cycle, start);
  // A transfer that stopped early (link lost, pause, error) left reads in flight: they finish
  // before the step ends, so whatever follows may free what they read.
  while (reads_in_flight_ > 0) co_await reads_done_.wait();
  co_return st;
}

asio::awaitable<Status> Session::ship_extents(TransferMode mode, std::uint64_t cycle, std::uint64_t start) {
  const std::uint64_t gen = conn_gen_;
  const auto started = clock_.steady_now();
  const bool is_cycle = mode == TransferMode::cycle;
  if (!is_cycle && start == 0 && state_.initial != InitialState::running) {
    // The whole volume ships now: what the dirty maps hold is covered. Cut them (the frozen sets
    // are discarded) so only writes from now on go into the first cycle.
    for (auto& m : members_) co_await m.m.volume->hold_writes();
    auto frozen_r = co_await freeze_all();
    Status st = frozen_r.ok() ? Status{} : Status(frozen_r.error());
    std::vector<engine::BlockBitmap> frozen = frozen_r.ok() ? std::move(frozen_r).value() : std::vector<engine::BlockBitmap>{};
    if (st) {
      state_.initial = InitialState::running;
      st = co_await persist();
    }
    for (std::size_t i = 0; st && i < members_.size(); ++i) st = co_await members_[i].m.volume->dirty().drop_frozen(frozen[i]);
    for (auto& m : members_) m.m.volume->release_writes();
    TANDEM_CO_TRY(st);
  }
  std::uint64_t frozen_blocks = 0;
  for (auto& m : members_) frozen_blocks += m.frozen ? m.frozen->count() : 0;
  transfer_total_ = is_cycle ? frozen_blocks * kBlock : total_bytes();
  transfer_done_ = 0;
  transfer_started_ = clock_.system_now();
  if (high_water_cycle_ != (is_cycle ? cycle : ~1ull)) {
    high_water_cycle_ = is_cycle ? cycle : ~1ull;
    high_water_ = start;
  }
  const bool resumed = start < high_water_;
  const std::uint64_t resume_high = high_water_;
  const std::uint64_t reshipped_before = bytes_reshipped_;
  bool resume_logged = false;
  const std::string what = is_cycle ? "cycle " + std::to_string(cycle) : std::string("initial sync");
  if (resumed) {
    ++resumes_;
    spdlog::info("session {}: resuming {} at offset {} (sent up to {} before the interruption)", opts_.id, what,
                 start, high_water_);
  }
  // Bytes sent again are counted until the transfer passes where it had got to.
  auto log_reship = [&] {
    if (!resumed || resume_logged) return;
    resume_logged = true;
    spdlog::info("session {}: resume of {} re-shipped {} bytes", opts_.id, what, bytes_reshipped_ - reshipped_before);
  };
  acked_offset_ = start;
  acked_cycle_ = cycle;
  sent_end_ = start;
  shipping_cycle_ = cycle;
  issued_end_ = start;
  awaiting_commit_.reset();
  unacked_.clear();
  unacked_bytes_ = 0;
  pending_hashes_ = 0;
  resend_.clear();
  committed_seen_ = ~0ull;
  state_name_ = state_.initial == InitialState::done || is_cycle ? (state_name_ == "Initializing" ? state_name_ : "Synchronizing")
                                                                 : "Initializing";
  SyncBegin sb{opts_.id, mode, cycle, frozen_blocks, start, opts_.window_bytes, generations_};
  std::vector<std::byte> begin_bytes = encode(sb);
  TANDEM_CO_TRY(co_await send(MsgType::sync_begin, std::move(begin_bytes)));
  const std::uint32_t ext_max = opts_.extent_bytes;
  engine::IoBuffer buf = members_[0].m.env->buffers().allocate(ext_max);
  // Sends an extent whose data is in `data`.
  // A transfer's sends from an earlier, interrupted one are over; their error is stale.
  (void)co_await sends_.wait();
  // Sends an extent whose data is in `data`. With `hold` (the read that owns the data), the
  // frame is queued without waiting for it to be written, so the connection's writer batches
  // many small extents into one TLS write; frames still go out in the order queued.
  auto send_read = [&](std::size_t mi, std::uint64_t off, std::uint32_t len, bool detect_zero,
                       const engine::IoBuffer& data, std::shared_ptr<AheadRead> hold) -> asio::awaitable<Status> {
    const std::uint64_t global = members_[mi].base + off;
    Extent e{opts_.id, cycle, global, len, false, 0, {}};
    if (detect_zero && all_zero(data.data(), len)) {
      e.zero = true;
    } else {
      e.hash = xxh3_64(data.data(), len);
    }
    // At most three corruptions: each costs a reconnect and a resume, and a test wants the
    // session to converge afterwards.
    const std::uint64_t every = opts_.corrupt_extent_every;
    if (!e.zero && every != 0 && ++extents_sent_ % every == 0 && corrupted_ < 3) {
      ++corrupted_;
      // Probe: damage the data after hashing, as a bad NIC or memory would; the destination
      // must catch it by the hash.
      data.data()[len / 2] ^= std::byte{0x5a};
      spdlog::warn("session {}: probe corrupt_extent_every: corrupting the extent at offset {}", opts_.id, global);
    }
    if (!e.zero) co_await pace(len);
    auto header = encode_extent_header(e);
    if (hold) {
      TANDEM_CO_TRY(sends_.first_error());
      // Bounded in frames and (about 16 MiB) in bytes.
      co_await sends_.wait_below(std::clamp<std::size_t>((16u << 20) / len, 2, kSendsInFlight));
      auto task = [](Session* self, std::vector<std::byte> hdr, std::shared_ptr<AheadRead> rd, std::uint32_t n,
                     bool zero) -> asio::awaitable<Status> {
        const std::span<const std::byte> payload = zero ? std::span<const std::byte>{}
                                                        : std::span<const std::byte>(rd->buf.data(), n);
        co_return co_await self->send(MsgType::extent, std::move(hdr), payload);
      };
      sends_.spawn(task(this, std::move(header), std::move(hold), len, e.zero));
    } else {
      TANDEM_CO_TRY(co_await send(MsgType::extent, std::move(header),
                                  e.zero ? std::span<const std::byte>{} : std::span<const std::byte>(data.data(), len)));
    }
    bytes_shipped_ += e.zero ? 0 : len;
    // Re-shipped: below where an interrupted attempt had got to (not a compare-mode resend).
    if (resumed && global < resume_high) bytes_reshipped_ += std::min<std::uint64_t>(len, resume_high - global);
    co_return Status{};
  };
  auto drain_resends = [&]() -> asio::awaitable<Status> {
    while (!resend_.empty()) {
      auto [off, len] = resend_.front();
      resend_.pop_front();
      auto [mi, local] = locate(off);
      TANDEM_CO_TRY(co_await read_extent(mi, local, len, buf, is_cycle));
      TANDEM_CO_TRY(co_await send_read(mi, local, len, false, buf, nullptr));
    }
    co_return Status{};
  };
  // Reads run ahead of the sender (in order, bounded in bytes and count), so the disk sees a
  // queue of reads rather than one at a time between sends.
  std::deque<std::shared_ptr<AheadRead>> ahead;
  std::uint64_t ahead_bytes = 0;
  auto consume = [&]() -> asio::awaitable<Status> {
    std::shared_ptr<AheadRead> r = std::move(ahead.front());
    ahead.pop_front();
    ahead_bytes -= r->len;
    while (!r->done) co_await reads_done_.wait();
    TANDEM_CO_TRY(r->status);
    Member& m = members_[r->mi];
    TANDEM_CO_TRY(co_await wait_window(gen));
    TANDEM_CO_TRY(co_await drain_resends());
    // Before the frame can reach the peer: its answer may be handled before this resumes.
    issued_end_ = std::max(issued_end_, m.base + r->off + r->len);
    if (mode == TransferMode::initial_compare) {
      ++pending_hashes_;
      const ExtentHash eh{opts_.id, m.base + r->off, r->len, xxh3_64(r->buf.data(), r->len)};
      std::vector<std::byte> bytes = encode(eh);
      TANDEM_CO_TRY(co_await send(MsgType::extent_hash, std::move(bytes)));
    } else {
      TANDEM_CO_TRY(co_await send_read(r->mi, r->off, r->len, mode == TransferMode::initial_full, r->buf, r));
    }
    sent_end_ = m.base + r->off + r->len;
    high_water_ = std::max(high_water_, sent_end_);
    unacked_.emplace_back(sent_end_, r->len);
    unacked_bytes_ += r->len;
    if (sent_end_ >= resume_high) log_reship();
    transfer_done_ += r->len;
    co_return Status{};
  };
  for (std::size_t mi = 0; mi < members_.size(); ++mi) {
    Member& m = members_[mi];
    const std::uint64_t size = m.m.volume->size_bytes();
    if (start >= m.base + size) continue;
    std::uint64_t pos = start > m.base ? (start - m.base) : 0;
    while (pos < size) {
      std::uint64_t off = pos;
      std::uint32_t len = 0;
      if (is_cycle) {
        const std::uint64_t b = m.frozen->next_set(pos / kBlock);
        if (b >= m.frozen->blocks()) break;
        const std::uint64_t e = std::min(m.frozen->next_clear(b), b + ext_max / kBlock);
        off = b * kBlock;
        len = static_cast<std::uint32_t>((e - b) * kBlock);
      } else {
        len = static_cast<std::uint32_t>(std::min<std::uint64_t>(ext_max, size - pos));
      }
      while (!ahead.empty() && (ahead.size() >= kReadAheadMax || ahead_bytes + len > kReadAheadBytes)) {
        TANDEM_CO_TRY(co_await consume());
      }
      if (gen != conn_gen_ || stopping_) co_return Error(errc::peer_unreachable, "link lost during transfer");
      if (state_.paused) {
        (void)co_await sends_.wait();  // every queued extent goes out before the pause handshake
        co_return Error(errc::paused, "paused");
      }
      ahead.push_back(start_read(mi, off, len, is_cycle));
      ahead_bytes += len;
      pos = off + len;
    }
  }
  while (!ahead.empty()) TANDEM_CO_TRY(co_await consume());
  // Compare mode: every answer in, every differing extent sent.
  while (pending_hashes_ > 0 || !resend_.empty()) {
    TANDEM_CO_TRY(co_await drain_resends());
    if (pending_hashes_ == 0) break;
    if (gen != conn_gen_ || stopping_) co_return Error(errc::peer_unreachable, "link lost during transfer");
    co_await window_.wait();
  }
  TANDEM_CO_TRY(co_await drain_resends());
  TANDEM_CO_TRY(co_await sends_.wait());  // every extent queued before cycle_end
  log_reship();
  const CycleEnd end_msg{opts_.id, cycle, total_bytes(), generations_};
  std::vector<std::byte> end_bytes = encode(end_msg);
  awaiting_commit_ = cycle;
  TANDEM_CO_TRY(co_await send(MsgType::cycle_end, std::move(end_bytes)));
  while (committed_seen_ != cycle) {
    if (gen != conn_gen_ || stopping_) co_return Error(errc::peer_unreachable, "link lost before the commit");
    co_await done_.wait();
  }
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(clock_.steady_now() - started);
  last_sync_ms_ = static_cast<std::uint64_t>(ms.count());
  transfer_total_ = 0;  // no progress to show until the next transfer
  transfer_done_ = 0;
  last_sync_ = clock_.system_now();
  state_.last_sync_unix_ms = unix_ms(*last_sync_);  // persisted with the cycle's end below
  if (is_cycle) {
    TANDEM_CO_TRY(co_await finish_cycle(cycle));
    spdlog::info("session {}: cycle {} committed: {} blocks in {} ms ({} bytes shipped, {} re-shipped in all)",
                 opts_.id, cycle, frozen_blocks, ms.count(), bytes_shipped_, bytes_reshipped_);
  } else {
    spdlog::info("session {}: initial sync complete in {} ms ({} bytes shipped, {} re-shipped)", opts_.id,
                 ms.count(), bytes_shipped_, bytes_reshipped_);
  }
  state_name_ = "OK";
  co_return Status{};
}

asio::awaitable<Status> Session::finish_cycle(std::uint64_t cycle) {
  TANDEM_ASSERT(state_.transfer_cycle == cycle);
  // Host writes may be inside the copy-on-write hook, using the preserve logs: let them finish
  // and hold new ones while the cycle's frozen sets and logs go away.
  for (auto& m : members_) co_await m.m.volume->hold_writes();
  state_.committed_cycle = cycle;
  state_.transfer_cycle = 0;
  peer_committed_ = cycle;
  Status st = co_await persist();
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
        spdlog::warn("session {}: volume {}: cannot cool the write-intent regions of cycle {}: {} (they stay "
                     "counted as changed until the next cycle)",
                     opts_.id, m.m.volume->id(), cycle, cooled.error().message());
      }
    }
  }
  co_return st;
}

// ---------------------------------------------------------------------------------------------
// Destination

asio::awaitable<Status> Session::on_sync_begin(const SyncBegin& m) {
  if (state_.role != Role::destination) co_return Error(errc::wrong_role, "sync begin sent to a source");
  // Writes of an interrupted transfer finish first (they are below its checkpoint's successor).
  TANDEM_CO_TRY(co_await dwrites_.wait());
  pending_.clear();
  pending_bytes_ = 0;
  awaiting_data_.clear();
  since_checkpoint_ = 0;
  dcycle_ = m.cycle;
  dnext_ = m.start_offset;
  dtransfer_started_ = clock_.steady_now();
  // Acknowledge well within the source's window, or it would wait for us while we wait for it.
  dbatch_ = std::min(opts_.stage_batch_bytes, m.window_bytes / 4);
  dcheckpoint_ = std::min(opts_.initial_checkpoint_bytes, m.window_bytes / 2);
  processed_end_ = m.start_offset;
  spdlog::debug("session {}: transfer begins: mode {}, cycle {}, offset {}, {} frozen blocks", opts_.id,
                static_cast<int>(m.mode), m.cycle, m.start_offset, m.frozen_blocks);
  if (m.mode != TransferMode::cycle) {
    if (state_.initial != InitialState::running || m.start_offset != state_.initial_offset) {
      if (m.start_offset != 0 && !(state_.initial == InitialState::running && m.start_offset <= state_.initial_offset)) {
        co_return Error(errc::bad_message, "initial sync resumes at " + std::to_string(m.start_offset) +
                                               " but this side's checkpoint is " + std::to_string(state_.initial_offset));
      }
    }
    state_.paired = true;
    state_.initial = InitialState::running;
    state_.initial_offset = m.start_offset;
    state_.initial_compare = m.mode == TransferMode::initial_compare;
    state_.committed_cycle = 0;
    TANDEM_CO_TRY(co_await persist_generations(m.generations));
    state_name_ = "Initializing";
    spdlog::info("session {}: initial sync ({}) from {} at offset {}", opts_.id,
                 m.mode == TransferMode::initial_full ? "full copy" : "compare hashes", opts_.peer_name, m.start_offset);
    // What the source sends again is what arrived here but was not yet checkpointed; the source
    // may have lost count (it crashed), this side has not.
    if (received_high_ > m.start_offset) {
      spdlog::info("session {}: initial sync resumes at offset {}: {} bytes received before the interruption "
                   "are shipped again",
                   opts_.id, m.start_offset, received_high_ - m.start_offset);
    }
    dmode_ = m.mode;
    co_return Status{};
  }
  const bool resume = state_.transfer_cycle == m.cycle && m.start_offset > 0;
  if (resume) {
    if (staged_global_end() != m.start_offset) {
      co_return Error(errc::bad_message, "cycle " + std::to_string(m.cycle) + " resumes at " +
                                             std::to_string(m.start_offset) + " but this side staged up to " +
                                             std::to_string(staged_global_end()));
    }
  } else {
    if (m.start_offset != 0) co_return Error(errc::bad_message, "a new cycle must start at offset 0");
    for (auto& mem : members_) {
      std::string path = journal_path(mem);
      auto j = co_await engine::CycleJournal::open(*mem.m.env, std::move(path), m.cycle,
                                                   engine::CycleJournal::capacity_for(m.frozen_blocks), false);
      if (!j) co_return j.error();
      mem.journal = std::move(j).value();
    }
    unsynced_bytes_ = 0;  // a fresh journal
    state_.transfer_cycle = m.cycle;
    TANDEM_CO_TRY(co_await persist());
  }
  dmode_ = TransferMode::cycle;
  if (state_name_ != "Initializing") state_name_ = "Synchronizing";
  co_return Status{};
}

asio::awaitable<Status> Session::on_extent(const Extent& m) {
  if (!dmode_) co_return Error(errc::bad_message, "extent outside a transfer");
  if (m.offset < dnext_ || m.offset + m.length > total_bytes()) {
    if (*dmode_ != TransferMode::initial_compare || !awaiting_data_.contains(m.offset)) {
      co_return Error(errc::bad_message, "extent at " + std::to_string(m.offset) + " out of order or out of range");
    }
  }
  if (!m.zero && xxh3_64(m.data.data(), m.data.size()) != m.hash) {
    spdlog::error("session {}: extent at offset {} ({} bytes) of cycle {} fails its xxh3 hash: corrupted in transit; "
                  "dropping the link to resume",
                  opts_.id, m.offset, m.length, m.cycle);
    co_return Error(errc::bad_message, "extent hash mismatch at offset " + std::to_string(m.offset));
  }
  auto [mi, local] = locate(m.offset);
  Member& mem = members_[mi];
  if (local + m.length > mem.m.volume->size_bytes()) co_return Error(errc::bad_message, "extent crosses a volume end");
  if (*dmode_ != TransferMode::cycle) {
    if (m.cycle != 0) co_return Error(errc::bad_message, "initial-sync extent with a cycle number");
    engine::IoBuffer buf;
    if (!m.zero) {
      buf = mem.m.env->buffers().allocate(m.length);
      std::memcpy(buf.data(), m.data.data(), m.length);
    }
    TANDEM_CO_TRY(dwrites_.first_error());
    co_await dwrites_.wait_below(kDestWritesMax);
    auto write = [](engine::Volume& v, std::uint64_t at, std::uint32_t len, bool zero,
                    engine::IoBuffer data) -> asio::awaitable<Status> {
      if (zero) co_return co_await v.zero_replicated(at, len);
      co_return co_await v.write_replicated(at, len, data);
    };
    dwrites_.spawn(write(*mem.m.volume, local, m.length, m.zero, std::move(buf)));
    awaiting_data_.erase(m.offset);
    received_high_ = std::max(received_high_, m.offset + m.length);
    if (m.offset >= dnext_) {
      dnext_ = m.offset + m.length;
      processed_end_ = dnext_;
    }
    since_checkpoint_ += m.length;
    if (since_checkpoint_ >= dcheckpoint_) TANDEM_CO_TRY(co_await initial_checkpoint());
    co_return Status{};
  }
  if (m.cycle != dcycle_) co_return Error(errc::bad_message, "extent of cycle " + std::to_string(m.cycle) + " during " + std::to_string(dcycle_));
  Pending p{mi, engine::JournalExtent{local, m.length, m.zero, m.hash}, {}};
  if (!m.zero) {
    p.data = mem.m.env->buffers().allocate(m.length);
    std::memcpy(p.data.data(), m.data.data(), m.length);
  }
  pending_bytes_ += m.length;
  pending_.push_back(std::move(p));
  dnext_ = m.offset + m.length;
  if (pending_bytes_ + unsynced_bytes_ >= dbatch_) {
    TANDEM_CO_TRY(co_await stage_flush());
  } else if (pending_.size() >= engine::CycleJournal::kExtentsPerRecordMax) {
    // A full record of small extents: written now, made durable (and acknowledged) with the
    // batch. A crash before the sync loses at most the unacknowledged tail: the journal scan
    // keeps the valid prefix.
    TANDEM_CO_TRY(co_await stage_write());
  }
  co_return Status{};
}

asio::awaitable<Status> Session::stage_flush() {
  if (pending_.empty() && unsynced_bytes_ == 0) co_return Status{};
  TANDEM_CO_TRY(co_await stage_write());
  for (auto& mem : members_) {
    if (mem.journal) TANDEM_CO_TRY(co_await mem.journal->sync());
  }
  unsynced_bytes_ = 0;
  const Ack ack{opts_.id, dcycle_, staged_global_end()};
  std::vector<std::byte> bytes = encode(ack);
  TANDEM_CO_TRY(co_await send(MsgType::ack, std::move(bytes)));
  spdlog::debug("session {}: cycle {} staged up to {}", opts_.id, dcycle_, staged_global_end());
  co_return Status{};
}

asio::awaitable<Status> Session::stage_write() {
  if (pending_.empty()) co_return Status{};
  // One record per member run; data concatenated.
  std::size_t i = 0;
  while (i < pending_.size()) {
    const std::size_t mi = pending_[i].member;
    std::size_t j = i;
    std::uint64_t bytes = 0;
    while (j < pending_.size() && pending_[j].member == mi && j - i < engine::CycleJournal::kExtentsPerRecordMax) {
      if (!pending_[j].e.zero) bytes += pending_[j].e.length;
      ++j;
    }
    Member& mem = members_[mi];
    engine::IoBuffer data = mem.m.env->buffers().allocate(std::max<std::uint64_t>(bytes, 4096));
    std::vector<engine::JournalExtent> exts;
    std::uint64_t at = 0;
    for (std::size_t k = i; k < j; ++k) {
      exts.push_back(pending_[k].e);
      if (!pending_[k].e.zero) {
        std::memcpy(data.data() + at, pending_[k].data.data(), pending_[k].e.length);
        at += pending_[k].e.length;
      }
    }
    TANDEM_CO_TRY(co_await mem.journal->append(exts, data));
    i = j;
  }
  unsynced_bytes_ += pending_bytes_;
  pending_.clear();
  pending_bytes_ = 0;
  co_return Status{};
}

asio::awaitable<Status> Session::initial_checkpoint() {
  TANDEM_CO_TRY(co_await dwrites_.wait());
  for (auto& mem : members_) TANDEM_CO_TRY(co_await mem.m.volume->flush());
  std::uint64_t durable = processed_end_;
  if (!awaiting_data_.empty()) durable = std::min(durable, *awaiting_data_.begin());
  state_.initial_offset = durable;
  TANDEM_CO_TRY(co_await persist());
  since_checkpoint_ = 0;
  const Ack ack{opts_.id, 0, durable};
  std::vector<std::byte> bytes = encode(ack);
  TANDEM_CO_TRY(co_await send(MsgType::ack, std::move(bytes)));
  co_return Status{};
}

asio::awaitable<Status> Session::on_extent_hash(const ExtentHash& m) {
  if (!dmode_ || *dmode_ != TransferMode::initial_compare) co_return Error(errc::bad_message, "hash outside a compare");
  if (m.offset < dnext_ || m.offset + m.length > total_bytes()) co_return Error(errc::bad_message, "hash out of order");
  auto [mi, local] = locate(m.offset);
  Member& mem = members_[mi];
  if (local + m.length > mem.m.volume->size_bytes()) co_return Error(errc::bad_message, "hash crosses a volume end");
  engine::IoBuffer buf = mem.m.env->buffers().allocate(m.length);
  TANDEM_CO_TRY(co_await mem.m.volume->read(local, m.length, buf));
  const bool match = xxh3_64(buf.data(), m.length) == m.hash;
  if (!match) awaiting_data_.insert(m.offset);
  dnext_ = m.offset + m.length;
  processed_end_ = dnext_;
  since_checkpoint_ += m.length;
  const HashResult result{opts_.id, m.offset, m.length, match};
  std::vector<std::byte> bytes = encode(result);
  TANDEM_CO_TRY(co_await send(MsgType::hash_result, std::move(bytes)));
  if (since_checkpoint_ >= dcheckpoint_) TANDEM_CO_TRY(co_await initial_checkpoint());
  co_return Status{};
}

asio::awaitable<Status> Session::on_cycle_end(const CycleEnd& m) {
  if (!dmode_) co_return Error(errc::bad_message, "cycle end outside a transfer");
  if (*dmode_ != TransferMode::cycle) {
    if (!awaiting_data_.empty()) co_return Error(errc::bad_message, "initial sync ended with extents still missing");
    processed_end_ = total_bytes();
    TANDEM_CO_TRY(co_await initial_checkpoint());
    state_.initial = InitialState::done;
    TANDEM_CO_TRY(co_await persist_generations(m.generations));
    dmode_.reset();
    spdlog::info("session {}: initial sync from {} complete; consistent after the first cycle", opts_.id,
                 opts_.peer_name);
    const Committed done{opts_.id, 0};
    std::vector<std::byte> bytes = encode(done);
    TANDEM_CO_TRY(co_await send(MsgType::committed, std::move(bytes)));
    co_return Status{};
  }
  if (m.cycle != dcycle_) co_return Error(errc::bad_message, "cycle end for another cycle");
  TANDEM_CO_TRY(co_await stage_flush());
  // The commit record: from here on the cycle is applied, whatever happens.
  state_.applying_cycle = m.cycle;
  TANDEM_CO_TRY(co_await persist_generations(m.generations));
  TANDEM_CO_TRY(co_await apply_committed(m.cycle));
  dmode_.reset();
  const Committed done{opts_.id, m.cycle};
  std::vector<std::byte> bytes = encode(done);
  TANDEM_CO_TRY(co_await send(MsgType::committed, std::move(bytes)));
  co_return Status{};
}

asio::awaitable<Status> Session::apply_committed(std::uint64_t cycle) {
  std::uint64_t bytes = 0;
  for (auto& mem : members_) {
    if (!mem.journal) continue;
    if (mem.test_image) {
      // A failover test shows the image as of its start: keep what the cycle overwrites.
      for (const auto& e : mem.journal->extents()) {
        TANDEM_CO_TRY(co_await mem.test_image->preserve(e.offset / kBlock, e.length / kBlock));
      }
      TANDEM_CO_TRY(co_await mem.test_image->sync());  // preserved before the base changes
    }
    bytes += mem.journal->staged_bytes();
    TANDEM_CO_TRY(co_await mem.journal->apply(*mem.m.volume));
  }
  state_.committed_cycle = cycle;
  state_.applying_cycle = 0;
  state_.transfer_cycle = 0;
  last_sync_ = clock_.system_now();
  state_.last_sync_unix_ms = unix_ms(*last_sync_);
  if (dtransfer_started_) {
    // As the source counts it: from the transfer's start (or resume) to the cycle in place.
    const auto took = clock_.steady_now() - *dtransfer_started_;
    last_sync_ms_ = static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::milliseconds>(took).count());
    dtransfer_started_.reset();
  }
  TANDEM_CO_TRY(co_await persist());
  for (auto& mem : members_) {
    if (mem.journal) TANDEM_CO_TRY(co_await mem.journal->remove());
    mem.journal.reset();
  }
  state_name_ = "OK";
  spdlog::info("session {}: cycle {} committed and applied ({} bytes)", opts_.id, cycle, bytes);
  co_return Status{};
}

// ---------------------------------------------------------------------------------------------
// Control: the operator's actions

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
  if (!state_.paused) state_.resume_to_sync = resume_to_sync;
  state_.paused = true;
  TANDEM_CO_TRY(co_await persist());
  if (state_.role == Role::source) {
    // The transfer stops at the next extent boundary; wait until it has.
    wake_.notify_all();
    while (busy_) co_await idle_.wait();
  } else {
    // Not in the middle of a data message: what it stages is whole.
    auto held = co_await dest_mu_.scoped();
    if (!dmode_) co_return Status{};
    // Everything received becomes durable and acknowledged: it is the restart address.
    if (*dmode_ == TransferMode::cycle) {
      TANDEM_CO_TRY(co_await stage_flush());
    } else {
      TANDEM_CO_TRY(co_await initial_checkpoint());
    }
  }
  co_return Status{};
}

asio::awaitable<Status> Session::on_control(const Control& c) {
  if (c.op == ControlOp::resume) {
    if (!state_.paused) {
      // Already running here: a resume whose answer was lost with the link (this side resumed,
      // the asker did not hear it) is asked again, and must not leave the asker paused for good.
      // Found by the simulation (seed 5032).
      spdlog::info("session {}: resume asked by the peer: not paused here", opts_.id);
      peer_paused_ = false;
      wake_.notify_all();
      co_return co_await reply_control(c, true, 0, {});
    }
    state_.paused = false;
    state_.local_only_paused = false;
    peer_paused_ = false;
    TANDEM_CO_TRY(co_await persist());
    spdlog::info("session {}: resumed by the peer", opts_.id);
    wake_.notify_all();
    co_return co_await reply_control(c, true, 0, {});
  }
  if (state_.role == Role::destination) {
    // From the source, which has stopped shipping: make what arrived durable and say where
    // the transfer goes on.
    TANDEM_CO_TRY(co_await pause_here(c.resume_to_sync));
    state_.local_only_paused = false;
    peer_paused_ = true;
    TANDEM_CO_TRY(co_await persist());
    // The initial sync's checkpoint while it runs; else the staged end of the cycle in flight,
    // or 0: no cycle is staged here, so the next one starts at its beginning (the initial sync's
    // final checkpoint, the volume's end, is no place to start a cycle).
    const std::uint64_t restart = state_.initial != InitialState::done ? state_.initial_offset
                                  : state_.transfer_cycle != 0          ? staged_global_end()
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
  Status st = co_await pause_here(resume_to_sync);
  if (!st) co_return ActionResult{Verdict::failed, "pause failed: " + st.error().message()};
  bool both = false;
  if (conn_) {
    auto reply = co_await request(ControlOp::pause, state_.resume_to_sync);
    both = reply && reply->ok;
    if (both && state_.role == Role::source && (plan_ == Plan::initial || plan_ == Plan::cycle)) {
      plan_start_ = reply->restart_offset;  // the destination's durable point: resume there
    }
    if (reply && !reply->ok) spdlog::warn("session {}: the peer did not pause: {}", opts_.id, reply->message);
  }
  state_.local_only_paused = !both;
  if (both) peer_paused_ = true;
  st = co_await persist();
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
  auto reply = co_await request(ControlOp::resume, false);
  if (!reply || !reply->ok) {
    std::string why = reply ? reply->message : "the peer " + opts_.peer_name + " did not answer";
    co_return ActionResult{Verdict::failed, "Operation resume failed: " + why + "."};
  }
  state_.paused = false;
  state_.local_only_paused = false;
  peer_paused_ = false;
  Status st = co_await persist();
  if (!st) co_return ActionResult{Verdict::failed, "resume failed: " + st.error().message()};
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
  sit.test_running = test_running_;
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
      state_.phase = Phase::failing_over;
      state_.reverse = args.reverse;
      Status st = co_await persist();
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
      state_.phase = Phase::reprotecting;
      exchange_done_ = false;
      Status st = co_await persist();
      if (!st) co_return ActionResult{Verdict::failed, "reprotect failed: " + st.error().message()};
      start_background(run_reprotect());
      co_return ActionResult{};
    }
    default:
      break;
  }
  std::string msg = "Operation " + std::string(action_name(a)) + " is not available in this version of tandem.";
  co_return ActionResult{Verdict::not_allowed, std::move(msg)};
}

}  // namespace tandem::replication

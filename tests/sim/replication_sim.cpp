// Plan: a deterministic simulation of two replicating sites, after leveldb's fault-injection
// env and TigerBeetle's VOPR. One process, one thread, one seed.
//
// Two sites, each with its own io_context, its volumes on the fault-injecting disk (FaultEnv)
// and a real replication::Session (source on site A, destination on site B). Between them a
// simulated link (SimChannel) that delivers each frame after a seeded delay, in order, and that
// the run cuts, reconnects, stalls (frames held for seconds, none lost), partitions (cut, and no
// new link for a while) and corrupts (a flipped byte in an extent, which the destination must
// catch by its hash). Time is virtual (SimClock): it moves only when every handler that is
// ready has run, to the next timer's deadline, so a run is a pure function of its seed.
//
// A host writer on the source stamps blocks in one total order (one write at a time, some with
// FUA, some followed by a flush) and keeps the model: the history of writes that count. Operators
// act at seeded instants: sync, pause and resume from either site, failover test start and stop
// on the destination, planned failover (and failback, with or without "reverse") on the source,
// unplanned failover on the destination, reprotect on a source that failed over. The host
// follows the source: at once on an unplanned failover (the writes after the promoted cycle are
// lost), when the roles have swapped on a planned one. Either site crashes inside a random disk
// operation: from then on its disk operations fail and its link is gone; it winds down and a new
// process opens the same disks and recovers. Half the crashes are a process kill (SIGKILL: what
// it wrote stays) and half a power loss (each write no flush covered is dropped, kept or torn at
// 512-byte sectors, on the data and the metadata alike).
// The model is a series of epochs: an image and the writes after it, in order. An unplanned
// failover or a power loss at the source starts a new epoch from the image the source has then
// (a power loss keeps the older ones: the destination may hold one of their images until its
// next cycle commits).
// After every step the invariants are checked:
//   - the destination's image (across every volume of the group) is an epoch's image after some
//     prefix of its writes: a committed cycle, never a mix, and never a write an unplanned
//     failover discarded (once reprotect's first cycle has overwritten them); it never goes back
//     to an older epoch or a shorter prefix;
//   - an unplanned failover starts from such an image;
//   - the source's image holds every write acknowledged; after a power loss, every write
//     acknowledged as durable (FUA, or before a flush of its volume that completed);
//   - a failover test image is also a prefix, and does not change while the test runs;
//   - a session's restart address never moves back within a transfer on one link...
//     (checked loosely: the destination's committed cycle never goes back);
//   - never two destinations; every state shown fits the side's role, and none is Error;
// and at the end, with the link restored, the pauses and tests lifted and any failover
// reprotected, the destination converges to the source, both sides OK.
//
// Usage: replication_sim [--seed N] [--seeds COUNT] [--first N] [--steps N]. A failure prints
// the seed and the command that replays it. TANDEM_SIM_SEEDS overrides --seeds.
#include <spdlog/spdlog.h>
#include <unistd.h>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "fault_env.h"
#include "tandem/common/async.h"
#include "tandem/engine/volume.h"
#include "tandem/replication/session.h"

namespace tandem::sim {
namespace {

using replication::Action;
using replication::MsgType;
using replication::Role;
using replication::Session;
constexpr std::uint64_t kBlock = 4096;
using Nanos = std::chrono::nanoseconds;

// A failed invariant: the run stops and reports its seed.
struct Violation {
  std::string what;
};

// The completion of the simulation's own coroutines: a violation found inside one leaves
// io_context::poll() and ends the run (the product's coroutines keep abort_on_exception).
void rethrow(std::exception_ptr e) {
  if (e) std::rethrow_exception(e);
}

[[noreturn]] void violated(std::string what) { throw Violation{std::move(what)}; }

// ---------------------------------------------------------------------------------------------
// Virtual time

class SimClock;

class SimTimer final : public engine::Timer {
 public:
  SimTimer(SimClock& c, asio::any_io_executor ex) : clock_(c), ex_(std::move(ex)) {}
  ~SimTimer() override;
  asio::awaitable<bool> wait_for(Nanos d) override;
  void cancel() override;
  void fire(bool expired) {
    auto p = std::move(pending_);
    pending_ = {};
    if (p) p(expired);
  }

 private:
  SimClock& clock_;
  asio::any_io_executor ex_;
  MoveFunction<void(bool)> pending_;
  std::optional<std::pair<std::int64_t, std::uint64_t>> key_;
  friend class SimClock;
};

class SimClock final : public engine::Clock {
 public:
  explicit SimClock(std::uint64_t seed) : rng_(seed) {}
  std::chrono::steady_clock::time_point steady_now() override {
    return std::chrono::steady_clock::time_point(Nanos(now_));
  }
  std::chrono::system_clock::time_point system_now() override {
    return std::chrono::system_clock::time_point(std::chrono::seconds(1'800'000'000) + Nanos(now_));
  }
  std::unique_ptr<engine::Timer> make_timer(asio::any_io_executor ex) override {
    return std::make_unique<SimTimer>(*this, std::move(ex));
  }
  std::uint64_t random_u64() override { return rng_(); }

  [[nodiscard]] std::int64_t now() const { return now_; }
  std::pair<std::int64_t, std::uint64_t> add(std::int64_t deadline, SimTimer* t) {
    const auto key = std::make_pair(deadline, next_seq_++);
    queue_.emplace(key, t);
    return key;
  }
  void remove(std::pair<std::int64_t, std::uint64_t> key) { queue_.erase(key); }
  [[nodiscard]] std::optional<std::int64_t> next_deadline() const {
    if (queue_.empty()) return std::nullopt;
    return queue_.begin()->first.first;
  }
  // Moves time to the earliest deadline and fires every timer due then, in the order armed.
  void fire_earliest() {
    const std::int64_t t = queue_.begin()->first.first;
    now_ = std::max(now_, t);
    while (!queue_.empty() && queue_.begin()->first.first == t) {
      SimTimer* timer = queue_.begin()->second;
      queue_.erase(queue_.begin());
      timer->key_.reset();
      timer->fire(true);
    }
  }
  void set_now(std::int64_t t) { now_ = std::max(now_, t); }

 private:
  std::mt19937_64 rng_;
  std::int64_t now_ = 0;
  std::uint64_t next_seq_ = 0;
  std::map<std::pair<std::int64_t, std::uint64_t>, SimTimer*> queue_;
};

SimTimer::~SimTimer() {
  if (key_) clock_.remove(*key_);
}

asio::awaitable<bool> SimTimer::wait_for(Nanos d) {
  return asio::async_initiate<const asio::use_awaitable_t<>&, void(bool)>(
      [this, d](auto handler) {
        auto ex = asio::get_associated_executor(handler);
        pending_ = [h = std::move(handler), ex](bool expired) mutable {
          asio::post(ex, [h = std::move(h), expired]() mutable { h(expired); });
        };
        key_ = clock_.add(clock_.now() + std::max<std::int64_t>(d.count(), 0), this);
      },
      asio::use_awaitable);
}

void SimTimer::cancel() {
  if (!key_) return;
  clock_.remove(*key_);
  key_.reset();
  fire(false);
}

// ---------------------------------------------------------------------------------------------
// The link

struct Frame {
  MsgType type;
  std::vector<std::byte> bytes;
  std::int64_t deliver_at;
};

class SimConnection;

// One direction of a connection: frames for `to`, delivered by a loop on its executor.
struct Direction {
  std::deque<Frame> frames;
  WaitQueue arrived;
  std::unique_ptr<engine::Timer> delay;
  bool loop_done = false;
  std::optional<MsgType> handling;  // the frame the session is handling now, if any
};

class SimConnection : public std::enable_shared_from_this<SimConnection> {
 public:
  SimConnection(SimClock& clock, std::mt19937_64& rng, std::uint64_t& corrupted_total)
      : clock_(clock), rng_(rng), corrupted_total_(corrupted_total) {}
  bool closed = false;
  std::string reason;
  Direction dir[2];                               // dir[i]: frames for side i
  std::uint64_t corrupt_next_extent[2] = {0, 0};  // to side i: flip a byte in the next extent
  std::int64_t stalled_until[2] = {0, 0};         // to side i: nothing arrives before then

  // Holds every frame to side `to` until `until`, those queued and those sent meanwhile (a path
  // that stalls): they arrive late, in order, none lost.
  void stall(int to, std::int64_t until) {
    stalled_until[to] = std::max(stalled_until[to], until);
    for (auto& f : dir[to].frames) f.deliver_at = std::max(f.deliver_at, until);
  }

  Status send(int from, MsgType type, std::span<const std::byte> fields, std::span<const std::byte> data) {
    if (closed) return Error(std::make_error_code(std::errc::not_connected), "link down: " + reason);
    const int to = 1 - from;
    Frame f{type, {}, 0};
    f.bytes.assign(fields.begin(), fields.end());
    f.bytes.insert(f.bytes.end(), data.begin(), data.end());
    if (type == MsgType::extent && !data.empty() && corrupt_next_extent[to] > 0) {
      --corrupt_next_extent[to];
      ++corrupted_total_;
      f.bytes[fields.size() + data.size() / 2] ^= std::byte{0x5a};  // after hashing, as a bad NIC would
    }
    // In order: never before the frame ahead of it.
    const std::int64_t earliest = dir[to].frames.empty() ? 0 : dir[to].frames.back().deliver_at;
    f.deliver_at = std::max(
        {earliest, stalled_until[to], clock_.now() + static_cast<std::int64_t>(rng_() % 2'000'000)});  // < 2 ms
    dir[to].frames.push_back(std::move(f));
    dir[to].arrived.notify_all();
    return {};
  }
  void close(const std::string& why) {
    if (closed) return;
    closed = true;
    reason = why;
    for (auto& d : dir) {
      d.arrived.notify_all();
      if (d.delay) d.delay->cancel();
    }
  }

 private:
  SimClock& clock_;
  std::mt19937_64& rng_;
  std::uint64_t& corrupted_total_;
};

class SimChannel final : public replication::PeerChannel {
 public:
  SimChannel(std::shared_ptr<SimConnection> c, int side) : c_(std::move(c)), side_(side) {}
  asio::awaitable<Status> send(MsgType type, std::span<const std::byte> fields,
                               std::span<const std::byte> data) override {
    co_return c_->send(side_, type, fields, data);
  }
  void close(const std::string& reason) override { c_->close(reason); }

 private:
  std::shared_ptr<SimConnection> c_;
  int side_;
};

// ---------------------------------------------------------------------------------------------
// Sites

struct Site {
  std::string name;
  std::unique_ptr<asio::io_context> ctx = std::make_unique<asio::io_context>();
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> guard{ctx->get_executor()};
  std::unique_ptr<test::FaultEnv> env = std::make_unique<test::FaultEnv>(2u << 20);
  std::vector<std::unique_ptr<engine::Volume>> volumes;
  std::unique_ptr<Session> session;
  // Failover test (destination): the image's volumes, as the daemon would export them.
  std::vector<engine::Volume*> test_volumes;
  std::optional<std::vector<std::vector<std::byte>>> test_image_at_start;
  bool action_running = false;        // one operator action at a time per site, as the API serializes
  Role role_at_start = Role::source;  // as configured (the role on disk wins once written)
};

// The host writer's model: every write issued, in order.
struct Write {
  std::uint64_t seq;
  std::size_t volume;
  std::uint64_t block;
};

// The model's unit: an image and the writes after it, in order.
struct Epoch {
  std::uint64_t id = 0;
  std::vector<std::vector<std::byte>> base;  // per member volume
  std::vector<Write> writes;
  // Set when a power loss at the source ended the epoch: the image the source had after it.
  // A destination may then hold a crash image of a prefix (a cycle cut before the loss and
  // shipped after it): any block as the power loss left it at the source, if no write newer
  // than the prefix shows in it.
  std::vector<std::vector<std::byte>> survived;
};

struct Options {
  std::uint64_t seed = 1;
  int steps = 60;
  bool verbose = false;
};

class Simulation {
 public:
  explicit Simulation(Options o) : opts_(o), rng_(o.seed), clock_(o.seed ^ 0x9e3779b97f4a7c15ull) {
    members_ = rng_() % 3 == 0 ? 3 : 1;  // a consistency group of three, or one volume
    blocks_ = 64 + rng_() % 192;         // 256 KiB .. 1 MiB per volume
    rpo_seconds_ = 1 + static_cast<std::uint32_t>(rng_() % 3);
    a_.name = "site-a";
    b_.name = "site-b";
    for (Site* s : {&a_, &b_}) s->env->clock_override = &clock_;
    flushed_upto_.assign(members_, 0);
    start_epoch(std::vector<std::vector<std::byte>>(members_, std::vector<std::byte>(blocks_ * kBlock)), false);
  }

  void run() {
    open_site(a_, Role::source);
    open_site(b_, Role::destination);
    connect();
    for (int step = 0; step < opts_.steps; ++step) {
      act_randomly();
      run_for(static_cast<std::int64_t>(rng_() % 400) * 1'000'000);  // up to 0.4 s
      if (crashed_ != nullptr) restart(*crashed_);
      check();
    }
    settle();
    shutdown();
  }

  [[nodiscard]] std::string summary() const {
    return "members " + std::to_string(members_) + ", " + std::to_string(blocks_) + " blocks each, rpo " +
           std::to_string(rpo_seconds_) + " s, " + std::to_string(issued_.size()) + " writes (" +
           std::to_string(lost_) + " lost to unplanned failovers), " + std::to_string(connects_) + " connections, " +
           std::to_string(corrupted_) + " frames corrupted, " + std::to_string(tests_) + " failover tests, " +
           std::to_string(pauses_) + " pauses, " + std::to_string(failovers_) + " failovers, " +
           std::to_string(reprotects_) + " reprotects, " + std::to_string(crashes_) + " crashes (" +
           std::to_string(power_losses_) + " power losses), " + std::to_string(stalls_) + " stalls, " +
           std::to_string(partitions_) + " partitions, " + std::to_string(epochs_.back().id) + " epochs, virtual " +
           std::to_string(clock_.now() / 1'000'000) + " ms";
  }

 private:
  // Runs every site's ready handlers, then moves time to the next deadline, until `dur` of
  // virtual time has passed. Bounded: a run that never goes idle is a livelock.
  void run_for(std::int64_t dur) {
    const std::int64_t until = clock_.now() + dur;
    std::uint64_t handlers = 0;
    for (;;) {
      std::size_t n = 0;
      for (Site* s : {&a_, &b_}) n += s->ctx->poll();
      handlers += n;
      if (handlers > 20'000'000) violated("livelock: 20 million handlers without the time moving on");
      if (n > 0) continue;
      const auto next = clock_.next_deadline();
      if (!next || *next > until) {
        clock_.set_now(until);
        return;
      }
      clock_.fire_earliest();
      handlers = 0;
    }
  }

  std::string vol_id(std::size_t i) const { return "vol" + std::to_string(i); }

  void open_site(Site& s, Role role) {
    s.role_at_start = role;
    for (std::size_t i = 0; i < members_; ++i) {
      engine::VolumeOptions vo{vol_id(i), vol_id(i) + ".data", blocks_ * kBlock, vol_id(i) + ".meta", {}};
      vo.dirty.region_bytes = 16 * 1024;
      vo.dirty.intent_regions_max = 8;
      auto v = sync(s, engine::Volume::open(*s.env, std::move(vo)));
      if (!v) violated(s.name + ": volume open: " + v.error().message());
      s.volumes.push_back(std::move(v).value());
    }
    replication::SessionOptions so;
    so.id = "s-sim";
    so.role = role;
    for (auto& v : s.volumes) so.members.push_back({v.get(), s.env.get(), "state"});
    so.peer_name = &s == &a_ ? "site-b" : "site-a";
    so.rpo_seconds = rpo_seconds_;
    so.window_bytes = 1 << 20;  // the smallest the protocol takes: acks and the window matter
    so.extent_bytes = 64 * 1024;
    so.stage_batch_bytes = 64 * 1024;
    so.initial_checkpoint_bytes = 128 * 1024;
    Site* site = &s;
    so.export_test = [site](std::vector<replication::TestImageExport> images) -> asio::awaitable<Status> {
      site->test_volumes.clear();
      for (const auto& e : images) site->test_volumes.push_back(e.image);
      co_return Status{};
    };
    so.unexport_test = [site]() -> asio::awaitable<void> {
      site->test_volumes.clear();
      co_return;
    };
    auto sess = sync(s, Session::open(s.ctx->get_executor(), std::move(so)));
    if (!sess) violated(s.name + ": session open: " + sess.error().message());
    s.session = std::move(sess).value();
  }

  // Runs one coroutine to completion on a site, moving time as needed.
  template <typename T>
  T sync(Site& s, asio::awaitable<T> aw) {
    std::optional<T> out;
    asio::co_spawn(*s.ctx, std::move(aw), [&out](std::exception_ptr e, T v) {
      if (e) std::rethrow_exception(e);
      out.emplace(std::move(v));
    });
    for (int i = 0; i < 100000 && !out; ++i) run_for(1'000'000);
    if (!out) violated(s.name + ": an operation did not complete in 100 s of virtual time");
    return std::move(*out);
  }
  void sync(Site& s, asio::awaitable<void> aw) {
    bool done = false;
    asio::co_spawn(*s.ctx, std::move(aw), [&done](std::exception_ptr e) {
      if (e) std::rethrow_exception(e);
      done = true;
    });
    for (int i = 0; i < 100000 && !done; ++i) run_for(1'000'000);
    if (!done) violated(s.name + ": an operation did not complete in 100 s of virtual time");
  }

  // The link -----------------------------------------------------------------------------

  static asio::awaitable<void> deliver(Simulation* sim, std::shared_ptr<SimConnection> c, int side) {
    Site& to = side == 0 ? sim->a_ : sim->b_;
    Direction& d = c->dir[side];
    d.delay = sim->clock_.make_timer(to.ctx->get_executor());
    while (!c->closed) {
      if (d.frames.empty()) {
        co_await d.arrived.wait();
        continue;
      }
      const std::int64_t wait = d.frames.front().deliver_at - sim->clock_.now();
      if (wait > 0) {
        (void)co_await d.delay->wait_for(Nanos(wait));
        continue;
      }
      Frame f = std::move(d.frames.front());
      d.frames.pop_front();
      d.handling = f.type;
      Status st = co_await to.session->handle(f.type, f.bytes);
      d.handling.reset();
      if (!st) {
        // The only frames a session may refuse here are those the simulation corrupted: any
        // other refusal is the two sides disagreeing about the protocol.
        // A link that went down while the frame was handled (its answer could not be sent)
        // is no refusal either.
        if (st.error().message().find("hash mismatch") == std::string::npos && !to.env->dead && !c->closed) {
          violated(to.name + " refused a frame the simulation did not damage: " + st.error().message());
        }
        c->close(to.name + " refused a frame: " + st.error().message());
      }
    }
    d.delay.reset();
    d.loop_done = true;
    if (c == sim->conn_) to.session->detach(c->reason);
    if (c->dir[0].loop_done && c->dir[1].loop_done && c == sim->conn_) sim->conn_.reset();
  }

  void connect() {
    if (conn_ || crashed_ != nullptr) return;  // a crashed process takes no new link
    if (clock_.now() < partitioned_until_) return;
    conn_ = std::make_shared<SimConnection>(clock_, rng_, corrupted_);
    ++connects_;
    a_.session->attach(std::make_shared<SimChannel>(conn_, 0));
    b_.session->attach(std::make_shared<SimChannel>(conn_, 1));
    asio::co_spawn(*a_.ctx, deliver(this, conn_, 0), rethrow);
    asio::co_spawn(*b_.ctx, deliver(this, conn_, 1), rethrow);
  }

  // Operators and the host --------------------------------------------------------------

  static std::vector<std::byte> stamp(std::uint64_t seq, std::size_t vol, std::uint64_t block) {
    std::vector<std::byte> out(kBlock);
    for (std::size_t i = 0; i + 24 <= kBlock; i += 24) {
      std::memcpy(out.data() + i, &seq, 8);
      const std::uint64_t v = vol;
      std::memcpy(out.data() + i + 8, &v, 8);
      std::memcpy(out.data() + i + 16, &block, 8);
    }
    return out;
  }

  // The host writes to whichever site is its source now (writer_), one write at a time.
  static asio::awaitable<void> host_writes(Simulation* sim, int count) {
    for (int i = 0; i < count; ++i) {
      Site& to = *sim->writer_;
      const std::size_t vol = sim->rng_() % sim->members_;
      const std::uint64_t block = sim->rng_() % sim->blocks_;
      const bool fua = sim->rng_() % 4 == 0;
      const std::uint64_t seq = sim->next_seq_++;
      const Write w{seq, vol, block};
      sim->issued_.emplace(seq, w);
      sim->epochs_.back().writes.push_back(w);
      engine::IoBuffer buf = to.env->buffers().allocate(kBlock);
      const auto data = stamp(seq, vol, block);
      std::memcpy(buf.data(), data.data(), kBlock);
      Status st = co_await to.volumes[vol]->write(block * kBlock, kBlock, buf, fua);
      if (!st && to.env->dead) {
        // The site crashed under it: the write may or may not be on its disk. The restart
        // looks (restart()).
        sim->uncertain_ = seq;
        break;
      }
      if (!st || &to != sim->writer_) {
        // Refused (read-only during a failover, say): it never happened. Or the host moved to
        // the other site meanwhile (an unplanned failover): it is lost with the old source.
        sim->forget(seq);
        break;
      }
      sim->acked_ = seq;
      if (fua) sim->fua_acked_.insert(seq);
      if (sim->opts_.verbose)
        spdlog::debug("sim: write {} to {} block {}{} acknowledged", seq, vol, block, fua ? " (FUA)" : "");
      if (sim->rng_() % 8 == 0) {
        // Every write to this volume acknowledged before the flush is durable once it completes.
        const std::uint64_t upto = sim->acked_;
        if (co_await to.volumes[vol]->flush()) sim->flushed_upto_[vol] = std::max(sim->flushed_upto_[vol], upto);
      }
    }
    sim->writer_busy_ = false;
  }

  // Takes a write out of the model (it is not part of what the sites must hold).
  void forget(std::uint64_t seq) {
    std::erase_if(epochs_.back().writes, [seq](const Write& w) { return w.seq == seq; });
  }

  // Starts a new epoch from `base`; keep_older: a destination may still hold an older one's image.
  void start_epoch(std::vector<std::vector<std::byte>> base, bool keep_older) {
    if (!keep_older) epochs_.clear();
    epochs_.push_back({next_epoch_++, std::move(base), {}, {}});
  }
  static std::vector<std::vector<std::byte>> copy_of(const std::vector<std::span<const std::byte>>& image) {
    std::vector<std::vector<std::byte>> out;
    for (const auto& v : image) out.emplace_back(v.begin(), v.end());
    return out;
  }

  Site& other(Site& s) { return &s == &a_ ? b_ : a_; }

  // The host moved to `s` (a failover): the trackers of the destination start over.
  void host_moves_to(Site& s) {
    writer_ = &s;
    committed_seen_ = 0;
    dest_at_ = {};
  }

  static asio::awaitable<void> operator_action(Simulation* sim, Site* s, Action a, replication::ActionArgs args) {
    auto r = co_await s->session->act(a, args);
    if (sim->opts_.verbose) {
      spdlog::info("sim: {} {} -> {}", s->name, replication::action_name(a), r.ok() ? "ok" : r.message);
    }
    if (s->env->dead) {
      // The site crashed under the action: whatever it did is for the restart to find (an
      // unplanned failover that got far enough goes on when the session opens again).
      s->action_running = false;
      co_return;
    }
    if (a == Action::start_test && r.ok()) {
      ++sim->tests_;
      auto image = co_await sim->read_all(*s, s->test_volumes);
      if (s->env->dead) {
        s->action_running = false;
        co_return;
      }
      s->test_image_at_start = std::move(image);
      sim->check_prefix(view(*s->test_image_at_start), "the failover test image at its start");
    }
    if (a == Action::stop_test && r.ok()) s->test_image_at_start.reset();
    if (a == Action::pause && r.ok()) ++sim->pauses_;
    if (a == Action::failover_planned && r.ok()) ++sim->failovers_;
    if (a == Action::reprotect && r.ok()) ++sim->reprotects_;
    if (a == Action::failover_unplanned && r.ok()) sim->host_follows_unplanned_failover(*s);
    s->action_running = false;
  }

  // `s` failed over (unplanned) and is the source now, at the last cycle it committed: the
  // writes after it are lost (at most a cycle's), and the host writes here from now on.
  void host_follows_unplanned_failover(Site& s) {
    ++failovers_;
    const Match m = check_prefix(visible(s), "the image an unplanned failover starts from");
    for (const auto& e : epochs_) {
      if (e.id < m.epoch) continue;
      for (const auto& w : e.writes) lost_ += w.seq > m.k ? 1 : 0;
    }
    start_epoch(copy_of(visible(s)), false);
    host_moves_to(s);
  }

  void spawn_action(Site& s, Action a, bool force = false, bool reverse = false) {
    if (s.action_running) return;
    if (a == Action::stop_test) check_test_image(s);  // before it goes
    s.action_running = true;
    replication::ActionArgs args;
    args.force = force;
    args.reverse = reverse;
    asio::co_spawn(*s.ctx, operator_action(this, &s, a, args), rethrow);
  }

  // A failover test image never changes under the test.
  void check_test_image(Site& s) {
    if (!s.test_image_at_start || s.test_volumes.empty() || s.env->dead) return;
    auto now = sync(s, read_all(s, s.test_volumes));
    if (s.env->dead) return;  // it crashed during the read: its restart reopens the test
    if (now != *s.test_image_at_start) violated("the failover test image changed under the test");
  }

  void act_randomly() {
    if (crashed_ != nullptr) restart(*crashed_);  // a crash inside the last step's checks
    Site& src = *writer_;
    Site& dst = other(src);
    const auto pick = rng_() % 100;
    if (pick < 42) {
      if (!writer_busy_) {
        writer_busy_ = true;
        asio::co_spawn(*src.ctx, host_writes(this, 1 + static_cast<int>(rng_() % 24)), rethrow);
      }
    } else if (pick < 49) {
      spawn_action(src, Action::sync);
    } else if (pick < 54) {
      if (conn_) conn_->close("the simulation cut the link");
    } else if (pick < 63) {
      connect();
    } else if (pick < 65) {
      if (conn_) conn_->corrupt_next_extent[rng_() % 2] += 1;
    } else if (pick < 67) {
      if (conn_) {
        ++stalls_;
        conn_->stall(static_cast<int>(rng_() % 2), clock_.now() + static_cast<std::int64_t>(rng_() % 3000) * 1'000'000);
      }
    } else if (pick < 68) {
      // A partition: the link goes and no new one comes up for up to 4 s.
      ++partitions_;
      partitioned_until_ = clock_.now() + static_cast<std::int64_t>(rng_() % 4000) * 1'000'000;
      if (conn_) conn_->close("the simulation partitioned the sites");
    } else if (pick < 74) {
      spawn_action(rng_() % 2 == 0 ? a_ : b_, Action::pause);
    } else if (pick < 81) {
      spawn_action(rng_() % 2 == 0 ? a_ : b_, Action::resume);
    } else if (pick < 87) {
      spawn_action(dst, Action::start_test);
    } else if (pick < 92) {
      spawn_action(dst, Action::stop_test);
    } else if (pick < 95) {
      spawn_action(src, Action::failover_planned, false, rng_() % 2 == 0);
    } else if (pick < 97) {
      spawn_action(dst, Action::failover_unplanned);
    } else if (pick < 99) {
      spawn_action(src, Action::reprotect);
    } else {
      arm_crash(rng_() % 2 == 0 ? a_ : b_);
    }
  }

  // Crashes and restarts --------------------------------------------------------------------

  // The site crashes (SIGKILL) inside one of its next few disk operations: from that instant
  // nothing it does reaches its disks or the peer. What it had written stays.
  void arm_crash(Site& s) {
    if (crashed_ != nullptr || a_.env->on_op || b_.env->on_op) return;  // one crash at a time
    const std::uint64_t at = s.env->ops + 1 + rng_() % 64;
    power_loss_ = rng_() % 2 == 0;
    Site* site = &s;
    s.env->on_op = [this, site, at](std::uint64_t op) {
      if (op < at || site->env->dead) return;
      site->env->dead = true;
      crashed_ = site;
      ++crashes_;
      if (power_loss_) ++power_losses_;
      if (conn_) conn_->close(site->name + " crashed");
    };
  }

  // The crashed process winds down (every disk operation fails, the link is gone) and a new one
  // starts over the same disks: its volumes and session recover from what is on them.
  void restart(Site& s) {
    crashed_ = nullptr;
    for (int i = 0; i < 2000 && (s.action_running || (writer_ == &s && writer_busy_) || conn_); ++i) {
      run_for(10'000'000);
    }
    if (s.action_running || (writer_ == &s && writer_busy_)) violated(s.name + ": work still running after a crash");
    sync(s, s.session->stop());
    s.session.reset();
    for (auto& v : s.volumes) (void)sync(s, v->close());
    s.volumes.clear();
    s.test_volumes.clear();
    s.test_image_at_start.reset();
    auto env = std::make_unique<test::FaultEnv>(2u << 20);
    env->adopt(*s.env);
    if (power_loss_) {
      // The disks keep what a flush made durable, and of the rest each write dropped, kept or torn.
      for (const auto& [path, st] : s.env->disks()) env->put(path, st->crash_image(rng_));
    }
    env->clock_override = &clock_;
    s.env = std::move(env);
    open_site(s, s.role_at_start);
    if (&s != writer_ && s.session->role() == Role::source &&
        s.session->status().state == replication::State::failed_over && other(s).session->role() == Role::source) {
      host_follows_unplanned_failover(s);  // it was under way when the site crashed
    }
    if (power_loss_ && &s == writer_ && s.session->role() == Role::source) {
      // What the host reads now is what it has: a new epoch, once every durable write is there.
      check_durable(s);
      epochs_.back().survived = copy_of(visible(s));
      start_epoch(copy_of(visible(s)), true);
      uncertain_ = 0;
    } else if (uncertain_ != 0) {
      // The write the crash interrupted counts if it reached the disk.
      const Write w = issued_.at(uncertain_);
      const std::byte* p = s.env->disk(vol_id(w.volume) + ".data")->visible.data() + w.block * kBlock;
      std::uint64_t seq = 0;
      std::memcpy(&seq, p, 8);
      if (seq != w.seq || &s != writer_) forget(w.seq);
      uncertain_ = 0;
    }
    if (opts_.verbose) spdlog::info("sim: {} restarted after a {}", s.name, power_loss_ ? "power loss" : "crash");
    power_loss_ = false;
  }

  // A planned failover completes in the background: once the roles have swapped, the host
  // writes to the new source.
  void follow_roles() {
    Site& src = *writer_;
    if (src.session->role() == Role::destination && other(src).session->role() == Role::source) {
      host_moves_to(other(src));
    }
  }

  // Invariants -----------------------------------------------------------------------------

  asio::awaitable<std::vector<std::vector<std::byte>>> read_all(Site& s, std::vector<engine::Volume*> vols) {
    std::vector<std::vector<std::byte>> out;
    for (auto* v : vols) {
      engine::IoBuffer buf = s.env->buffers().allocate(blocks_ * kBlock);
      Status st = co_await v->read(0, blocks_ * kBlock, buf);
      if (!st && s.env->dead) co_return out;  // crashed meanwhile: the caller looks at env->dead
      if (!st) violated(s.name + ": reading " + v->id() + ": " + st.error().message());
      out.emplace_back(buf.data(), buf.data() + blocks_ * kBlock);
    }
    co_return out;
  }

  // The image's blocks, as the sequence numbers of the writes they hold (0: never written).
  using Image = std::vector<std::span<const std::byte>>;  // one span per member volume
  static Image view(const std::vector<std::vector<std::byte>>& copy) { return Image(copy.begin(), copy.end()); }

  using Seqs = std::vector<std::vector<std::uint64_t>>;

  // The image's blocks as the writes of epoch `e` they hold (0: the epoch's base content), or
  // why none can be. A block as a power loss left it (see Epoch::survived) counts as the
  // newest write any of its sectors holds, and is marked in `survivor`.
  std::optional<Seqs> seqs_in(const Epoch& e, const Image& image, std::string& why, Seqs* survivor = nullptr) const {
    Seqs out(members_, std::vector<std::uint64_t>(blocks_, 0));
    if (survivor != nullptr) *survivor = out;
    for (std::size_t v = 0; v < members_; ++v) {
      for (std::uint64_t b = 0; b < blocks_; ++b) {
        const std::byte* p = image[v].data() + b * kBlock;
        if (!e.survived.empty() && survivor != nullptr &&
            std::memcmp(p, e.survived[v].data() + b * kBlock, kBlock) == 0) {
          (*survivor)[v][b] = 1;
          out[v][b] = newest_sector_write(e, p, v, b);
          continue;
        }
        if (std::memcmp(p, e.base[v].data() + b * kBlock, kBlock) == 0) continue;
        std::uint64_t seq = 0, vol = 0, block = 0;
        std::memcpy(&seq, p, 8);
        std::memcpy(&vol, p + 8, 8);
        std::memcpy(&block, p + 16, 8);
        const auto it = issued_.find(seq);
        if (vol != v || block != b || it == issued_.end() || it->second.volume != v || it->second.block != b ||
            std::memcmp(p, stamp(seq, v, b).data(), kBlock) != 0) {
          why = vol_id(v) + " block " + std::to_string(b) +
                " holds no write this block had (torn or misplaced): " + describe_sectors(p);
          return std::nullopt;
        }
        out[v][b] = seq;
      }
    }
    return out;
  }

  // The write named by the first whole stamp record in the 512-byte sector at `off`.
  static std::uint64_t sector_write(const std::byte* p, std::size_t off) {
    const std::size_t rec = (off + 23) / 24 * 24;
    std::uint64_t seq = 0;
    std::memcpy(&seq, p + rec, 8);
    return seq;
  }

  // What each 512-byte sector of a block holds, as the write its first whole stamp record names.
  static std::string describe_sectors(const std::byte* p) {
    std::string out = "sectors hold writes";
    for (std::size_t off = 0; off < kBlock; off += 512) out += " " + std::to_string(sector_write(p, off));
    return out;
  }

  // The newest write whose stamp any 512-byte sector of the block holds (0: none; sectors of
  // the epoch's base hold none). The sectors were checked when the power loss was (check_durable).
  std::uint64_t newest_sector_write(const Epoch& e, const std::byte* p, std::size_t v, std::uint64_t b) const {
    std::uint64_t newest = 0;
    for (std::size_t off = 0; off < kBlock; off += 512) {
      if (std::memcmp(p + off, e.base[v].data() + b * kBlock + off, 512) == 0) continue;
      newest = std::max(newest, sector_write(p, off));
    }
    return newest;
  }

  // Returns k if the image is epoch e's base after its writes up to k (some blocks perhaps as a
  // power loss left them, see Epoch::survived).
  std::optional<std::uint64_t> prefix_in(const Epoch& e, const Image& image, std::string& why) const {
    Seqs survivor;
    const auto seqs = seqs_in(e, image, why, &survivor);
    if (!seqs) return std::nullopt;
    std::uint64_t k = 0;
    for (const auto& vol : *seqs) {
      for (auto s : vol) k = std::max(k, s);
    }
    Seqs expect(members_, std::vector<std::uint64_t>(blocks_, 0));
    for (const auto& w : e.writes) {
      if (w.seq <= k) expect[w.volume][w.block] = w.seq;
    }
    for (std::size_t v = 0; v < members_; ++v) {
      for (std::uint64_t b = 0; b < blocks_; ++b) {
        if ((*seqs)[v][b] != expect[v][b] && survivor[v][b] == 0) {
          why = "after write " + std::to_string(k) + ", " + vol_id(v) + " block " + std::to_string(b) +
                " should hold write " + std::to_string(expect[v][b]) + " but holds " + std::to_string((*seqs)[v][b]);
          return std::nullopt;
        }
      }
    }
    return k;
  }

  struct Match {
    std::uint64_t epoch;
    std::uint64_t k;
    auto operator<=>(const Match&) const = default;
  };
  // The image is some kept epoch's image after a prefix of its writes (the newest that fits).
  // Violation otherwise, with why it is none of each epoch's.
  Match check_prefix(const Image& image, const std::string& what) const {
    std::string whys;
    for (auto it = epochs_.rbegin(); it != epochs_.rend(); ++it) {
      std::string why;
      if (auto k = prefix_in(*it, image, why)) return {it->id, *k};
      whys += "; in epoch " + std::to_string(it->id) + ": " + why;
    }
    violated(what + " is not the image after any prefix of the writes" + whys);
  }

  // After a power loss at the source: each sector holds the last write acknowledged as durable
  // or a later one (not durable: whole or torn); where no write was durable, the base or any
  // write.
  void check_durable(Site& s) {
    const Epoch& e = epochs_.back();
    const Image img = visible(s);
    constexpr std::size_t kSector = 512;
    for (std::size_t v = 0; v < members_; ++v) {
      for (std::uint64_t b = 0; b < blocks_; ++b) {
        std::vector<std::uint64_t> seqs;
        std::uint64_t durable = 0;
        for (const auto& w : e.writes) {
          if (w.volume != v || w.block != b) continue;
          seqs.push_back(w.seq);
          if (w.seq <= acked_ && (fua_acked_.contains(w.seq) || w.seq <= flushed_upto_[v])) durable = w.seq;
        }
        if (seqs.empty()) {
          // Nothing wrote here since the epoch began: what it began from was durable (a
          // committed cycle, or what an earlier power loss left).
          if (std::memcmp(img[v].data() + b * kBlock, e.base[v].data() + b * kBlock, kBlock) != 0) {
            violated("a power loss at the source changed " + vol_id(v) + " block " + std::to_string(b) +
                     ", which no write touched since its epoch began");
          }
          continue;
        }
        for (std::size_t off = 0; off < kBlock; off += kSector) {
          const std::byte* got = img[v].data() + b * kBlock + off;
          bool ok = durable == 0 && std::memcmp(got, e.base[v].data() + b * kBlock + off, kSector) == 0;
          for (auto seq : seqs) {
            if (seq >= durable && std::memcmp(got, stamp(seq, v, b).data() + off, kSector) == 0) ok = true;
          }
          if (!ok) {
            violated("a power loss at the source lost durable write " + std::to_string(durable) + " (" + vol_id(v) +
                     " block " + std::to_string(b) + ", sector " + std::to_string(off / kSector) + ")");
          }
        }
      }
    }
  }

  // The volumes' contents as the host would read them now (no copy: valid until the next I/O).
  Image visible(Site& s) {
    Image out;
    for (std::size_t v = 0; v < members_; ++v) out.emplace_back(s.env->disk(vol_id(v) + ".data")->visible);
    return out;
  }
  bool same(const Image& x, const Image& y) const {
    for (std::size_t v = 0; v < members_; ++v) {
      if (x[v].size() != y[v].size() || std::memcmp(x[v].data(), y[v].data(), x[v].size()) != 0) return false;
    }
    return true;
  }

  std::vector<engine::Volume*> volume_ptrs(Site& s) {
    std::vector<engine::Volume*> out;
    for (auto& v : s.volumes) out.push_back(v.get());
    return out;
  }

  static bool in_failover(replication::State st) {
    return st == replication::State::failing_over || st == replication::State::failing_over_for_dr ||
           st == replication::State::failed_over || st == replication::State::reprotecting;
  }

  void check() {
    if (crashed_ != nullptr) restart(*crashed_);  // a crash that fired inside an operation
    follow_roles();
    Site& src = *writer_;
    Site& dst = other(src);
    // The host's site: every acknowledged write is there (the history up to the last write
    // acknowledged, plus perhaps the one in flight).
    std::string why;
    const auto held = seqs_in(epochs_.back(), visible(src), why);
    if (!held) violated("the source: " + why);
    Seqs expect(members_, std::vector<std::uint64_t>(blocks_, 0));
    for (const auto& w : epochs_.back().writes) {
      if (w.seq <= acked_) expect[w.volume][w.block] = w.seq;
    }
    for (std::size_t v = 0; v < members_; ++v) {
      for (std::uint64_t b = 0; b < blocks_; ++b) {
        if ((*held)[v][b] < expect[v][b]) {
          violated("the source lost acknowledged write " + std::to_string(expect[v][b]) + " (" + vol_id(v) + " block " +
                   std::to_string(b) + ")");
        }
      }
    }
    // The other site, once it is a destination with a committed cycle and no failover under
    // way (until reprotect's first cycle, an old source still holds what it wrote alone): a
    // committed cycle of the history, never going back.
    const auto st = dst.session->status();
    if (dst.session->role() == Role::destination && st.committed_cycle > 0 && !in_failover(st.state) &&
        !in_failover(src.session->status().state)) {
      const Match m = check_prefix(visible(dst), "the destination");
      if (st.committed_cycle < committed_seen_) violated("the destination's committed cycle went back");
      committed_seen_ = st.committed_cycle;
      if (m < dest_at_) violated("the destination went back to an older image");
      dest_at_ = m;
      while (epochs_.front().id < m.epoch) epochs_.pop_front();  // it cannot go back to them
    }
    if (rng_() % 4 == 0) check_test_image(dst);  // also before every stop
    if (a_.session->role() == Role::destination && b_.session->role() == Role::destination) {
      violated("both sites are destinations");
    }
    for (Site* x : {&a_, &b_}) check_shown_state(*x);
  }

  // Every state shown is one the control table has for the side's role, and none is Error: the
  // simulation forces nothing, so no refusal (split brain, say) is ever right here.
  void check_shown_state(Site& s) {
    using replication::State;
    const auto st = s.session->status();
    const bool source = s.session->role() == Role::source;
    const bool fits = source ? st.state != State::failing_over_for_dr : st.state != State::failing_over;
    if (!fits || st.state == State::error) {
      violated(s.name + " shows " + std::string(replication::state_name(st.state)) + " as a " +
               (source ? "source" : "destination") + (st.error.empty() ? "" : ": " + st.error));
    }
  }

  // With the link up, pauses and tests lifted, failovers finished and reprotected, and the
  // writer idle, the destination catches up with the source.
  void settle() {
    for (Site* s : {&a_, &b_}) s->env->on_op = nullptr;  // no crash armed from here on
    partitioned_until_ = 0;
    if (crashed_ != nullptr) restart(*crashed_);
    for (int i = 0; i < 200 && (writer_busy_ || a_.action_running || b_.action_running); ++i) run_for(100'000'000);
    for (int round = 0; round < 60; ++round) {
      connect();
      follow_roles();
      Site& src = *writer_;
      Site& dst = other(src);
      for (Site* s : {&a_, &b_}) {
        const auto st = s->session->status();
        if (s->action_running) continue;
        if (st.test_running) {
          spawn_action(*s, Action::stop_test, true);
        } else if (st.state == replication::State::paused) {
          // A pause that reached only this site is issued again with the peer back, then resumed.
          spawn_action(*s, st.local_only_paused ? Action::pause : Action::resume);
        } else if (st.state == replication::State::failed_over && s->session->role() == Role::source) {
          spawn_action(*s, Action::reprotect);
        }
      }
      if (!src.action_running) spawn_action(src, Action::sync);
      run_for(2'000'000'000);
      check();
      const auto ss = src.session->status();
      const auto ds = dst.session->status();
      if (src.session->role() == Role::source && dst.session->role() == Role::destination &&
          ss.state == replication::State::ok && ds.state == replication::State::ok && ss.lag_bytes == 0 &&
          same(visible(src), visible(dst))) {
        return;
      }
    }
    violated("the destination did not converge to the source after 120 s of virtual time with the link up (state " +
             std::string(replication::state_name(a_.session->status().state)) + " / " +
             std::string(replication::state_name(b_.session->status().state)) + ")" + first_difference() +
             link_report());
  }

  // A link that never finished closing, for the report: which side still handles which frame.
  std::string link_report() const {
    if (!conn_) return "";
    std::string out = "; the link is " + std::string(conn_->closed ? "closed (" + conn_->reason + ")" : "up");
    for (int side = 0; side < 2; ++side) {
      const Direction& d = conn_->dir[side];
      if (d.handling) {
        out += ", " + std::string(side == 0 ? "site-a" : "site-b") + " still handles a frame of type " +
               std::to_string(static_cast<int>(*d.handling));
      }
    }
    return out;
  }

  // Where the source's and the destination's images differ first, for the report.
  std::string first_difference() {
    Site& src = *writer_;
    const Image x = visible(src);
    const Image y = visible(other(src));
    for (std::size_t v = 0; v < members_; ++v) {
      for (std::uint64_t b = 0; b < blocks_; ++b) {
        if (std::memcmp(x[v].data() + b * kBlock, y[v].data() + b * kBlock, kBlock) == 0) continue;
        std::uint64_t sx = 0, sy = 0;
        std::memcpy(&sx, x[v].data() + b * kBlock, 8);
        std::memcpy(&sy, y[v].data() + b * kBlock, 8);
        return ": first difference " + vol_id(v) + " block " + std::to_string(b) + ", source write " +
               std::to_string(sx) + ", destination write " + std::to_string(sy);
      }
    }
    return "";
  }

  void shutdown() {
    if (conn_) conn_->close("simulation over");
    run_for(100'000'000);
    for (Site* s : {&a_, &b_}) {
      sync(*s, s->session->stop());
      s->session.reset();
      for (auto& v : s->volumes) {
        Status st = sync(*s, v->close());
        if (!st) violated(s->name + ": close: " + st.error().message());
      }
      s->volumes.clear();
    }
  }

  Options opts_;
  std::mt19937_64 rng_;
  SimClock clock_;
  std::size_t members_ = 1;
  std::uint64_t blocks_ = 64;
  std::uint32_t rpo_seconds_ = 1;
  Site a_;
  Site b_;
  std::shared_ptr<SimConnection> conn_;
  // The model: the writes that count (issued, not refused, not lost to an unplanned failover or
  // a power loss), in epochs, oldest first.
  std::deque<Epoch> epochs_;
  std::uint64_t next_epoch_ = 1;
  std::map<std::uint64_t, Write> issued_;    // every write ever issued, by sequence number
  std::set<std::uint64_t> fua_acked_;        // writes acknowledged with FUA
  std::vector<std::uint64_t> flushed_upto_;  // per volume: its writes up to here were flushed
  std::uint64_t next_seq_ = 1;
  std::uint64_t acked_ = 0;  // the last write acknowledged (every one of the model's before it was)
  Site* writer_ = &a_;       // the site the host writes to: the source
  std::uint64_t lost_ = 0;
  std::uint64_t failovers_ = 0;
  std::uint64_t reprotects_ = 0;
  Site* crashed_ = nullptr;      // a site that crashed and waits for its restart
  std::uint64_t uncertain_ = 0;  // the host write a crash interrupted (0: none)
  std::uint64_t crashes_ = 0;
  bool power_loss_ = false;  // the armed or fired crash is a power loss
  std::uint64_t power_losses_ = 0;
  std::uint64_t stalls_ = 0;
  std::uint64_t partitions_ = 0;
  std::int64_t partitioned_until_ = 0;
  bool writer_busy_ = false;
  std::uint64_t committed_seen_ = 0;
  Match dest_at_{};  // the newest image the destination was seen at
  std::uint64_t connects_ = 0;
  std::uint64_t corrupted_ = 0;
  std::uint64_t tests_ = 0;
  std::uint64_t pauses_ = 0;
};

}  // namespace
}  // namespace tandem::sim

namespace {
// The seed running, for a report when the code under test aborts (a failed assertion).
char g_replay[512] = "";
extern "C" void report_abort(int) {
  (void)!write(2, g_replay, std::strlen(g_replay));
  std::signal(SIGABRT, SIG_DFL);
  std::abort();
}
}  // namespace

int main(int argc, char** argv) {
  std::signal(SIGABRT, report_abort);
  using tandem::sim::Options;
  std::uint64_t first = 1;
  std::uint64_t seeds = 1;
  std::optional<std::uint64_t> one;
  std::vector<std::uint64_t> list;  // --list: these seeds (the regressions)
  Options base;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::uint64_t {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return std::strtoull(argv[++i], nullptr, 10);
    };
    if (a == "--seed") {
      one = next();
    } else if (a == "--seeds") {
      seeds = next();
    } else if (a == "--first") {
      first = next();
    } else if (a == "--steps") {
      base.steps = static_cast<int>(next());
    } else if (a == "--list") {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "--list needs seeds (1,2,3)\n");
        return 2;
      }
      for (const char* p = argv[++i]; *p != '\0';) {
        char* end = nullptr;
        list.push_back(std::strtoull(p, &end, 10));
        if (end == p || (*end != ',' && *end != '\0')) {
          std::fprintf(stderr, "--list: not a list of seeds: %s\n", argv[i]);
          return 2;
        }
        p = *end == ',' ? end + 1 : end;
      }
    } else if (a == "--verbose") {
      base.verbose = true;
    } else {
      std::fprintf(stderr, "usage: %s [--seed N | --first N --seeds COUNT | --list N,N,...] [--steps N] [--verbose]\n",
                   argv[0]);
      return 2;
    }
  }
  if (const char* env = std::getenv("TANDEM_SIM_SEEDS"); env != nullptr && !one)
    seeds = std::strtoull(env, nullptr, 10);
  if (one) list = {*one};
  if (list.empty()) {
    for (std::uint64_t seed = first; seed < first + seeds; ++seed) list.push_back(seed);
  }
  spdlog::set_level(base.verbose ? spdlog::level::debug : spdlog::level::off);
  for (const std::uint64_t seed : list) {
    Options o = base;
    o.seed = seed;
    std::snprintf(g_replay, sizeof g_replay,
                  "FAIL seed %llu: aborted (see above)\n  replay: %s --seed %llu --steps %d --verbose\n",
                  static_cast<unsigned long long>(seed), argv[0], static_cast<unsigned long long>(seed), o.steps);
    tandem::sim::Simulation sim(o);
    try {
      sim.run();
    } catch (const tandem::sim::Violation& v) {
      std::fprintf(stderr, "FAIL seed %llu: %s\n  (%s)\n  replay: %s --seed %llu --steps %d --verbose\n",
                   static_cast<unsigned long long>(seed), v.what.c_str(), sim.summary().c_str(), argv[0],
                   static_cast<unsigned long long>(seed), o.steps);
      // The run stopped in the middle: its coroutines are abandoned, not leaked by the code
      // under test. Exit without the leak check's report of them.
      std::fflush(stdout);
      std::fflush(stderr);
      std::_Exit(1);
    }
    if (list.size() <= 20 || base.verbose)
      std::printf("seed %llu: ok: %s\n", static_cast<unsigned long long>(seed), sim.summary().c_str());
  }
  std::printf("%zu seed(s) from %llu: all invariants held\n", list.size(),
              static_cast<unsigned long long>(list.front()));
  return 0;
}

// Session: one replication relationship between a local volume (or a consistency group of
// volumes) and its peer, in one role: source or destination. It is the only place that knows
// the rules of the design's data path:
//
// Source. Host writes mark the dirty map (engine). A cycle cuts it (all members at one instant,
// writes held briefly): the frozen set ships in LBA order as extents hashed with xxh3, a window
// of them in flight; a host write to a frozen block the peer does not have durably yet first
// copies the old block into the preserve log (copy-on-write), so the cycle ships exactly the
// image of the cut and can be resumed after any interruption. The cycle is forgotten only when
// the destination says it is committed. A source that writes while disconnected starts a new
// generation first.
//
// Destination. Extents are verified against their hash and staged in the cycle journal; every
// durable batch is acknowledged with the restart address. At the cycle's end a commit record is
// written, the journal is applied in place, the volume flushed, and the commit acknowledged.
// The volume is therefore always exactly at a committed cycle (a crash mid-apply is repaired by
// applying again on start). The initial sync is not staged: the destination is Initializing
// (inconsistent) until it and the first cycle complete; it restarts from its durable checkpoint.
//
// On connect both sides exchange a SessionHello; the source compares generation histories
// (generation.h) and refuses split brain and unrelated volumes, touching nothing.
//
// Threading: one io_context thread. Ownership: the session does not own its volumes or envs
// (the daemon does); they outlive stop().
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "tandem/common/async.h"
#include "tandem/common/result.h"
#include "tandem/engine/bitmap.h"
#include "tandem/engine/cycle_journal.h"
#include "tandem/engine/preserve_log.h"
#include "tandem/engine/volume.h"
#include "tandem/replication/control.h"
#include "tandem/replication/generation.h"
#include "tandem/replication/messages.h"
#include "tandem/replication/peer_channel.h"
#include "tandem/replication/session_state.h"
#include "tandem/replication/state_store.h"
#include "tandem/transport/rate_limiter.h"

namespace tandem::replication {

class Transfer;
class FailoverTest;
class Receiver;

// How a transfer ended: committed (the destination said so), paused (an operator's pause
// stopped it at an extent boundary), link lost (or the session stopping), or failed (an I/O
// error, or an answer of the destination refused).
enum class TransferEnd : std::uint8_t { committed, paused, link_lost, failed };
struct TransferOutcome {
  TransferEnd end = TransferEnd::committed;
  Status error;  // link_lost, failed: why
};

// A failover test's image of one destination volume, as the daemon exports it.
struct TestImageExport {
  std::string volume_id;  // the destination volume it is an image of
  engine::Volume* image = nullptr;
};

struct SessionMember {
  engine::Volume* volume = nullptr;
  engine::DeviceEnv* env = nullptr;  // opens the member's journal / preserve files
  std::string state_dir;             // where they live
};

struct SessionOptions {
  std::string id;
  Role role = Role::source;  // initial role (the persisted one wins once written)
  std::vector<SessionMember> members;
  std::vector<std::string> remote_volumes;
  std::string peer_name;
  std::uint32_t rpo_seconds = 10;
  // Unacknowledged bytes in flight. 64 MiB keeps a 10 Gb/s link busy at 50 ms round trips and
  // bounds what a resume may re-ship.
  std::uint64_t window_bytes = 64ull << 20;
  // Extent data this session ships, in bytes/s; 0 = unlimited. The link's own limit
  // (peer.rate_limit) still caps all sessions together.
  std::uint64_t rate_limit_bytes_per_s = 0;
  // Largest extent shipped in one frame.
  std::uint32_t extent_bytes = 1u << 20;
  // Destination: staged bytes per journal record / acknowledgement.
  std::uint64_t stage_batch_bytes = 8ull << 20;
  // Failover tests: the daemon exports the test images (one volume per member, in order) on
  // their own sockets, and withdraws them. Unset: tests are refused.
  std::function<asio::awaitable<Status>(std::vector<TestImageExport>)> export_test;
  std::function<asio::awaitable<void>()> unexport_test;
  // Destination: initial-sync bytes between durable checkpoints (each flushes the volume and
  // bounds what a resume after a source crash ships again: 16 MiB is under 1% of a 2 GiB volume).
  std::uint64_t initial_checkpoint_bytes = 16ull << 20;
  // Fault probe (tests): corrupt every Nth extent sent after hashing it; 0 = never.
  std::uint64_t corrupt_extent_every = 0;
};

struct RestartAddress {
  std::uint64_t cycle = 0;
  std::uint64_t offset = 0;
};

struct ActionArgs {
  bool force = false;
  bool reverse = false;
};

struct ActionResult {
  Verdict verdict = Verdict::accept;
  std::string message;  // when refused or failed
  [[nodiscard]] bool ok() const { return verdict == Verdict::accept; }
};

struct SessionStatus {
  State state = State::ok;
  Role role = Role::source;
  bool connected = false;
  bool local_only_paused = false;
  bool peer_paused = false;
  bool test_running = false;  // destination: a failover test image is exported
  bool initial_sync = false;  // the transfer under way (or due) is the initial copy
  bool transferring = false;  // source: a transfer is under way
  std::uint64_t committed_cycle = 0;
  std::uint64_t transfer_cycle = 0;
  RestartAddress restart;
  std::uint64_t lag_bytes = 0;        // source: dirty + frozen bytes not yet committed
  std::uint64_t bytes_shipped = 0;    // source: extent bytes sent
  std::uint64_t bytes_reshipped = 0;  // source: sent again after a resume
  std::uint64_t transfer_bytes_total = 0;
  std::uint64_t transfer_bytes_done = 0;
  std::optional<std::chrono::system_clock::time_point> transfer_started;
  std::uint64_t resumes = 0;          // source: transfers resumed from a restart address
  std::uint64_t diverged_blocks = 0;  // destination in Failed_Over: blocks that reprotect will overwrite
  std::optional<std::chrono::system_clock::time_point> last_sync;
  std::uint64_t last_sync_duration_ms = 0;
  std::string error;  // why it is refused / paused
  std::vector<std::uint64_t> generations;
};

class Session {
 public:
  static asio::awaitable<Result<std::unique_ptr<Session>>> open(asio::any_io_executor ex, SessionOptions opts);

  // Offline (daemon stopped): makes this side the source or the destination of the session, as
  // an operator forcing a role without the peer (DRBD's "primary --force"). Becoming the source
  // starts a new generation: the peer's data and this side's may now diverge, and the next
  // connect decides (and refuses a split brain). A cycle in flight is abandoned: a source's
  // frozen blocks go back to its dirty map; a destination's staged journal is dropped.
  static asio::awaitable<Status> set_role_offline(SessionOptions opts, Role role);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  [[nodiscard]] const std::string& id() const { return opts_.id; }
  [[nodiscard]] Role role() const { return state_.role; }

  // The link came up: send our hello. The session uses this connection until detach().
  void attach(std::shared_ptr<PeerChannel> conn);
  void detach(const std::string& reason);
  // A replication frame for this session, from the link's receive loop.
  asio::awaitable<Status> handle(MsgType type, std::span<const std::byte> payload);
  // Start a cycle now (source).
  void request_sync();
  // An operator's action (the control API): checked against the rules of control.h, then
  // carried out on this site and, where the action needs both, on the peer.
  asio::awaitable<ActionResult> act(Action a, ActionArgs args);
  asio::awaitable<void> stop();
  // A clean shutdown (maintenance): tells the peer, which shows Paused_For_NDU until this
  // side is back and then goes on by itself.
  asio::awaitable<void> announce_shutdown();
  [[nodiscard]] SessionStatus status() const;
  [[nodiscard]] State state() const;
  // Logs the session's state when it differs from the last one logged: once per change, with
  // the session id. Called after every message, action, link change and step of the session's
  // loops, and by the daemon's ticker as a backstop. The routine OK <-> Synchronizing steps of
  // each cycle are logged at debug level; System_Paused, Paused_For_NDU and Error at warn.
  void note_state();
  // Destination in Failed_Over: blocks written here after the failover point (they will be
  // overwritten by reprotect).
  [[nodiscard]] std::uint64_t diverged_blocks() const;
  [[nodiscard]] const SessionOptions& options() const { return opts_; }
  // Run-time changes (SIGHUP). A new RPO restarts the cycle timer with the new period; a new
  // rate applies to the next extent sent (0 = unlimited).
  void set_rpo_seconds(std::uint32_t seconds);
  void set_rate_limit(std::uint64_t bytes_per_s);

 private:
  friend class Transfer;
  class CowHook;
  struct NoteOnExit;
  struct Member {
    SessionMember m;
    std::uint64_t base = 0;  // global offset of the member's first byte
    std::optional<engine::BlockBitmap> frozen;
    std::unique_ptr<engine::PreserveLog> preserve;
    std::unique_ptr<CowHook> hook;
  };
  enum class Plan { wait, initial, cycle, finish, refused };

  Session(asio::any_io_executor ex, SessionOptions opts);
  asio::awaitable<Status> recover();
  SessionHello make_hello() const;
  std::string journal_path(const Member& m) const;
  std::string preserve_path(const Member& m) const;
  std::uint64_t total_bytes() const;
  std::pair<std::size_t, std::uint64_t> locate(std::uint64_t global) const;
  asio::awaitable<Status> send(MsgType t, std::vector<std::byte> payload, std::span<const std::byte> data = {});

  // Source.
  asio::awaitable<void> run_source();
  asio::awaitable<void> run_timer();
  asio::awaitable<Status> on_peer_hello(const SessionHello& h);
  asio::awaitable<Status> cut();
  asio::awaitable<Result<std::vector<engine::BlockBitmap>>> freeze_all();
  // A transfer (transfer.h) from its sync_begin to its end; a committed one is recorded here
  // (a cycle's end: finish_cycle).
  asio::awaitable<TransferOutcome> ship(TransferMode mode, std::uint64_t cycle, std::uint64_t start);
  // Before an initial sync from offset 0: the dirty maps are cut (the whole volume ships).
  asio::awaitable<Status> begin_initial();
  asio::awaitable<Status> cow(std::size_t mi, std::uint64_t first, std::uint64_t count);
  asio::awaitable<Status> finish_cycle(std::uint64_t cycle);

  // Control: requests to the peer, answered by request id, bounded by a timeout.
  struct PendingControl;
  asio::awaitable<std::optional<ControlReply>> request(ControlOp op, bool resume_to_sync = false,
                                                       std::uint64_t value = 0);
  asio::awaitable<Status> on_control(const Control& c);
  asio::awaitable<Status> on_control_reply(const ControlReply& r);
  asio::awaitable<ActionResult> do_pause(bool resume_to_sync);
  asio::awaitable<ActionResult> do_resume();
  asio::awaitable<Status> pause_here(bool resume_to_sync);  // stop transfers, flush, persist
  asio::awaitable<Status> reply_control(const Control& c, bool ok, std::uint64_t restart, std::string message,
                                        std::uint64_t value = 0);

  // Failover and reprotect (session_failover.cpp).
  asio::awaitable<ActionResult> unplanned_failover();
  asio::awaitable<void> retry_pause();           // before asking the peer again
  asio::awaitable<void> run_planned_failover();  // source, phase failing_over: until the roles swap
  asio::awaitable<void> run_reprotect();         // new source, phase reprotecting: until OK
  // Role changes: the transition's name, and what else the caller's transition changes with
  // the role (in the same write). Each swaps the sides: the old role's side goes whole (the
  // receiver is destroyed, or the source's loops wind down), the new one is built fresh.
  asio::awaitable<Status> become_source(std::string_view transition, StateStore::Edit also);
  asio::awaitable<Status> become_destination(std::string_view transition, StateStore::Edit also);
  // What neither side keeps across a role change: the pause, the peer's pause, the source's run state.
  void forget_for_role_change();
  asio::awaitable<Status> note_paired();  // durably, the first time a peer's hello is taken
  // A source that is not on its way to becoming a destination (become_destination() winds its
  // loops down before the role goes to disk).
  [[nodiscard]] bool acting_source() const { return state_.role == Role::source && !leaving_source_; }
  asio::awaitable<Status> on_failover_control(const Control& c);
  asio::awaitable<Status> on_changed_blocks(const ChangedBlocks& m);
  asio::awaitable<Status> demote_by_hello(const SessionHello& h);
  void start_source_tasks();
  void set_source_hooks(bool on);  // the copy-on-write hooks of a source's volumes
  void start_background(asio::awaitable<void> task);
  // Replication waits while the roles are being swapped or wait for reprotect.
  [[nodiscard]] bool replication_held() const;
  // Failover test (session_failover.cpp).
  asio::awaitable<ActionResult> start_test();
  asio::awaitable<Status> open_test(bool resume);  // resume: after a restart, the overlay as it was
  asio::awaitable<ActionResult> stop_test();
  asio::awaitable<void> close_test_volumes();
  // The failover test running here (destination), or nullptr. It observes the apply.
  std::unique_ptr<FailoverTest> test_;
  [[nodiscard]] bool test_running() const { return test_ != nullptr; }
  WaitQueue progress_;          // a cycle committed, a hello arrived, a phase changed
  std::size_t background_ = 0;  // failover/reprotect tasks running
  bool timer_running_ = false;
  // Destination: the staged cycle, its apply and the failover test's image are used across
  // co_awaits by the receive loop (data messages), by operators' actions (pause, failover,
  // start/stop of a test) and by stop(). Each holds this lock while it uses or tears them down,
  // so a test is never stopped under a cycle's apply nor started in the middle of one.
  AsyncMutex dest_mu_;
  // Messages being handled (handle() calls not yet returned); stop() waits for none.
  std::size_t handling_ = 0;
  WaitQueue handled_;
  std::uint64_t next_request_ = 1;
  std::map<std::uint64_t, std::shared_ptr<PendingControl>> control_waits_;
  bool busy_ = false;          // source: the run loop is in a transfer step
  WaitQueue idle_;             // notified when busy_ drops
  bool peer_paused_ = false;   // the peer's hello said it is paused
  bool peer_ndu_ = false;      // the peer said it is going down for maintenance
  bool control_busy_ = false;  // one control action at a time
  // A pause and a resume asked on the two sites at once end paused on both: a resume asked by
  // the peer while a pause of this site's is under way is refused (pausing_), and a resume of
  // this site's that the peer accepted before pausing again stays paused (peer_pauses_ moved).
  bool pausing_ = false;
  std::uint64_t peer_pauses_ = 0;  // pauses asked by the peer and taken here
  WaitQueue control_idle_;

  // Destination: the receiving side (receiver.h), present while this side is a destination.
  // Built by make_receiver() when the role becomes destination, destroyed when it becomes
  // source; the destination lock (dest_mu_) is held by whoever uses or swaps it.
  std::unique_ptr<Receiver> receiver_;
  void make_receiver();
  // The frames of the destination's data path, handed to the receiver.
  asio::awaitable<Status> on_data(MsgType type, std::span<const std::byte> payload);
  // Up to where the staged cycle is durable here (0: none, or not a destination).
  [[nodiscard]] std::uint64_t staged_end() const;

  asio::any_io_executor ex_;
  SessionOptions opts_;
  std::vector<Member> members_;
  // The durable state: read through the two references, changed only by store_'s transitions.
  StateStore store_;
  const SessionState& state_ = store_.state();
  const std::vector<std::uint64_t>& generations_ = store_.generations();
  std::shared_ptr<PeerChannel> conn_;
  std::uint64_t conn_gen_ = 0;
  bool stopping_ = false;
  bool leaving_source_ = false;  // become_destination() under way
  bool running_ = false;
  WaitQueue wake_;
  WaitQueue done_;
  engine::Clock& clock_;  // the first member's env's: time, timers and chance
  std::unique_ptr<engine::Timer> timer_;
  bool sync_requested_ = false;
  std::string error_;
  Activity activity_ = Activity::initializing;  // what the shown state derives from (shown_state())
  std::optional<State> logged_state_;           // note_state()

  // The source's run state: what it plans on its destination's last hello, the transfer under
  // way, reprotect's exchange. A role change replaces it whole (become_source() and
  // become_destination()), so nothing of the old role's replication is carried into the new
  // one; attach() and detach() reset what belongs to one link.
  struct SourceSide {
    Plan plan = Plan::wait;
    TransferMode plan_mode = TransferMode::cycle;
    std::uint64_t plan_start = 0;
    std::uint64_t peer_committed = 0;
    bool peer_ready = false;
    bool need_new_generation = true;  // until the first hello: writes before it bump
    // The transfer begun on this link (nullptr: none since it came up). The destination's
    // answers go to it; anything they say about another transfer is refused.
    std::shared_ptr<Transfer> transfer;
    // Where the destination durably has the transfer up to (its restart address), kept after
    // the transfer ends: host writes below it in the same cycle need no copy-on-write.
    RestartAddress restart;
    bool exchange_done = false;                 // reprotect: the peer's changed blocks are in our dirty map
    std::vector<engine::BlockBitmap> incoming;  // reprotect: the peer's changed blocks, per member
  };
  SourceSide src_;
  bool bumping_ = false;
  WaitQueue bump_done_;
  engine::Timer* pacing_ = nullptr;  // pace()'s wait, while there is one
  transport::RateLimiter limiter_;   // SessionOptions::rate_limit_bytes_per_s, on extent data
  asio::awaitable<void> pace(std::uint64_t bytes);
  // What the status shows of the source's transfers.
  struct Counters {
    std::uint64_t bytes_shipped = 0;
    std::uint64_t bytes_reshipped = 0;  // sent again after a resume
    std::uint64_t resumes = 0;
    std::uint64_t extents_sent = 0;  // for the corrupt_extent_every probe
    std::uint64_t corrupted = 0;
    std::uint64_t high_water = 0;  // furthest offset sent in the current transfer
    std::uint64_t high_water_cycle = ~0ull;
    std::uint64_t transfer_total = 0;
    std::uint64_t transfer_done = 0;
    std::optional<std::chrono::system_clock::time_point> transfer_started;
    std::optional<std::chrono::system_clock::time_point> last_sync;
    std::uint64_t last_sync_ms = 0;
  } counters_;

  // Short coroutines started beside the caller (the hello on attach, a pause the peer asked
  // for); stop() waits for them, as they use the session.
  TaskGroup side_tasks_{ex_};
  // Source: extent frames queued on the connection and not yet written.
  static constexpr std::size_t kSendsInFlight = 64;
  TaskGroup sends_{ex_};
};

}  // namespace tandem::replication

// Receiver: the destination's side of a session (receiver.h).
#include "receiver.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "session_internal.h"
#include "tandem/common/hash.h"
#include "tandem/replication/errc.h"

namespace tandem::replication {

Receiver::Receiver(asio::any_io_executor ex, ReceiverOptions opts, std::vector<ReceiverMember> members,
                   StateStore& store, engine::Clock& clock, ReceiverHooks hooks)
    : ex_(std::move(ex)),
      opts_(std::move(opts)),
      members_(std::move(members)),
      journals_(members_.size()),
      store_(store),
      clock_(clock),
      hooks_(std::move(hooks)) {}

Receiver::~Receiver() = default;

std::uint64_t Receiver::total_bytes() const { return members_.back().base + members_.back().volume->size_bytes(); }

std::pair<std::size_t, std::uint64_t> Receiver::locate(std::uint64_t global) const {
  for (std::size_t i = members_.size(); i-- > 0;) {
    if (global >= members_[i].base) return {i, global - members_[i].base};
  }
  return {0, global};
}

std::uint64_t Receiver::staged_end() const {
  std::uint64_t end = 0;
  for (std::size_t i = 0; i < members_.size(); ++i) {
    const auto& j = journals_[i];
    if (j && !j->extents().empty()) end = std::max(end, members_[i].base + j->staged_end_offset());
  }
  return end;
}

void Receiver::observe(ApplyObserver* o) { observers_.push_back(o); }
void Receiver::unobserve(ApplyObserver* o) { std::erase(observers_, o); }

asio::awaitable<Status> Receiver::send(MsgType t, std::vector<std::byte> bytes) {
  co_return co_await hooks_.send(t, std::move(bytes));
}

asio::awaitable<Status> Receiver::open_journals(std::uint64_t cycle, std::uint64_t capacity, bool existing) {
  for (std::size_t i = 0; i < members_.size(); ++i) {
    std::string path = members_[i].journal_path;
    auto j = co_await engine::CycleJournal::open(*members_[i].env, std::move(path), cycle, capacity, existing);
    if (!j) co_return j.error();
    journals_[i] = std::move(j).value();
  }
  co_return Status{};
}

asio::awaitable<Status> Receiver::recover() {
  if (state_.applying_cycle != 0) {
    // A commit record without the apply finished: apply again (idempotent).
    spdlog::info("session {}: finishing the apply of committed cycle {} after restart", opts_.session_id,
                 state_.applying_cycle);
    TANDEM_CO_TRY(co_await open_journals(state_.applying_cycle, 0, true));
    TANDEM_CO_TRY(co_await apply_committed(state_.applying_cycle));
  } else if (state_.transfer_cycle != 0) {
    TANDEM_CO_TRY(co_await open_journals(state_.transfer_cycle, 0, true));
    spdlog::info("session {}: cycle {} staged up to offset {} before restart", opts_.session_id, state_.transfer_cycle,
                 staged_end());
  }
  co_return Status{};
}

asio::awaitable<Status> Receiver::make_durable(std::uint64_t link) {
  TANDEM_ASSERT(state_.role == Role::destination);
  if (!recv_) co_return Status{};
  if (recv_->mode == TransferMode::cycle) co_return co_await stage_flush(link);
  co_return co_await initial_checkpoint(link);
}

asio::awaitable<Status> Receiver::settle() {
  TANDEM_ASSERT(state_.role == Role::destination);
  TANDEM_CO_TRY(co_await writes_.wait());
  if (state_.applying_cycle != 0) TANDEM_CO_TRY(co_await apply_committed(state_.applying_cycle));  // it is committed
  co_return Status{};
}

asio::awaitable<void> Receiver::discard() {
  (void)co_await writes_.wait();
  for (auto& j : journals_) {
    if (j) (void)co_await j->remove();
    j.reset();
  }
  recv_.reset();
  unsynced_bytes_ = 0;
}

asio::awaitable<Status> Receiver::on_sync_begin(const SyncBegin& m, std::uint64_t link) {
  TANDEM_ASSERT(state_.role == Role::destination);
  // Writes of an interrupted transfer finish first (they are below its checkpoint's successor).
  TANDEM_CO_TRY(co_await writes_.wait());
  // What an interrupted transfer had received and not staged is dropped: the source sends it
  // again from the restart address.
  recv_.reset();
  Receiving r;
  r.mode = m.mode;
  r.cycle = m.cycle;
  r.next = m.start_offset;
  r.processed_end = m.start_offset;
  r.started = clock_.steady_now();
  r.link = link;
  // Acknowledge well within the source's window, or it would wait for us while we wait for it.
  r.batch = std::min(opts_.stage_batch_bytes, m.window_bytes / 4);
  r.checkpoint = std::min(opts_.initial_checkpoint_bytes, m.window_bytes / 2);
  spdlog::debug("session {}: transfer begins: mode {}, cycle {}, offset {}, {} frozen blocks", opts_.session_id,
                static_cast<int>(m.mode), m.cycle, m.start_offset, m.frozen_blocks);
  if (m.mode != TransferMode::cycle) {
    if (state_.initial != InitialState::running || m.start_offset != state_.initial_offset) {
      if (m.start_offset != 0 &&
          !(state_.initial == InitialState::running && m.start_offset <= state_.initial_offset)) {
        co_return Error(errc::bad_message, "initial sync resumes at " + std::to_string(m.start_offset) +
                                               " but this side's checkpoint is " +
                                               std::to_string(state_.initial_offset));
      }
    }
    TANDEM_CO_TRY(co_await store_.change("initial sync begins", m.generations, [&m](SessionState& s) {
      s.paired = true;
      s.initial = InitialState::running;
      s.initial_offset = m.start_offset;
      s.initial_compare = m.mode == TransferMode::initial_compare;
      s.committed_cycle = 0;
    }));
    spdlog::info("session {}: initial sync ({}) from {} at offset {}", opts_.session_id,
                 m.mode == TransferMode::initial_full ? "full copy" : "compare hashes", opts_.peer_name,
                 m.start_offset);
    // What the source sends again is what arrived here but was not yet checkpointed; the source
    // may have lost count (it crashed), this side has not.
    if (received_high_ > m.start_offset) {
      spdlog::info(
          "session {}: initial sync resumes at offset {}: {} bytes received before the interruption "
          "are shipped again",
          opts_.session_id, m.start_offset, received_high_ - m.start_offset);
    }
    recv_ = std::move(r);
    co_return Status{};
  }
  const bool resume = state_.transfer_cycle == m.cycle && m.start_offset > 0;
  if (resume) {
    if (staged_end() != m.start_offset) {
      co_return Error(errc::bad_message, "cycle " + std::to_string(m.cycle) + " resumes at " +
                                             std::to_string(m.start_offset) + " but this side staged up to " +
                                             std::to_string(staged_end()));
    }
  } else {
    if (m.start_offset != 0) co_return Error(errc::bad_message, "a new cycle must start at offset 0");
    TANDEM_CO_TRY(co_await open_journals(m.cycle, engine::CycleJournal::capacity_for(m.frozen_blocks), false));
    unsynced_bytes_ = 0;  // a fresh journal
    TANDEM_CO_TRY(
        co_await store_.change("cycle staging begins", [&m](SessionState& s) { s.transfer_cycle = m.cycle; }));
  }
  recv_ = std::move(r);
  co_return Status{};
}

asio::awaitable<Status> Receiver::on_extent(const Extent& m, std::uint64_t link) {
  TANDEM_ASSERT(state_.role == Role::destination);
  if (!recv_ || recv_->link != link) co_return Error(errc::bad_message, "extent outside a transfer");
  if (m.offset < recv_->next || m.offset + m.length > total_bytes()) {
    if (recv_->mode != TransferMode::initial_compare || !recv_->awaiting_data.contains(m.offset)) {
      co_return Error(errc::bad_message, "extent at " + std::to_string(m.offset) + " out of order or out of range");
    }
  }
  if (!m.zero && xxh3_64(m.data.data(), m.data.size()) != m.hash) {
    spdlog::error(
        "session {}: extent at offset {} ({} bytes) of cycle {} fails its xxh3 hash: corrupted in transit; "
        "dropping the link to resume",
        opts_.session_id, m.offset, m.length, m.cycle);
    co_return Error(errc::bad_message, "extent hash mismatch at offset " + std::to_string(m.offset));
  }
  auto [mi, local] = locate(m.offset);
  ReceiverMember& mem = members_[mi];
  if (local + m.length > mem.volume->size_bytes()) co_return Error(errc::bad_message, "extent crosses a volume end");
  if (recv_->mode != TransferMode::cycle) {
    if (m.cycle != 0) co_return Error(errc::bad_message, "initial-sync extent with a cycle number");
    engine::IoBuffer buf;
    if (!m.zero) {
      buf = mem.env->buffers().allocate(m.length);
      std::memcpy(buf.data(), m.data.data(), m.length);
    }
    TANDEM_CO_TRY(writes_.first_error());
    co_await writes_.wait_below(kWritesMax);
    auto write = [](engine::Volume& v, std::uint64_t at, std::uint32_t len, bool zero,
                    engine::IoBuffer data) -> asio::awaitable<Status> {
      if (zero) co_return co_await v.zero_replicated(at, len);
      co_return co_await v.write_replicated(at, len, data);
    };
    writes_.spawn(write(*mem.volume, local, m.length, m.zero, std::move(buf)));
    recv_->awaiting_data.erase(m.offset);
    received_high_ = std::max(received_high_, m.offset + m.length);
    if (m.offset >= recv_->next) {
      recv_->next = m.offset + m.length;
      recv_->processed_end = recv_->next;
    }
    recv_->since_checkpoint += m.length;
    if (recv_->since_checkpoint >= recv_->checkpoint) TANDEM_CO_TRY(co_await initial_checkpoint(link));
    co_return Status{};
  }
  if (m.cycle != recv_->cycle)
    co_return Error(errc::bad_message,
                    "extent of cycle " + std::to_string(m.cycle) + " during " + std::to_string(recv_->cycle));
  Pending p{mi, engine::JournalExtent{local, m.length, m.zero, m.hash}, {}};
  if (!m.zero) {
    p.data = mem.env->buffers().allocate(m.length);
    std::memcpy(p.data.data(), m.data.data(), m.length);
  }
  recv_->pending_bytes += m.length;
  recv_->pending.push_back(std::move(p));
  recv_->next = m.offset + m.length;
  if (recv_->pending_bytes + unsynced_bytes_ >= recv_->batch) {
    TANDEM_CO_TRY(co_await stage_flush(link));
  } else if (recv_->pending.size() >= engine::CycleJournal::kExtentsPerRecordMax) {
    // A full record of small extents: written now, made durable (and acknowledged) with the
    // batch. A crash before the sync loses at most the unacknowledged tail: the journal scan
    // keeps the valid prefix.
    TANDEM_CO_TRY(co_await stage_write());
  }
  co_return Status{};
}

asio::awaitable<Status> Receiver::stage_flush(std::uint64_t link) {
  TANDEM_ASSERT(state_.role == Role::destination && recv_ && recv_->mode == TransferMode::cycle);
  if (recv_->pending.empty() && unsynced_bytes_ == 0) co_return Status{};
  TANDEM_CO_TRY(co_await stage_write());
  for (auto& j : journals_) {
    if (j) TANDEM_CO_TRY(co_await j->sync());
  }
  unsynced_bytes_ = 0;
  // Acknowledged on the link the transfer came on only: a pause asked on a newer link makes a
  // transfer of a lost one durable, and its source has begun nothing on this one yet (found by
  // the simulation, seed 335 of the failover runs: the source refused the ack).
  if (recv_->link != link) co_return Status{};
  const Ack ack{opts_.session_id, recv_->cycle, staged_end()};
  std::vector<std::byte> bytes = encode(ack);
  TANDEM_CO_TRY(co_await send(MsgType::ack, std::move(bytes)));
  spdlog::debug("session {}: cycle {} staged up to {}", opts_.session_id, recv_->cycle, staged_end());
  co_return Status{};
}

asio::awaitable<Status> Receiver::stage_write() {
  TANDEM_ASSERT(state_.role == Role::destination && recv_);
  if (recv_->pending.empty()) co_return Status{};
  // One record per member run; data concatenated.
  std::size_t i = 0;
  while (i < recv_->pending.size()) {
    const std::size_t mi = recv_->pending[i].member;
    std::size_t j = i;
    std::uint64_t bytes = 0;
    while (j < recv_->pending.size() && recv_->pending[j].member == mi &&
           j - i < engine::CycleJournal::kExtentsPerRecordMax) {
      if (!recv_->pending[j].e.zero) bytes += recv_->pending[j].e.length;
      ++j;
    }
    engine::IoBuffer data = members_[mi].env->buffers().allocate(std::max<std::uint64_t>(bytes, 4096));
    std::vector<engine::JournalExtent> exts;
    std::uint64_t at = 0;
    for (std::size_t k = i; k < j; ++k) {
      exts.push_back(recv_->pending[k].e);
      if (!recv_->pending[k].e.zero) {
        std::memcpy(data.data() + at, recv_->pending[k].data.data(), recv_->pending[k].e.length);
        at += recv_->pending[k].e.length;
      }
    }
    TANDEM_CO_TRY(co_await journals_[mi]->append(exts, data));
    i = j;
  }
  unsynced_bytes_ += recv_->pending_bytes;
  recv_->pending.clear();
  recv_->pending_bytes = 0;
  co_return Status{};
}

asio::awaitable<Status> Receiver::initial_checkpoint(std::uint64_t link) {
  TANDEM_ASSERT(state_.role == Role::destination && recv_ && recv_->mode != TransferMode::cycle);
  TANDEM_CO_TRY(co_await writes_.wait());
  for (auto& mem : members_) TANDEM_CO_TRY(co_await mem.volume->flush());
  std::uint64_t durable = recv_->processed_end;
  if (!recv_->awaiting_data.empty()) durable = std::min(durable, *recv_->awaiting_data.begin());
  TANDEM_CO_TRY(
      co_await store_.change("initial sync checkpoint", [durable](SessionState& s) { s.initial_offset = durable; }));
  recv_->since_checkpoint = 0;
  if (recv_->link != link) co_return Status{};  // a transfer of a lost link (stage_flush)
  const Ack ack{opts_.session_id, 0, durable};
  std::vector<std::byte> bytes = encode(ack);
  TANDEM_CO_TRY(co_await send(MsgType::ack, std::move(bytes)));
  co_return Status{};
}

asio::awaitable<Status> Receiver::on_extent_hash(const ExtentHash& m, std::uint64_t link) {
  TANDEM_ASSERT(state_.role == Role::destination);
  if (!recv_ || recv_->link != link || recv_->mode != TransferMode::initial_compare)
    co_return Error(errc::bad_message, "hash outside a compare");
  if (m.offset < recv_->next || m.offset + m.length > total_bytes())
    co_return Error(errc::bad_message, "hash out of order");
  auto [mi, local] = locate(m.offset);
  ReceiverMember& mem = members_[mi];
  if (local + m.length > mem.volume->size_bytes()) co_return Error(errc::bad_message, "hash crosses a volume end");
  engine::IoBuffer buf = mem.env->buffers().allocate(m.length);
  TANDEM_CO_TRY(co_await mem.volume->read(local, m.length, buf));
  const bool match = xxh3_64(buf.data(), m.length) == m.hash;
  if (!match) recv_->awaiting_data.insert(m.offset);
  recv_->next = m.offset + m.length;
  recv_->processed_end = recv_->next;
  recv_->since_checkpoint += m.length;
  const HashResult result{opts_.session_id, m.offset, m.length, match};
  std::vector<std::byte> bytes = encode(result);
  TANDEM_CO_TRY(co_await send(MsgType::hash_result, std::move(bytes)));
  if (recv_->since_checkpoint >= recv_->checkpoint) TANDEM_CO_TRY(co_await initial_checkpoint(link));
  co_return Status{};
}

asio::awaitable<Status> Receiver::on_cycle_end(const CycleEnd& m, std::uint64_t link) {
  TANDEM_ASSERT(state_.role == Role::destination);
  if (!recv_ || recv_->link != link) co_return Error(errc::bad_message, "cycle end outside a transfer");
  if (recv_->mode != TransferMode::cycle) {
    if (!recv_->awaiting_data.empty())
      co_return Error(errc::bad_message, "initial sync ended with extents still missing");
    recv_->processed_end = total_bytes();
    TANDEM_CO_TRY(co_await initial_checkpoint(link));
    TANDEM_CO_TRY(co_await store_.change("initial sync complete", m.generations,
                                         [](SessionState& s) { s.initial = InitialState::done; }));
    recv_.reset();
    spdlog::info("session {}: initial sync from {} complete; consistent after the first cycle", opts_.session_id,
                 opts_.peer_name);
    const Committed done{opts_.session_id, 0};
    std::vector<std::byte> bytes = encode(done);
    TANDEM_CO_TRY(co_await send(MsgType::committed, std::move(bytes)));
    co_return Status{};
  }
  if (m.cycle != recv_->cycle) co_return Error(errc::bad_message, "cycle end for another cycle");
  TANDEM_CO_TRY(co_await stage_flush(link));
  // The commit record: from here on the cycle is applied, whatever happens.
  TANDEM_CO_TRY(co_await store_.change("cycle committed (commit record)", m.generations,
                                       [&m](SessionState& s) { s.applying_cycle = m.cycle; }));
  TANDEM_CO_TRY(co_await apply_committed(m.cycle));
  recv_.reset();
  const Committed done{opts_.session_id, m.cycle};
  std::vector<std::byte> bytes = encode(done);
  TANDEM_CO_TRY(co_await send(MsgType::committed, std::move(bytes)));
  co_return Status{};
}

asio::awaitable<Status> Receiver::apply_committed(std::uint64_t cycle) {
  TANDEM_ASSERT(state_.role == Role::destination && state_.applying_cycle == cycle);
  Applied done;
  done.cycle = cycle;
  for (std::size_t mi = 0; mi < members_.size(); ++mi) {
    auto& j = journals_[mi];
    if (!j) continue;
    // Whoever keeps an image of the volume as it was sees the extents first.
    for (ApplyObserver* o : observers_) TANDEM_CO_TRY(co_await o->before_apply(mi, j->extents()));
    done.bytes += j->staged_bytes();
    TANDEM_CO_TRY(co_await j->apply(*members_[mi].volume));
  }
  done.at = clock_.system_now();
  if (recv_) {
    // As the source counts it: from the transfer's start (or resume) to the cycle in place.
    done.took = std::chrono::duration_cast<std::chrono::milliseconds>(clock_.steady_now() - recv_->started);
  }
  const std::uint64_t at_ms = unix_ms(done.at);
  TANDEM_CO_TRY(co_await store_.change("cycle applied", [&](SessionState& s) {
    s.committed_cycle = cycle;
    s.applying_cycle = 0;
    s.transfer_cycle = 0;
    s.last_sync_unix_ms = at_ms;
    done.also = hooks_.apply_also && hooks_.apply_also(s);
  }));
  for (auto& j : journals_) {
    if (j) TANDEM_CO_TRY(co_await j->remove());
    j.reset();
  }
  spdlog::info("session {}: cycle {} committed and applied ({} bytes)", opts_.session_id, cycle, done.bytes);
  if (hooks_.applied) hooks_.applied(done);
  co_return Status{};
}

}  // namespace tandem::replication

#include "transfer.h"

#include <spdlog/spdlog.h>

#include <boost/asio/co_spawn.hpp>

#include "tandem/common/hash.h"
#include "tandem/replication/errc.h"
#include "tandem/replication/session.h"

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

Transfer::Transfer(Session& s, TransferMode mode, std::uint64_t cycle, std::uint64_t start)
    : s_(s),
      mode_(mode),
      cycle_(cycle),
      start_(start),
      gen_(s.conn_gen_),
      what_(mode == TransferMode::cycle ? "cycle " + std::to_string(cycle) : std::string("initial sync")),
      acked_offset_(start),
      sent_end_(start),
      issued_end_(start) {}

bool Transfer::link_gone() const { return gen_ != s_.conn_gen_ || s_.stopping_; }

void Transfer::interrupt() { answered_.notify_all(); }

asio::awaitable<TransferOutcome> Transfer::run() {
  Status st = co_await ship();
  // A transfer that stopped early (link lost, pause, error) left reads in flight: they finish
  // before it ends, so whatever follows may free what they read.
  while (reads_in_flight_ > 0) co_await reads_done_.wait();
  if (st) co_return TransferOutcome{TransferEnd::committed, {}};
  if (st.code() == make_error_code(errc::paused)) co_return TransferOutcome{TransferEnd::paused, {}};
  if (link_gone()) co_return TransferOutcome{TransferEnd::link_lost, st};
  co_return TransferOutcome{TransferEnd::failed, st};
}

// The checks of the destination's answers: each names this transfer and a place it has sent.
std::string Transfer::on_ack(const Ack& a) {
  if (a.cycle != cycle_) {
    return "ack for cycle " + std::to_string(a.cycle) + " during the transfer of cycle " + std::to_string(cycle_);
  }
  if (a.durable_offset > issued_end_) {
    return "ack up to offset " + std::to_string(a.durable_offset) + " beyond the " + std::to_string(issued_end_) +
           " sent";
  }
  if (a.durable_offset < acked_offset_) {
    return "ack up to offset " + std::to_string(a.durable_offset) + " behind the " + std::to_string(acked_offset_) +
           " acknowledged before";
  }
  acked_offset_ = a.durable_offset;
  while (!unacked_.empty() && unacked_.front().first <= acked_offset_) {
    TANDEM_ASSERT(unacked_bytes_ >= unacked_.front().second);
    unacked_bytes_ -= unacked_.front().second;
    unacked_.pop_front();
  }
  answered_.notify_all();
  return {};
}

std::string Transfer::on_hash_result(const HashResult& r) {
  if (pending_hashes_ == 0) return "hash result at offset " + std::to_string(r.offset) + " with no hash asked";
  // A mismatch makes this side read and send the extent again: it must be one it could have
  // asked about (whole blocks within one member, at most one extent, below what was sent).
  const auto [mi, local] = s_.locate(r.offset);
  if (r.length == 0 || r.length % kBlock != 0 || r.offset % kBlock != 0 || r.length > s_.opts_.extent_bytes ||
      r.offset + r.length > issued_end_ || local + r.length > s_.members_[mi].m.volume->size_bytes()) {
    return "hash result for " + std::to_string(r.length) + " bytes at offset " + std::to_string(r.offset) +
           " that was never asked";
  }
  --pending_hashes_;
  if (!r.match) resend_.emplace_back(r.offset, r.length);
  answered_.notify_all();
  return {};
}

std::string Transfer::on_committed(const Committed& c) {
  if (!cycle_end_sent_ || committed_) return "committed cycle " + std::to_string(c.cycle) + " with no cycle end sent";
  if (c.cycle != cycle_) {
    return "committed cycle " + std::to_string(c.cycle) + " while cycle " + std::to_string(cycle_) +
           " awaits its commit";
  }
  committed_ = true;
  answered_.notify_all();
  return {};
}

asio::awaitable<Status> Transfer::wait_window() {
  // The window counts bytes, not offsets: a sparse frozen set jumps far ahead in offset while
  // only a little data is in flight.
  while (!link_gone() && unacked_bytes_ > s_.opts_.window_bytes) co_await answered_.wait();
  if (link_gone()) co_return Error(errc::peer_unreachable, "link lost during transfer");
  co_return Status{};
}

asio::awaitable<Status> Transfer::read_extent(std::size_t mi, std::uint64_t offset, std::uint32_t len,
                                              const engine::IoBuffer& buf) {
  auto& m = s_.members_[mi];
  TANDEM_CO_TRY(co_await m.m.volume->read(offset, len, buf));
  if (is_cycle() && m.preserve) {
    // Checked after the read: a host write that landed during it preserved the block first.
    for (std::uint64_t i = 0; i < len / kBlock; ++i) {
      const std::uint64_t b = offset / kBlock + i;
      if (m.preserve->contains(b)) TANDEM_CO_TRY(co_await m.preserve->read(b, buf.data() + i * kBlock));
    }
  }
  co_return Status{};
}

std::shared_ptr<Transfer::AheadRead> Transfer::start_read(std::size_t mi, std::uint64_t off, std::uint32_t len) {
  auto r = std::make_shared<AheadRead>();
  r->mi = mi;
  r->off = off;
  r->len = len;
  r->buf = s_.members_[mi].m.env->buffers().allocate(len);
  ++reads_in_flight_;
  // The coroutine holds the read: a transfer that stops early drops its queue, and run() waits
  // for reads_in_flight_ before it returns.
  auto read = [](Transfer* self, std::shared_ptr<AheadRead> rd) -> asio::awaitable<void> {
    rd->status = co_await self->read_extent(rd->mi, rd->off, rd->len, rd->buf);
    rd->done = true;
    --self->reads_in_flight_;
    self->reads_done_.notify_all();
  };
  asio::co_spawn(s_.ex_, read(this, r), abort_on_exception);
  return r;
}

void Transfer::log_reship() {
  if (!resumed_ || resume_logged_) return;
  resume_logged_ = true;
  spdlog::info("session {}: resume of {} re-shipped {} bytes", s_.opts_.id, what_,
               s_.counters_.bytes_reshipped - reshipped_before_);
}

asio::awaitable<Status> Transfer::send_extent(std::size_t mi, std::uint64_t off, std::uint32_t len, bool detect_zero,
                                              const engine::IoBuffer& data, std::shared_ptr<AheadRead> hold) {
  auto& c = s_.counters_;
  const std::uint64_t global = s_.members_[mi].base + off;
  Extent e{s_.opts_.id, cycle_, global, len, false, 0, {}};
  if (detect_zero && all_zero(data.data(), len)) {
    e.zero = true;
  } else {
    e.hash = xxh3_64(data.data(), len);
  }
  // At most three corruptions: each costs a reconnect and a resume, and a test wants the
  // session to converge afterwards.
  const std::uint64_t every = s_.opts_.corrupt_extent_every;
  if (!e.zero && every != 0 && ++c.extents_sent % every == 0 && c.corrupted < 3) {
    ++c.corrupted;
    // Probe: damage the data after hashing, as a bad NIC or memory would; the destination
    // must catch it by the hash.
    data.data()[len / 2] ^= std::byte{0x5a};
    spdlog::warn("session {}: probe corrupt_extent_every: corrupting the extent at offset {}", s_.opts_.id, global);
  }
  if (!e.zero) co_await s_.pace(len);
  auto header = encode_extent_header(e);
  if (hold) {
    TANDEM_CO_TRY(s_.sends_.first_error());
    // Bounded in frames and (about 16 MiB) in bytes.
    co_await s_.sends_.wait_below(std::clamp<std::size_t>((16u << 20) / len, 2, Session::kSendsInFlight));
    auto task = [](Session* self, std::vector<std::byte> hdr, std::shared_ptr<AheadRead> rd, std::uint32_t n,
                   bool zero) -> asio::awaitable<Status> {
      const std::span<const std::byte> payload =
          zero ? std::span<const std::byte>{} : std::span<const std::byte>(rd->buf.data(), n);
      co_return co_await self->send(MsgType::extent, std::move(hdr), payload);
    };
    s_.sends_.spawn(task(&s_, std::move(header), std::move(hold), len, e.zero));
  } else {
    TANDEM_CO_TRY(
        co_await s_.send(MsgType::extent, std::move(header),
                         e.zero ? std::span<const std::byte>{} : std::span<const std::byte>(data.data(), len)));
  }
  c.bytes_shipped += e.zero ? 0 : len;
  // Re-shipped: below where an interrupted attempt had got to (not a compare-mode resend).
  if (resumed_ && global < resume_high_) c.bytes_reshipped += std::min<std::uint64_t>(len, resume_high_ - global);
  co_return Status{};
}

asio::awaitable<Status> Transfer::drain_resends() {
  while (!resend_.empty()) {
    auto [off, len] = resend_.front();
    resend_.pop_front();
    auto [mi, local] = s_.locate(off);
    if (!resend_buf_) resend_buf_ = s_.members_[0].m.env->buffers().allocate(s_.opts_.extent_bytes);
    TANDEM_CO_TRY(co_await read_extent(mi, local, len, resend_buf_));
    TANDEM_CO_TRY(co_await send_extent(mi, local, len, false, resend_buf_, nullptr));
  }
  co_return Status{};
}

asio::awaitable<Status> Transfer::consume_ahead() {
  std::shared_ptr<AheadRead> r = std::move(ahead_.front());
  ahead_.pop_front();
  ahead_bytes_ -= r->len;
  while (!r->done) co_await reads_done_.wait();
  TANDEM_CO_TRY(r->status);
  const std::uint64_t base = s_.members_[r->mi].base;
  TANDEM_CO_TRY(co_await wait_window());
  TANDEM_CO_TRY(co_await drain_resends());
  // Before the frame can reach the peer: its answer may be handled before this resumes.
  issued_end_ = std::max(issued_end_, base + r->off + r->len);
  if (mode_ == TransferMode::initial_compare) {
    ++pending_hashes_;
    const ExtentHash eh{s_.opts_.id, base + r->off, r->len, xxh3_64(r->buf.data(), r->len)};
    std::vector<std::byte> bytes = encode(eh);
    TANDEM_CO_TRY(co_await s_.send(MsgType::extent_hash, std::move(bytes)));
  } else {
    TANDEM_CO_TRY(co_await send_extent(r->mi, r->off, r->len, mode_ == TransferMode::initial_full, r->buf, r));
  }
  TANDEM_ASSERT(base + r->off >= sent_end_);  // in offset order
  sent_end_ = base + r->off + r->len;
  auto& c = s_.counters_;
  c.high_water = std::max(c.high_water, sent_end_);
  unacked_.emplace_back(sent_end_, r->len);
  unacked_bytes_ += r->len;
  if (sent_end_ >= resume_high_) log_reship();
  c.transfer_done += r->len;
  co_return Status{};
}

asio::awaitable<Status> Transfer::ship() {
  auto& c = s_.counters_;
  for (const auto& m : s_.members_) frozen_blocks_ += m.frozen ? m.frozen->count() : 0;
  c.transfer_total = is_cycle() ? frozen_blocks_ * kBlock : s_.total_bytes();
  c.transfer_done = 0;
  c.transfer_started = s_.clock_.system_now();
  const std::uint64_t which = is_cycle() ? cycle_ : ~1ull;
  if (c.high_water_cycle != which) {
    c.high_water_cycle = which;
    c.high_water = start_;
  }
  resumed_ = start_ < c.high_water;
  resume_high_ = c.high_water;
  reshipped_before_ = c.bytes_reshipped;
  if (resumed_) {
    ++c.resumes;
    spdlog::info("session {}: resuming {} at offset {} (sent up to {} before the interruption)", s_.opts_.id, what_,
                 start_, c.high_water);
  }
  SyncBegin sb{s_.opts_.id, mode_, cycle_, frozen_blocks_, start_, s_.opts_.window_bytes, s_.generations_};
  std::vector<std::byte> begin_bytes = encode(sb);
  TANDEM_CO_TRY(co_await s_.send(MsgType::sync_begin, std::move(begin_bytes)));
  const std::uint32_t ext_max = s_.opts_.extent_bytes;
  // A transfer's sends from an earlier, interrupted one are over; their error is stale.
  (void)co_await s_.sends_.wait();
  // Reads run ahead of the sender (in order, bounded in bytes and count), so the disk sees a
  // queue of reads rather than one at a time between sends.
  for (std::size_t mi = 0; mi < s_.members_.size(); ++mi) {
    const auto& m = s_.members_[mi];
    const std::uint64_t size = m.m.volume->size_bytes();
    if (start_ >= m.base + size) continue;
    std::uint64_t pos = start_ > m.base ? (start_ - m.base) : 0;
    while (pos < size) {
      std::uint64_t off = pos;
      std::uint32_t len = 0;
      if (is_cycle()) {
        const std::uint64_t b = m.frozen->next_set(pos / kBlock);
        if (b >= m.frozen->blocks()) break;
        const std::uint64_t e = std::min(m.frozen->next_clear(b), b + ext_max / kBlock);
        off = b * kBlock;
        len = static_cast<std::uint32_t>((e - b) * kBlock);
      } else {
        len = static_cast<std::uint32_t>(std::min<std::uint64_t>(ext_max, size - pos));
      }
      while (!ahead_.empty() && (ahead_.size() >= kReadAheadMax || ahead_bytes_ + len > kReadAheadBytes)) {
        TANDEM_CO_TRY(co_await consume_ahead());
      }
      if (link_gone()) co_return Error(errc::peer_unreachable, "link lost during transfer");
      if (s_.state_.paused) {
        (void)co_await s_.sends_.wait();  // every queued extent goes out before the pause handshake
        co_return Error(errc::paused, "paused");
      }
      ahead_.push_back(start_read(mi, off, len));
      ahead_bytes_ += len;
      pos = off + len;
    }
  }
  while (!ahead_.empty()) TANDEM_CO_TRY(co_await consume_ahead());
  // Compare mode: every answer in, every differing extent sent.
  while (pending_hashes_ > 0 || !resend_.empty()) {
    TANDEM_CO_TRY(co_await drain_resends());
    if (pending_hashes_ == 0) break;
    if (link_gone()) co_return Error(errc::peer_unreachable, "link lost during transfer");
    co_await answered_.wait();
  }
  TANDEM_CO_TRY(co_await drain_resends());
  TANDEM_CO_TRY(co_await s_.sends_.wait());  // every extent queued before cycle_end
  log_reship();
  // What the destination is about to commit must be durable here first: a block the disk still
  // cached could be lost or torn by a power loss while the destination holds it whole, and once
  // committed, nothing here marks it as differing any more (found by the simulation, seed 889
  // of the power-loss runs: a block whose intent region had been evicted before the cut).
  for (auto& m : s_.members_) TANDEM_CO_TRY(co_await m.m.volume->flush_data());
  const CycleEnd end_msg{s_.opts_.id, cycle_, s_.total_bytes(), s_.generations_};
  std::vector<std::byte> end_bytes = encode(end_msg);
  cycle_end_sent_ = true;
  TANDEM_CO_TRY(co_await s_.send(MsgType::cycle_end, std::move(end_bytes)));
  while (!committed_) {
    if (link_gone()) co_return Error(errc::peer_unreachable, "link lost before the commit");
    co_await answered_.wait();
  }
  co_return Status{};
}

}  // namespace tandem::replication

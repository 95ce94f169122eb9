// Transfer: one transfer of a source to its destination, from its sync_begin to the commit
// (an initial sync in either mode, or a cycle), on one link.
//
// It owns everything that lives only as long as it: the window of extents sent and not yet
// acknowledged, the hash questions in flight and the extents to send again (compare mode), the
// reads running ahead of the sender, and the progress it reports. Each transfer starts fresh, so
// nothing is reset by hand, and it ends in one of four ways: committed (the destination said
// so), paused (an operator's pause stopped it at an extent boundary), link lost (or the session
// stopping), or failed (an I/O error, or the destination's answer refused).
//
// The destination's answers reach it through on_ack / on_hash_result / on_committed, which
// check each against what this transfer asked and sent: an answer for another cycle, a second
// hash reply, an acknowledgement beyond what was sent, is refused (the session closes the link,
// and the transfer resumes from its restart address on the next one).
#pragma once

#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>

#include "tandem/common/async.h"
#include "tandem/common/result.h"
#include "tandem/engine/io_buffer.h"
#include "tandem/replication/messages.h"
#include "tandem/replication/session.h"

namespace tandem::replication {

class Transfer {
 public:
  Transfer(Session& s, TransferMode mode, std::uint64_t cycle, std::uint64_t start);
  Transfer(const Transfer&) = delete;
  Transfer& operator=(const Transfer&) = delete;

  // Runs the transfer to its end. It returns only once none of its reads runs any more (they
  // use the cycle's preserve logs, which a role change or the cycle's end frees).
  asio::awaitable<TransferOutcome> run();
  // The link it runs on is gone, or the session stops: whatever it waits for ends now.
  void interrupt();

  // The destination's answers: an empty string, or why the answer is refused.
  [[nodiscard]] std::string on_ack(const Ack& a);
  [[nodiscard]] std::string on_hash_result(const HashResult& r);
  [[nodiscard]] std::string on_committed(const Committed& c);

  [[nodiscard]] std::uint64_t cycle() const { return cycle_; }
  [[nodiscard]] bool is_cycle() const { return mode_ == TransferMode::cycle; }
  // The destination's durable point of this transfer: where it resumes.
  [[nodiscard]] std::uint64_t acked_offset() const { return acked_offset_; }
  [[nodiscard]] std::uint64_t sent_end() const { return sent_end_; }
  [[nodiscard]] std::uint64_t frozen_blocks() const { return frozen_blocks_; }

 private:
  // A read of an extent to ship, started ahead of the sender.
  struct AheadRead {
    std::size_t mi = 0;
    std::uint64_t off = 0;
    std::uint32_t len = 0;
    engine::IoBuffer buf;
    bool done = false;
    Status status;
  };
  static constexpr std::size_t kReadAheadMax = 128;
  static constexpr std::uint64_t kReadAheadBytes = 8ull << 20;

  asio::awaitable<Status> ship();
  [[nodiscard]] bool link_gone() const;
  asio::awaitable<Status> read_extent(std::size_t mi, std::uint64_t offset, std::uint32_t len,
                                      const engine::IoBuffer& buf);
  std::shared_ptr<AheadRead> start_read(std::size_t mi, std::uint64_t off, std::uint32_t len);
  asio::awaitable<Status> wait_window();
  // Sends an extent whose data is in `data`. With `hold` (the read that owns the data), the
  // frame is queued without waiting for it to be written, so the connection's writer batches
  // many small extents into one TLS write; frames still go out in the order queued.
  asio::awaitable<Status> send_extent(std::size_t mi, std::uint64_t off, std::uint32_t len, bool detect_zero,
                                      const engine::IoBuffer& data, std::shared_ptr<AheadRead> hold);
  asio::awaitable<Status> drain_resends();
  asio::awaitable<Status> consume_ahead();
  void log_reship();

  Session& s_;
  const TransferMode mode_;
  const std::uint64_t cycle_;
  const std::uint64_t start_;
  const std::uint64_t gen_;  // the link it runs on
  const std::string what_;   // "cycle 7" or "initial sync", for the log
  std::uint64_t frozen_blocks_ = 0;
  bool resumed_ = false;           // started below where an interrupted attempt had got to
  std::uint64_t resume_high_ = 0;  // where that was
  std::uint64_t reshipped_before_ = 0;
  bool resume_logged_ = false;
  engine::IoBuffer resend_buf_;

  // The window: extents sent (their end offset and bytes) and not yet acknowledged.
  std::uint64_t acked_offset_;
  std::uint64_t sent_end_;
  std::uint64_t issued_end_;  // the furthest byte handed to the link
  std::deque<std::pair<std::uint64_t, std::uint64_t>> unacked_;
  std::uint64_t unacked_bytes_ = 0;
  // Compare mode: hashes asked and not answered, and extents the destination lacks.
  std::uint64_t pending_hashes_ = 0;
  std::deque<std::pair<std::uint64_t, std::uint32_t>> resend_;
  bool cycle_end_sent_ = false;
  bool committed_ = false;
  WaitQueue answered_;  // an answer arrived, or interrupt()

  std::deque<std::shared_ptr<AheadRead>> ahead_;
  std::uint64_t ahead_bytes_ = 0;
  std::size_t reads_in_flight_ = 0;
  WaitQueue reads_done_;
};

}  // namespace tandem::replication

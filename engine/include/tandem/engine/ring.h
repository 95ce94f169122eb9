// Ring: one io_uring driven from an Asio io_context.
//
// Submissions are prepared into the SQ and pushed to the kernel in one io_uring_submit() per
// event-loop turn (batching). Completions are signalled through an eventfd registered with the
// ring and watched by an asio::posix::stream_descriptor; the reaper drains the whole CQ (the
// eventfd is only a hint) and posts each completion handler, never running it inside the CQ
// loop. In-flight operations never exceed the ring's entries (asserted); excess submissions
// wait in a FIFO until completions free a slot.
//
// Threading: a Ring and all its operations belong to the io_context's single thread.
// Ownership: the owner calls stop() and waits until in_flight() == 0 before destroying it.
#pragma once

#include <liburing.h>

#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>

#include "tandem/common/result.h"
#include "tandem/engine/io_buffer.h"

namespace tandem::engine {

namespace asio = boost::asio;

struct RingOptions {
  // SQ entries; also the bound on operations in flight in the kernel. 256 covers QD32 on
  // several NBD connections with room for metadata writes.
  unsigned entries = 256;
};

class Ring {
 public:
  static Result<std::unique_ptr<Ring>> create(asio::io_context& ctx, RingOptions opts = {});
  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  // Registers the arena as fixed buffer 0. Failure (e.g. RLIMIT_MEMLOCK) is not fatal: the
  // engine then uses non-fixed reads and writes, and the reason is returned for the log.
  Status register_arena(BufferArena& arena);

  // Submits one operation prepared by `prep(io_uring_sqe*)` and completes with cqe->res.
  template <typename Prep>
  asio::awaitable<int> submit(Prep prep) {
    return asio::async_initiate<const asio::use_awaitable_t<>&, void(int)>(
        [this, prep = std::move(prep)](auto handler) mutable {
          auto* op = new OpImpl<decltype(handler)>(std::move(handler));
          std::memset(&op->sqe, 0, sizeof op->sqe);
          prep(&op->sqe);
          enqueue(op);
        },
        asio::use_awaitable);
  }

  // Stops the reaper once in-flight work has drained.
  void stop();
  [[nodiscard]] unsigned in_flight() const { return in_flight_; }
  [[nodiscard]] std::size_t queued() const { return pending_.size(); }
  [[nodiscard]] bool arena_registered() const { return arena_registered_; }
  [[nodiscard]] std::uint64_t submit_calls() const { return submit_calls_; }
  [[nodiscard]] std::uint64_t ops_completed() const { return ops_completed_; }

 private:
  struct OpBase {
    virtual ~OpBase() = default;
    virtual void complete(int res) = 0;
    io_uring_sqe sqe;
  };
  template <typename Handler>
  struct OpImpl final : OpBase {
    explicit OpImpl(Handler h) : handler(std::move(h)) {}
    void complete(int res) override {
      auto ex = asio::get_associated_executor(handler);
      asio::post(ex, [h = std::move(handler), res]() mutable { std::move(h)(res); });
    }
    Handler handler;
  };

  Ring(asio::io_context& ctx, unsigned entries);
  void enqueue(OpBase* op);
  bool try_push(OpBase* op);
  void schedule_submit();
  void do_submit();
  void arm_reaper();
  void reap();

  struct Impl;
  asio::io_context& ctx_;
  std::unique_ptr<Impl> impl_;  // io_uring + eventfd descriptor (keeps Asio's posix headers out)
  unsigned entries_;
  unsigned in_flight_ = 0;
  unsigned unsubmitted_ = 0;
  bool submit_scheduled_ = false;
  bool stopping_ = false;
  bool arena_registered_ = false;
  std::uint64_t submit_calls_ = 0;
  std::uint64_t ops_completed_ = 0;
  std::deque<OpBase*> pending_;
};

}  // namespace tandem::engine

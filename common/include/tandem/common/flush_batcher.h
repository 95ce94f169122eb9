// FlushBatcher: group commit. Many writers each need "my completed write is durable"; one
// flush covers every write completed before it started, so concurrent writers share flushes
// instead of issuing one each.
//
// Use: after your write completes, `co_await batcher.durable(flush_fn)`. It returns the status
// of a flush that started after your write completed (yours or a shared one).
// Threading: one io_context thread.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <cstdint>

#include "tandem/common/async.h"
#include "tandem/common/result.h"

namespace tandem {

class FlushBatcher {
 public:
  template <typename FlushFn>
  asio::awaitable<Status> durable(FlushFn flush) {
    const std::uint64_t mine = ++completed_;  // this write is the `mine`-th completed
    while (flushed_ < mine) {
      if (!flushing_) {
        flushing_ = true;
        const std::uint64_t target = completed_;
        Status st = co_await flush();
        flushing_ = false;
        if (st) {
          flushed_ = target;
        } else {
          last_error_ = st;
        }
        waiters_.notify_all();
        if (!st) co_return st;
        continue;
      }
      co_await waiters_.wait();
      if (!last_error_.ok() && flushed_ < mine) co_return last_error_;
    }
    co_return Status{};
  }

  // How many completed writes are known durable.
  [[nodiscard]] std::uint64_t covered() const { return flushed_; }

 private:
  std::uint64_t completed_ = 0;
  std::uint64_t flushed_ = 0;
  bool flushing_ = false;
  Status last_error_;
  WaitQueue waiters_;
};

}  // namespace tandem

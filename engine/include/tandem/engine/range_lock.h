// RangeLock: exclusive locks on block ranges, granted in arrival order among overlapping
// requests.
//
// Writes lock the aligned span they touch, so a read-modify-write of a partial block can never
// interleave with another write to that block, and overlapping writes reach the device in the
// order they arrived. Non-overlapping ranges proceed in parallel. The number of entries is
// bounded by the writes in flight (NBD connections × their request limit).
//
// Threading: one io_context thread.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <list>

#include "tandem/common/async.h"

namespace tandem::engine {

struct RangeEntry {
  std::uint64_t first = 0;
  std::uint64_t end = 0;
};

class RangeLock {
 public:
  class Guard {
   public:
    Guard() = default;
    Guard(RangeLock* l, std::list<RangeEntry>::iterator it) : lock_(l), it_(it) {}
    Guard(Guard&& o) noexcept : lock_(o.lock_), it_(o.it_) { o.lock_ = nullptr; }
    Guard& operator=(Guard&&) = delete;
    Guard(const Guard&) = delete;
    ~Guard() {
      if (lock_ != nullptr) lock_->release(it_);
    }

   private:
    RangeLock* lock_ = nullptr;
    std::list<RangeEntry>::iterator it_;
  };

  // Waits until [first, first+count) overlaps no earlier entry, then holds it until the guard
  // is destroyed.
  asio::awaitable<Guard> acquire(std::uint64_t first, std::uint64_t count);

  [[nodiscard]] std::size_t entries() const { return entries_.size(); }

 private:
  friend class Guard;
  void release(std::list<RangeEntry>::iterator it);
  bool blocked(std::list<RangeEntry>::iterator it) const;

  std::list<RangeEntry> entries_;
  WaitQueue waiters_;
};

}  // namespace tandem::engine

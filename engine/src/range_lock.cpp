#include "tandem/engine/range_lock.h"

#include "tandem/common/assert.h"

namespace tandem::engine {

bool RangeLock::blocked(std::list<RangeEntry>::iterator it) const {
  for (auto e = entries_.begin(); e != it; ++e) {
    if (e->first < it->end && it->first < e->end) return true;
  }
  return false;
}

asio::awaitable<RangeLock::Guard> RangeLock::acquire(std::uint64_t first, std::uint64_t count) {
  TANDEM_ASSERT(count > 0);
  auto it = entries_.insert(entries_.end(), RangeEntry{first, first + count});
  while (blocked(it)) co_await waiters_.wait();
  co_return Guard(this, it);
}

void RangeLock::release(std::list<RangeEntry>::iterator it) {
  entries_.erase(it);
  // Everyone re-checks; waiters are few (bounded by writes in flight).
  waiters_.notify_all();
}

}  // namespace tandem::engine

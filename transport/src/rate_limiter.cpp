#include "tandem/transport/rate_limiter.h"

#include <algorithm>

#include "tandem/common/assert.h"

namespace tandem::transport {

RateLimiter::RateLimiter(std::uint64_t bytes_per_s, Clock::duration burst, Clock::time_point now)
    : rate_(bytes_per_s), burst_(burst), paid_until_(now) {
  TANDEM_ASSERT(burst.count() >= 0);
}

RateLimiter::Clock::duration RateLimiter::cost(std::uint64_t bytes) const {
  TANDEM_ASSERT(rate_ != 0);
  // Rounded up, so the rate is never exceeded; 128 bits so a big count at a low rate cannot
  // overflow before the division.
  const auto per_s =
      static_cast<unsigned __int128>(std::chrono::duration_cast<Clock::duration>(std::chrono::seconds(1)).count());
  const unsigned __int128 ticks = (static_cast<unsigned __int128>(bytes) * per_s + rate_ - 1) / rate_;
  // A cost beyond ~290 years (int64 nanoseconds) is clamped; no sender waits that long anyway.
  const auto max = static_cast<unsigned __int128>(Clock::duration::max().count() / 4);
  return Clock::duration(static_cast<Clock::rep>(std::min(ticks, max)));
}

void RateLimiter::set_rate(std::uint64_t bytes_per_s, Clock::time_point now) {
  if (bytes_per_s == rate_) return;
  std::uint64_t owed_bytes = 0;
  if (rate_ != 0 && paid_until_ > now) {
    const auto ahead = static_cast<unsigned __int128>((paid_until_ - now).count());
    const auto per_s =
        static_cast<unsigned __int128>(std::chrono::duration_cast<Clock::duration>(std::chrono::seconds(1)).count());
    owed_bytes = static_cast<std::uint64_t>(ahead * rate_ / per_s);
  }
  const Clock::time_point old_paid_until = std::max(paid_until_, now);
  rate_ = bytes_per_s;
  paid_until_ = now;
  // Bytes already sent were sent under the old limit: a higher limit shortens what they still
  // cost (re-priced), a lower one does not charge them again (the wait already scheduled is
  // kept, never lengthened). The new limit governs the bytes sent from now on.
  if (rate_ != 0 && owed_bytes != 0) paid_until_ = std::min(old_paid_until, now + cost(owed_bytes));
}

RateLimiter::Clock::duration RateLimiter::delay(Clock::time_point now) const {
  if (rate_ == 0) return Clock::duration::zero();
  const Clock::time_point allowed_at = paid_until_ - burst_;
  return allowed_at > now ? allowed_at - now : Clock::duration::zero();
}

void RateLimiter::consume(std::uint64_t bytes, Clock::time_point now) {
  if (rate_ == 0) return;
  paid_until_ = std::max(paid_until_, now) + cost(bytes);
}

}  // namespace tandem::transport

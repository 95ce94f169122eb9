#include "tandem/transport/backoff.h"

#include <algorithm>

#include "tandem/common/assert.h"

namespace tandem::transport {

Backoff::Backoff(std::uint32_t min_ms, std::uint32_t max_ms, std::uint64_t seed)
    : min_ms_(min_ms), max_ms_(max_ms), rng_(seed) {
  TANDEM_ASSERT(min_ms >= 1 && min_ms <= max_ms);
}

std::uint32_t Backoff::next_ms() {
  // 2^32 × min overflows nothing in 64 bits once the exponent is capped at 32.
  const std::uint64_t step64 =
      std::min<std::uint64_t>(max_ms_, std::uint64_t{min_ms_} << std::min<std::uint32_t>(attempt_, 32));
  const auto step = static_cast<std::uint32_t>(step64);
  if (attempt_ < 64) ++attempt_;  // bounded: the step is at max_ms long before this
  const std::uint32_t low = std::max(min_ms_, step / 2);
  std::uniform_int_distribution<std::uint32_t> dist(low, step);
  const std::uint32_t d = dist(rng_);
  TANDEM_ASSERT(d >= min_ms_ && d <= max_ms_);
  return d;
}

}  // namespace tandem::transport

// Backoff: the delays between reconnect attempts. Exponential from min_ms to max_ms, with
// "equal jitter" (each delay is uniformly drawn from the upper half of the current step, and
// never below min_ms), so two daemons that lost their link at the same instant do not redial
// in lock-step. Sans-IO and seeded: the same seed gives the same delays.
//
// Not thread-safe; one owner (the Link's dial loop).
#pragma once

#include <cstdint>
#include <random>

namespace tandem::transport {

class Backoff {
 public:
  // Asserts 1 <= min_ms <= max_ms.
  Backoff(std::uint32_t min_ms, std::uint32_t max_ms, std::uint64_t seed);

  // The next delay, in ms: within [max(min, step/2), step] where step = min(max, min × 2^n)
  // and n is the number of delays taken since the last reset().
  std::uint32_t next_ms();
  // After a connection that stayed up: the next delay starts from min_ms again.
  void reset() { attempt_ = 0; }
  [[nodiscard]] std::uint32_t attempt() const { return attempt_; }

 private:
  std::uint32_t min_ms_;
  std::uint32_t max_ms_;
  std::uint32_t attempt_ = 0;
  std::mt19937_64 rng_;
};

}  // namespace tandem::transport

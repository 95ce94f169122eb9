// RateLimiter: the token bucket behind LinkOptions::rate_limit_bytes_per_s, written as a
// virtual-scheduling (GCRA) meter so it needs no refill timer and no floating point.
//
// The caller asks delay(now) before sending; when it is zero the caller sends any number of
// bytes and reports them with consume(bytes, now). Sending is allowed while the bytes already
// sent are at most `burst` worth of time ahead of the rate; a big frame may overdraw (the
// bucket goes into debt) and the debt is paid by the following delays, so the long-run rate
// is exact whatever the frame sizes. Time is a parameter, never read here, so tests drive it
// with a fake clock.
//
// Not thread-safe; one owner (the connection's writer).
#pragma once

#include <chrono>
#include <cstdint>

namespace tandem::transport {

class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  // How far ahead of the rate a sender may run: the burst is rate × kBurstDefault bytes.
  static constexpr std::chrono::milliseconds kBurstDefault{100};

  explicit RateLimiter(std::uint64_t bytes_per_s = 0, Clock::duration burst = kBurstDefault,
                       Clock::time_point now = Clock::now());

  // 0 = unlimited. Bytes already sent were legal under the old rate: raising the limit re-prices
  // what they still owe (the wait already scheduled gets shorter); lowering it keeps that wait
  // as it is rather than charging those bytes again at the lower rate (which could stall a
  // sender for minutes after a burst). Bytes sent from now on pay the new rate.
  void set_rate(std::uint64_t bytes_per_s, Clock::time_point now);
  [[nodiscard]] std::uint64_t rate() const { return rate_; }
  [[nodiscard]] bool limited() const { return rate_ != 0; }

  // How long to wait before sending anything; zero when sending is allowed now.
  [[nodiscard]] Clock::duration delay(Clock::time_point now) const;
  // Accounts `bytes` sent at `now` (which should be after delay(now) reached zero).
  void consume(std::uint64_t bytes, Clock::time_point now);

 private:
  [[nodiscard]] Clock::duration cost(std::uint64_t bytes) const;

  std::uint64_t rate_ = 0;
  Clock::duration burst_;
  // The theoretical time at which everything consumed so far has been paid for at the rate.
  Clock::time_point paid_until_;
};

}  // namespace tandem::transport

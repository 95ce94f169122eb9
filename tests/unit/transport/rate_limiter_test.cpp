// Plan: the rate limiter and the back-off are sans-IO, so they are driven here with a fake
// clock and fixed seeds, never with wall time. The limiter: unlimited means no delay; a burst
// of rate × burst-window goes out at once and then sends are spaced at the rate; over a long
// simulated run with frames of random sizes (including frames bigger than the burst) the bytes
// sent stay within rate × elapsed + burst + one frame, and come close to it (the limit is a
// limit, not a throttle to zero); a raised rate shortens the wait already owed, a lowered one
// never lengthens it, new bytes pay the new rate, and switching to unlimited clears the debt. The back-off:
// delays grow exponentially to the cap, each within its jitter window, the same seed gives the same delays,
// reset() starts over.
#include <gtest/gtest.h>

#include <random>

#include "tandem/transport/backoff.h"
#include "tandem/transport/rate_limiter.h"

namespace tandem::transport {
namespace {

using Clock = RateLimiter::Clock;
using namespace std::chrono_literals;

TEST(RateLimiter, UnlimitedNeverWaits) {
  const Clock::time_point t0{};
  RateLimiter r(0, 100ms, t0);
  EXPECT_FALSE(r.limited());
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(r.delay(t0), Clock::duration::zero());
    r.consume(1 << 20, t0);
  }
}

TEST(RateLimiter, BurstThenSpacedAtTheRate) {
  const Clock::time_point t0{};
  RateLimiter r(1000, 100ms, t0);  // 1000 B/s, burst 100 bytes
  EXPECT_EQ(r.delay(t0), Clock::duration::zero());
  r.consume(100, t0);  // exactly the burst
  EXPECT_EQ(r.delay(t0), Clock::duration::zero());
  r.consume(100, t0);  // now 100 ms ahead of the allowance
  EXPECT_EQ(r.delay(t0), 100ms);
  EXPECT_EQ(r.delay(t0 + 60ms), 40ms);
  EXPECT_EQ(r.delay(t0 + 100ms), Clock::duration::zero());
  // A frame much bigger than the burst is allowed once (debt), then paid back.
  r.consume(5000, t0 + 100ms);
  EXPECT_EQ(r.delay(t0 + 100ms), 5000ms);
}

TEST(RateLimiter, LongRunStaysWithinTheRate) {
  for (std::uint64_t rate : {1'000ull, 1'000'000ull, 100'000'000ull}) {
    const Clock::time_point t0{};
    RateLimiter r(rate, 100ms, t0);
    std::mt19937_64 rng(rate);
    Clock::time_point now = t0;
    std::uint64_t sent = 0;
    std::uint64_t biggest = 0;
    const Clock::time_point end = t0 + 60s;
    while (now < end) {
      const Clock::duration d = r.delay(now);
      if (d > Clock::duration::zero()) {
        now += d;  // a sender that sleeps exactly as told
        continue;
      }
      const std::uint64_t frame = 1 + rng() % (rate / 2 + 1);
      biggest = std::max(biggest, frame);
      r.consume(frame, now);
      sent += frame;
      const double elapsed_s = std::chrono::duration<double>(now - t0).count();
      ASSERT_LE(static_cast<double>(sent),
                static_cast<double>(rate) * (elapsed_s + 0.1) + static_cast<double>(biggest) + 1)
          << "rate " << rate;
    }
    const double elapsed_s = std::chrono::duration<double>(now - t0).count();
    EXPECT_GE(static_cast<double>(sent), static_cast<double>(rate) * elapsed_s * 0.9) << "rate " << rate;
  }
}

TEST(RateLimiter, ARateChangeNeverLengthensTheWaitAlreadyOwed) {
  const Clock::time_point t0{};
  RateLimiter r(1000, 0ms, t0);
  r.consume(1000, t0);  // owes 1 s at 1000 B/s
  EXPECT_EQ(r.delay(t0), 1s);
  r.set_rate(2000, t0);  // raised: the same 1000 bytes take 0.5 s at the new rate
  EXPECT_EQ(r.delay(t0), 500ms);
  r.set_rate(10, t0 + 250ms);  // lowered: the 250 ms left stay 250 ms, not 50 s
  EXPECT_EQ(r.delay(t0 + 250ms), 250ms);
  r.consume(10, t0 + 500ms);  // new bytes pay the new rate: 1 s for 10 bytes
  EXPECT_EQ(r.delay(t0 + 500ms), 1s);
  r.set_rate(0, t0 + 500ms);  // unlimited: nothing owed
  EXPECT_EQ(r.delay(t0 + 500ms), Clock::duration::zero());
  r.set_rate(1000, t0 + 500ms);  // limited again, starting clean
  EXPECT_EQ(r.delay(t0 + 500ms), Clock::duration::zero());
}

TEST(Backoff, GrowsToTheCapWithinTheJitterWindow) {
  Backoff b(100, 5000, 7);
  std::uint32_t step = 100;
  for (int i = 0; i < 20; ++i) {
    const std::uint32_t d = b.next_ms();
    EXPECT_GE(d, std::max<std::uint32_t>(100, step / 2)) << i;
    EXPECT_LE(d, step) << i;
    step = std::min<std::uint32_t>(5000, step * 2);
  }
  b.reset();
  EXPECT_LE(b.next_ms(), 100u);
}

TEST(Backoff, SameSeedSameDelaysAndJitterVaries) {
  Backoff a(10, 10'000, 99);
  Backoff b(10, 10'000, 99);
  Backoff c(10, 10'000, 100);
  bool differs = false;
  for (int i = 0; i < 30; ++i) {
    const std::uint32_t x = a.next_ms();
    EXPECT_EQ(x, b.next_ms());
    differs = differs || x != c.next_ms();
  }
  EXPECT_TRUE(differs);
  Backoff flat(50, 50, 1);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(flat.next_ms(), 50u);
}

}  // namespace
}  // namespace tandem::transport

#include "tandem/engine/clock.h"

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <random>

namespace tandem::engine {
namespace {

class SteadyTimer final : public Timer {
 public:
  explicit SteadyTimer(asio::any_io_executor ex) : t_(std::move(ex)) {}
  asio::awaitable<bool> wait_for(std::chrono::nanoseconds d) override {
    t_.expires_after(d);
    auto [ec] = co_await t_.async_wait(asio::as_tuple(asio::use_awaitable));
    co_return !ec;
  }
  void cancel() override { t_.cancel(); }

 private:
  asio::steady_timer t_;
};

class SystemClock final : public Clock {
 public:
  std::chrono::steady_clock::time_point steady_now() override { return std::chrono::steady_clock::now(); }
  std::chrono::system_clock::time_point system_now() override { return std::chrono::system_clock::now(); }
  std::unique_ptr<Timer> make_timer(asio::any_io_executor ex) override {
    return std::make_unique<SteadyTimer>(std::move(ex));
  }
  std::uint64_t random_u64() override { return (std::uint64_t{rd_()} << 32) ^ rd_(); }

 private:
  std::random_device rd_;
};

}  // namespace

Clock& system_clock() {
  static SystemClock c;
  return c;
}

}  // namespace tandem::engine

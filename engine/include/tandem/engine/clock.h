// Clock: time and chance, behind the same seam as the disk (DeviceEnv::clock()).
//
// Everything above the operating system that asks what time it is, waits for a while, or draws
// a random number (a new generation id, a volume's uuid) asks a Clock. The production one reads
// the system's clocks, waits on Asio timers and draws from std::random_device; a simulation
// supplies one whose time moves only when it says so and whose numbers come from a seed, so a
// run replays exactly.
//
// Threading: timers are made for one executor and used on it only.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <chrono>
#include <cstdint>
#include <memory>

namespace tandem::engine {

namespace asio = boost::asio;

class Timer {
 public:
  virtual ~Timer() = default;
  // Waits `d`. True when the time passed, false when cancel() cut the wait short. A cancel()
  // with no wait under way has no effect on the next wait.
  virtual asio::awaitable<bool> wait_for(std::chrono::nanoseconds d) = 0;
  virtual void cancel() = 0;
};

class Clock {
 public:
  virtual ~Clock() = default;
  // For intervals (never goes back).
  virtual std::chrono::steady_clock::time_point steady_now() = 0;
  // For timestamps shown to people and kept on disk.
  virtual std::chrono::system_clock::time_point system_now() = 0;
  virtual std::unique_ptr<Timer> make_timer(asio::any_io_executor ex) = 0;
  virtual std::uint64_t random_u64() = 0;
};

// The system's clocks, Asio's steady_timer and std::random_device. One per process.
Clock& system_clock();

}  // namespace tandem::engine

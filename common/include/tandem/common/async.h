// Small Asio coroutine primitives shared by the modules.
//
// Everything here runs on one io_context thread (a shard): none of these types is thread-safe,
// and none needs to be, because every caller lives on the same executor. Waiters are resumed by
// posting, never inline, so a notify() inside a completion handler does not re-enter its caller.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <deque>
#include <exception>
#include <memory>
#include <utility>

#include "tandem/common/result.h"

namespace tandem {

namespace asio = boost::asio;

// The completion handler for every co_spawn in tandem: errors are values here, so a coroutine
// that lets an exception escape is a bug, and carrying on would leave what it was doing half
// torn down; log it (naming the coroutine) and abort rather than lose it (asio::detached would
// swallow it).
struct AbortOnException {
  const char* what;  // "an NBD connection", ...
  void operator()(const std::exception_ptr& e) const;
};
void abort_on_exception(std::exception_ptr e);  // AbortOnException{"a coroutine"}

// A move-only, type-erased `void(Args...)` callable (std::move_only_function is C++23).
template <typename Sig>
class MoveFunction;

template <typename R, typename... Args>
class MoveFunction<R(Args...)> {
 public:
  MoveFunction() = default;
  template <typename F>
  MoveFunction(F f) : impl_(std::make_unique<Impl<F>>(std::move(f))) {}  // NOLINT
  MoveFunction(MoveFunction&&) noexcept = default;
  MoveFunction& operator=(MoveFunction&&) noexcept = default;
  explicit operator bool() const { return impl_ != nullptr; }
  R operator()(Args... args) { return impl_->call(std::forward<Args>(args)...); }

 private:
  struct Base {
    virtual ~Base() = default;
    virtual R call(Args... args) = 0;
  };
  template <typename F>
  struct Impl final : Base {
    explicit Impl(F f) : fn(std::move(f)) {}
    R call(Args... args) override { return fn(std::forward<Args>(args)...); }
    F fn;
  };
  std::unique_ptr<Base> impl_;
};

// A queue of suspended coroutines waiting for "something changed". Used as a condition
// variable: the waiter re-checks its condition after every wake-up.
class WaitQueue {
 public:
  WaitQueue() = default;
  WaitQueue(const WaitQueue&) = delete;
  WaitQueue& operator=(const WaitQueue&) = delete;

  // Suspends until notify_one()/notify_all() picks this waiter.
  asio::awaitable<void> wait() {
    return asio::async_initiate<const asio::use_awaitable_t<>&, void()>(
        [this](auto handler) {
          auto ex = asio::get_associated_executor(handler);
          waiters_.emplace_back([h = std::move(handler), ex]() mutable { asio::post(ex, std::move(h)); });
        },
        asio::use_awaitable);
  }

  void notify_one() {
    if (waiters_.empty()) return;
    auto w = std::move(waiters_.front());
    waiters_.pop_front();
    w();
  }

  void notify_all() {
    auto ws = std::move(waiters_);
    waiters_.clear();
    for (auto& w : ws) w();
  }

  [[nodiscard]] std::size_t size() const { return waiters_.size(); }

 private:
  std::deque<MoveFunction<void()>> waiters_;
};

// A mutual-exclusion lock for coroutines on one executor: what is held across a co_await
// (a cycle's apply, a failover test's image) is used by one holder at a time. Ownership is
// handed to the longest waiter on unlock, so a stream of new lockers cannot starve it.
class AsyncMutex {
 public:
  AsyncMutex() = default;
  AsyncMutex(const AsyncMutex&) = delete;
  AsyncMutex& operator=(const AsyncMutex&) = delete;

  // Releases the lock when it goes out of scope (a coroutine that returns early, by
  // TANDEM_CO_TRY, still unlocks).
  class [[nodiscard]] Guard {
   public:
    Guard(Guard&& o) noexcept : m_(std::exchange(o.m_, nullptr)) {}
    Guard& operator=(Guard&&) = delete;
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;
    ~Guard() {
      if (m_ != nullptr) m_->unlock();
    }

   private:
    friend class AsyncMutex;
    explicit Guard(AsyncMutex* m) : m_(m) {}
    AsyncMutex* m_;
  };

  asio::awaitable<void> lock() {
    if (!locked_) {
      locked_ = true;
      co_return;
    }
    co_await waiters_.wait();  // woken only by unlock(), which hands the lock over held
  }
  void unlock() {
    if (waiters_.size() > 0) {
      waiters_.notify_one();  // stays locked: the waiter owns it now
    } else {
      locked_ = false;
    }
  }
  asio::awaitable<Guard> scoped() {
    co_await lock();
    co_return Guard(this);
  }
  [[nodiscard]] bool locked() const { return locked_; }

 private:
  bool locked_ = false;
  WaitQueue waiters_;
};

// Runs coroutines that return Status concurrently on one executor, and waits for them: a
// bounded fan-out (wait_below) and a join (wait) that returns the first failure. Every spawned
// task must be waited for before what it references goes away; the group's own bookkeeping is
// shared with the tasks, so a task finishing late never touches freed memory of the group.
// An exception escaping a task is a bug: it aborts the process (abort_on_exception).
class TaskGroup {
 public:
  explicit TaskGroup(asio::any_io_executor ex) : ex_(std::move(ex)), st_(std::make_shared<State>()) {}
  TaskGroup(const TaskGroup&) = delete;
  TaskGroup& operator=(const TaskGroup&) = delete;

  void spawn(asio::awaitable<Status> task) {
    ++st_->running;
    asio::co_spawn(ex_, run(st_, std::move(task)), abort_on_exception);
  }
  [[nodiscard]] std::size_t running() const { return st_->running; }
  // Until fewer than n tasks run.
  asio::awaitable<void> wait_below(std::size_t n) {
    auto st = st_;
    while (st->running >= n && st->running > 0) co_await st->done.wait();
  }
  // Until no task runs; returns (and clears) the first failure since the last wait().
  asio::awaitable<Status> wait() {
    auto st = st_;
    while (st->running > 0) co_await st->done.wait();
    Status first = std::move(st->first);
    st->first = Status{};
    co_return first;
  }
  // The first failure so far, without waiting (a caller may stop issuing work early).
  [[nodiscard]] const Status& first_error() const { return st_->first; }

 private:
  struct State {
    std::size_t running = 0;
    Status first;
    WaitQueue done;
  };
  static asio::awaitable<void> run(std::shared_ptr<State> st, asio::awaitable<Status> task) {
    Status r = co_await std::move(task);
    if (!r && st->first) st->first = std::move(r);
    --st->running;
    st->done.notify_all();
  }

  asio::any_io_executor ex_;
  std::shared_ptr<State> st_;
};

}  // namespace tandem

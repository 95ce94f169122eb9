// TaskGroup: bounded fan-out and join of Status coroutines on one executor.
#include <gtest/gtest.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <chrono>
#include <system_error>
#include <vector>

#include "run_sync.h"
#include "tandem/common/async.h"

namespace tandem {
namespace {

// A task that sleeps `ms`, records the concurrency it saw, and fails when told to.
asio::awaitable<Status> task(int ms, int* running, int* peak, bool fail, std::vector<int>* order, int id) {
  ++*running;
  *peak = std::max(*peak, *running);
  asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::milliseconds(ms));
  auto [ec] = co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
  (void)ec;
  --*running;
  order->push_back(id);
  if (fail) co_return Error(std::make_error_code(std::errc::io_error), "task " + std::to_string(id));
  co_return Status{};
}

TEST(TaskGroup, BoundsConcurrencyAndJoinsAll) {
  asio::io_context ctx;
  int running = 0;
  int peak = 0;
  std::vector<int> order;
  auto body = [&]() -> asio::awaitable<Status> {
    TaskGroup g(ctx.get_executor());
    for (int i = 0; i < 10; ++i) {
      co_await g.wait_below(3);
      EXPECT_LT(g.running(), 3u);
      g.spawn(task(5, &running, &peak, false, &order, i));
    }
    co_return co_await g.wait();
  };
  Status st = test::run_sync(ctx, body());
  EXPECT_TRUE(st.ok());
  EXPECT_EQ(order.size(), 10u);  // wait() returned only after every task finished
  EXPECT_EQ(running, 0);
  EXPECT_EQ(peak, 3);
}

TEST(TaskGroup, KeepsTheFirstFailureAndClearsItOnWait) {
  asio::io_context ctx;
  int running = 0;
  int peak = 0;
  std::vector<int> order;
  auto body = [&]() -> asio::awaitable<std::pair<Status, Status>> {
    TaskGroup g(ctx.get_executor());
    g.spawn(task(1, &running, &peak, true, &order, 1));   // fails first
    g.spawn(task(20, &running, &peak, true, &order, 2));  // fails later: not reported
    g.spawn(task(5, &running, &peak, false, &order, 3));
    Status first = co_await g.wait();
    EXPECT_TRUE(g.first_error().ok());
    g.spawn(task(1, &running, &peak, false, &order, 4));
    Status second = co_await g.wait();
    co_return std::pair{first, second};
  };
  auto [first, second] = test::run_sync(ctx, body());
  ASSERT_FALSE(first.ok());
  EXPECT_EQ(first.error().context, "task 1");
  EXPECT_TRUE(second.ok());
  EXPECT_EQ(order.size(), 4u);
}

}  // namespace
}  // namespace tandem

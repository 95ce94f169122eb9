// AsyncMutex: mutual exclusion across co_await for coroutines on one executor.
//
// Plan: several holders that each suspend inside the lock (a timer) must never overlap, must
// get the lock in the order they asked for it, and a guard left by an early return must
// release it.
#include <gtest/gtest.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <chrono>
#include <vector>

#include "run_sync.h"
#include "tandem/common/async.h"

namespace tandem {
namespace {

asio::awaitable<void> hold(AsyncMutex* mu, int id, int* inside, int* peak, std::vector<int>* order, int* left) {
  auto g = co_await mu->scoped();
  ++*inside;
  *peak = std::max(*peak, *inside);
  order->push_back(id);
  asio::steady_timer t(co_await asio::this_coro::executor, std::chrono::milliseconds(2));
  auto [ec] = co_await t.async_wait(asio::as_tuple(asio::use_awaitable));
  (void)ec;
  --*inside;
  --*left;
}

TEST(AsyncMutex, HoldersNeverOverlapAndGoInOrder) {
  asio::io_context ctx;
  AsyncMutex mu;
  int inside = 0;
  int peak = 0;
  int left = 6;
  std::vector<int> order;
  for (int i = 0; i < 6; ++i) asio::co_spawn(ctx, hold(&mu, i, &inside, &peak, &order, &left), abort_on_exception);
  ctx.run_for(std::chrono::seconds(10));
  EXPECT_EQ(left, 0);
  EXPECT_EQ(peak, 1);
  EXPECT_EQ(order, (std::vector<int>{0, 1, 2, 3, 4, 5}));
  EXPECT_FALSE(mu.locked());
}

TEST(AsyncMutex, AGuardReleasesOnAnEarlyReturn) {
  asio::io_context ctx;
  AsyncMutex mu;
  auto early = [](AsyncMutex* m) -> asio::awaitable<Status> {
    auto g = co_await m->scoped();
    co_return Error(std::make_error_code(std::errc::io_error), "failed while holding the lock");
  };
  Status st = test::run_sync(ctx, early(&mu));
  EXPECT_FALSE(st.ok());
  EXPECT_FALSE(mu.locked());
  auto again = [](AsyncMutex* m) -> asio::awaitable<bool> {
    auto g = co_await m->scoped();
    co_return m->locked();
  };
  EXPECT_TRUE(test::run_sync(ctx, again(&mu)));
  EXPECT_FALSE(mu.locked());
}

}  // namespace
}  // namespace tandem

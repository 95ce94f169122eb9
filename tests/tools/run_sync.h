// Test helper: runs one coroutine on an io_context until it completes and returns its value.
// An exception escaping the coroutine is rethrown in the test (gtest reports it). The context is
// stopped when the coroutine completes, so long-lived work (an io_uring reaper waiting on its
// eventfd) does not keep run() from returning; it resumes on the next run_sync.
#pragma once

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <exception>
#include <optional>
#include <utility>

namespace tandem::test {

template <typename T>
T run_sync(boost::asio::io_context& ctx, boost::asio::awaitable<T> aw) {
  std::optional<T> out;
  std::exception_ptr err;
  boost::asio::co_spawn(ctx, std::move(aw), [&](std::exception_ptr e, T v) {
    err = e;
    if (!e) out.emplace(std::move(v));
    ctx.stop();
  });
  ctx.restart();
  ctx.run();
  if (err) std::rethrow_exception(err);
  return std::move(*out);
}

inline void run_sync(boost::asio::io_context& ctx, boost::asio::awaitable<void> aw) {
  std::exception_ptr err;
  bool done = false;
  boost::asio::co_spawn(ctx, std::move(aw), [&](std::exception_ptr e) {
    err = e;
    done = true;
    ctx.stop();
  });
  ctx.restart();
  ctx.run();
  if (err) std::rethrow_exception(err);
  (void)done;
}

}  // namespace tandem::test

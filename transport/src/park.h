// Parking: a coroutine suspended until someone wakes it, with per-operation cancellation.
//
// tandem::WaitQueue (common/async.h) ignores cancellation, which is right for internal loops
// but wrong for the public send()/receive(): a caller writing `co_await (conn->receive() ||
// timer)` must get its receive() back when the timer wins. A Parking lives in the waiting
// coroutine's frame; its owner keeps a pointer to it in some queue and calls wake(). When the
// operation is cancelled, try_cancel() is asked first: it unlinks the Parking from its queue and
// says yes, or says no (e.g. the frame is already being written and its buffers are in use),
// in which case the cancellation is ignored and a later wake() completes the wait.
//
// Single-threaded, like everything on a connection. The coroutine resumes through a post, never
// inside wake() or inside the cancellation.
#pragma once

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/cancellation_type.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <utility>

#include "tandem/common/assert.h"
#include "tandem/common/async.h"

namespace tandem::transport::detail {

namespace asio = boost::asio;

struct Parking {
  Parking() = default;
  Parking(const Parking&) = delete;
  Parking& operator=(const Parking&) = delete;

  // Set while suspended; resume posts the coroutine's continuation.
  MoveFunction<void()> resume;
  asio::cancellation_slot slot;
  // Optional: asked on cancellation; true = unlinked, complete the wait as cancelled.
  MoveFunction<bool()> try_cancel;
  bool cancelled = false;

  [[nodiscard]] bool parked() const { return static_cast<bool>(resume); }

  // Completes the wait normally. Must be parked.
  void wake() {
    TANDEM_ASSERT(parked());
    // Our cancellation handler must not outlive this wait: the coroutine's next operation may
    // not install one of its own, and a later emit would then reach this Parking's ghost.
    if (slot.is_connected()) slot.clear();
    MoveFunction<void()> r = std::move(resume);
    r();
  }
};

struct ParkingCancel {
  Parking* p;
  void operator()(asio::cancellation_type_t /*type*/) {
    if (p == nullptr || !p->parked()) return;
    if (p->try_cancel && !p->try_cancel()) return;
    // Runs inside the slot: it cannot clear itself, so it disarms itself instead.
    Parking* q = std::exchange(p, nullptr);
    q->cancelled = true;
    MoveFunction<void()> r = std::move(q->resume);
    r();
  }
};

// Suspends until p.wake() or an accepted cancellation (then p.cancelled is true).
inline asio::awaitable<void> park(Parking& p) {
  TANDEM_ASSERT(!p.parked());
  p.cancelled = false;
  return asio::async_initiate<const asio::use_awaitable_t<>&, void()>(
      [&p](auto handler) {
        auto ex = asio::get_associated_executor(handler);
        p.slot = asio::get_associated_cancellation_slot(handler);
        p.resume = [h = std::move(handler), ex]() mutable { asio::post(ex, std::move(h)); };
        if (p.slot.is_connected()) p.slot.template emplace<ParkingCancel>(ParkingCancel{&p});
      },
      asio::use_awaitable);
}

}  // namespace tandem::transport::detail

#include "tandem/engine/ring.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <boost/asio/posix/stream_descriptor.hpp>
#include <cerrno>

#include "tandem/common/assert.h"

namespace tandem::engine {

struct Ring::Impl {
  explicit Impl(asio::io_context& ctx) : efd(ctx) {}
  io_uring ring{};
  bool ring_ok = false;
  asio::posix::stream_descriptor efd;
  bool waiting = false;
};

Ring::Ring(asio::io_context& ctx, unsigned entries)
    : ctx_(ctx), impl_(std::make_unique<Impl>(ctx)), entries_(entries) {}

Result<std::unique_ptr<Ring>> Ring::create(asio::io_context& ctx, RingOptions opts) {
  TANDEM_ASSERT(opts.entries >= 8 && opts.entries <= 4096);
  std::unique_ptr<Ring> r(new Ring(ctx, opts.entries));
  io_uring_params params{};
  // The CQ is twice the SQ so completions never overflow while the SQ is full.
  params.flags = IORING_SETUP_CQSIZE;
  params.cq_entries = opts.entries * 2;
  int rc = io_uring_queue_init_params(opts.entries, &r->impl_->ring, &params);
  if (rc < 0) return errno_error(-rc, "io_uring_queue_init (is io_uring disabled by sysctl or seccomp?)");
  r->impl_->ring_ok = true;
  int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) return errno_error(errno, "eventfd");
  rc = io_uring_register_eventfd(&r->impl_->ring, efd);
  if (rc < 0) {
    ::close(efd);
    return errno_error(-rc, "io_uring_register_eventfd");
  }
  r->impl_->efd.assign(efd);
  r->arm_reaper();
  return r;
}

Ring::~Ring() {
  TANDEM_ASSERT_MSG(in_flight_ == 0 && pending_.empty(), "ring destroyed with I/O in flight");
  boost::system::error_code ec;
  impl_->efd.close(ec);
  if (impl_->ring_ok) io_uring_queue_exit(&impl_->ring);
}

Status Ring::register_arena(BufferArena& arena) {
  iovec iov{arena.base(), arena.size_bytes()};
  int rc = io_uring_register_buffers(&impl_->ring, &iov, 1);
  if (rc < 0) return errno_error(-rc, "io_uring_register_buffers");
  arena.set_registered(true);
  arena_registered_ = true;
  return {};
}

bool Ring::try_push(OpBase* op) {
  if (in_flight_ + unsubmitted_ >= entries_) return false;
  io_uring_sqe* sqe = io_uring_get_sqe(&impl_->ring);
  if (sqe == nullptr) return false;
  std::memcpy(sqe, &op->sqe, sizeof *sqe);
  io_uring_sqe_set_data(sqe, op);
  ++unsubmitted_;
  return true;
}

void Ring::enqueue(OpBase* op) {
  // FIFO: once anything waits, everything waits behind it, so ordering is preserved.
  if (!pending_.empty() || !try_push(op)) {
    pending_.push_back(op);
    return;
  }
  schedule_submit();
}

void Ring::schedule_submit() {
  if (submit_scheduled_) return;
  submit_scheduled_ = true;
  // One io_uring_submit per loop turn: every op prepared in this turn shares the syscall.
  asio::post(ctx_, [this] { do_submit(); });
}

void Ring::do_submit() {
  submit_scheduled_ = false;
  while (unsubmitted_ > 0) {
    int rc = io_uring_submit(&impl_->ring);
    ++submit_calls_;
    if (rc >= 0) {
      const auto n = static_cast<unsigned>(rc);
      TANDEM_ASSERT(n <= unsubmitted_);
      unsubmitted_ -= n;
      in_flight_ += n;
      TANDEM_ASSERT(in_flight_ <= entries_);
      if (n == 0) break;
      continue;
    }
    if (rc == -EINTR) continue;
    if (rc == -EAGAIN || rc == -EBUSY) {
      // The kernel is short of resources or the CQ is full: retry after the reaper runs, or
      // on the next loop turn when nothing is in flight to wake the reaper.
      if (in_flight_ == 0) schedule_submit();
      break;
    }
    TANDEM_ASSERT_MSG(false, "io_uring_submit failed unexpectedly");
  }
}

void Ring::arm_reaper() {
  if (impl_->waiting || stopping_) return;
  impl_->waiting = true;
  impl_->efd.async_wait(asio::posix::stream_descriptor::wait_read, [this](const boost::system::error_code& ec) {
    // On abort the ring may already be gone: touch nothing.
    if (ec == asio::error::operation_aborted) return;
    impl_->waiting = false;
    reap();
    if (!stopping_ || in_flight_ > 0 || unsubmitted_ > 0) arm_reaper();
  });
}

void Ring::reap() {
  std::uint64_t v = 0;
  // Reset the hint; the CQ itself is the truth, drained below whatever the counter said.
  [[maybe_unused]] auto n = ::read(impl_->efd.native_handle(), &v, sizeof v);
  for (;;) {
    io_uring_cqe* cqe = nullptr;
    unsigned head = 0;
    unsigned count = 0;
    io_uring_for_each_cqe(&impl_->ring, head, cqe) {
      auto* op = static_cast<OpBase*>(io_uring_cqe_get_data(cqe));
      TANDEM_ASSERT(op != nullptr);
      const int res = cqe->res;
      ++count;
      op->complete(res);  // posts the handler
      delete op;
    }
    if (count == 0) break;
    io_uring_cq_advance(&impl_->ring, count);
    TANDEM_ASSERT(count <= in_flight_);
    in_flight_ -= count;
    ops_completed_ += count;
  }
  while (!pending_.empty() && try_push(pending_.front())) pending_.pop_front();
  if (unsubmitted_ > 0) schedule_submit();
}

void Ring::stop() {
  stopping_ = true;
  if (in_flight_ == 0 && unsubmitted_ == 0 && pending_.empty()) {
    boost::system::error_code ec;
    impl_->efd.cancel(ec);
  }
}

}  // namespace tandem::engine

// The NBD source: one libnbd handle driven by its asynchronous API from the caller's event loop.
//
// libnbd owns the protocol (handshake, TLS, structured replies, block status); this file only
// feeds it readiness. The handle's socket is watched with a stream_descriptor: whenever libnbd
// wants to read or write (aio_get_direction), one wait per direction is armed, and its
// completion calls aio_notify_read/aio_notify_write, which runs libnbd's state machine and, from
// inside it, the completion callbacks of finished commands. A command's coroutine sleeps on its
// Op until that callback marks it done.
//
// Going down closes the handle at once: nbd_close() guarantees no callback runs afterwards and
// no buffer is touched again, so the requests in flight can be failed and their buffers freed
// safely. Until then libnbd may write into a read's buffer at any notify, which is why a
// request is never abandoned while the handle is open.
#include <libnbd.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstring>
#include <list>

#include "nbd_source.h"
#include "tandem/common/assert.h"
#include "tandem/common/async.h"

namespace tandem::importer {
namespace {

constexpr std::uint64_t kRequestBytesMax = 32 * 1024 * 1024;
constexpr std::uint64_t kStatusBytesMax = 1ULL << 30;  // one block status request
constexpr auto kTuple = asio::as_tuple(asio::use_awaitable);

struct Op {
  bool done = false;
  int err = 0;
  std::string failure;  // set when the source went down under it
  std::chrono::steady_clock::time_point started;
  WaitQueue wq;
  std::vector<SourceExtent>* extents = nullptr;
  std::uint64_t status_end = 0;  // block status: clip extents here
};
using OpPtr = std::shared_ptr<Op>;

int on_complete(void* ud, int* error) {
  Op& op = **static_cast<OpPtr*>(ud);
  if (!op.done) {
    op.done = true;
    op.err = *error;
    op.wq.notify_all();
  }
  return 1;  // retire the command
}

int on_extents(void* ud, const char* context, std::uint64_t offset, std::uint32_t* entries, std::size_t n,
               int* /*error*/) {
  Op& op = **static_cast<OpPtr*>(ud);
  if (std::string_view(context) != LIBNBD_CONTEXT_BASE_ALLOCATION || op.extents == nullptr) return 0;
  std::uint64_t at = offset;
  for (std::size_t i = 0; i + 1 < n && at < op.status_end; i += 2) {
    const std::uint64_t len = std::min<std::uint64_t>(entries[i], op.status_end - at);
    if (len == 0) break;
    const bool zero = (entries[i + 1] & LIBNBD_STATE_ZERO) != 0;
    if (!op.extents->empty() && op.extents->back().zero == zero &&
        op.extents->back().offset + op.extents->back().length == at) {
      op.extents->back().length += len;
    } else {
      op.extents->push_back(SourceExtent{at, len, zero});
    }
    at += len;
  }
  return 0;
}

void free_op(void* ud) { delete static_cast<OpPtr*>(ud); }

nbd_completion_callback completion_for(const OpPtr& op) {
  return nbd_completion_callback{.callback = on_complete, .user_data = new OpPtr(op), .free = free_op};
}

// libnbd's last error on this thread, without the trailing ": <strerror>" that Error::message()
// adds again from the error code.
std::string libnbd_error(std::string_view what) {
  const char* e = nbd_get_error();
  std::string text = e != nullptr ? e : "unknown libnbd error";
  if (const int err = nbd_get_errno(); err != 0) {
    const std::string suffix = std::string(": ") + std::strerror(err);
    if (text.size() > suffix.size() && text.ends_with(suffix)) text.resize(text.size() - suffix.size());
  }
  return std::string(what) + ": " + text;
}

class NbdSource final : public ForeignSource {
 public:
  NbdSource(asio::any_io_executor ex, std::string uri, SourceOptions opts)
      : ex_(ex), uri_(std::move(uri)), display_(redact_uri(uri_)), opts_(opts), sd_(ex), timer_(ex) {}
  ~NbdSource() override {
    *alive_ = false;
    TANDEM_ASSERT_MSG(h_ == nullptr, "NBD source destroyed before close()");
  }

  asio::awaitable<Status> connect();

  [[nodiscard]] std::uint64_t size() const override { return size_; }
  [[nodiscard]] const std::string& display_name() const override { return display_; }
  [[nodiscard]] bool has_block_status() const override { return block_status_; }
  [[nodiscard]] bool is_down() const override { return down_; }
  [[nodiscard]] const std::string& down_reason() const override { return reason_; }

  asio::awaitable<Status> read(std::uint64_t offset, std::size_t len, const engine::IoBuffer& dst) override {
    for (std::uint64_t done = 0; done < len;) {
      const std::uint64_t n = std::min<std::uint64_t>(len - done, request_max_);
      std::byte* p = dst.data() + done;
      const std::uint64_t at = offset + done;
      TANDEM_CO_TRY(co_await run(
          "read", [&](nbd_handle* h, const OpPtr& op) { return nbd_aio_pread(h, p, n, at, completion_for(op), 0); }));
      done += n;
    }
    co_return Status{};
  }

  asio::awaitable<Status> write(std::uint64_t offset, std::size_t len, const engine::IoBuffer& src, bool fua) override {
    const std::uint32_t flags = fua && can_fua_ ? LIBNBD_CMD_FLAG_FUA : 0;
    for (std::uint64_t done = 0; done < len;) {
      const std::uint64_t n = std::min<std::uint64_t>(len - done, request_max_);
      const std::byte* p = src.data() + done;
      const std::uint64_t at = offset + done;
      TANDEM_CO_TRY(co_await run("write", [&](nbd_handle* h, const OpPtr& op) {
        return nbd_aio_pwrite(h, p, n, at, completion_for(op), flags);
      }));
      done += n;
    }
    if (fua && !can_fua_) TANDEM_CO_TRY(co_await flush());
    co_return Status{};
  }

  asio::awaitable<Status> zero(std::uint64_t offset, std::uint64_t len, bool fua) override {
    if (!can_zero_) {
      // Without WRITE_ZEROES the zeros are written.
      std::vector<std::byte> heap(std::min<std::uint64_t>(len, 1 << 20));
      for (std::uint64_t done = 0; done < len;) {
        const std::uint64_t n = std::min<std::uint64_t>(len - done, heap.size());
        const std::uint64_t at = offset + done;
        TANDEM_CO_TRY(co_await run("write", [&](nbd_handle* h, const OpPtr& op) {
          return nbd_aio_pwrite(h, heap.data(), n, at, completion_for(op), 0);
        }));
        done += n;
      }
      if (fua) TANDEM_CO_TRY(co_await flush());
      co_return Status{};
    }
    const std::uint32_t flags = fua && can_fua_ ? LIBNBD_CMD_FLAG_FUA : 0;
    for (std::uint64_t done = 0; done < len;) {
      const std::uint64_t n = std::min<std::uint64_t>(len - done, kStatusBytesMax);
      const std::uint64_t at = offset + done;
      TANDEM_CO_TRY(co_await run("write zeroes", [&](nbd_handle* h, const OpPtr& op) {
        return nbd_aio_zero(h, n, at, completion_for(op), flags);
      }));
      done += n;
    }
    if (fua && !can_fua_) TANDEM_CO_TRY(co_await flush());
    co_return Status{};
  }

  asio::awaitable<Status> flush() override {
    if (!can_flush_) co_return Status{};  // the server says it has no volatile cache to flush
    co_return co_await run("flush",
                           [&](nbd_handle* h, const OpPtr& op) { return nbd_aio_flush(h, completion_for(op), 0); });
  }

  asio::awaitable<Result<std::vector<SourceExtent>>> extents(std::uint64_t offset, std::uint64_t len) override {
    std::vector<SourceExtent> out;
    if (!block_status_) {
      out.push_back(SourceExtent{offset, len, false});
      co_return out;
    }
    const std::uint64_t n = std::min(len, kStatusBytesMax);
    auto op = std::make_shared<Op>();
    op->extents = &out;
    op->status_end = offset + n;
    TANDEM_CO_TRY(co_await run(
        "block status",
        [&](nbd_handle* h, const OpPtr& o) {
          return nbd_aio_block_status(
              h, n, offset, nbd_extent_callback{.callback = on_extents, .user_data = new OpPtr(o), .free = free_op},
              completion_for(o), 0);
        },
        op));
    if (out.empty() || out.front().offset != offset) {
      // A server that answered nothing useful: treat the range as data (always correct).
      out.assign(1, SourceExtent{offset, n, false});
    }
    // Extents end on block boundaries: a partial block at an edge counts as data.
    std::vector<SourceExtent> aligned;
    for (const SourceExtent& e : out) {
      std::uint64_t lo = e.offset;
      std::uint64_t hi = e.offset + e.length;
      if (e.zero) {
        lo = (lo + engine::Volume::kBlockBytes - 1) / engine::Volume::kBlockBytes * engine::Volume::kBlockBytes;
        hi = hi / engine::Volume::kBlockBytes * engine::Volume::kBlockBytes;
        if (hi <= lo) continue;  // folded into the data around it below
      }
      if (!aligned.empty() && aligned.back().offset + aligned.back().length < lo) {
        // Gap left by trimming a zero extent's edges: data.
        const std::uint64_t gap_at = aligned.back().offset + aligned.back().length;
        aligned.push_back(SourceExtent{gap_at, lo - gap_at, false});
      } else if (aligned.empty() && lo > offset) {
        aligned.push_back(SourceExtent{offset, lo - offset, false});
      }
      if (!aligned.empty() && aligned.back().zero == e.zero) {
        aligned.back().length = hi - aligned.back().offset;
      } else {
        aligned.push_back(SourceExtent{lo, hi - lo, e.zero});
      }
    }
    // The last data extent ends on a block boundary (rounded up, within the source).
    if (!aligned.empty()) {
      SourceExtent& last = aligned.back();
      const std::uint64_t end = std::min<std::uint64_t>((last.offset + last.length + engine::Volume::kBlockBytes - 1) /
                                                            engine::Volume::kBlockBytes * engine::Volume::kBlockBytes,
                                                        size_);
      last.length = end - last.offset;
    } else {
      aligned.push_back(SourceExtent{offset, engine::Volume::kBlockBytes, false});
    }
    co_return aligned;
  }

  asio::awaitable<void> close() override {
    go_down("closed");
    if (watchdog_running_) {
      timer_.cancel();
      while (watchdog_running_) co_await watchdog_exit_.wait();
    }
  }

 private:
  template <typename Submit>
  asio::awaitable<Status> run(const char* what, Submit submit, OpPtr op = nullptr) {
    if (down_) co_return Error(std::make_error_code(std::errc::not_connected), display_ + ": " + reason_);
    if (!op) op = std::make_shared<Op>();
    op->started = std::chrono::steady_clock::now();
    ops_.push_back(op);
    auto it = std::prev(ops_.end());
    const std::int64_t cookie = submit(h_, op);
    if (cookie == -1) {
      const int err = nbd_get_errno();
      const std::string msg = libnbd_error(std::string("NBD ") + what);
      ops_.erase(it);
      if (nbd_aio_is_dead(h_) != 0 || nbd_aio_is_closed(h_) != 0) go_down(msg);
      co_return Error(std::error_code(err != 0 ? err : EIO, std::generic_category()), display_ + ": " + msg);
    }
    arm();
    start_watchdog();
    while (!op->done) co_await op->wq.wait();
    ops_.erase(it);
    if (!op->failure.empty()) {
      co_return Error(std::make_error_code(std::errc::not_connected), display_ + ": " + op->failure);
    }
    if (op->err != 0) {
      co_return Error(std::error_code(op->err, std::generic_category()), display_ + ": NBD " + what);
    }
    co_return Status{};
  }

  // Keeps one wait armed per direction libnbd wants; follows the handle to a new socket.
  void arm() {
    if (down_ || h_ == nullptr) return;
    if (nbd_aio_is_dead(h_) != 0 || nbd_aio_is_closed(h_) != 0) {
      go_down(nbd_aio_is_dead(h_) != 0 ? "the connection failed" : "the server closed the connection");
      return;
    }
    const int fd = nbd_aio_get_fd(h_);
    if (fd < 0) return;
    if (fd != fd_) {
      if (sd_.is_open()) {
        sd_.cancel();
        sd_.release();
      }
      ++fd_gen_;
      read_armed_ = write_armed_ = false;
      boost::system::error_code ec;
      sd_.assign(fd, ec);
      if (ec) {
        go_down("cannot watch the NBD socket: " + ec.message());
        return;
      }
      fd_ = fd;
    }
    const unsigned dir = nbd_aio_get_direction(h_);
    if ((dir & LIBNBD_AIO_DIRECTION_READ) != 0 && !read_armed_) {
      read_armed_ = true;
      sd_.async_wait(asio::posix::descriptor_base::wait_read,
                     [this, alive = alive_, gen = fd_gen_](const boost::system::error_code& ec) {
                       if (*alive) ready(false, ec, gen);
                     });
    }
    if ((dir & LIBNBD_AIO_DIRECTION_WRITE) != 0 && !write_armed_) {
      write_armed_ = true;
      sd_.async_wait(asio::posix::descriptor_base::wait_write,
                     [this, alive = alive_, gen = fd_gen_](const boost::system::error_code& ec) {
                       if (*alive) ready(true, ec, gen);
                     });
    }
  }

  void ready(bool write, const boost::system::error_code& ec, std::uint64_t gen) {
    if (gen != fd_gen_ || down_) return;
    (write ? write_armed_ : read_armed_) = false;
    if (ec) {
      if (ec != asio::error::operation_aborted) go_down("waiting on the NBD socket: " + ec.message());
      return;
    }
    // Readiness may be stale: libnbd may have finished sending (or changed state) since the
    // wait was armed, and a notify it does not expect is an error. Ask again.
    const unsigned want = write ? LIBNBD_AIO_DIRECTION_WRITE : LIBNBD_AIO_DIRECTION_READ;
    if ((nbd_aio_get_direction(h_) & want) == 0) {
      arm();
      return;
    }
    const int r = write ? nbd_aio_notify_write(h_) : nbd_aio_notify_read(h_);
    if (r == -1) {
      go_down(libnbd_error("NBD connection"));
      return;
    }
    progress_.notify_all();
    arm();
  }

  // The source stops answering: close the handle (no callback or buffer use after this) and
  // fail every request in flight.
  void go_down(std::string why) {
    if (down_) return;
    down_ = true;
    reason_ = std::move(why);
    if (sd_.is_open()) {
      sd_.cancel();
      sd_.release();  // libnbd owns the socket
    }
    if (h_ != nullptr) {
      nbd_close(h_);
      h_ = nullptr;
    }
    for (const OpPtr& op : ops_) {
      if (!op->done) {
        op->done = true;
        op->failure = reason_;
        op->wq.notify_all();
      }
    }
    progress_.notify_all();
    timer_.cancel();
  }

  void start_watchdog() {
    if (watchdog_running_) return;
    watchdog_running_ = true;
    asio::co_spawn(ex_, watchdog(), AbortOnException{"an NBD source's watchdog"});
  }

  // While requests are in flight, takes the source down when the oldest has waited timeout_ms.
  asio::awaitable<void> watchdog() {
    const auto limit = std::chrono::milliseconds(opts_.timeout_ms);
    while (!down_ && !ops_.empty()) {
      auto oldest = std::chrono::steady_clock::now();
      for (const OpPtr& op : ops_) oldest = std::min(oldest, op->started);
      if (std::chrono::steady_clock::now() - oldest >= limit) {
        go_down("no answer within " + std::to_string(opts_.timeout_ms) + " ms");
        break;
      }
      timer_.expires_at(oldest + limit);
      co_await timer_.async_wait(kTuple);
    }
    watchdog_running_ = false;
    watchdog_exit_.notify_all();
  }

  asio::any_io_executor ex_;
  std::string uri_;
  std::string display_;
  SourceOptions opts_;
  nbd_handle* h_ = nullptr;
  asio::posix::stream_descriptor sd_;
  int fd_ = -1;
  std::uint64_t fd_gen_ = 0;
  bool read_armed_ = false;
  bool write_armed_ = false;
  bool down_ = false;
  std::string reason_;
  std::list<OpPtr> ops_;
  WaitQueue progress_;
  asio::steady_timer timer_;
  bool watchdog_running_ = false;
  WaitQueue watchdog_exit_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  std::uint64_t size_ = 0;
  std::uint64_t request_max_ = kRequestBytesMax;
  bool block_status_ = false;
  bool can_fua_ = false;
  bool can_flush_ = false;
  bool can_zero_ = false;
};

asio::awaitable<Status> NbdSource::connect() {
  h_ = nbd_create();
  if (h_ == nullptr) co_return Error(std::make_error_code(std::errc::not_enough_memory), libnbd_error("nbd_create"));
  // nbds:// URIs name their x509 directory (tls-certificates=) or PSK file (tls-psk-file=);
  // libnbd reads them only when allowed. The URI comes from the control API, which already
  // names local paths (volume backing files) with the daemon's privileges.
  nbd_set_uri_allow_local_file(h_, true);
  nbd_set_pread_initialize(h_, false);
  if (nbd_add_meta_context(h_, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1) {
    Error e(std::make_error_code(std::errc::invalid_argument), libnbd_error("base:allocation"));
    go_down(e.message());
    co_return e;
  }
  if (nbd_aio_connect_uri(h_, uri_.c_str()) == -1) {
    const int err = nbd_get_errno();
    Error e(std::error_code(err != 0 ? err : EINVAL, std::generic_category()),
            display_ + ": " + libnbd_error("connect"));
    go_down(e.message());
    co_return e;
  }
  // Bounded: the watchdog's clock is not running yet, so a timer of our own.
  bool timed_out = false;
  asio::steady_timer deadline(ex_);
  deadline.expires_after(std::chrono::milliseconds(opts_.timeout_ms));
  deadline.async_wait([this, alive = alive_, &timed_out](const boost::system::error_code& ec) {
    if (ec || !*alive) return;
    timed_out = true;
    progress_.notify_all();
  });
  while (!down_ && !timed_out && nbd_aio_is_connecting(h_) != 0) {
    arm();
    if (down_) break;
    co_await progress_.wait();
  }
  deadline.cancel();
  if (timed_out && !down_) go_down("no answer within " + std::to_string(opts_.timeout_ms) + " ms while connecting");
  if (down_ || nbd_aio_is_ready(h_) == 0) {
    std::string why = down_ ? reason_ : libnbd_error("connect");
    if (!down_) go_down(why);
    // Let the deadline's handler run before `timed_out` goes out of scope.
    co_await asio::post(ex_, asio::use_awaitable);
    co_return Error(std::make_error_code(std::errc::connection_refused), display_ + ": " + why);
  }
  co_await asio::post(ex_, asio::use_awaitable);
  const std::int64_t size = nbd_get_size(h_);
  if (size < 0) {
    std::string why = libnbd_error("size");
    go_down(why);
    co_return Error(std::make_error_code(std::errc::io_error), display_ + ": " + why);
  }
  size_ = static_cast<std::uint64_t>(size);
  block_status_ = nbd_can_meta_context(h_, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
  can_fua_ = nbd_can_fua(h_) == 1;
  can_flush_ = nbd_can_flush(h_) == 1;
  can_zero_ = nbd_can_zero(h_) == 1;
  const std::int64_t max = nbd_get_block_size(h_, LIBNBD_SIZE_MAXIMUM);
  if (max > 0) request_max_ = std::min<std::uint64_t>(kRequestBytesMax, static_cast<std::uint64_t>(max) / 4096 * 4096);
  if (request_max_ == 0) request_max_ = 4096;
  if (nbd_is_read_only(h_) == 1) {
    go_down("read-only");
    co_return Error(std::make_error_code(std::errc::read_only_file_system),
                    display_ + ": the server exports it read-only, but host writes must reach it until cutover");
  }
  co_return Status{};
}

}  // namespace

asio::awaitable<Result<std::unique_ptr<ForeignSource>>> open_nbd_source(asio::any_io_executor ex, std::string uri,
                                                                        SourceOptions opts) {
  auto s = std::make_unique<NbdSource>(ex, std::move(uri), opts);
  Status st = co_await s->connect();
  if (!st) {
    co_await s->close();
    co_return st.error();
  }
  co_return std::unique_ptr<ForeignSource>(std::move(s));
}

}  // namespace tandem::importer

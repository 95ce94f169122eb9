// The production DeviceEnv: O_DIRECT files and block devices driven by one io_uring.
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "tandem/common/assert.h"
#include "tandem/engine/block_device.h"
#include "tandem/engine/errc.h"

namespace tandem::engine {
namespace {

// -EAGAIN from the kernel means "try again"; a device that keeps saying it is broken. 64
// resubmissions is far beyond any transient condition seen on real devices.
constexpr int kEagainRetriesMax = 64;
// Lock attempts 100 ms apart when a volume is locked (a killed daemon's ring may still hold it).
constexpr int kLockRetries = 100;

class UringDevice final : public BlockDevice {
 public:
  UringDevice(Ring& ring, int fd, std::string path, std::uint64_t size, bool blk)
      : ring_(ring), fd_(fd), path_(std::move(path)), size_(size), blk_(blk) {}
  ~UringDevice() override { ::close(fd_); }

  std::uint64_t size_bytes() const override { return size_; }
  const std::string& path() const override { return path_; }
  bool is_block_device() const override { return blk_; }

  asio::awaitable<Status> read(std::uint64_t offset, std::size_t len, const IoBuffer& buf) override {
    co_return co_await rw(false, offset, len, buf, false);
  }

  asio::awaitable<Status> write(std::uint64_t offset, std::size_t len, const IoBuffer& buf, bool fua) override {
    co_return co_await rw(true, offset, len, buf, fua);
  }

  asio::awaitable<Status> flush() override {
    const int fd = fd_;
    int res = co_await ring_.submit([fd](io_uring_sqe* sqe) { io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC); });
    if (res < 0) co_return errno_error(-res, "fdatasync " + path_);
    co_return Status{};
  }

  asio::awaitable<Status> zero(std::uint64_t offset, std::uint64_t len, bool may_unmap) override {
    check_range(offset, len);
    const int mode =
        may_unmap ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) : (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
    const int fd = fd_;
    int res = co_await ring_.submit([=](io_uring_sqe* sqe) {
      io_uring_prep_fallocate(sqe, fd, mode, static_cast<off_t>(offset), static_cast<off_t>(len));
    });
    if (res == -EOPNOTSUPP || res == -EINVAL) co_return errc::not_supported;
    if (res < 0) co_return errno_error(-res, "fallocate " + path_);
    co_return Status{};
  }

 private:
  void check_range(std::uint64_t offset, std::uint64_t len) const {
    TANDEM_ASSERT(offset % 4096 == 0 && len % 4096 == 0);
    TANDEM_ASSERT(offset <= size_ && len <= size_ - offset);
  }

  asio::awaitable<Status> rw(bool is_write, std::uint64_t offset, std::size_t len, const IoBuffer& buf, bool fua) {
    check_range(offset, len);
    TANDEM_ASSERT(len <= buf.capacity());
    std::size_t done = 0;
    int eagain = 0;
    while (done < len) {
      const std::uint64_t off = offset + done;
      std::byte* p = buf.data() + done;
      // A single SQE moves at most 2 GiB; requests are far smaller, but say so.
      const auto n = static_cast<unsigned>(std::min<std::size_t>(len - done, std::size_t{1} << 30));
      const int fd = fd_;
      const int idx = buf.buf_index();
      int res = co_await ring_.submit([=](io_uring_sqe* sqe) {
        if (is_write) {
          if (idx >= 0) {
            io_uring_prep_write_fixed(sqe, fd, p, n, off, idx);
          } else {
            io_uring_prep_write(sqe, fd, p, n, off);
          }
          if (fua) sqe->rw_flags = RWF_DSYNC;
        } else {
          if (idx >= 0) {
            io_uring_prep_read_fixed(sqe, fd, p, n, off, idx);
          } else {
            io_uring_prep_read(sqe, fd, p, n, off);
          }
        }
      });
      if (res == -EAGAIN || res == -EINTR) {
        if (++eagain > kEagainRetriesMax) co_return errno_error(EAGAIN, path_);
        continue;
      }
      if (res < 0) {
        co_return errno_error(-res, std::string(is_write ? "write " : "read ") + path_);
      }
      if (res == 0) {
        // A zero-length transfer inside the device is an unexpected end of file.
        co_return Error(errc::io_error, "short " + std::string(is_write ? "write" : "read") + " at end of " + path_);
      }
      done += static_cast<std::size_t>(res);  // short I/O: requeue the remainder
    }
    co_return Status{};
  }

  Ring& ring_;
  int fd_;
  std::string path_;
  std::uint64_t size_;
  bool blk_;
};

class UringEnv final : public DeviceEnv {
 public:
  UringEnv(std::unique_ptr<Ring> ring, std::size_t arena_bytes) : arena_(arena_bytes), ring_(std::move(ring)) {}
  ~UringEnv() override = default;

  Status init() {
    auto st = ring_->register_arena(arena_);
    // Not fatal: without registration the same buffers are used with plain READ/WRITE.
    registration_error_ = st.ok() ? std::string{} : st.error().message();
    return {};
  }

  Result<std::unique_ptr<BlockDevice>> open(const OpenSpec& spec) override {
    int flags = O_RDWR | O_DIRECT | O_CLOEXEC;
    struct stat st {};
    if (::stat(spec.path.c_str(), &st) != 0) {
      if (errno != ENOENT) return errno_error(errno, "stat " + spec.path);
      if (!spec.create_bytes) return errno_error(ENOENT, spec.path);
      flags |= O_CREAT | O_EXCL;
    }
    int fd = ::open(spec.path.c_str(), flags, 0600);
    if (fd < 0) {
      if (errno == EINVAL) {
        return Error(errc::not_supported, spec.path + ": O_DIRECT is not supported by this filesystem");
      }
      return errno_error(errno, "open " + spec.path);
    }
    if (::fstat(fd, &st) != 0) {
      int e = errno;
      ::close(fd);
      return errno_error(e, "fstat " + spec.path);
    }
    // Two daemons writing one volume would corrupt it silently: take an exclusive lock that
    // dies with the process (so a SIGKILLed daemon never leaves a stale lock behind).
    // A daemon that was just killed may still hold it for a moment: the kernel tears an
    // io_uring instance (and the files its requests hold) down asynchronously after the
    // process is gone. Retry for a bounded time before calling the volume busy.
    int lock_rc = ::flock(fd, LOCK_EX | LOCK_NB);
    for (int tries = 0; lock_rc != 0 && errno == EWOULDBLOCK && tries < kLockRetries; ++tries) {
      if (tries == 0)
        spdlog::info("{}: locked by another process; waiting up to {} s for it to go", spec.path, kLockRetries / 10);
      ::usleep(100'000);
      lock_rc = ::flock(fd, LOCK_EX | LOCK_NB);
    }
    if (lock_rc != 0) {
      int e = errno;
      ::close(fd);
      if (e == EWOULDBLOCK) {
        return errno_error(EBUSY, spec.path + " is in use by another process (is another tandemd running?)");
      }
      return errno_error(e, "flock " + spec.path);
    }
    std::uint64_t size = 0;
    const bool blk = S_ISBLK(st.st_mode);
    if (blk) {
      if (::ioctl(fd, BLKGETSIZE64, &size) != 0) {
        int e = errno;
        ::close(fd);
        return errno_error(e, "BLKGETSIZE64 " + spec.path);
      }
    } else if (S_ISREG(st.st_mode)) {
      size = static_cast<std::uint64_t>(st.st_size);
      if ((flags & O_CREAT) != 0) {
        if (::ftruncate(fd, static_cast<off_t>(*spec.create_bytes)) != 0 || ::fsync(fd) != 0) {
          int e = errno;
          ::close(fd);
          ::unlink(spec.path.c_str());
          return errno_error(e, "create " + spec.path);
        }
        size = *spec.create_bytes;
      }
    } else {
      ::close(fd);
      return errno_error(ENOTBLK, spec.path + " is neither a block device nor a regular file");
    }
    return std::unique_ptr<BlockDevice>(new UringDevice(*ring_, fd, spec.path, size, blk));
  }

  Status remove(const std::string& path) override {
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return errno_error(errno, "unlink " + path);
    // Make the removal durable: a stale file must not reappear after a crash.
    const auto slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) return errno_error(errno, "open " + dir);
    const int rc = ::fsync(dfd);
    const int e = errno;
    ::close(dfd);
    if (rc != 0) return errno_error(e, "fsync " + dir);
    return {};
  }
  BufferArena& buffers() override { return arena_; }
  void stop() override { ring_->stop(); }
  Ring& ring() { return *ring_; }

 private:
  // The arena outlives the ring: the ring is torn down (buffers unregistered) first.
  BufferArena arena_;
  std::unique_ptr<Ring> ring_;
  std::string registration_error_;
};

}  // namespace

Result<std::unique_ptr<DeviceEnv>> make_uring_env(asio::io_context& ctx, UringEnvOptions opts) {
  auto ring = Ring::create(ctx, opts.ring);
  if (!ring) return ring.error();
  auto env = std::make_unique<UringEnv>(std::move(ring).value(), opts.arena_bytes);
  TANDEM_TRY(env->init());
  return std::unique_ptr<DeviceEnv>(std::move(env));
}

}  // namespace tandem::engine

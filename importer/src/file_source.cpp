// The file source: a local file or block device, through the engine's io_uring device (the
// same O_DIRECT path the volumes use). Block status comes from SEEK_DATA/SEEK_HOLE on regular
// files; a block device is all data.
#include <fcntl.h>
#include <unistd.h>

#include <boost/asio/use_awaitable.hpp>
#include <cstring>

#include "nbd_source.h"
#include "tandem/engine/errc.h"

namespace tandem::importer {
namespace {

class FileSource final : public ForeignSource {
 public:
  FileSource(std::unique_ptr<engine::BlockDevice> dev, int seek_fd, engine::BufferArena& arena)
      : dev_(std::move(dev)), seek_fd_(seek_fd), name_(dev_->path()), arena_(arena) {}
  ~FileSource() override {
    if (seek_fd_ >= 0) ::close(seek_fd_);
  }

  [[nodiscard]] std::uint64_t size() const override { return dev_->size_bytes(); }
  [[nodiscard]] const std::string& display_name() const override { return name_; }
  [[nodiscard]] bool has_block_status() const override { return seek_fd_ >= 0; }
  [[nodiscard]] bool is_down() const override { return false; }
  [[nodiscard]] const std::string& down_reason() const override { return none_; }

  asio::awaitable<Status> read(std::uint64_t offset, std::size_t len, const engine::IoBuffer& dst) override {
    co_return co_await dev_->read(offset, len, dst);
  }
  asio::awaitable<Status> write(std::uint64_t offset, std::size_t len, const engine::IoBuffer& src, bool fua) override {
    co_return co_await dev_->write(offset, len, src, fua);
  }
  asio::awaitable<Status> zero(std::uint64_t offset, std::uint64_t len, bool fua) override {
    Status st = co_await dev_->zero(offset, len, true);
    if (st.code() == make_error_code(engine::errc::not_supported)) st = co_await dev_->zero(offset, len, false);
    if (st.code() == make_error_code(engine::errc::not_supported)) {
      // Neither deallocation nor a zeroing call: write the zeros.
      engine::IoBuffer zeros = arena_.allocate(std::min<std::uint64_t>(len, 1 << 20));
      std::memset(zeros.data(), 0, zeros.capacity());
      st = Status{};
      for (std::uint64_t done = 0; st && done < len;) {
        const std::uint64_t n = std::min<std::uint64_t>(len - done, zeros.capacity());
        st = co_await dev_->write(offset + done, n, zeros, false);
        done += n;
      }
    }
    if (st && fua) st = co_await dev_->flush();
    co_return st;
  }
  asio::awaitable<Status> flush() override { co_return co_await dev_->flush(); }

  asio::awaitable<Result<std::vector<SourceExtent>>> extents(std::uint64_t offset, std::uint64_t len) override {
    std::vector<SourceExtent> out;
    const std::uint64_t end = offset + len;
    std::uint64_t at = offset;
    while (at < end && seek_fd_ >= 0) {
      const off_t data = ::lseek(seek_fd_, static_cast<off_t>(at), SEEK_DATA);
      if (data < 0) {
        // ENXIO: nothing but a hole from here to the end of the file.
        if (errno == ENXIO) out.push_back(SourceExtent{at, end - at, true});
        break;
      }
      const std::uint64_t d = std::min<std::uint64_t>(static_cast<std::uint64_t>(data) / 4096 * 4096, end);
      if (d > at) out.push_back(SourceExtent{at, d - at, true});
      if (d >= end) break;
      const off_t hole = ::lseek(seek_fd_, static_cast<off_t>(d), SEEK_HOLE);
      if (hole < 0) break;
      const std::uint64_t h = std::min<std::uint64_t>((static_cast<std::uint64_t>(hole) + 4095) / 4096 * 4096, end);
      out.push_back(SourceExtent{d, h - d, false});
      at = h;
      if (out.size() >= 1024) break;  // enough for one call
    }
    if (out.empty() || out.front().offset != offset) out.assign(1, SourceExtent{offset, len, false});
    co_return out;
  }

  asio::awaitable<void> close() override { co_return; }

 private:
  std::unique_ptr<engine::BlockDevice> dev_;
  int seek_fd_ = -1;
  std::string name_;
  std::string none_;
  engine::BufferArena& arena_;
};

}  // namespace

asio::awaitable<Result<std::unique_ptr<ForeignSource>>> open_file_source(engine::DeviceEnv& env, std::string path) {
  auto dev = env.open(engine::OpenSpec{path, std::nullopt});
  if (!dev) co_return dev.error();
  int seek_fd = -1;
  if (!(*dev)->is_block_device()) seek_fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  co_return std::unique_ptr<ForeignSource>(
      std::make_unique<FileSource>(std::move(dev).value(), seek_fd, env.buffers()));
}

}  // namespace tandem::importer

#include "tandem/engine/test_image.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>

#include "tandem/engine/errc.h"

namespace tandem::engine {

namespace {
constexpr std::uint64_t kBlock = 4096;
}  // namespace

class TestImage::Device final : public BlockDevice {
 public:
  explicit Device(TestImage& img) : img_(img), path_(img.overlay_path_ + " (test image)") {}
  [[nodiscard]] std::uint64_t size_bytes() const override { return img_.base_.size_bytes(); }
  [[nodiscard]] const std::string& path() const override { return path_; }
  [[nodiscard]] bool is_block_device() const override { return false; }

  asio::awaitable<Status> read(std::uint64_t offset, std::size_t len, const IoBuffer& buf) override {
    // Runs of blocks from the same side, each in one I/O.
    const std::uint64_t first = offset / kBlock;
    const std::uint64_t n = len / kBlock;
    std::uint64_t i = 0;
    while (i < n) {
      const bool over = img_.in_overlay_.test(first + i);
      std::uint64_t j = i + 1;
      while (j < n && img_.in_overlay_.test(first + j) == over) ++j;
      const std::uint64_t bytes = (j - i) * kBlock;
      IoBuffer part = img_.env_.buffers().allocate(bytes);
      if (over) {
        TANDEM_CO_TRY(co_await img_.overlay_->read((first + i) * kBlock, bytes, part));
      } else {
        TANDEM_CO_TRY(co_await img_.base_.read((first + i) * kBlock, bytes, part));
        // A preserve that ran during the read moved the old block to the overlay first.
        for (std::uint64_t k = i; k < j; ++k) {
          if (img_.in_overlay_.test(first + k)) {
            IoBuffer one = img_.env_.buffers().allocate(kBlock);
            TANDEM_CO_TRY(co_await img_.overlay_->read((first + k) * kBlock, kBlock, one));
            std::memcpy(part.data() + (k - i) * kBlock, one.data(), kBlock);
          }
        }
      }
      std::memcpy(buf.data() + i * kBlock, part.data(), bytes);
      i = j;
    }
    co_return Status{};
  }

  asio::awaitable<Status> write(std::uint64_t offset, std::size_t len, const IoBuffer& buf, bool fua) override {
    auto held = co_await img_.mu_.scoped();
    Status st = co_await img_.overlay_->write(offset, len, buf, fua);
    if (st) img_.in_overlay_.set_range(offset / kBlock, len / kBlock);
    co_return st;
  }

  asio::awaitable<Status> flush() override { co_return co_await img_.overlay_->flush(); }

  asio::awaitable<Status> zero(std::uint64_t, std::uint64_t, bool) override {
    co_return errc::not_supported;  // the volume writes zeros through write()
  }

 private:
  TestImage& img_;
  std::string path_;
};

TestImage::TestImage(DeviceEnv& env, std::string path, Volume& base, std::unique_ptr<BlockDevice> overlay)
    : env_(env),
      overlay_path_(std::move(path)),
      base_(base),
      overlay_(std::move(overlay)),
      in_overlay_(base.size_bytes() / kBlock) {}

TestImage::~TestImage() = default;

Result<std::unique_ptr<TestImage>> TestImage::create(DeviceEnv& env, std::string overlay_path, Volume& base) {
  TANDEM_TRY(env.remove(overlay_path));
  auto dev = env.open(OpenSpec{overlay_path, base.size_bytes()});
  if (!dev) return dev.error();
  return std::unique_ptr<TestImage>(new TestImage(env, std::move(overlay_path), base, std::move(dev).value()));
}

Result<std::unique_ptr<TestImage>> TestImage::reopen(DeviceEnv& env, std::string overlay_path, Volume& base) {
  // Which blocks the overlay holds: its allocated ranges (it is sparse; every write to it is
  // whole 4 KiB blocks).
  const int fd = ::open(overlay_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error(std::error_code(errno, std::system_category()), "open " + overlay_path);
  BlockBitmap held(base.size_bytes() / kBlock);
  const auto size = static_cast<off_t>(base.size_bytes());
  off_t at = 0;
  while (at < size) {
    const off_t data = ::lseek(fd, at, SEEK_DATA);
    if (data < 0) break;  // ENXIO: no data beyond `at`
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0 || hole > size) hole = size;
    const auto first = static_cast<std::uint64_t>(data) / kBlock;
    const auto end = (static_cast<std::uint64_t>(hole) + kBlock - 1) / kBlock;
    if (end > first) held.set_range(first, std::min<std::uint64_t>(end, held.blocks()) - first);
    at = hole;
  }
  ::close(fd);
  auto dev = env.open(OpenSpec{overlay_path, std::nullopt});
  if (!dev) return dev.error();
  std::unique_ptr<TestImage> img(new TestImage(env, std::move(overlay_path), base, std::move(dev).value()));
  img->in_overlay_ = std::move(held);
  return img;
}

asio::awaitable<Status> TestImage::sync() { co_return co_await overlay_->flush(); }

std::unique_ptr<BlockDevice> TestImage::device() { return std::make_unique<Device>(*this); }

asio::awaitable<Status> TestImage::preserve(std::uint64_t first_block, std::uint64_t count) {
  auto held = co_await mu_.scoped();
  Status st;
  std::uint64_t b = first_block;
  while (st && b < first_block + count) {
    if (in_overlay_.test(b)) {
      ++b;
      continue;
    }
    std::uint64_t e = b + 1;
    while (e < first_block + count && !in_overlay_.test(e) && e - b < 256) ++e;
    const std::uint64_t bytes = (e - b) * kBlock;
    IoBuffer buf = env_.buffers().allocate(bytes);
    st = co_await base_.read(b * kBlock, bytes, buf);
    if (st) st = co_await overlay_->write(b * kBlock, bytes, buf, false);
    if (st) in_overlay_.set_range(b, e - b);
    b = e;
  }
  co_return st;
}

Status TestImage::discard() {
  overlay_.reset();
  return env_.remove(overlay_path_);
}

namespace {

class TestImageEnv final : public DeviceEnv {
 public:
  TestImageEnv(DeviceEnv& real, std::string image_path, TestImage& image)
      : real_(real), image_path_(std::move(image_path)), image_(image) {}
  Result<std::unique_ptr<BlockDevice>> open(const OpenSpec& spec) override {
    if (spec.path == image_path_) return image_.device();
    return real_.open(spec);
  }
  Status remove(const std::string& path) override { return real_.remove(path); }
  BufferArena& buffers() override { return real_.buffers(); }

 private:
  DeviceEnv& real_;
  std::string image_path_;
  TestImage& image_;
};

}  // namespace

std::unique_ptr<DeviceEnv> make_test_image_env(DeviceEnv& real, std::string image_path, TestImage& image) {
  return std::make_unique<TestImageEnv>(real, std::move(image_path), image);
}

}  // namespace tandem::engine

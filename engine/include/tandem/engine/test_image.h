// TestImage: the writable point-in-time image a failover test presents on a destination.
//
// It is the destination volume (the base) as of the moment the test starts, plus a sparse
// overlay file of the same size holding every block that differs from the base: the test's
// own writes, and the old contents of base blocks that replication overwrote since. Cycles keep
// committing to the base underneath; before one overwrites base blocks, preserve() copies the
// ones the image still shows from the base into the overlay, so the image never changes under
// the test. Stopping the test drops the overlay.
//
// The image is a BlockDevice (device()), so a Volume (and an NBD export) can sit on it:
// reads come from the overlay where its bit is set, else from the base (re-checked after the
// base read, as a preserve may have run meanwhile); writes go to the overlay. preserve() and
// writes to the image exclude each other per call, so a test write is never overwritten by a
// late copy of the old base block.
//
// The overlay's map is its file's allocation: only blocks the image wrote or preserved are
// allocated in the sparse file, so reopen() after a restart finds them with SEEK_DATA. The
// caller syncs the overlay (sync()) after preserving and before overwriting the base, so a
// crash never leaves the base overwritten and the old block not in the overlay.
#pragma once

#include <memory>
#include <string>

#include "tandem/common/async.h"
#include "tandem/common/result.h"
#include "tandem/engine/bitmap.h"
#include "tandem/engine/block_device.h"
#include "tandem/engine/volume.h"

namespace tandem::engine {

class TestImage {
 public:
  // Creates the overlay (replacing an old one) beside the base. The base must outlive the image.
  static Result<std::unique_ptr<TestImage>> create(DeviceEnv& env, std::string overlay_path, Volume& base);
  // After a restart: the overlay as it was (a real, sparse file).
  static Result<std::unique_ptr<TestImage>> reopen(DeviceEnv& env, std::string overlay_path, Volume& base);
  // Makes the overlay durable (after preserve(), before the base is overwritten).
  asio::awaitable<Status> sync();
  ~TestImage();
  TestImage(const TestImage&) = delete;
  TestImage& operator=(const TestImage&) = delete;

  // A device view of the image (one at a time; the image must outlive it).
  std::unique_ptr<BlockDevice> device();
  // Before base blocks [first, first+count) are overwritten: keep what the image shows.
  asio::awaitable<Status> preserve(std::uint64_t first_block, std::uint64_t count);
  [[nodiscard]] std::uint64_t overlay_blocks() const { return in_overlay_.count(); }
  [[nodiscard]] const std::string& overlay_path() const { return overlay_path_; }
  // Closes and removes the overlay file.
  Status discard();

 private:
  class Device;
  TestImage(DeviceEnv& env, std::string path, Volume& base, std::unique_ptr<BlockDevice> overlay);

  DeviceEnv& env_;
  std::string overlay_path_;
  Volume& base_;
  std::unique_ptr<BlockDevice> overlay_;
  BlockBitmap in_overlay_;
  AsyncMutex mu_;  // preserve() against the image's own writes
};

// A DeviceEnv that opens `image_path` as the test image's device and everything else (the
// test volume's metadata file) through the real env.
std::unique_ptr<DeviceEnv> make_test_image_env(DeviceEnv& real, std::string image_path, TestImage& image);

}  // namespace tandem::engine

// BlockDevice and DeviceEnv: the one seam between the engine and the operating system.
//
// Everything the engine stores (volume data and its metadata) goes through a BlockDevice, and
// every BlockDevice comes from a DeviceEnv. The real env (make_uring_env) opens files and block
// devices with O_DIRECT and does all I/O through the volume's io_uring. Tests substitute an env
// whose disks drop or tear writes that no flush covered when a crash is simulated (leveldb's
// fault-injection Env, for block storage).
//
// Contract for implementations: offsets and lengths of read/write/zero are multiples of 4096
// and lie within size_bytes(); a write with `fua` is durable when it completes; flush() makes
// every completed write durable; a failure is reported, never retried into success.
// Threading: one io_context thread.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <boost/asio/io_context.hpp>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "tandem/common/result.h"
#include "tandem/engine/clock.h"
#include "tandem/engine/io_buffer.h"
#include "tandem/engine/ring.h"

namespace tandem::engine {

namespace asio = boost::asio;

class BlockDevice {
 public:
  virtual ~BlockDevice() = default;
  [[nodiscard]] virtual std::uint64_t size_bytes() const = 0;
  [[nodiscard]] virtual const std::string& path() const = 0;
  [[nodiscard]] virtual bool is_block_device() const = 0;

  // Reads [offset, offset+len) into buf[0, len).
  virtual asio::awaitable<Status> read(std::uint64_t offset, std::size_t len, const IoBuffer& buf) = 0;
  // Writes buf[0, len) at offset; durable on completion when fua.
  virtual asio::awaitable<Status> write(std::uint64_t offset, std::size_t len, const IoBuffer& buf, bool fua) = 0;
  // Makes every completed write durable (fdatasync).
  virtual asio::awaitable<Status> flush() = 0;
  // Makes [offset, offset+len) read as zeros. `may_unmap` lets the device deallocate (punch a
  // hole / discard); otherwise the space stays allocated. Returns not_supported when the
  // device cannot do it without writing zeros itself.
  virtual asio::awaitable<Status> zero(std::uint64_t offset, std::uint64_t len, bool may_unmap) = 0;
};

struct OpenSpec {
  std::string path;
  // Create a regular file of this size when the path does not exist. Without it, a missing
  // path is an error.
  std::optional<std::uint64_t> create_bytes;
};

class DeviceEnv {
 public:
  virtual ~DeviceEnv() = default;
  virtual Result<std::unique_ptr<BlockDevice>> open(const OpenSpec& spec) = 0;
  // Removes a regular file (not open), durably; a missing file is not an error.
  virtual Status remove(const std::string& path) = 0;
  virtual BufferArena& buffers() = 0;
  // Time, timers and random numbers (clock.h): the system's, unless a test drives them.
  virtual Clock& clock() { return system_clock(); }
  // Stops background work (the ring's reaper) once nothing is in flight.
  virtual void stop() {}
};

struct UringEnvOptions {
  RingOptions ring;
  // Registered buffer arena. 64 MiB holds 32 in-flight 1 MiB requests twice over.
  std::size_t arena_bytes = 64 * 1024 * 1024;
};

// The production env: O_DIRECT files/block devices through one io_uring.
Result<std::unique_ptr<DeviceEnv>> make_uring_env(asio::io_context& ctx, UringEnvOptions opts = {});

}  // namespace tandem::engine

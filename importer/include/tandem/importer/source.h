// ForeignSource: the storage a volume is imported from, read and written while the import runs.
//
// Two kinds: any NBD server, named by URI (nbd://, nbds:// with TLS, nbd+unix://), read through
// libnbd's asynchronous API on the caller's event loop; or a local file or block device, read
// and written through the engine's io_uring device. Offsets and lengths are multiples of 4096
// (the volume's block) and lie within size().
//
// A source that stops answering (the connection lost, an I/O error that means the link is
// gone, or no reply within timeout_ms) is "down": every request in flight and every later one
// fails at once with not_connected and the reason is kept (down_reason()); the caller opens a
// new source to try again. An error the server returns for one request (EIO for a bad sector,
// say) fails that request only.
//
// Threading: one io_context thread; all calls from it. close() must complete before
// destruction.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tandem/common/result.h"
#include "tandem/engine/block_device.h"
#include "tandem/engine/io_buffer.h"

namespace tandem::importer {

namespace asio = boost::asio;

// A run of the source that block status describes: `zero` when it reads as zeros (a hole or
// known zeros), so the copy need not move its bytes.
struct SourceExtent {
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  bool zero = false;
  bool operator==(const SourceExtent&) const = default;
};

struct SourceOptions {
  // A request with no answer for this long takes the source down.
  std::uint32_t timeout_ms = 30'000;
};

class ForeignSource {
 public:
  virtual ~ForeignSource() = default;
  [[nodiscard]] virtual std::uint64_t size() const = 0;
  // The URI or path without secrets (no user, password or query string).
  [[nodiscard]] virtual const std::string& display_name() const = 0;
  // Block status is available: extents() tells holes and zeros apart from data.
  [[nodiscard]] virtual bool has_block_status() const = 0;
  [[nodiscard]] virtual bool is_down() const = 0;
  [[nodiscard]] virtual const std::string& down_reason() const = 0;

  virtual asio::awaitable<Status> read(std::uint64_t offset, std::size_t len, const engine::IoBuffer& dst) = 0;
  virtual asio::awaitable<Status> write(std::uint64_t offset, std::size_t len, const engine::IoBuffer& src,
                                        bool fua) = 0;
  // Makes the range read as zeros on the source (deallocating where it can).
  virtual asio::awaitable<Status> zero(std::uint64_t offset, std::uint64_t len, bool fua) = 0;
  virtual asio::awaitable<Status> flush() = 0;
  // Runs covering [offset, offset+len) from its start, in order, possibly fewer than the whole
  // range (at least one block); without block status, one data extent over the whole range.
  virtual asio::awaitable<Result<std::vector<SourceExtent>>> extents(std::uint64_t offset, std::uint64_t len) = 0;
  // Ends the connection (or closes the file); requests still in flight fail.
  virtual asio::awaitable<void> close() = 0;
};

// True for nbd://, nbds://, nbd+unix:// and nbds+unix:// URIs (otherwise a local path).
bool is_nbd_uri(const std::string& s);
// The URI without user, password and query string (which may name key files): what logs,
// the API and metrics may show.
std::string redact_uri(const std::string& uri);

// Connects to an NBD URI (at most timeout_ms) or opens a local file or block device (an
// absolute path). The size must be a non-zero multiple of 4096.
asio::awaitable<Result<std::unique_ptr<ForeignSource>>> open_source(asio::any_io_executor ex, engine::DeviceEnv& env,
                                                                    const std::string& uri_or_path,
                                                                    SourceOptions opts = {});

}  // namespace tandem::importer

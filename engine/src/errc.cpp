#include "tandem/engine/errc.h"

#include <string>

namespace tandem::engine {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "tandem.engine"; }
  std::string message(int c) const override {
    switch (static_cast<errc>(c)) {
      case errc::ok:
        return "ok";
      case errc::io_error:
        return "I/O error on the device";
      case errc::out_of_range:
        return "request beyond the end of the volume";
      case errc::no_space:
        return "write beyond the end of the volume";
      case errc::read_only:
        return "volume is read-only";
      case errc::volume_failed:
        return "volume failed after a flush error and is read-only until restart";
      case errc::shutting_down:
        return "volume is shutting down";
      case errc::not_supported:
        return "operation not supported by the device";
      case errc::corrupt_metadata:
        return "metadata is corrupt (no slot passed its checksum)";
      case errc::metadata_mismatch:
        return "metadata belongs to a different volume";
      case errc::bad_config:
        return "invalid volume configuration";
      case errc::intent_log_full:
        return "write-intent log is full";
    }
    return "unknown engine error " + std::to_string(c);
  }
};

}  // namespace

const std::error_category& engine_category() noexcept {
  static const Category c;
  return c;
}

}  // namespace tandem::engine

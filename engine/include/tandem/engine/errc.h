// Error codes of the block engine. Each maps to the errno an NBD client should see
// (see frontend's mapping); the message says what an operator should know.
#pragma once

#include <system_error>

namespace tandem::engine {

enum class errc {
  ok = 0,
  io_error = 1,       // the device returned an I/O error
  out_of_range,       // a read or request beyond the end of the volume
  no_space,           // a write beyond the end of the volume
  read_only,          // the volume is not writable in its current role
  volume_failed,      // an earlier flush failed; the volume stays read-only until restart
  shutting_down,      // the volume is closing
  not_supported,      // e.g. a fast zero the device cannot do
  corrupt_metadata,   // no metadata slot passed its checksum
  metadata_mismatch,  // metadata describes another volume (size, block size, uuid)
  bad_config,         // an option the engine cannot use
  intent_log_full,    // too many regions hot at once (bounded by in-flight writes)
};

const std::error_category& engine_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), engine_category()}; }

}  // namespace tandem::engine

template <>
struct std::is_error_code_enum<tandem::engine::errc> : std::true_type {};

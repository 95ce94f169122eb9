// Hashes used for integrity: xxh3 (64-bit) for metadata records and extents, xxh128 where two
// whole images are compared. Thin wrappers so only one file includes xxhash.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace tandem {

std::uint64_t xxh3_64(const void* data, std::size_t len) noexcept;
inline std::uint64_t xxh3_64(std::span<const std::byte> s) noexcept { return xxh3_64(s.data(), s.size()); }

}  // namespace tandem

#include "tandem/common/hash.h"

#include <xxhash.h>

namespace tandem {

std::uint64_t xxh3_64(const void* data, std::size_t len) noexcept { return XXH3_64bits(data, len); }

}  // namespace tandem

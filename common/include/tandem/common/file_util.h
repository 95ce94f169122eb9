// Small files the daemon keeps in its state directory, written so that a crash at any instant
// leaves either the old contents or the new, never a mix.
#pragma once

#include <string>
#include <string_view>

#include "tandem/common/result.h"

namespace tandem {

// Writes `text` to path.tmp, syncs it, renames it over `path` and syncs the directory. Mode
// 0600. On failure the old file is untouched and the temporary is removed.
Status write_file_durably(const std::string& path, std::string_view text);

// The whole file, or an error naming it.
Result<std::string> read_whole_file(const std::string& path);

}  // namespace tandem

// The import session's states and the actions that move between them: the contract's table,
// as data. Pure functions; the API and the import itself both ask here.
#pragma once

#include <optional>
#include <string_view>

namespace tandem::importer {

enum class ImportState {
  scheduled,
  queued,
  copy_in_progress,
  paused,
  ready_for_cutover,
  cutover_in_progress,
  import_completed,
  cancel_in_progress,
  cancelled,
  cancel_failed,
  failed,
};

enum class ImportAction { pause, resume, cutover, cancel, cancel_force, remove };

std::string_view to_string(ImportState s);  // "Copy_In_Progress"
std::optional<ImportState> import_state_from(std::string_view s);
std::string_view to_string(ImportAction a);  // "pause", ..., "cancel (force)", "delete"

// Whether the action is allowed in the state (otherwise 422).
bool import_action_allowed(ImportState s, ImportAction a);

// The import no longer runs: only delete is allowed.
bool is_final(ImportState s);

// The volume is still filtered by the import (host I/O goes to both copies).
bool filters_host_io(ImportState s);

}  // namespace tandem::importer

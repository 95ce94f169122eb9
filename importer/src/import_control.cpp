#include "tandem/importer/import_control.h"

#include <array>

namespace tandem::importer {

namespace {

struct Name {
  ImportState s;
  std::string_view name;
};
constexpr std::array kNames = {
    Name{ImportState::scheduled, "Scheduled"},
    Name{ImportState::queued, "Queued"},
    Name{ImportState::copy_in_progress, "Copy_In_Progress"},
    Name{ImportState::paused, "Paused"},
    Name{ImportState::ready_for_cutover, "Ready_For_Cutover"},
    Name{ImportState::cutover_in_progress, "Cutover_In_Progress"},
    Name{ImportState::import_completed, "Import_Completed"},
    Name{ImportState::cancel_in_progress, "Cancel_In_Progress"},
    Name{ImportState::cancelled, "Cancelled"},
    Name{ImportState::cancel_failed, "Cancel_Failed"},
    Name{ImportState::failed, "Failed"},
};

}  // namespace

std::string_view to_string(ImportState s) {
  for (const Name& n : kNames) {
    if (n.s == s) return n.name;
  }
  return "Unknown";
}

std::optional<ImportState> import_state_from(std::string_view s) {
  for (const Name& n : kNames) {
    if (n.name == s) return n.s;
  }
  return std::nullopt;
}

std::string_view to_string(ImportAction a) {
  switch (a) {
    case ImportAction::pause:
      return "pause";
    case ImportAction::resume:
      return "resume";
    case ImportAction::cutover:
      return "cutover";
    case ImportAction::cancel:
      return "cancel";
    case ImportAction::cancel_force:
      return "cancel (force)";
    case ImportAction::remove:
      return "delete";
  }
  return "unknown";
}

bool is_final(ImportState s) {
  return s == ImportState::import_completed || s == ImportState::cancelled || s == ImportState::failed;
}

bool filters_host_io(ImportState s) { return !is_final(s); }

bool import_action_allowed(ImportState s, ImportAction a) {
  using S = ImportState;
  using A = ImportAction;
  switch (a) {
    case A::pause:
      return s == S::copy_in_progress;
    case A::resume:
      return s == S::paused;
    case A::cutover:
      return s == S::ready_for_cutover;
    case A::cancel:
    case A::cancel_force:
      return s == S::scheduled || s == S::queued || s == S::copy_in_progress || s == S::paused ||
             s == S::ready_for_cutover || s == S::cancel_failed;
    case A::remove:
      return is_final(s);
  }
  return false;
}

}  // namespace tandem::importer

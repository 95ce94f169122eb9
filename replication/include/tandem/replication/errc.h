// Error codes of the replication module (see docs/ for what an operator sees).
#pragma once

#include <system_error>

namespace tandem::replication {

// The values are also the codes of a `refuse` frame between peers (docs/wire-protocol.md):
// never renumber them.
enum class errc {
  not_allowed_in_state = 1,  // the session's state does not allow it now
  wrong_role = 2,            // meant for the other role (both sides are sources, say)
  split_brain = 3,           // both sides were written since they last agreed
  unrelated_volumes = 4,     // the generation histories share nothing
  peer_unreachable = 5,      // no link, or it went down meanwhile
  bad_message = 7,           // a peer's message that breaks the protocol
  paused = 8,                // a transfer stopped because an operator paused the session
  mismatched_volumes = 9,    // the two sides' volumes differ in number or size
  destination_ahead = 10,    // the destination was promoted and holds newer data
};

const std::error_category& replication_category() noexcept;

inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), replication_category()}; }

}  // namespace tandem::replication

template <>
struct std::is_error_code_enum<tandem::replication::errc> : std::true_type {};

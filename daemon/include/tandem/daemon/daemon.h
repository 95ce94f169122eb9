// Daemon: the wiring of tandemd. It opens every configured volume on its own io_uring, exports
// each over NBD, and runs the event loop until SIGTERM/SIGINT, then shuts down cleanly: stop
// accepting, finish requests in flight, flush, persist the dirty maps.
//
// Threading: one io_context thread (the shard) runs everything.
#pragma once

#include <string>

#include "tandem/daemon/config.h"

namespace tandem::daemon {

// Runs tandemd until a terminating signal. Returns the process exit code. The caller has run
// check_files(cfg) (the key's and the socket directories' permissions; tandemd's main does). Under systemd it
// notifies READY/STATUS/STOPPING and pings the watchdog; SIGHUP re-reads `config_path` and
// applies what can change at run time (see plan_reload()).
int run_daemon(const Config& cfg, const std::string& config_path);

// Opens each volume (recovering it as a restart would), prints its superblock and dirty map as
// JSON on stdout, and closes it. For operators and tests; the daemon must not be running.
int inspect_volumes(const Config& cfg);

// Offline: makes this node the source or destination of a session (the daemon must be
// stopped). Becoming the source starts a new generation. Returns the exit code.
int set_session_role(const Config& cfg, const std::string& session_id, const std::string& role);

// Sets up spdlog on stderr: "<N>message" lines with the syslog priority when stderr is
// journald's stream (JOURNAL_STREAM), which stamps the time itself; timestamped lines otherwise.
void setup_logging(const std::string& level);
// Whether stderr is connected to the journal (JOURNAL_STREAM names it).
bool journald_logging();

}  // namespace tandem::daemon

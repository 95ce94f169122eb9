// tandemd: the tandem replication daemon. Wiring only; see daemon.h.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>

#include "tandem/daemon/config.h"
#include "tandem/daemon/daemon.h"

int main(int argc, char** argv) {
  CLI::App app{
      "tandemd — replicates Linux block devices between two hosts for disaster recovery.\n"
      "Exports each configured volume over NBD and tracks every write."};
  std::string config_path = "/etc/tandem/tandemd.toml";
  bool check = false;
  bool inspect = false;
  bool version = false;
  bool dropin = false;
  std::string set_role;
  app.add_option("-c,--config", config_path, "configuration file (TOML)")->capture_default_str();
  app.add_flag("--check-config", check, "validate the configuration and exit (0 when valid)");
  app.add_flag("--inspect", inspect,
               "print each volume's metadata and dirty map as JSON and exit (daemon must be stopped)");
  app.add_option("--set-role", set_role,
                 "SESSION=ROLE: make this node the source or destination of a session and exit (daemon must be "
                 "stopped; becoming the source starts a new generation, like a forced promotion)");
  app.add_flag("--systemd-dropin", dropin,
               "print a systemd drop-in for tandemd.service that opens the unit's sandbox to exactly what this "
               "configuration uses (DeviceAllow= for its block devices, ReadWritePaths= for files and directories "
               "outside /var/lib/tandem and /run/tandem) and exit");
  app.add_flag("--version", version, "print the version and exit");
  CLI11_PARSE(app, argc, argv);
  if (version) {
    std::cout << "tandemd " << TANDEM_VERSION << "\n";
    return 0;
  }
  auto cfg = tandem::daemon::load_config(config_path);
  if (!cfg) {
    std::fprintf(stderr, "tandemd: %s\n", cfg.error().message().c_str());
    return 2;
  }
  if (dropin) {
    std::cout << tandem::daemon::systemd_dropin(*cfg);
    return 0;
  }
  // Before the daemon runs (and for --check-config, so the unit's ExecStartPre stops it): the
  // key's and the sockets' permissions.
  const bool runs = !inspect && set_role.empty();
  if (auto files = tandem::daemon::check_files(*cfg); (check || runs) && !files) {
    std::fprintf(stderr, "tandemd: %s\n", files.error().message().c_str());
    return 2;
  }
  if (check) {
    std::printf("%s: OK (%zu volume(s))\n", config_path.c_str(), cfg->volumes.size());
    return 0;
  }
  tandem::daemon::setup_logging(cfg->node.log_level);
  if (inspect) return tandem::daemon::inspect_volumes(*cfg);
  if (!set_role.empty()) {
    const auto eq = set_role.find('=');
    if (eq == std::string::npos) {
      std::fprintf(stderr, "tandemd: --set-role takes SESSION=ROLE\n");
      return 2;
    }
    return tandem::daemon::set_session_role(*cfg, set_role.substr(0, eq), set_role.substr(eq + 1));
  }
  return tandem::daemon::run_daemon(*cfg, config_path);
}

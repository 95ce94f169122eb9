// Fuzzer for the configuration parsers: the TOML configuration file, the run-time volumes' file,
// the JSON bodies of POST /api/rest/volume and POST /api/rest/import_session, and an import's
// record file. Any bytes give a result or an Error with a message, never a crash, a hang or an
// exception escaping the parser; a run-time volumes' file or an import record that parses reads
// back the same after it is written again.
#include <string>
#include <string_view>

#include "fuzz_driver.h"
#include "tandem/common/assert.h"
#include "tandem/daemon/config.h"
#include "tandem/importer/import.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto r = tandem::daemon::parse_config(text, "fuzz.toml");
  if (r.ok()) {
    // Whatever parses is valid by the rules: at least one volume, each with an export.
    TANDEM_ASSERT(!r->volumes.empty());
    for (const auto& v : r->volumes) {
      TANDEM_ASSERT(!v.path.empty() && (!v.nbd_socket.empty() || !v.nbd_listen.empty()));
      TANDEM_ASSERT(!v.size_bytes || (*v.size_bytes > 0 && *v.size_bytes % 4096 == 0));
    }
  } else {
    TANDEM_ASSERT(!r.error().message().empty());
  }
  static const tandem::daemon::Config base = [] {
    auto c = tandem::daemon::parse_config(
        "[node]\nname = \"a\"\n[[volume]]\nid = \"vol0\"\npath = \"/d/vol0\"\nnbd_socket = \"/run/v.nbd\"\n",
        "base.toml");
    TANDEM_ASSERT(c.ok());
    return *c;
  }();
  auto made = tandem::daemon::parse_runtime_volumes(text, "volumes.toml", base);
  if (made.ok()) {
    auto again = tandem::daemon::parse_runtime_volumes(tandem::daemon::render_runtime_volumes(*made), "again", base);
    TANDEM_ASSERT(again.ok() && *again == *made);
  } else {
    TANDEM_ASSERT(!made.error().message().empty());
  }
  auto asked = tandem::daemon::parse_volume_request(text, base, base.volumes);
  if (asked.ok()) {
    TANDEM_ASSERT(asked->id != "vol0" && !asked->path.empty());
    TANDEM_ASSERT(!asked->nbd_socket.empty() || !asked->nbd_listen.empty());
  } else {
    TANDEM_ASSERT(!asked.error().message().empty());
  }
  auto imp = tandem::daemon::parse_import_request(text, base, base.volumes);
  if (imp.ok()) {
    TANDEM_ASSERT(!imp->name.empty() && !imp->source_uri.empty() && !imp->volume_id.empty());
    TANDEM_ASSERT(imp->new_volume.has_value() == (imp->volume_id != "vol0"));
    TANDEM_ASSERT(!imp->new_volume || !imp->new_volume->size_bytes);
  } else {
    TANDEM_ASSERT(!imp.error().message().empty());
  }
  auto rec = tandem::importer::parse_record(std::string(text), "fuzz.json");
  if (rec.ok()) {
    auto again = tandem::importer::parse_record(tandem::importer::render_record(*rec), "again.json");
    TANDEM_ASSERT(again.ok() && again->restart_address == rec->restart_address && again->state == rec->state &&
                  again->source_uri == rec->source_uri);
  } else {
    TANDEM_ASSERT(!rec.error().message().empty());
  }
  return 0;
}

std::vector<std::string> tandem::fuzz::seeds() {
  return {
      "[node]\nname = \"site-a\"\nstate_dir = \"/var/lib/tandem\"\n\n[[volume]]\nid = \"vol0\"\n"
      "path = \"/dev/nvme0n1\"\nsize = \"1GiB\"\nnbd_socket = \"/run/tandem/vol0.nbd\"\n",
      "[node]\nname=\"b\"\nlog_level=\"debug\"\n[[volume]]\nid=\"v\"\npath=\"/x\"\nnbd_listen=\"[::1]:10809\"\n"
      "intent_region_size=\"1MiB\"\nintent_regions_max=64\n[[volume]]\nid=\"w\"\npath=\"/y\"\nsize=8192\n"
      "nbd_socket=\"/s\"\nmeta_path=\"/m\"\n",
      "[node]\nname = 'a'\n[[volume]]\nid = \"v\"\npath = \"/x\"\nsize = 4096\nnbd_listen = \"h:1\"\n",
      "[[volume]]\nid = \"db0\"\npath = \"/srv/db0\"\nsize = 1048576\nnbd_socket = \"/run/db0.nbd\"\n",
      R"({"id": "db0", "path": "/srv/db0.img", "size": "64MiB", "nbd_socket": "/run/db0.nbd", "meta_path": null})",
      R"({"id": "db1", "path": "/dev/vg/db1", "nbd_listen": "127.0.0.1:0", "intent_regions_max": 9})",
      R"({"name": "m", "source": {"uri": "nbd://old:10809/lun7"}, "volume": {"id": "db0", "path": "/srv/db0.img",)"
      R"( "nbd_socket": "/run/db0.nbd"}, "automatic_cutover": true, "scheduled_timestamp": "2026-12-02T16:00:00.5Z",)"
      R"( "rate_limit": 1048576})",
      R"({"name": "n", "source": {"uri": "/dev/sdb"}, "volume": {"id": "vol0"}})",
      R"({"id": "imp-1", "name": "m", "state": "Paused", "source_uri": "nbd://h/x", "source_size": 8192,)"
      R"( "volume_id": "v", "volume_created": true, "automatic_cutover": false, "scheduled_ms": null,)"
      R"( "rate_limit": 0, "restart_address": 4096, "copied_bytes": 1, "skipped_bytes": 2,)"
      R"( "source_missing_blocks": 0, "error_code": "", "error_message": "", "created_ms": 1, "last_update_ms": 2})",
  };
}

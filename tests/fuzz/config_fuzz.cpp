// Fuzzer for the TOML configuration parser: any bytes give a Config or an Error with a message,
// never a crash, a hang or an exception escaping parse_config.
#include <string>
#include <string_view>

#include "fuzz_driver.h"
#include "tandem/common/assert.h"
#include "tandem/daemon/config.h"

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
  };
}

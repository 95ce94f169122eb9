// Plan: a valid config parses with documented defaults; every kind of mistake an operator can
// make is refused with a message that names the key (and the volume) and says what is wrong.
#include <gtest/gtest.h>

#include <algorithm>

#include "tandem/daemon/config.h"

namespace tandem::daemon {
namespace {

constexpr const char* kGood = R"(
[node]
name = "site-a"
state_dir = "/var/lib/tandem"

[[volume]]
id = "vol0"
path = "/dev/nvme0n1"
nbd_socket = "/run/tandem/vol0.nbd"

[[volume]]
id = "vol1"
path = "/srv/vol1.img"
size = "1GiB"
nbd_listen = "127.0.0.1:10809"
intent_region_size = "1MiB"
intent_regions_max = 64
)";

TEST(Config, ParsesWithDefaults) {
  auto c = parse_config(kGood, "t.toml");
  ASSERT_TRUE(c.ok()) << c.error().message();
  EXPECT_EQ(c->node.name, "site-a");
  ASSERT_EQ(c->volumes.size(), 2u);
  EXPECT_EQ(c->volumes[0].meta_path, "/var/lib/tandem/vol0.meta");
  EXPECT_FALSE(c->volumes[0].size_bytes.has_value());
  EXPECT_EQ(c->volumes[0].intent_region_bytes, 4u << 20);
  EXPECT_EQ(c->volumes[0].intent_regions_max, 1024u);
  EXPECT_EQ(c->volumes[1].size_bytes, 1ull << 30);
  EXPECT_EQ(c->volumes[1].intent_region_bytes, 1u << 20);
  EXPECT_EQ(c->volumes[1].intent_regions_max, 64u);
  EXPECT_EQ(c->volumes[1].nbd_listen, "127.0.0.1:10809");
}

struct BadCase {
  const char* name;
  std::string text;
  std::string expect;  // substring of the error
};

std::string with_volume(const std::string& body) { return "[node]\nname = \"a\"\n[[volume]]\n" + body; }

TEST(Config, EveryMistakeIsNamed) {
  const std::vector<BadCase> cases = {
      {"syntax", "[node\nname=1", "t.toml:"},
      {"no node", "[[volume]]\nid=\"v\"", "missing [node]"},
      {"no name", "[node]\nstate_dir=\"/x\"\n[[volume]]\nid=\"v\"", "node.name is required"},
      {"bad name", "[node]\nname=\"a b\"", "node.name"},
      {"relative state_dir", "[node]\nname=\"a\"\nstate_dir=\"x\"", "state_dir must be an absolute"},
      {"bad level", "[node]\nname=\"a\"\nlog_level=\"loud\"", "log_level"},
      {"unknown node key", "[node]\nname=\"a\"\ncolour=1", "unknown key 'colour'"},
      {"unknown section", "[node]\nname=\"a\"\n[nodes]\nx=1", "unknown section 'nodes'"},
      {"no volumes", "[node]\nname=\"a\"", "no [[volume]]"},
      {"volume as table", "[node]\nname=\"a\"\n[volume]\nid=\"v\"", "[[volume]] tables"},
      {"no id", with_volume("path=\"/x\""), "id is required"},
      {"bad id", with_volume("id=\"../x\"\npath=\"/x\""), "id \"../x\""},
      {"no path", with_volume("id=\"v\"\nnbd_socket=\"/s\""), "(v).path"},
      {"relative path", with_volume("id=\"v\"\npath=\"x\"\nnbd_socket=\"/s\""), "(v).path"},
      {"bad size", with_volume("id=\"v\"\npath=\"/x\"\nsize=\"1XB\"\nnbd_socket=\"/s\""),
       "(v).size: \"1XB\" is not a size"},
      {"unaligned size", with_volume("id=\"v\"\npath=\"/x\"\nsize=1000\nnbd_socket=\"/s\""), "multiple of 4096"},
      {"size type", with_volume("id=\"v\"\npath=\"/x\"\nsize=true\nnbd_socket=\"/s\""), "(v).size: must be a size"},
      {"no export", with_volume("id=\"v\"\npath=\"/x\""), "needs nbd_socket or nbd_listen"},
      {"bad listen", with_volume("id=\"v\"\npath=\"/x\"\nnbd_listen=\"localhost\""), "is not host:port"},
      {"bad port", with_volume("id=\"v\"\npath=\"/x\"\nnbd_listen=\"h:70000\""), "is not host:port"},
      {"port reason", with_volume("id=\"v\"\npath=\"/x\"\nnbd_listen=\"h:70000\""), "port 70000 is above 65535"},
      {"bare v6", with_volume("id=\"v\"\npath=\"/x\"\nnbd_listen=\"::1:10809\""), "IPv6 address in brackets"},
      {"listen type", with_volume("id=\"v\"\npath=\"/x\"\nnbd_listen=10809"), "(v).nbd_listen: must be a string"},
      {"unknown volume key", with_volume("id=\"v\"\npath=\"/x\"\nnbd_socket=\"/s\"\nsise=\"1G\""),
       "(v): unknown key 'sise'"},
      {"region not pow2", with_volume("id=\"v\"\npath=\"/x\"\nnbd_socket=\"/s\"\nintent_region_size=\"3MiB\""),
       "power of two"},
      {"hot max", with_volume("id=\"v\"\npath=\"/x\"\nnbd_socket=\"/s\"\nintent_regions_max=0"), "intent_regions_max"},
      {"dup id",
       with_volume("id=\"v\"\npath=\"/x\"\nnbd_socket=\"/s\"\n[[volume]]\nid=\"v\"\npath=\"/y\"\nnbd_socket=\"/t\""),
       "duplicate volume id"},
      {"dup path",
       with_volume("id=\"v\"\npath=\"/x\"\nnbd_socket=\"/s\"\n[[volume]]\nid=\"w\"\npath=\"/x\"\nnbd_socket=\"/t\""),
       "used by another volume"},
      {"dup socket",
       with_volume("id=\"v\"\npath=\"/x\"\nnbd_socket=\"/s\"\n[[volume]]\nid=\"w\"\npath=\"/y\"\nnbd_socket=\"/s\""),
       "nbd_socket: used by another"},
      {"meta is data", with_volume("id=\"v\"\npath=\"/x\"\nmeta_path=\"/x\"\nnbd_socket=\"/s\""),
       "must differ from path"},
      {"api relative",
       "[node]\nname=\"a\"\napi_socket=\"api.sock\"\n[[volume]]\nid=\"v\"\npath=\"/x\"\nnbd_socket=\"/s\"",
       "node.api_socket must be an absolute"},
      {"api listen no token",
       "[node]\nname=\"a\"\napi_listen=\"127.0.0.1:8443\"\n[[volume]]\nid=\"v\"\npath=\"/x\"\nnbd_socket=\"/s\"",
       "needs node.api_token"},
      {"api short token",
       "[node]\nname=\"a\"\napi_listen=\"127.0.0.1:8443\"\napi_token=\"short\"\n[[volume]]\nid=\"v\"\npath=\"/"
       "x\"\nnbd_socket=\"/s\"",
       "at least 16"},
      {"api token alone",
       "[node]\nname=\"a\"\napi_token=\"0123456789abcdef\"\n[[volume]]\nid=\"v\"\npath=\"/x\"\nnbd_socket=\"/s\"",
       "api_listen is not"},
      {"api listen no tls",
       "[node]\nname=\"a\"\napi_listen=\"127.0.0.1:8443\"\napi_token=\"0123456789abcdef\"\n[[volume]]\nid=\"v\"\npath="
       "\"/x\"\nnbd_socket=\"/s\"",
       "needs the [tls] section"},
  };
  for (const auto& c : cases) {
    auto r = parse_config(c.text, "t.toml");
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_NE(r.error().message().find(c.expect), std::string::npos)
        << c.name << ": got \"" << r.error().message() << "\", want \"" << c.expect << "\"";
  }
}

constexpr const char* kPair = R"(
[node]
name = "site-a"
[[volume]]
id = "vol0"
path = "/srv/vol0.img"
nbd_socket = "/run/tandem/vol0.nbd"
[tls]
ca = "/etc/tandem/ca.pem"
cert = "/etc/tandem/a.pem"
key = "/etc/tandem/a.key"
[peer]
name = "site-b"
address = "10.0.0.2:7788"
listen = "0.0.0.0:7788"
[[session]]
id = "s0"
volumes = ["vol0"]
remote_volumes = ["vol0"]
role = "source"
)";

TEST(Config, SessionKeys) {
  auto c =
      parse_config(std::string(kPair) + "rpo_seconds = 30\nwindow = \"16MiB\"\nrate_limit = \"50MiB\"\n", "t.toml");
  ASSERT_TRUE(c.ok()) << c.error().message();
  ASSERT_EQ(c->sessions.size(), 1u);
  EXPECT_EQ(c->sessions[0].rpo_seconds, 30u);
  EXPECT_EQ(c->sessions[0].window_bytes, 16ull << 20);
  EXPECT_EQ(c->sessions[0].rate_limit_bytes_per_s, 50ull << 20);
  auto d = parse_config(kPair, "t.toml");
  ASSERT_TRUE(d.ok()) << d.error().message();
  EXPECT_EQ(d->sessions[0].rate_limit_bytes_per_s, 0u);  // unlimited by default
  auto bad = parse_config(std::string(kPair) + "rate_limit = \"fast\"\n", "t.toml");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message().find("rate_limit"), std::string::npos) << bad.error().message();
}

TEST(Config, PeerAddresses) {
  auto with = [](const std::string& from, const std::string& to) {
    std::string text = kPair;
    text.replace(text.find(from), from.size(), to);
    return parse_config(text, "t.toml");
  };
  auto v6 = with("10.0.0.2:7788", "[fd00::2]:7788");
  ASSERT_TRUE(v6.ok()) << v6.error().message();
  EXPECT_EQ(v6->peer->address, "[fd00::2]:7788");
  auto any = with("0.0.0.0:7788", "[::]:0");  // a listener may take any free port
  ASSERT_TRUE(any.ok()) << any.error().message();
  EXPECT_EQ(any->peer->listen, "[::]:0");
  const struct {
    std::string from, to, expect;
  } cases[] = {
      {"10.0.0.2:7788", "10.0.0.2:0", "peer.address: \"10.0.0.2:0\" is not host:port (port 0 cannot be dialed"},
      {"10.0.0.2:7788", "fd00::2:7788", "peer.address: \"fd00::2:7788\" is not host:port (more than one ':'"},
      {"10.0.0.2:7788", "10.0.0.2", "peer.address: \"10.0.0.2\" is not host:port (no port)"},
      {"0.0.0.0:7788", ":7788", "peer.listen: \":7788\" is not host:port (no host before the ':')"},
      {"address = \"10.0.0.2:7788\"\n", "", "peer.address: host:port of the peer is required"},
  };
  for (const auto& c : cases) {
    auto r = with(c.from, c.to);
    ASSERT_FALSE(r.ok()) << c.to;
    EXPECT_NE(r.error().message().find(c.expect), std::string::npos)
        << "got \"" << r.error().message() << "\", want \"" << c.expect << "\"";
  }
}

Config parsed(const std::string& text) {
  auto c = parse_config(text, "t.toml");
  EXPECT_TRUE(c.ok()) << c.error().message();
  return c.ok() ? *c : Config{};
}

bool has(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

TEST(Config, ReloadAppliesRuntimeKeysAndNamesTheRest) {
  const Config running = parsed(kPair);
  // Nothing changed: nothing to do.
  const ReloadPlan same = plan_reload(running, parsed(kPair));
  EXPECT_TRUE(same.applied.empty());
  EXPECT_TRUE(same.needs_restart.empty());
  // The reloadable keys.
  std::string text = kPair;
  text.replace(text.find("name = \"site-a\""), 15, "name = \"site-a\"\nlog_level = \"debug\"");
  text.replace(text.find("listen = \"0.0.0.0:7788\""), 23, "listen = \"0.0.0.0:7788\"\nrate_limit = \"1MiB\"");
  text += "rpo_seconds = 4\nrate_limit = \"2MiB\"\n";
  const ReloadPlan r = plan_reload(running, parsed(text));
  EXPECT_TRUE(r.needs_restart.empty()) << r.needs_restart.front();
  EXPECT_TRUE(has(r.applied, "[node] log_level: info -> debug"));
  EXPECT_TRUE(has(r.applied, "[peer] rate_limit: unlimited -> 1048576 B/s"));
  EXPECT_TRUE(has(r.applied, "session s0 rpo_seconds: 10 -> 4"));
  EXPECT_TRUE(has(r.applied, "session s0 rate_limit: unlimited -> 2097152 B/s"));
  EXPECT_EQ(r.applied.size(), 4u);
  // Keys that need a restart, each named.
  std::string moved = kPair;
  moved.replace(moved.find("/srv/vol0.img"), 13, "/srv/other.img");
  moved.replace(moved.find("10.0.0.2:7788"), 13, "10.0.0.3:7788");
  moved.replace(moved.find("/etc/tandem/a.key"), 17, "/etc/tandem/b.key");
  moved +=
      "window = \"8MiB\"\n[[session]]\nid = \"s1\"\nvolumes = [\"vol1\"]\nremote_volumes = [\"v\"]\nrole = \"source\"\n"
      "[[volume]]\nid = \"vol1\"\npath = \"/srv/vol1.img\"\nnbd_socket = \"/run/tandem/vol1.nbd\"\n";
  const ReloadPlan m = plan_reload(running, parsed(moved));
  EXPECT_TRUE(m.applied.empty());
  EXPECT_TRUE(has(m.needs_restart, "volume vol0 path"));
  EXPECT_TRUE(has(m.needs_restart, "[peer] address"));
  EXPECT_TRUE(has(m.needs_restart, "[tls] key"));
  EXPECT_TRUE(has(m.needs_restart, "session s0 window"));
  EXPECT_EQ(m.needs_restart.size(), 4u);
  EXPECT_EQ(m.sessions_added, std::vector<std::string>{"s1"});
  // A volume added is applied at run time, not a restart.
  EXPECT_EQ(m.volumes_added, std::vector<std::string>{"vol1"});
  EXPECT_TRUE(m.volumes_removed.empty());
  const ReloadPlan back = plan_reload(parsed(moved), running);
  EXPECT_EQ(back.volumes_removed, std::vector<std::string>{"vol1"});
  EXPECT_EQ(back.sessions_removed, std::vector<std::string>{"s1"});
}

TEST(Config, SystemdDropinOpensWhatTheConfigUses) {
  const std::string d = systemd_dropin(parsed(kGood));
  // The block device by name, replacing the unit's device classes; the file's directory.
  EXPECT_NE(d.find("[Service]\nDeviceAllow=\nDeviceAllow=/dev/nvme0n1 rw\n"), std::string::npos) << d;
  EXPECT_NE(d.find("ReadWritePaths=-/srv\n"), std::string::npos) << d;
  // Nothing for the unit's own directories.
  EXPECT_EQ(d.find("ReadWritePaths=/var/lib/tandem"), std::string::npos) << d;
  EXPECT_EQ(d.find("ReadWritePaths=/run/tandem"), std::string::npos) << d;
}

TEST(Config, MissingFileIsAClearError) {
  auto r = load_config("/nonexistent/tandem.toml");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("/nonexistent/tandem.toml"), std::string::npos);
}

}  // namespace
}  // namespace tandem::daemon

namespace tandem::daemon {
namespace {

// Volumes created at run time: the API's body is held to the [[volume]] rules and checked
// against the volumes that exist; the file that keeps them across restarts reads back exactly
// what was written, and refuses what conflicts with the configuration.
TEST(RuntimeVolumes, ARequestIsHeldToTheVolumeRules) {
  auto c = parse_config(kGood, "t.toml");
  ASSERT_TRUE(c.ok()) << c.error().message();
  auto v = parse_volume_request(
      R"({"id": "db0", "path": "/srv/db0.img", "size": "64MiB", "nbd_socket": "/run/tandem/db0.nbd", "nbd_listen": null})",
      *c, c->volumes);
  ASSERT_TRUE(v.ok()) << v.error().message();
  EXPECT_EQ(v->id, "db0");
  EXPECT_EQ(v->size_bytes, 64ull << 20);
  EXPECT_EQ(v->meta_path, "/var/lib/tandem/db0.meta");
  EXPECT_TRUE(v->nbd_listen.empty());
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"[]", "must be a JSON object"},
      {"{\"id\": ", "must be a JSON object"},
      {R"({"path": "/srv/x.img", "nbd_socket": "/run/x.nbd"})", "id is required"},
      {R"({"id": "a b", "path": "/srv/x.img", "nbd_socket": "/run/x.nbd"})", "use letters"},
      {R"({"id": "x", "path": "srv/x.img", "nbd_socket": "/run/x.nbd"})", "absolute path"},
      {R"({"id": "x", "path": "/srv/x.img", "nbd_socket": "/run/x.nbd", "colour": "red"})", "unknown key 'colour'"},
      {R"({"id": "x", "path": "/srv/x.img", "nbd_socket": "/run/x.nbd", "size": true})", "volume.size: must be"},
      {R"({"id": "x", "path": "/srv/x.img", "nbd_socket": "/run/x.nbd", "size": 1000})", "multiple of 4096"},
      {R"({"id": "x", "path": "/srv/x.img"})", "needs nbd_socket or nbd_listen"},
      {R"({"id": "x", "path": "/srv/x.img", "nbd_socket": "/srv/x.img"})", "must differ from path and meta_path"},
      {R"({"id": "vol0", "path": "/srv/x.img", "nbd_socket": "/run/x.nbd"})", "duplicate volume id"},
      {R"({"id": "x", "path": "/srv/vol1.img", "nbd_socket": "/run/x.nbd"})", "path: used by another volume"},
      {R"({"id": "x", "path": "/srv/x.img", "nbd_socket": "/run/tandem/vol0.nbd"})", "nbd_socket: used by another"},
      {R"({"id": "x", "path": "/srv/x.img", "nbd_listen": "127.0.0.1:10809"})", "nbd_listen: used by another"},
  };
  for (const auto& [body, expect] : bad) {
    auto r = parse_volume_request(body, *c, c->volumes);
    ASSERT_FALSE(r.ok()) << body;
    EXPECT_NE(r.error().message().find(expect), std::string::npos) << body << " -> " << r.error().message();
  }
}

TEST(RuntimeVolumes, TheFileReadsBackWhatWasWrittenAndRefusesConflicts) {
  auto c = parse_config(kGood, "t.toml");
  ASSERT_TRUE(c.ok()) << c.error().message();
  std::vector<VolumeConfig> made;
  for (const char* body :
       {R"({"id": "db0", "path": "/srv/db \"0\".img", "size": 1048576, "nbd_socket": "/run/db0.nbd"})",
        R"({"id": "db1", "path": "/dev/vg/db1", "nbd_listen": "127.0.0.1:0", "intent_regions_max": 9})"}) {
    std::vector<VolumeConfig> existing = c->volumes;
    existing.insert(existing.end(), made.begin(), made.end());
    auto v = parse_volume_request(body, *c, existing);
    ASSERT_TRUE(v.ok()) << v.error().message();
    made.push_back(*v);
  }
  const std::string text = render_runtime_volumes(made);
  auto back = parse_runtime_volumes(text, "volumes.toml", *c);
  ASSERT_TRUE(back.ok()) << back.error().message() << "\n" << text;
  EXPECT_EQ(*back, made);
  auto none = parse_runtime_volumes("", "volumes.toml", *c);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
  // The last one deleted: the file written then reads back as none.
  auto emptied = parse_runtime_volumes(render_runtime_volumes({}), "volumes.toml", *c);
  ASSERT_TRUE(emptied.ok()) << emptied.error().message();
  EXPECT_TRUE(emptied->empty());
  // The configuration gained a volume with the same id since: named, not silently shadowed.
  auto grown = parse_config(
      std::string(kGood) + "\n[[volume]]\nid = \"db1\"\npath = \"/srv/other\"\nnbd_socket = \"/run/o.nbd\"\n",
      "t.toml");
  ASSERT_TRUE(grown.ok()) << grown.error().message();
  auto clash = parse_runtime_volumes(text, "volumes.toml", *grown);
  ASSERT_FALSE(clash.ok());
  EXPECT_NE(clash.error().message().find("volumes.toml: volume[1]: volume db1: its id is used by another volume"),
            std::string::npos)
      << clash.error().message();
  // At start the configuration file wins: the clashing entry is left out, by name.
  std::vector<std::string> skipped;
  auto kept = parse_runtime_volumes(text, "volumes.toml", *grown, &skipped);
  ASSERT_TRUE(kept.ok()) << kept.error().message();
  ASSERT_EQ(kept->size(), 1u);
  EXPECT_EQ((*kept)[0].id, "db0");
  ASSERT_EQ(skipped.size(), 1u);
  EXPECT_NE(skipped[0].find("db1"), std::string::npos);
  auto junk = parse_runtime_volumes("[[volume]]\nid = 3\n", "volumes.toml", *c);
  EXPECT_FALSE(junk.ok());
}

TEST(ImportRequest, TimesAndVolumes) {
  EXPECT_EQ(parse_rfc3339_ms("1970-01-01T00:00:00Z"), 0);
  EXPECT_EQ(parse_rfc3339_ms("2026-12-02T16:00:00Z"), 1796227200000);
  EXPECT_EQ(parse_rfc3339_ms("2026-12-02T16:00:00.25Z"), 1796227200250);
  EXPECT_FALSE(parse_rfc3339_ms("2026-12-02T16:00:00+01:00").has_value());
  EXPECT_FALSE(parse_rfc3339_ms("2026-02-30T00:00:00Z").has_value());
  EXPECT_FALSE(parse_rfc3339_ms("2026-12-02T16:00:00.Z").has_value());
  EXPECT_FALSE(parse_rfc3339_ms("tomorrow").has_value());
  auto cfg = parse_config(
      "[node]\nname = \"a\"\n[[volume]]\nid = \"vol0\"\npath = \"/d/v\"\nnbd_socket = \"/r/v.nbd\"\n", "t.toml");
  ASSERT_TRUE(cfg.ok()) << cfg.error().message();
  auto into_existing = parse_import_request(
      R"({"name": "m", "source": {"uri": "nbd://h/x"}, "volume": {"id": "vol0"}})", *cfg, cfg->volumes);
  ASSERT_TRUE(into_existing.ok()) << into_existing.error().message();
  EXPECT_FALSE(into_existing->new_volume.has_value());
  EXPECT_FALSE(
      parse_import_request(R"({"name": "m", "source": {"uri": "nbd://h/x"}, "volume": {"id": "vol0", "path": "/x"}})",
                           *cfg, cfg->volumes)
          .ok());
  auto fresh = parse_import_request(
      R"({"name": "m", "source": {"uri": "nbd://h/x"}, "volume": {"id": "db0", "path": "/srv/db0", "nbd_socket": "/r/db0.nbd"},)"
      R"( "rate_limit": 5, "scheduled_timestamp": "2026-12-02T16:00:00Z", "automatic_cutover": true})",
      *cfg, cfg->volumes);
  ASSERT_TRUE(fresh.ok()) << fresh.error().message();
  ASSERT_TRUE(fresh->new_volume.has_value());
  EXPECT_EQ(fresh->new_volume->id, "db0");
  EXPECT_FALSE(fresh->new_volume->size_bytes.has_value());
  EXPECT_EQ(fresh->rate_limit, 5u);
  EXPECT_TRUE(fresh->automatic_cutover);
  EXPECT_EQ(fresh->scheduled_ms, 1796227200000);
  // A new volume may not reuse another's socket.
  auto clash = parse_import_request(
      R"({"name": "m", "source": {"uri": "nbd://h/x"}, "volume": {"id": "db0", "path": "/srv/db0", "nbd_socket": "/r/v.nbd"}})",
      *cfg, cfg->volumes);
  EXPECT_FALSE(clash.ok());
}

}  // namespace
}  // namespace tandem::daemon

#include "tandem/daemon/daemon.h"

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <fcntl.h>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstdio>
#include <cstdlib>

#include <filesystem>
#include <iostream>
#include <list>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>

#include "tandem/api/router.h"
#include "tandem/api/server.h"
#include "tandem/common/async.h"
#include "tandem/common/endpoint.h"
#include "tandem/common/file_util.h"
#include "tandem/common/probe.h"
#include "tandem/common/units.h"
#include "tandem/engine/block_device.h"
#include "tandem/engine/volume.h"
#include "tandem/frontend/nbd_server.h"
#include "tandem/importer/manager.h"
#include "tandem/importer/source.h"
#include "tandem/replication/replicator.h"
#include "tandem/replication/session.h"
#include "tandem/transport/tls.h"

namespace tandem::daemon {
namespace {

namespace asio = boost::asio;
namespace fs = std::filesystem;

struct VolumeRuntime {
  std::shared_ptr<const VolumeConfig> cfg;  // from the configuration file, or created at run time
  bool runtime = false;                     // created through the API (kept in <state_dir>/volumes.toml)
  std::unique_ptr<engine::DeviceEnv> env;
  std::unique_ptr<engine::Volume> volume;
  std::unique_ptr<frontend::NbdServer> nbd;
};

Status ensure_dir(const std::string& dir, fs::perms perms) {
  std::error_code ec;
  if (fs::exists(dir, ec)) return {};
  fs::create_directories(dir, ec);
  if (ec) return Error(ec, "cannot create directory " + dir);
  fs::permissions(dir, perms, ec);
  return {};
}

// n random bytes as hex (import ids).
std::string random_hex(std::size_t n) {
  static std::mt19937_64 rng{std::random_device{}()};
  std::string out;
  for (std::size_t i = 0; i < n; ++i) out += fmt::format("{:02x}", static_cast<unsigned>(rng() & 0xff));
  return out;
}

// systemd's notification protocol (sd_notify(3)); a no-op when not run by systemd.
void notify(const std::string& state) { (void)sd_notify(0, state.c_str()); }

engine::VolumeOptions volume_options(const VolumeConfig& v) {
  engine::VolumeOptions o;
  o.id = v.id;
  o.path = v.path;
  o.create_bytes = v.size_bytes;
  o.meta_path = v.meta_path;
  o.dirty.region_bytes = v.intent_region_bytes;
  o.dirty.intent_regions_max = v.intent_regions_max;
  return o;
}

// Opens a volume on its own io_uring env (`env`, or a new one).
asio::awaitable<Result<VolumeRuntime>> open_volume(asio::io_context& ctx, const VolumeConfig& vc,
                                                   std::unique_ptr<engine::DeviceEnv> given = nullptr) {
  VolumeRuntime rt;
  rt.cfg = std::make_shared<const VolumeConfig>(vc);
  if (given) {
    rt.env = std::move(given);
  } else {
    auto env = engine::make_uring_env(ctx);
    if (!env) co_return Error(env.error().code, "volume " + vc.id + ": " + env.error().message());
    rt.env = std::move(env).value();
  }
  TANDEM_CO_TRY(ensure_dir(fs::path(vc.meta_path).parent_path().string(), fs::perms::owner_all));
  // A named local, moved in: GCC 12 mishandles a temporary argument inside co_await (double free).
  engine::VolumeOptions opts = volume_options(vc);
  auto vol = co_await engine::Volume::open(*rt.env, std::move(opts));
  if (!vol) {
    rt.env->stop();
    co_return vol.error();
  }
  rt.volume = std::move(vol).value();
  co_return rt;
}

class Daemon {
 public:
  Daemon(Config cfg, std::string config_path)
      : cfg_(std::move(cfg)),
        config_path_(std::move(config_path)),
        signals_(ctx_, SIGTERM, SIGINT, SIGHUP),
        tick_(ctx_),
        start_tick_(ctx_) {}

  int run() {
    asio::co_spawn(ctx_, start(), abort_on_exception);
    ctx_.run();
    return exit_code_;
  }

 private:
  // Start-up can take long: a destination killed while applying a cycle replays it before its
  // session is loaded. Until READY it tells systemd it is still going (EXTEND_TIMEOUT_USEC)
  // and what it is doing (STATUS), so the unit's start timeout bounds a stuck start, not a
  // long one.
  asio::awaitable<void> extend_start() {
    while (!ready_ && !shutting_down_) {
      notify("EXTEND_TIMEOUT_USEC=60000000");
      start_tick_.expires_after(std::chrono::seconds(20));
      auto [ec] = co_await start_tick_.async_wait(asio::as_tuple(asio::use_awaitable));
      (void)ec;
    }
  }

  void starting(const std::string& what) { notify("STATUS=" + cfg_.node.name + ": starting: " + what); }

  asio::awaitable<void> start() {
    asio::co_spawn(ctx_, extend_start(), abort_on_exception);
    for (const auto& vc : cfg_.volumes) {
      starting("opening volume " + vc.id + " (" + vc.path + ")");
      auto rt = co_await open_volume(ctx_, vc);
      if (!rt) {
        spdlog::error("{}", rt.error().message());
        exit_code_ = 1;
        co_await shutdown();
        co_return;
      }
      volumes_.push_back(std::move(rt).value());
      auto& v = volumes_.back();
      const auto& sb = v.volume->meta().superblock();
      spdlog::info("volume {}: {} ({}), uuid {}, generation {:016x}{}, {} dirty blocks", vc.id, vc.path,
                   format_bytes(v.volume->size_bytes()), engine::uuid_to_string(sb.volume_uuid),
                   sb.generations.empty() ? 0 : sb.generations.front(), v.volume->created() ? " (new)" : "",
                   v.volume->dirty().dirty_blocks());
    }
    // Volumes created at run time (POST /api/rest/volume) by an earlier run.
    std::vector<std::string> skipped;
    auto made = load_runtime_volumes(cfg_, &skipped);
    for (const auto& why : skipped) {
      spdlog::error("{}: a volume created at run time is not opened: {} (the configuration file defines it now)",
                    runtime_volumes_path(cfg_), why);
    }
    if (!made) {
      spdlog::error("{}", made.error().message());
      exit_code_ = 1;
      co_await shutdown();
      co_return;
    }
    for (auto& vc : *made) {
      runtime_cfgs_.push_back(std::move(vc));
      const VolumeConfig& c = runtime_cfgs_.back();
      starting("opening volume " + c.id + " (" + c.path + ")");
      auto rt = co_await open_volume(ctx_, c);
      if (!rt) {
        spdlog::error("{} (created at run time; kept in {})", rt.error().message(), runtime_volumes_path(cfg_));
        exit_code_ = 1;
        co_await shutdown();
        co_return;
      }
      rt->runtime = true;
      volumes_.push_back(std::move(rt).value());
      spdlog::info("volume {}: {} ({}), created at run time", c.id, c.path,
                   format_bytes(volumes_.back().volume->size_bytes()));
    }
    // Imports before exports: each volume being filled gets its filter (and the write-intent
    // regions a crash left hot are made equal on both copies) before a host can reach it.
    {
      importer::ImportManagerOptions io;
      io.dir = (fs::path(cfg_.node.state_dir) / "imports").string();
      io.max_concurrent = cfg_.node.max_concurrent_imports;
      imports_ = std::make_unique<importer::ImportManager>(ctx_.get_executor(), std::move(io));
      imports_->on_final = [this](importer::Import& im) { return import_ended(im); };
      starting("recovering imports");
      if (Status st = co_await recover_imports(); !st) {
        spdlog::error("{}", st.error().message());
        exit_code_ = 1;
        co_await shutdown();
        co_return;
      }
    }
    // Sessions before exports: a destination's volumes turn read-only and a source's get their
    // copy-on-write hook before any host can write.
    for (const auto& sc : cfg_.sessions) {
      for (const auto& vid : sc.volumes) {
        if (importer::Import* im = imports_->filling(vid)) {
          spdlog::error("session {}: volume {} is still being imported (import {}, {}); cut the import over first",
                        sc.id, vid, im->record().id, importer::to_string(im->record().state));
          exit_code_ = 1;
          co_await shutdown();
          co_return;
        }
      }
      replication::SessionOptions so = session_options(sc);
      asio::any_io_executor ex = ctx_.get_executor();
      starting("loading session " + sc.id + " (a cycle the destination had committed is applied first)");
      auto s = co_await replication::Session::open(std::move(ex), std::move(so));
      if (!s) {
        spdlog::error("session {}: {}", sc.id, s.error().message());
        exit_code_ = 1;
        co_await shutdown();
        co_return;
      }
      sessions_.push_back(std::move(s).value());
    }
    for (auto& v : volumes_) {
      if (auto st = export_volume(v); !st) {
        spdlog::error("{}", st.error().message());
        exit_code_ = 1;
        co_await shutdown();
        co_return;
      }
    }
    if (!sessions_.empty()) {
      replication::ReplicatorOptions ro;
      ro.node_name = cfg_.node.name;
      ro.tls = transport::TlsFiles{cfg_.tls->ca, cfg_.tls->cert, cfg_.tls->key};
      ro.peer_name = cfg_.peer->name;
      ro.peer_address = cfg_.peer->address;
      ro.listen_address = cfg_.peer->listen;
      ro.rate_limit_bytes_per_s = cfg_.peer->rate_limit_bytes_per_s;
      ro.keepalive_interval_ms = cfg_.peer->keepalive_interval_ms;
      ro.peer_timeout_ms = cfg_.peer->peer_timeout_ms;
      replicator_ = std::make_unique<replication::Replicator>(ctx_.get_executor(), std::move(ro));
      for (auto& s : sessions_) replicator_->add_session(s.get());
      auto st = replicator_->start();
      if (!st) {
        spdlog::error("replication: cannot start the link to {}: {}", cfg_.peer->name, st.error().message());
        exit_code_ = 1;
        co_await shutdown();
        co_return;
      }
      spdlog::info("replication: {} session(s) with {}; {} {} (listening on {}, port {})", sessions_.size(),
                   cfg_.peer->name, replicator_->dials() ? "dialing" : "accepting from", cfg_.peer->address,
                   cfg_.peer->listen, replicator_->listen_port());
    }
    {
      api::ApiContext actx;
      actx.node_name = cfg_.node.name;
      actx.sessions = [this] {
        std::vector<replication::Session*> out;
        for (auto& s : sessions_) out.push_back(s.get());
        return out;
      };
      actx.volumes = [this] { return volume_views(); };
      actx.extra_metrics = [this] { return nbd_metrics(); };
      actx.create_volume = [this](std::string body) { return create_volume(std::move(body)); };
      actx.delete_volume = [this](std::string id) { return delete_volume(std::move(id)); };
      actx.imports = [this] {
        std::vector<importer::ImportStatus> out;
        for (const importer::Import* im : imports_->all()) out.push_back(im->status());
        return out;
      };
      actx.create_import = [this](std::string body) { return create_import(std::move(body)); };
      actx.import_action = [this](std::string id, importer::ImportAction a) { return import_action(std::move(id), a); };
      router_ = std::make_unique<api::Router>(std::move(actx));
      auto st = ensure_dir(fs::path(cfg_.node.api_socket).parent_path().string(),
                           fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec);
      api::ApiServerOptions ao;
      ao.socket_path = cfg_.node.api_socket;
      ao.socket_group = cfg_.node.api_socket_group;
      if (!cfg_.node.api_listen.empty()) {
        auto tls = transport::make_tls_context(transport::TlsFiles{cfg_.tls->ca, cfg_.tls->cert, cfg_.tls->key});
        if (!tls) {
          spdlog::error("api: {}", tls.error().message());
          exit_code_ = 1;
          co_await shutdown();
          co_return;
        }
        // Clients prove themselves with the bearer token, not a certificate.
        boost::system::error_code vec;
        (*tls)->set_verify_mode(asio::ssl::verify_none, vec);
        ao.tcp_listen = cfg_.node.api_listen;
        ao.tls = *tls;
        ao.token = cfg_.node.api_token;
      }
      auto srv = st ? api::ApiServer::listen(ctx_.get_executor(), std::move(ao), *router_)
                    : Result<std::unique_ptr<api::ApiServer>>(st.error());
      if (!srv) {
        spdlog::error("api: cannot listen on {}: {}", cfg_.node.api_socket, srv.error().message());
        exit_code_ = 1;
        co_await shutdown();
        co_return;
      }
      api_ = std::move(srv).value();
    }
    imports_->start();
    spdlog::info("tandemd {} ready: {} volume(s), {} session(s), {} import(s)", cfg_.node.name, volumes_.size(),
                 sessions_.size(), imports_->all().size());
    asio::co_spawn(ctx_, wait_signals(), abort_on_exception);
    // READY only now: every volume is exported and every session loaded, so a unit ordered
    // after tandemd.service (a mount over nbd-client, say) finds them there.
    status_line_ = status_text();
    ready_ = true;
    start_tick_.cancel();
    notify("READY=1\nSTATUS=" + status_line_);
    for (auto& sp : sessions_) sp->note_state();  // the state at start (not logged: the start-up lines say it)
    asio::co_spawn(ctx_, run_ticker(), abort_on_exception);
  }

  // The event loop's heartbeat: pings systemd's watchdog (a loop stuck for WatchdogSec gets the
  // daemon restarted), keeps STATUS= current, and logs each session's state changes once.
  asio::awaitable<void> run_ticker() {
    std::uint64_t watchdog_usec = 0;
    const bool watchdog = sd_watchdog_enabled(0, &watchdog_usec) > 0 && watchdog_usec > 0;
    // Ping at a quarter of the watchdog's period; look at the sessions at least twice a second.
    auto period = std::chrono::milliseconds(500);
    if (watchdog)
      period = std::min(period, std::chrono::milliseconds(std::max<std::uint64_t>(watchdog_usec / 4000, 10)));
    // It goes on pinging during a shutdown (flushing big volumes takes a while), until the
    // shutdown is over.
    while (!stopped_) {
      if (watchdog) notify("WATCHDOG=1");
      if (!shutting_down_) {
        for (auto& sp : sessions_) sp->note_state();  // a backstop: sessions log their own changes
        const std::string line = status_text();
        if (line != status_line_) {
          status_line_ = line;
          notify("STATUS=" + line);
        }
      }
      tick_.expires_after(period);
      auto [ec] = co_await tick_.async_wait(asio::as_tuple(asio::use_awaitable));
      (void)ec;
    }
  }

  // "site-a: s-vol0 OK (source, lag 0 B); s-db Paused (destination)"
  std::string status_text() const {
    std::string out = cfg_.node.name + ":";
    if (sessions_.empty()) return out + " " + std::to_string(volumes_.size()) + " volume(s) exported, no replication";
    bool first = true;
    for (const auto& s : sessions_) {
      const auto st = s->status();
      out += first ? " " : "; ";
      first = false;
      out += fmt::format("{} {} ({}{}{})", s->id(), replication::state_name(st.state),
                         st.role == replication::Role::source ? "source" : "destination",
                         st.connected ? "" : ", peer not connected",
                         st.role == replication::Role::source ? ", lag " + format_bytes(st.lag_bytes) : std::string());
    }
    return out;
  }

  replication::SessionOptions session_options(const SessionConfig& sc) {
    replication::SessionOptions so;
    so.id = sc.id;
    so.role = sc.role == "source" ? replication::Role::source : replication::Role::destination;
    so.remote_volumes = sc.remote_volumes;
    so.peer_name = cfg_.peer->name;
    so.rpo_seconds = sc.rpo_seconds;
    so.window_bytes = sc.window_bytes;
    so.rate_limit_bytes_per_s = sc.rate_limit_bytes_per_s;
    so.corrupt_extent_every = probe::value("corrupt_extent_every");  // TANDEM_PROBES, tests only
    so.export_test = [this, sid = sc.id](std::vector<replication::TestImageExport> images) -> asio::awaitable<Status> {
      co_return export_test_images(sid, std::move(images));
    };
    so.unexport_test = [this, sid = sc.id]() -> asio::awaitable<void> { co_await unexport_test_images(sid); };
    for (const auto& vid : sc.volumes) {
      for (auto& v : volumes_) {
        if (v.cfg->id == vid) so.members.push_back({v.volume.get(), v.env.get(), cfg_.node.state_dir});
      }
    }
    return so;
  }

  // SIGHUP's sessions removed from the file: each leaves the link (no frame is being handed to
  // it any more) and stops as at shutdown, its restart address kept in its volumes' metadata.
  // Its volumes stay open and exported, writable as after a restart without the session.
  asio::awaitable<void> reload_sessions_removed(const ReloadPlan& plan) {
    for (const auto& id : plan.sessions_removed) {
      auto it = std::find_if(sessions_.begin(), sessions_.end(), [&id](const auto& s) { return s->id() == id; });
      if (it == sessions_.end()) continue;
      std::unique_ptr<replication::Session> s = std::move(*it);
      sessions_.erase(it);
      if (replicator_) co_await replicator_->remove_session(s.get());
      // Host writes inside the session's copy-on-write hook finish first, and new ones wait,
      // until the session is stopped and gone (its hook with it).
      const auto members = s->options().members;
      for (const auto& m : members) co_await m.volume->hold_writes();
      co_await s->stop();
      s.reset();
      for (const auto& m : members) {
        m.volume->set_access(engine::Access::read_write);
        m.volume->release_writes();
      }
      std::erase_if(cfg_.sessions, [&id](const SessionConfig& c) { return c.id == id; });
      spdlog::info("SIGHUP: applied session {} (removed): it no longer replicates; its volumes stay exported", id);
    }
  }

  // SIGHUP's sessions added to the file: opened over their volumes (open by now) and joined to
  // the link to the peer, which must already run with the same [peer] and [tls].
  asio::awaitable<void> reload_sessions_added(const Config& next, const ReloadPlan& plan) {
    for (const auto& id : plan.sessions_added) {
      const auto sc = std::find_if(next.sessions.begin(), next.sessions.end(),
                                   [&id](const SessionConfig& c) { return c.id == id; });
      std::string why;
      if (!replicator_ || !cfg_.peer || !cfg_.tls) {
        why = "no link to a peer runs yet ([peer] and [tls] take a restart)";
      } else if (next.peer != cfg_.peer || next.tls != cfg_.tls) {
        why = "[peer] or [tls] changed as well, which takes a restart";
      }
      for (const auto& vid : sc->volumes) {
        if (!why.empty()) break;
        const auto v =
            std::find_if(volumes_.begin(), volumes_.end(), [&vid](const VolumeRuntime& x) { return x.cfg->id == vid; });
        if (v == volumes_.end()) {
          why = "its volume " + vid + " is not open";
        } else if (const importer::Import* im = imports_ ? imports_->filling(vid) : nullptr) {
          why = "its volume " + vid + " is still being imported (import " + im->record().id + ", " +
                std::string(importer::to_string(im->record().state)) + "); cut the import over first";
        } else if (sc->role == "destination" && v->nbd && v->nbd->counters().connections_open > 0) {
          why = "its volume " + vid + " has NBD clients connected and a destination's volume turns read-only; " +
                "disconnect them first";
        }
        for (const auto& other : cfg_.sessions) {
          if (why.empty() && std::find(other.volumes.begin(), other.volumes.end(), vid) != other.volumes.end())
            why = "its volume " + vid + " is in session " + other.id;
        }
      }
      if (!why.empty()) {
        spdlog::warn("SIGHUP: session {} (added) not started: {}", id, why);
        continue;
      }
      asio::any_io_executor ex = ctx_.get_executor();
      // Hosts may be writing to a source's volumes: no write is in flight while the session
      // installs itself (every later one is tracked for it).
      std::vector<engine::Volume*> held;
      for (const auto& vid : sc->volumes) {
        auto v = find_volume(vid);
        co_await v->volume->hold_writes();
        held.push_back(v->volume.get());
      }
      auto s = co_await replication::Session::open(std::move(ex), session_options(*sc));
      for (engine::Volume* v : held) v->release_writes();
      if (!s) {
        spdlog::error("SIGHUP: session {} (added) not started: {}", id, s.error().message());
        continue;
      }
      sessions_.push_back(std::move(s).value());
      cfg_.sessions.push_back(*sc);
      replicator_->add_session(sessions_.back().get());
      sessions_.back()->note_state();
      spdlog::info("SIGHUP: applied session {} (added)", id);
    }
  }

  // The volume's NBD export on its socket and/or TCP listener.
  Status export_volume(VolumeRuntime& v) {
    const auto& vc = *v.cfg;
    v.nbd = std::make_unique<frontend::NbdServer>(ctx_.get_executor());
    v.nbd->add_export(vc.id, *v.volume);
    if (!vc.nbd_socket.empty()) {
      auto st = ensure_dir(fs::path(vc.nbd_socket).parent_path().string(),
                           fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec);
      if (st) st = v.nbd->listen_unix(vc.nbd_socket);
      if (!st)
        return Error(st.error().code,
                     "volume " + vc.id + ": cannot export on " + vc.nbd_socket + ": " + st.error().message());
      spdlog::info("volume {}: NBD export on unix socket {}", vc.id, vc.nbd_socket);
    }
    if (!vc.nbd_listen.empty()) {
      auto st = v.nbd->listen_tcp(vc.nbd_listen);
      if (!st)
        return Error(st.error().code,
                     "volume " + vc.id + ": cannot export on " + vc.nbd_listen + ": " + st.error().message());
      spdlog::info("volume {}: NBD export on tcp {} (port {})", vc.id, vc.nbd_listen, v.nbd->tcp_port());
    }
    return {};
  }

  // <state_dir>/volumes.toml, replaced whole: written beside, synced, renamed over, and the
  // directory synced, so a crash leaves the old list or the new one.
  Status persist_runtime_volumes() {
    const std::vector<VolumeConfig> list(runtime_cfgs_.begin(), runtime_cfgs_.end());
    const std::string path = runtime_volumes_path(cfg_);
    TANDEM_TRY(ensure_dir(cfg_.node.state_dir, fs::perms::owner_all));
    return write_file_durably(path, render_runtime_volumes(list));
  }

  std::vector<VolumeConfig> all_volume_configs() const {
    std::vector<VolumeConfig> out = cfg_.volumes;
    out.insert(out.end(), runtime_cfgs_.begin(), runtime_cfgs_.end());
    return out;
  }

  std::optional<api::VolumeView> view_of(const std::string& id) const {
    for (auto& w : volume_views()) {
      if (w.id == id) return w;
    }
    return std::nullopt;
  }

  // Opens a volume and exports it; one created at run time joins the list kept on disk, which
  // is written before this returns. Nothing is left behind when it fails: a file or metadata
  // this call created is removed again. The caller holds volume_change_.
  asio::awaitable<Status> add_volume(const VolumeConfig& vc, bool runtime) {
    // What is there before: only what this call creates is removed when it fails.
    std::error_code ec;
    const bool had_data = fs::exists(vc.path, ec);
    const bool had_meta = fs::exists(vc.meta_path, ec);
    auto remove_made = [&] {
      std::error_code rec;
      if (!had_data && fs::is_regular_file(vc.path, rec)) fs::remove(vc.path, rec);
      if (!had_meta && fs::is_regular_file(vc.meta_path, rec)) fs::remove(vc.meta_path, rec);
    };
    auto rt = co_await open_volume(ctx_, vc);
    if (!rt) {
      remove_made();
      co_return rt.error();
    }
    rt->runtime = runtime;
    Status st = export_volume(*rt);
    if (st && runtime) {
      runtime_cfgs_.push_back(vc);
      st = persist_runtime_volumes();
      if (!st) runtime_cfgs_.pop_back();
    }
    if (!st) {
      if (rt->nbd) co_await rt->nbd->stop();  // removes the sockets it made, and only those
      (void)co_await rt->volume->close();
      rt->nbd.reset();
      rt->volume.reset();
      rt->env->stop();
      remove_made();
      co_return st;
    }
    volumes_.push_back(std::move(rt).value());
    spdlog::info("volume {}: {} ({}){}, exported", vc.id, vc.path, format_bytes(volumes_.back().volume->size_bytes()),
                 volumes_.back().volume->data_created() ? ", new file" : "");
    co_return Status{};
  }

  // The file's [[volume]] describes this run-time volume: the same backing, metadata and exports
  // (a size left out of the file matches any).
  static bool same_volume(const VolumeConfig& running, const VolumeConfig& file) {
    return running.path == file.path && running.meta_path == file.meta_path && running.nbd_socket == file.nbd_socket &&
           running.nbd_listen == file.nbd_listen && (!file.size_bytes || file.size_bytes == running.size_bytes);
  }

  // Why a volume cannot be withdrawn now (a session or an NBD client uses it), or empty.
  std::string in_use(const VolumeRuntime& v) const {
    for (const auto& sc : cfg_.sessions) {
      if (std::find(sc.volumes.begin(), sc.volumes.end(), v.cfg->id) != sc.volumes.end()) {
        return "replication session " + sc.id + " uses it";
      }
    }
    if (imports_) {
      if (const importer::Import* im = imports_->filling(v.cfg->id)) {
        return "import " + im->record().id + " is filling it (cancel or cut it over first)";
      }
    }
    if (v.nbd && v.nbd->counters().connections_open > 0) {
      return std::to_string(v.nbd->counters().connections_open) + " NBD client(s) are connected; disconnect them first";
    }
    return {};
  }

  // Withdraws the export and closes the volume; its data and metadata stay. A run-time volume
  // leaves the list on disk. The caller holds volume_change_ and checked in_use().
  asio::awaitable<Status> withdraw_volume(std::vector<VolumeRuntime>::iterator it) {
    VolumeRuntime v = std::move(*it);
    volumes_.erase(it);
    if (v.nbd) co_await v.nbd->stop();
    Status closed = co_await v.volume->close();
    v.nbd.reset();
    v.volume.reset();
    v.env->stop();
    const std::string& id = v.cfg->id;
    if (!closed) spdlog::error("volume {}: close: {}", id, closed.error().message());
    if (v.runtime) {
      runtime_cfgs_.remove_if([&id](const VolumeConfig& c) { return c.id == id; });
      if (Status st = persist_runtime_volumes(); !st) {
        co_return Error(st.error().code, "the list of run-time volumes could not be written (" + st.error().message() +
                                             "); it comes back at the next start");
      }
    }
    spdlog::info("volume {}: withdrawn (its data stays in {})", id, v.cfg->path);
    co_return Status{};
  }

  // POST /api/rest/volume.
  asio::awaitable<std::variant<api::VolumeView, api::HttpResponse>> create_volume(std::string body) {
    auto held = co_await volume_change_.scoped();
    if (shutting_down_) co_return api::error_response(api::ErrorKind::not_allowed, "tandemd is shutting down.");
    auto parsed = parse_volume_request(body, cfg_, all_volume_configs());
    if (!parsed) co_return api::error_response(api::ErrorKind::bad_request, parsed.error().message() + ".");
    if (Status st = co_await add_volume(*parsed, true); !st) {
      spdlog::error("volume {}: not created: {}", parsed->id, st.error().message());
      co_return api::error_response(api::ErrorKind::failed, "Volume not created: " + st.error().message() + ".");
    }
    co_return *view_of(parsed->id);
  }

  // DELETE /api/rest/volume/{id}: only a volume created at run time, and only while nothing
  // uses it.
  asio::awaitable<std::optional<api::HttpResponse>> delete_volume(std::string id) {
    auto held = co_await volume_change_.scoped();
    auto it = std::find_if(volumes_.begin(), volumes_.end(), [&id](const VolumeRuntime& v) { return v.cfg->id == id; });
    if (it == volumes_.end()) {
      co_return api::error_response(api::ErrorKind::unknown_volume, "Volume " + id + " does not exist.", {id});
    }
    auto refuse = [&id](const std::string& why) {
      return api::error_response(api::ErrorKind::not_allowed, "Volume " + id + " cannot be removed: " + why + ".",
                                 {id});
    };
    if (shutting_down_) co_return refuse("tandemd is shutting down");
    if (!it->runtime) {
      co_return refuse("it is defined in the configuration file " + config_path_ + "; remove it there and reload");
    }
    if (std::string why = in_use(*it); !why.empty()) co_return refuse(why);
    if (Status st = co_await withdraw_volume(it); !st) {
      co_return api::error_response(api::ErrorKind::failed,
                                    "Volume " + id + " was removed but " + st.error().message() + ".", {id});
    }
    co_return std::nullopt;
  }

  // SIGHUP's volumes: those removed from the file are withdrawn (unless in use: named and
  // kept), those added are opened and exported.
  asio::awaitable<void> reload_volumes(const Config& next, const ReloadPlan& plan) {
    auto held = co_await volume_change_.scoped();
    if (shutting_down_) co_return;
    for (const auto& id : plan.volumes_removed) {
      auto it = std::find_if(volumes_.begin(), volumes_.end(),
                             [&id](const VolumeRuntime& v) { return !v.runtime && v.cfg->id == id; });
      if (it == volumes_.end()) continue;
      if (std::string why = in_use(*it); !why.empty()) {
        spdlog::warn("SIGHUP: volume {} was removed from the file but {}; still running", id, why);
        continue;
      }
      if (Status st = co_await withdraw_volume(it); !st)
        spdlog::error("SIGHUP: volume {}: {}", id, st.error().message());
      std::erase_if(cfg_.volumes, [&id](const VolumeConfig& c) { return c.id == id; });
      spdlog::info("SIGHUP: applied volume {} (removed): its export is withdrawn", id);
    }
    for (const auto& id : plan.volumes_added) {
      const auto nv =
          std::find_if(next.volumes.begin(), next.volumes.end(), [&id](const VolumeConfig& c) { return c.id == id; });
      // A run-time volume (an imported one, say) the file now describes the same way moves into
      // the file as it runs: nothing is reopened, and a session may name it in the same reload.
      if (auto rt = find_volume(id); rt != volumes_.end() && rt->runtime && same_volume(*rt->cfg, *nv)) {
        if (imports_ && imports_->filling(id) != nullptr) {
          spdlog::error("SIGHUP: volume {} (added) is still being imported; cut the import over first", id);
          continue;
        }
        rt->runtime = false;
        rt->cfg = std::make_shared<const VolumeConfig>(*nv);
        runtime_cfgs_.remove_if([&id](const VolumeConfig& c) { return c.id == id; });
        if (Status pst = persist_runtime_volumes(); !pst) {
          spdlog::error("SIGHUP: volume {}: the run-time list could not be written: {}", id, pst.error().message());
        }
        cfg_.volumes.push_back(*nv);
        spdlog::info("SIGHUP: applied volume {} (added): the run-time volume of that id is the file's now", id);
        continue;
      }
      Status st = check_volume_unique(*nv, all_volume_configs());
      if (st) st = co_await add_volume(*nv, false);
      if (!st) {
        spdlog::error("SIGHUP: volume {} (added) not opened: {}; fix the file and reload again", id,
                      st.error().message());
        continue;
      }
      cfg_.volumes.push_back(*nv);
      spdlog::info("SIGHUP: applied volume {} (added)", id);
    }
  }

  // SIGHUP: re-read the configuration file and apply what can change at run time.
  asio::awaitable<void> reload() {
    notify("RELOADING=1");
    auto next = load_config(config_path_);
    if (!next) {
      spdlog::error("SIGHUP: {}; keeping the running configuration", next.error().message());
      notify("READY=1");
      co_return;
    }
    const ReloadPlan plan = plan_reload(cfg_, *next);
    if (plan.applied.empty() && plan.needs_restart.empty() && plan.volumes_added.empty() &&
        plan.volumes_removed.empty() && plan.sessions_added.empty() && plan.sessions_removed.empty()) {
      spdlog::info("SIGHUP: {} unchanged", config_path_);
    }
    if (cfg_.node.log_level != next->node.log_level) {
      cfg_.node.log_level = next->node.log_level;
      spdlog::set_level(spdlog::level::from_str(cfg_.node.log_level));
    }
    if (cfg_.peer && next->peer && cfg_.peer->rate_limit_bytes_per_s != next->peer->rate_limit_bytes_per_s) {
      cfg_.peer->rate_limit_bytes_per_s = next->peer->rate_limit_bytes_per_s;
      if (replicator_) replicator_->set_rate_limit(cfg_.peer->rate_limit_bytes_per_s);
    }
    for (auto& sc : cfg_.sessions) {
      for (const auto& nc : next->sessions) {
        if (nc.id != sc.id) continue;
        sc.rpo_seconds = nc.rpo_seconds;
        sc.rate_limit_bytes_per_s = nc.rate_limit_bytes_per_s;
        for (auto& s : sessions_) {
          if (s->id() != sc.id) continue;
          s->set_rpo_seconds(sc.rpo_seconds);
          s->set_rate_limit(sc.rate_limit_bytes_per_s);
        }
      }
    }
    for (const auto& a : plan.applied) spdlog::info("SIGHUP: applied {}", a);
    for (const auto& r : plan.needs_restart) {
      spdlog::warn("SIGHUP: {} changed: this needs a restart; still running with the old value", r);
    }
    co_await reload_sessions_removed(plan);
    co_await reload_volumes(*next, plan);
    co_await reload_sessions_added(*next, plan);
    notify("READY=1");
  }

  asio::awaitable<void> wait_signals() {
    for (;;) {
      auto [ec, sig] = co_await signals_.async_wait(asio::as_tuple(asio::use_awaitable));
      if (ec) co_return;
      if (sig == SIGHUP) {
        if (!shutting_down_) co_await reload();
        continue;
      }
      spdlog::info("signal {}: shutting down", sig == SIGTERM ? "SIGTERM" : "SIGINT");
      co_await shutdown();
      co_return;
    }
  }

  // SIGTERM, or a start that failed half way. In order: refuse new work (API, NBD: requests
  // in flight finish and are answered), tell the peer this is maintenance (it pauses for the
  // NDU and goes on by itself when this side is back), stop replication at an extent boundary
  // with the restart address persisted, then flush each volume and write its dirty map.
  asio::awaitable<void> shutdown() {
    if (shutting_down_) co_return;
    shutting_down_ = true;
    notify("STOPPING=1\nSTATUS=" + cfg_.node.name + ": shutting down");
    if (api_) co_await api_->stop();
    // An import that just ended removes its volume first (it takes volume_change_).
    if (imports_) co_await imports_->settle();
    // A volume being created, removed or reloaded finishes first (later ones see shutting_down_).
    auto held = co_await volume_change_.scoped();
    for (auto& v : volumes_) {
      if (v.nbd) co_await v.nbd->stop();
    }
    // No host I/O from here: the imports stop (their records say where each goes on).
    if (imports_) co_await imports_->stop();
    for (auto& s : sessions_) co_await s->announce_shutdown();
    if (replicator_) co_await replicator_->stop();
    for (auto& s : sessions_) co_await s->stop();
    sessions_.clear();
    for (auto& v : volumes_) {
      auto st = co_await v.volume->close();
      if (!st) {
        spdlog::error("volume {}: close: {}", v.cfg->id, st.error().message());
        exit_code_ = 1;
      } else {
        spdlog::info("volume {}: closed cleanly, {} dirty blocks persisted", v.cfg->id,
                     v.volume->dirty().dirty_blocks());
      }
    }
    for (auto& v : volumes_) {
      v.nbd.reset();
      v.volume.reset();
      v.env->stop();
    }
    boost::system::error_code ec;
    signals_.cancel(ec);
    stopped_ = true;
    tick_.cancel();
    start_tick_.cancel();
  }

  // Run-time volumes' configurations (a list: each volume keeps a pointer to its own), and one
  // create or delete at a time.
  std::list<VolumeConfig> runtime_cfgs_;
  AsyncMutex volume_change_;

  struct TestExport {
    std::string volume_id;  // the destination volume it is an image of
    std::string socket;
    engine::Volume* volume = nullptr;
    std::unique_ptr<frontend::NbdServer> nbd;
  };

  // A failover test's images, each on its own Unix socket beside the volume's
  // (<dir>/<volume>-test.nbd), export name = the volume id.
  Status export_test_images(const std::string& sid, std::vector<replication::TestImageExport> images) {
    auto& list = tests_[sid];
    for (const auto& image : images) {
      const std::string& vid = image.volume_id;
      engine::Volume* tv = image.image;
      const VolumeConfig* vc = nullptr;
      for (const auto& v : cfg_.volumes) {
        if (v.id == vid) vc = &v;
      }
      const std::string dir =
          vc && !vc->nbd_socket.empty() ? fs::path(vc->nbd_socket).parent_path().string() : cfg_.node.state_dir;
      TestExport te;
      te.volume_id = vid;
      te.socket = dir + "/" + vid + "-test.nbd";
      te.volume = tv;
      te.nbd = std::make_unique<frontend::NbdServer>(ctx_.get_executor());
      te.nbd->add_export(vid, *tv);
      auto st = te.nbd->listen_unix(te.socket);
      if (!st) return st;
      spdlog::info("volume {}: failover test image exported on unix socket {}", vid, te.socket);
      list.push_back(std::move(te));
    }
    return {};
  }

  asio::awaitable<void> unexport_test_images(const std::string& sid) {
    auto it = tests_.find(sid);
    if (it == tests_.end()) co_return;
    for (auto& te : it->second) {
      if (te.nbd) co_await te.nbd->stop();
      std::error_code ec;
      fs::remove(te.socket, ec);
    }
    tests_.erase(it);
  }

  std::vector<api::VolumeView> volume_views() const {
    std::vector<api::VolumeView> out;
    for (const auto& v : volumes_) {
      api::VolumeView w;
      w.id = v.cfg->id;
      w.size_bytes = v.volume->size_bytes();
      w.access = v.volume->access() == engine::Access::read_write ? "read-write" : "read-only";
      if (!v.cfg->nbd_socket.empty()) w.exports.push_back("nbd+unix:///" + v.cfg->id + "?socket=" + v.cfg->nbd_socket);
      if (!v.cfg->nbd_listen.empty() && v.nbd) {
        // The configured host with the port actually bound (nbd_listen may ask for port 0).
        if (auto ep = parse_endpoint(v.cfg->nbd_listen, EndpointUse::listen)) {
          ep->port = v.nbd->tcp_port();
          w.exports.push_back("nbd://" + ep->to_string() + "/" + v.cfg->id);
        }
      }
      w.backing = v.cfg->path;
      for (const auto& sc : cfg_.sessions) {
        for (const auto& vid : sc.volumes) {
          if (vid == v.cfg->id) w.session_id = sc.id;
        }
      }
      out.push_back(std::move(w));
    }
    for (const auto& [sid, list] : tests_) {
      for (const auto& te : list) {
        api::VolumeView w;
        w.id = te.volume_id + "-test";
        w.size_bytes = te.volume->size_bytes();
        w.access = "read-write";
        w.exports.push_back("nbd+unix:///" + te.volume_id + "?socket=" + te.socket);
        w.backing = "failover test image of " + te.volume_id;
        w.session_id = sid;
        out.push_back(std::move(w));
      }
    }
    return out;
  }

  // ---- imports ------------------------------------------------------------------------------

  std::vector<VolumeRuntime>::iterator find_volume(const std::string& id) {
    return std::find_if(volumes_.begin(), volumes_.end(), [&id](const VolumeRuntime& v) { return v.cfg->id == id; });
  }

  // At start: every import record; those still running get their volume's filter back, with
  // the regions a crash left hot made equal on both copies. A cancelled import whose volume
  // was not removed yet (a crash in between) has it removed now.
  asio::awaitable<Status> recover_imports() {
    auto records = imports_->load_records();
    if (!records) co_return records.error();
    for (auto& rec : *records) {
      const std::string id = rec.id;
      if (importer::is_final(rec.state)) {
        if (rec.state == importer::ImportState::cancelled && find_volume(rec.volume_id) != volumes_.end()) {
          auto it = find_volume(rec.volume_id);
          if (it->runtime) TANDEM_CO_TRY(co_await remove_cancelled_volume(it, rec));
        }
        imports_->adopt(importer::Import::record_only(ctx_.get_executor(), std::move(rec), imports_->options().import));
        continue;
      }
      auto it = find_volume(rec.volume_id);
      if (it == volumes_.end()) {
        co_return Error(std::make_error_code(std::errc::no_such_device),
                        "import " + id + ": its volume " + rec.volume_id +
                            " is not open; the host's writes since the import began may be on it alone. Restore "
                            "the volume (or remove " +
                            imports_->options().dir + "/" + id + ".json to give it up)");
      }
      starting("recovering import " + id + " of volume " + rec.volume_id);
      auto im = co_await importer::Import::recover(ctx_.get_executor(), *it->env, *it->volume, std::move(rec),
                                                   imports_->options().import);
      if (!im) co_return Error(im.error().code, "import " + id + ": " + im.error().message());
      spdlog::info("import {}: {} of volume {} from {}, restart address {}", id,
                   importer::to_string((*im)->record().state), (*im)->record().volume_id,
                   importer::redact_uri((*im)->record().source_uri), (*im)->record().restart_address);
      imports_->adopt(std::move(im).value());
    }
    co_return Status{};
  }

  // A cancelled import's volume: withdrawn, closed, and removed (its files too when the import
  // created them). The caller holds volume_change_.
  asio::awaitable<Status> remove_cancelled_volume(std::vector<VolumeRuntime>::iterator it,
                                                  const importer::ImportRecord& rec) {
    const VolumeConfig vc = *it->cfg;
    const bool runtime = it->runtime;
    TANDEM_CO_TRY(co_await withdraw_volume(it));
    if (runtime && rec.volume_created) {
      std::error_code ec;
      fs::remove(vc.path, ec);
      fs::remove(vc.meta_path, ec);
      spdlog::info("import {}: the partial copy {} is removed", rec.id, vc.path);
    }
    co_return Status{};
  }

  // Manager's on_final: Import_Completed leaves an ordinary volume; Cancelled removes it.
  asio::awaitable<void> import_ended(importer::Import& im) {
    const importer::ImportRecord rec = im.record();
    if (rec.state == importer::ImportState::import_completed) {
      spdlog::info("import {}: complete; volume {} is an ordinary tandem volume now (a session may protect it)", rec.id,
                   rec.volume_id);
      co_return;
    }
    auto held = co_await volume_change_.scoped();
    auto it = find_volume(rec.volume_id);
    if (it == volumes_.end() || shutting_down_) co_return;
    // The export goes first (the import refuses host I/O meanwhile), then the import lets go.
    if (it->nbd) co_await it->nbd->stop();
    co_await im.stop();
    if (!it->runtime) {
      spdlog::warn(
          "import {}: cancelled; volume {} is defined in the configuration file: its export is withdrawn "
          "until a restart (remove it from the file)",
          rec.id, rec.volume_id);
      co_return;
    }
    if (Status st = co_await remove_cancelled_volume(it, rec); !st) {
      spdlog::error("import {}: removing volume {}: {}", rec.id, rec.volume_id, st.error().message());
    }
  }

  // POST /api/rest/import_session.
  asio::awaitable<std::variant<importer::ImportStatus, api::HttpResponse>> create_import(std::string body) {
    auto held_imports = co_await import_change_.scoped();
    auto held = co_await volume_change_.scoped();
    using api::ErrorKind;
    if (shutting_down_) co_return api::error_response(ErrorKind::not_allowed, "tandemd is shutting down.");
    auto req = parse_import_request(body, cfg_, all_volume_configs());
    if (!req) co_return api::error_response(ErrorKind::bad_request, req.error().message() + ".");
    auto refuse = [](const std::string& why) {
      return api::error_response(ErrorKind::import_failed, "Import not created: " + why + ".");
    };
    // The source first: its size is the volume's.
    std::unique_ptr<engine::DeviceEnv> env;
    engine::DeviceEnv* envp = nullptr;
    auto existing = find_volume(req->volume_id);
    if (existing != volumes_.end()) {
      if (std::string why = in_use(*existing); !why.empty()) co_return refuse("volume " + req->volume_id + ": " + why);
      for (const auto& sc : cfg_.sessions) {
        if (std::find(sc.volumes.begin(), sc.volumes.end(), req->volume_id) != sc.volumes.end())
          co_return refuse("volume " + req->volume_id + " is in replication session " + sc.id);
      }
      envp = existing->env.get();
    } else {
      auto e = engine::make_uring_env(ctx_);
      if (!e) co_return refuse(e.error().message());
      env = std::move(e).value();
      envp = env.get();
    }
    importer::SourceOptions so;
    auto src = co_await importer::open_source(ctx_.get_executor(), *envp, req->source_uri, so);
    if (!src) {
      if (env) env->stop();
      co_return refuse("the source " + src.error().message());
    }
    const std::uint64_t size = (*src)->size();
    auto give_up = [&](const std::string& why) -> asio::awaitable<api::HttpResponse> {
      co_await (*src)->close();
      if (env) env->stop();
      co_return refuse(why);
    };
    importer::ImportRecord rec;
    rec.id = "imp-" + random_hex(8);
    while (imports_->find(rec.id) != nullptr) rec.id = "imp-" + random_hex(8);
    rec.name = req->name;
    rec.source_uri = req->source_uri;
    rec.source_size = size;
    rec.volume_id = req->volume_id;
    rec.automatic_cutover = req->automatic_cutover;
    rec.scheduled_ms = req->scheduled_ms;
    rec.rate_limit = req->rate_limit;
    rec.created_ms = importer::unix_now_ms();
    rec.state = rec.scheduled_ms && *rec.scheduled_ms > rec.created_ms ? importer::ImportState::scheduled
                                                                       : importer::ImportState::queued;
    if (Status st = ensure_dir(imports_->options().dir, fs::perms::owner_all); !st) {
      co_return co_await give_up(st.error().message());
    }
    if (existing != volumes_.end()) {
      if (existing->volume->size_bytes() != size) {
        co_return co_await give_up("the source is " + std::to_string(size) + " bytes, volume " + req->volume_id +
                                   " is " + std::to_string(existing->volume->size_bytes()) +
                                   "; an import fills a volume of the source's size");
      }
      auto im = co_await importer::Import::create(ctx_.get_executor(), *envp, *existing->volume, rec,
                                                  std::move(src).value(), imports_->options().import, false);
      if (!im) co_return refuse(im.error().message());
      importer::Import* p = im->get();
      imports_->adopt(std::move(im).value());
      spdlog::info("import {} ({}): {} into volume {} ({}), {}", rec.id, rec.name, importer::redact_uri(rec.source_uri),
                   rec.volume_id, format_bytes(size), importer::to_string(p->record().state));
      co_return p->status();
    }
    // A new volume of the source's size, filtered before it is exported.
    VolumeConfig vc = *req->new_volume;
    vc.size_bytes = size;
    std::error_code ec;
    const bool had_data = fs::exists(vc.path, ec);
    const bool had_meta = fs::exists(vc.meta_path, ec);
    auto remove_made = [&] {
      std::error_code rec_ec;
      if (!had_data && fs::is_regular_file(vc.path, rec_ec)) fs::remove(vc.path, rec_ec);
      if (!had_meta && fs::is_regular_file(vc.meta_path, rec_ec)) fs::remove(vc.meta_path, rec_ec);
    };
    auto rt = co_await open_volume(ctx_, vc, std::move(env));
    if (!rt) {
      co_await (*src)->close();
      remove_made();
      co_return refuse(rt.error().message());
    }
    rt->runtime = true;
    rec.volume_created = rt->volume->data_created();
    auto im = co_await importer::Import::create(ctx_.get_executor(), *rt->env, *rt->volume, rec, std::move(src).value(),
                                                imports_->options().import, rt->volume->data_created());
    Status st = im ? Status{} : Status(im.error());
    if (st) st = export_volume(*rt);
    if (st) {
      runtime_cfgs_.push_back(vc);
      st = persist_runtime_volumes();
      if (!st) runtime_cfgs_.pop_back();
    }
    if (!st) {
      if (rt->nbd) co_await rt->nbd->stop();
      if (im) {
        co_await (*im)->stop();
        (void)(*im)->remove_files();
      }
      (void)co_await rt->volume->close();
      rt->nbd.reset();
      rt->volume.reset();
      rt->env->stop();
      remove_made();
      co_return refuse(st.error().message());
    }
    volumes_.push_back(std::move(rt).value());
    importer::Import* p = im->get();
    imports_->adopt(std::move(im).value());
    spdlog::info("import {} ({}): {} into new volume {} ({}, {}), {}", rec.id, rec.name,
                 importer::redact_uri(rec.source_uri), vc.id, vc.path, format_bytes(size),
                 importer::to_string(p->record().state));
    co_return p->status();
  }

  // An import action (the router checked the import exists and the state allows it; checked
  // again here, one action at a time).
  asio::awaitable<std::optional<api::HttpResponse>> import_action(std::string id, importer::ImportAction a) {
    auto held = co_await import_change_.scoped();
    using api::ErrorKind;
    importer::Import* im = imports_->find(id);
    if (im == nullptr) {
      co_return api::error_response(ErrorKind::unknown_import, "Import session " + id + " does not exist.", {id});
    }
    const std::string verb(importer::to_string(a));
    const std::string state(importer::to_string(im->record().state));
    if (shutting_down_) co_return api::error_response(ErrorKind::import_not_allowed, "tandemd is shutting down.");
    if (!importer::import_action_allowed(im->record().state, a)) {
      co_return api::error_response(
          ErrorKind::import_not_allowed,
          "Import session " + id + " is " + state + ": " + verb + " is not allowed in that state.", {verb, state});
    }
    Status st = co_await imports_->act(*im, a);
    if (!st) {
      co_return api::error_response(ErrorKind::import_failed,
                                    "Import session " + id + ": " + verb + " failed: " + st.error().message() + ".",
                                    {verb, state});
    }
    spdlog::info("import {}: {} done", id, verb);
    co_return std::nullopt;
  }

  std::string import_metrics() const {
    std::string out;
    if (!imports_) return out;
    const auto all = imports_->all();
    auto metric = [&](const char* name, const char* type, const char* help, auto value) {
      out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n";
      for (const importer::Import* im : all) {
        const importer::ImportStatus st = im->status();
        out += std::string(name) + "{import=\"" + st.record.id + "\",volume=\"" + st.record.volume_id + "\"} " +
               value(st) + "\n";
      }
    };
    out +=
        "# HELP tandem_import_state 1 for the import's current state (label state).\n"
        "# TYPE tandem_import_state gauge\n";
    for (const importer::Import* im : all) {
      out += "tandem_import_state{import=\"" + im->record().id + "\",state=\"" +
             std::string(importer::to_string(im->record().state)) + "\"} 1\n";
    }
    metric("tandem_import_copied_bytes_total", "counter", "Bytes the background copy moved from the source.",
           [](const importer::ImportStatus& st) { return std::to_string(st.record.copied_bytes); });
    metric("tandem_import_skipped_bytes_total", "counter", "Holes and zeros not moved.",
           [](const importer::ImportStatus& st) { return std::to_string(st.record.skipped_bytes); });
    metric("tandem_import_restart_address_bytes", "gauge", "Where the copy goes on from.",
           [](const importer::ImportStatus& st) { return std::to_string(st.record.restart_address); });
    metric("tandem_import_source_missing_blocks", "gauge", "4 KiB blocks the source lacks (written while it was away).",
           [](const importer::ImportStatus& st) { return std::to_string(st.record.source_missing_blocks); });
    metric("tandem_import_source_connected", "gauge", "1 while the source answers.",
           [](const importer::ImportStatus& st) { return std::string(st.source_connected ? "1" : "0"); });
    metric("tandem_import_host_reads_from_source_total", "counter", "Host reads that fetched blocks not yet copied.",
           [](const importer::ImportStatus& st) { return std::to_string(st.host_reads_from_source); });
    metric("tandem_import_host_writes_mirrored_total", "counter", "Host writes mirrored to the source.",
           [](const importer::ImportStatus& st) { return std::to_string(st.host_writes_mirrored); });
    return out;
  }

  std::string nbd_metrics() const {
    std::string out =
        "# HELP tandem_nbd_requests_total NBD requests served, per volume.\n# TYPE tandem_nbd_requests_total counter\n";
    for (const auto& v : volumes_) {
      if (v.nbd)
        out += "tandem_nbd_requests_total{volume=\"" + v.cfg->id + "\"} " + std::to_string(v.nbd->counters().requests) +
               "\n";
    }
    out +=
        "# HELP tandem_nbd_request_errors_total NBD requests answered with an error.\n# TYPE "
        "tandem_nbd_request_errors_total counter\n";
    for (const auto& v : volumes_) {
      if (v.nbd)
        out += "tandem_nbd_request_errors_total{volume=\"" + v.cfg->id + "\"} " +
               std::to_string(v.nbd->counters().request_errors) + "\n";
    }
    out += import_metrics();
    out += "# HELP tandem_nbd_connections NBD connections open.\n# TYPE tandem_nbd_connections gauge\n";
    for (const auto& v : volumes_) {
      if (v.nbd)
        out += "tandem_nbd_connections{volume=\"" + v.cfg->id + "\"} " +
               std::to_string(v.nbd->counters().connections_open) + "\n";
    }
    return out;
  }

  Config cfg_;  // reloadable keys change on SIGHUP; VolumeRuntime::cfg points into cfg_.volumes
  const std::string config_path_;
  asio::io_context ctx_;
  asio::signal_set signals_;
  asio::steady_timer tick_;
  asio::steady_timer start_tick_;  // extend_start()
  std::string status_line_;
  std::vector<VolumeRuntime> volumes_;
  std::vector<std::unique_ptr<replication::Session>> sessions_;
  std::unique_ptr<replication::Replicator> replicator_;
  std::unique_ptr<importer::ImportManager> imports_;
  AsyncMutex import_change_;  // one import action or create at a time
  std::unique_ptr<api::Router> router_;
  std::map<std::string, std::vector<TestExport>> tests_;  // session id -> its failover test's exports
  std::unique_ptr<api::ApiServer> api_;
  bool shutting_down_ = false;
  bool stopped_ = false;  // shutdown() is over
  bool ready_ = false;    // READY=1 sent
  int exit_code_ = 0;
};

}  // namespace

namespace {

// "<N>": the syslog priority of the message, which journald reads off the start of each line
// written to a stream it captured (sd-daemon(3)); `journalctl -p warning` then filters on it.
class SyslogPriorityFlag final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    int prio = 6;
    switch (msg.level) {
      case spdlog::level::trace:
      case spdlog::level::debug:
        prio = 7;
        break;
      case spdlog::level::info:
        prio = 6;
        break;
      case spdlog::level::warn:
        prio = 4;
        break;
      case spdlog::level::err:
        prio = 3;
        break;
      case spdlog::level::critical:
        prio = 2;
        break;
      default:
        break;
    }
    const char text[3] = {'<', static_cast<char>('0' + prio), '>'};
    dest.append(text, text + 3);
  }
  [[nodiscard]] std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<SyslogPriorityFlag>();
  }
};

}  // namespace

bool journald_logging() {
  // systemd sets JOURNAL_STREAM to "device:inode" of the stream it connected to stderr; it is
  // only ours when that is still what stderr is (not inherited by a child whose stderr moved).
  const char* js = std::getenv("JOURNAL_STREAM");
  if (js == nullptr) return false;
  unsigned long long dev = 0;
  unsigned long long ino = 0;
  if (std::sscanf(js, "%llu:%llu", &dev, &ino) != 2) return false;
  struct stat st {};
  if (::fstat(STDERR_FILENO, &st) != 0) return false;
  return st.st_dev == dev && st.st_ino == ino;
}

void setup_logging(const std::string& level) {
  auto logger = spdlog::stderr_logger_mt("tandemd");
  auto formatter = std::make_unique<spdlog::pattern_formatter>();
  if (journald_logging()) {
    // journald stamps each line itself and reads the priority off the <N> prefix.
    formatter->add_flag<SyslogPriorityFlag>('*').set_pattern("%*%v");
  } else {
    formatter->set_pattern("%Y-%m-%dT%H:%M:%S.%e [%l] %v");
  }
  logger->set_formatter(std::move(formatter));
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(level));
  spdlog::flush_on(spdlog::level::info);
}

int run_daemon(const Config& cfg, const std::string& config_path) {
  Daemon d(cfg, config_path);
  return d.run();
}

int set_session_role(const Config& cfg, const std::string& session_id, const std::string& role) {
  const SessionConfig* sc = nullptr;
  for (const auto& s : cfg.sessions) {
    if (s.id == session_id) sc = &s;
  }
  if (sc == nullptr) {
    spdlog::error("no session \"{}\" in {}", session_id, cfg.source);
    return 2;
  }
  if (role != "source" && role != "destination") {
    spdlog::error("role must be \"source\" or \"destination\", not \"{}\"", role);
    return 2;
  }
  asio::io_context ctx;
  int rc = 0;
  auto body = [](asio::io_context& io, const Config& c, const SessionConfig& s, std::string r,
                 int& out) -> asio::awaitable<void> {
    std::vector<VolumeRuntime> vols;
    for (const auto& vid : s.volumes) {
      for (const auto& vc : c.volumes) {
        if (vc.id != vid) continue;
        auto rt = co_await open_volume(io, vc);
        if (!rt) {
          spdlog::error("{}", rt.error().message());
          out = 1;
        } else {
          vols.push_back(std::move(rt).value());
        }
      }
    }
    if (out == 0) {
      replication::SessionOptions so;
      so.id = s.id;
      so.role = s.role == "source" ? replication::Role::source : replication::Role::destination;
      for (auto& v : vols) so.members.push_back({v.volume.get(), v.env.get(), c.node.state_dir});
      const replication::Role target = r == "source" ? replication::Role::source : replication::Role::destination;
      Status st = co_await replication::Session::set_role_offline(std::move(so), target);
      if (!st) {
        spdlog::error("session {}: {}", s.id, st.error().message());
        out = 1;
      }
    }
    for (auto& v : vols) {
      Status st = co_await v.volume->close();
      if (!st) out = 1;
      v.volume.reset();
      v.env->stop();
    }
  };
  asio::co_spawn(ctx, body(ctx, cfg, *sc, role, rc), abort_on_exception);
  ctx.run();
  return rc;
}

int inspect_volumes(const Config& cfg) {
  asio::io_context ctx;
  int rc = 0;
  nlohmann::json out = nlohmann::json::array();
  auto body = [&]() -> asio::awaitable<void> {
    for (const auto& vc : cfg.volumes) {
      auto rt = co_await open_volume(ctx, vc);
      if (!rt) {
        spdlog::error("{}", rt.error().message());
        rc = 1;
        continue;
      }
      auto& v = *rt;
      const auto& sb = v.volume->meta().superblock();
      nlohmann::json j;
      j["id"] = vc.id;
      j["path"] = vc.path;
      j["size_bytes"] = v.volume->size_bytes();
      j["uuid"] = engine::uuid_to_string(sb.volume_uuid);
      j["generations"] = sb.generations;
      j["superblock_seq"] = sb.seq;
      j["region_bytes"] = sb.region_bytes;
      j["dirty_blocks"] = v.volume->dirty().dirty_blocks();
      nlohmann::json ext = nlohmann::json::array();
      for (const auto& e : v.volume->dirty().extents()) ext.push_back({e.first_block, e.blocks});
      j["dirty_extents"] = ext;
      out.push_back(j);
      auto st = co_await v.volume->close();
      if (!st) {
        spdlog::error("volume {}: close: {}", vc.id, st.error().message());
        rc = 1;
      }
      v.volume.reset();
      v.env->stop();
    }
  };
  asio::co_spawn(ctx, body(), abort_on_exception);
  ctx.run();
  std::cout << out.dump(2) << "\n";
  return rc;
}

}  // namespace tandem::daemon

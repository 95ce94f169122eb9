#include "transport_test_util.h"

#include <fcntl.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <spdlog/sinks/stdout_sinks.h>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "tandem/common/units.h"

extern char** environ;

namespace tandem::transport::test {

namespace fs = std::filesystem;

namespace {

std::string make_temp_dir(const char* prefix) {
  std::string tmpl = (fs::temp_directory_path() / (std::string(prefix) + "XXXXXX")).string();
  char* d = ::mkdtemp(tmpl.data());
  if (d == nullptr) throw std::runtime_error("mkdtemp failed");
  return tmpl;
}

struct CertsDir {
  std::string path;
  CertsDir() {
    path = make_temp_dir("tandem-certs-");
    const std::string cmd = std::string(TANDEM_MAKE_CERTS) + " " + path + " >/dev/null";
    if (std::system(cmd.c_str()) != 0) throw std::runtime_error("make_certs.sh failed: " + cmd);
  }
  ~CertsDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

}  // namespace

const std::string& certs_dir() {
  static const CertsDir dir;
  return dir.path;
}

TlsFiles tls_files(const std::string& name, const std::string& ca) {
  const std::string& d = certs_dir();
  return TlsFiles{d + "/" + ca + ".crt", d + "/" + name + ".crt", d + "/" + name + ".key"};
}

std::shared_ptr<asio::ssl::context> tls_context(const std::string& name, const std::string& ca) {
  auto ctx = make_tls_context(tls_files(name, ca));
  if (!ctx) throw std::runtime_error("make_tls_context: " + ctx.error().message());
  return std::move(*ctx);
}

// ------------------------------------------------------------------------------ LogCapture

class LogCapture::Sink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  std::vector<std::string> snapshot() {
    std::lock_guard lock(mutex_);
    return lines;
  }

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    lines.emplace_back(msg.payload.data(), msg.payload.size());
  }
  void flush_() override {}

 private:
  std::vector<std::string> lines;
};

LogCapture::LogCapture() : sink_(std::make_shared<Sink>()), previous_(spdlog::default_logger()) {
  auto out = std::make_shared<spdlog::sinks::stderr_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>("test", spdlog::sinks_init_list{sink_, out});
  logger->set_level(spdlog::level::debug);
  spdlog::set_default_logger(logger);
}

LogCapture::~LogCapture() { spdlog::set_default_logger(previous_); }

bool LogCapture::contains(std::initializer_list<std::string_view> parts) const {
  for (const auto& line : sink_->snapshot()) {
    bool all = true;
    for (auto p : parts) all = all && line.find(p) != std::string::npos;
    if (all) return true;
  }
  return false;
}

std::string LogCapture::dump() const {
  std::string s;
  for (const auto& l : sink_->snapshot()) s += l + "\n";
  return s;
}

// ------------------------------------------------------------------------------------ runs

void run(asio::io_context& io, asio::awaitable<void> aw, std::chrono::milliseconds limit) {
  // Shared: a coroutine that timed out may still complete later (while TearDown runs).
  struct State {
    bool done = false;
    std::exception_ptr error;
  };
  auto state = std::make_shared<State>();
  asio::co_spawn(io, std::move(aw), [state](std::exception_ptr e) {
    state->error = e;
    state->done = true;
  });
  io.restart();
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!state->done && std::chrono::steady_clock::now() < deadline) io.run_one_for(50ms);
  if (state->error) std::rethrow_exception(state->error);
  if (!state->done) {
    ADD_FAILURE() << "test coroutine did not complete within " << limit.count() << " ms";
    throw std::runtime_error("timed out");
  }
}

asio::awaitable<void> sleep_for(std::chrono::milliseconds d) {
  asio::steady_timer t(co_await asio::this_coro::executor, d);
  auto [ec] = co_await t.async_wait(kTuple);
  (void)ec;
}

asio::awaitable<bool> eventually(std::function<bool()> pred, std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline) co_return false;
    co_await sleep_for(5ms);
  }
  co_return true;
}

// ---------------------------------------------------------------------------------- peers

LinkOptions options(const std::string& peer, std::string hello) {
  LinkOptions o;
  o.peer_name = peer;
  o.listen_address = "127.0.0.1:0";
  o.hello = bytes_of(hello);
  o.keepalive_interval_ms = 100;
  // Short enough for quick tests, long enough that a loaded CI machine (sanitizers, two
  // cores) does not starve a healthy link into a false "dead peer".
  o.peer_timeout_ms = 2000;
  o.backoff_min_ms = 20;
  o.backoff_max_ms = 200;
  o.handshake_timeout_ms = 5000;
  return o;
}

std::unique_ptr<Peer> make_peer(asio::io_context& io, const std::string& cert, LinkOptions opts,
                                const std::string& ca) {
  auto p = std::make_unique<Peer>();
  Peer* raw = p.get();
  p->link = std::make_unique<Link>(io.get_executor(), tls_context(cert, ca), std::move(opts),
                                   [raw](std::shared_ptr<Connection> c) { raw->connections.push_back(std::move(c)); });
  return p;
}

std::vector<std::byte> bytes_of(std::string_view s) {
  std::vector<std::byte> v(s.size());
  if (!s.empty()) std::memcpy(v.data(), s.data(), s.size());
  return v;
}

std::vector<std::byte> pattern(std::size_t n, std::uint64_t seed) {
  std::vector<std::byte> v(n);
  std::mt19937_64 rng(seed);
  for (std::size_t i = 0; i < n; i += 8) {
    const std::uint64_t x = rng();
    std::memcpy(v.data() + i, &x, std::min<std::size_t>(8, n - i));
  }
  return v;
}

// ------------------------------------------------------------------------------- RawClient

namespace {

// Configured before the stream exists: SSL_new() copies the certificate from the context.
asio::ssl::context raw_context(const std::string& cert, const std::string& ca, RawClient::Mode mode) {
  asio::ssl::context ctx(asio::ssl::context::tls_client);
  SSL_CTX* c = ctx.native_handle();
  if (mode == RawClient::Mode::tls12_only) {
    SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION);
    SSL_CTX_set_max_proto_version(c, TLS1_2_VERSION);
  }
  ctx.set_verify_mode(asio::ssl::verify_none);
  if (!cert.empty()) {
    const TlsFiles f = tls_files(cert, ca);
    ctx.use_certificate_chain_file(f.cert);
    ctx.use_private_key_file(f.key, asio::ssl::context::pem);
  }
  return ctx;
}

}  // namespace

RawClient::RawClient(asio::io_context& io, const std::string& cert, const std::string& ca, Mode mode)
    : ctx_(raw_context(cert, ca, mode)), stream_(io, ctx_) {}

asio::awaitable<ErrorCode> RawClient::connect(std::uint16_t port) {
  const Tcp::endpoint ep(asio::ip::make_address("127.0.0.1"), port);
  auto [ec] = co_await stream_.lowest_layer().async_connect(ep, kTuple);
  co_return ec;
}

asio::awaitable<ErrorCode> RawClient::handshake() {
  auto [ec] = co_await stream_.async_handshake(asio::ssl::stream_base::client, kTuple);
  co_return ec;
}

asio::awaitable<ErrorCode> RawClient::write(std::vector<std::byte> bytes) {
  auto [ec, n] = co_await asio::async_write(stream_, asio::buffer(bytes), kTuple);
  (void)n;
  co_return ec;
}

asio::awaitable<ErrorCode> RawClient::send_frame(std::uint16_t type, std::uint16_t flags,
                                                 std::vector<std::byte> payload) {
  std::vector<std::byte> out(kFrameHeaderBytes + payload.size());
  FrameHeader h;
  h.type = type;
  h.flags = flags;
  h.payload_bytes = static_cast<std::uint32_t>(payload.size());
  encode_frame_header(h, std::span<std::byte, kFrameHeaderBytes>(out.data(), kFrameHeaderBytes));
  if (!payload.empty()) std::memcpy(out.data() + kFrameHeaderBytes, payload.data(), payload.size());
  co_return co_await write(std::move(out));
}

asio::awaitable<ErrorCode> RawClient::send_hello(std::uint64_t instance_id, std::vector<std::byte> app) {
  Hello h;
  h.instance_id = instance_id;
  h.app = std::move(app);
  std::vector<std::byte> payload = encode_hello(h);
  co_return co_await send_frame(kFrameTypeHello, 0, std::move(payload));
}

asio::awaitable<std::optional<Frame>> RawClient::read_frame() {
  std::array<std::byte, kFrameHeaderBytes> hb{};
  auto [ec, n] = co_await asio::async_read(stream_, asio::buffer(hb), kTuple);
  (void)n;
  if (ec) {
    error_ = ec;
    co_return std::nullopt;
  }
  auto h = decode_frame_header(hb);
  if (!h) {
    error_ = make_error_code(boost::system::errc::protocol_error);
    co_return std::nullopt;
  }
  Frame f;
  f.type = h->type;
  f.flags = h->flags;
  f.payload.resize(h->payload_bytes);
  auto [pec, pn] = co_await asio::async_read(stream_, asio::buffer(f.payload), kTuple);
  (void)pn;
  if (pec) {
    error_ = pec;
    co_return std::nullopt;
  }
  co_return f;
}

asio::awaitable<std::string> RawClient::read_until_closed() {
  std::string reason;
  for (;;) {
    std::optional<Frame> f = co_await read_frame();
    if (!f) break;
    if (f->type == kFrameTypeGoodbye) reason = printable(f->payload);
  }
  co_return reason;
}

// ------------------------------------------------------------------------------ FaultProxy

FaultProxy::FaultProxy(std::uint16_t target_port, std::uint64_t seed) {
  dir_ = make_temp_dir("tandem-proxy-");
  const std::string port_file = dir_ + "/port";
  const std::string target = "127.0.0.1:" + std::to_string(target_port);
  const std::string seed_s = std::to_string(seed);
  const std::string control = dir_ + "/control.sock";
  std::vector<std::string> args = {
      "/usr/bin/python3", TANDEM_FAULT_PROXY, "--listen",  "127.0.0.1:0", "--target", target, "--seed", seed_s,
      "--port-file",      port_file,          "--control", control};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) throw std::runtime_error("posix_spawn fault_proxy.py failed");
  pid_ = pid;
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream in(port_file);
    int p = 0;
    if (in >> p && p > 0 && fs::exists(control)) {
      port_ = static_cast<std::uint16_t>(p);
      return;
    }
    std::this_thread::sleep_for(20ms);
  }
  throw std::runtime_error("fault_proxy.py did not start within 20 s");
}

FaultProxy::~FaultProxy() {
  if (pid_ > 0) {
    ::kill(pid_, SIGTERM);
    int status = 0;
    ::waitpid(pid_, &status, 0);
  }
  std::error_code ec;
  fs::remove_all(dir_, ec);
}

std::string FaultProxy::command(const std::string& line) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  if (fd < 0) return "error: socket";
  timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  const std::string path = dir_ + "/control.sock";
  std::strncpy(sa.sun_path, path.c_str(), sizeof(sa.sun_path) - 1);
  std::string reply;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0) {
    const std::string l = line + "\n";
    if (::write(fd, l.data(), l.size()) == static_cast<ssize_t>(l.size())) {
      char c = 0;
      while (::read(fd, &c, 1) == 1 && c != '\n') reply.push_back(c);
    }
  }
  ::close(fd);
  return reply;
}

}  // namespace tandem::transport::test

// Plan: NbdServer end to end over a real Volume (io_uring on a file in /var/tmp) with the
// server's io_context on a background thread, talked to by a raw-socket NBD client written
// here, so every byte on the wire is the test's choice. Replies may come out of order, so the
// client matches them by handle. It proves, for simple and structured replies: read-after-write,
// unaligned write read-back, FUA and flush, trim and write-zeroes reading back zeros,
// pipelined requests beyond requests_in_flight_max all answered exactly once; that bad
// requests (out-of-range read, write past the end, bad flags, unknown command, oversized read,
// writes on a read-only export) get their errno while the connection stays usable; that an
// oversized WRITE or garbage magic closes only that connection while another keeps working;
// DISC answers what is in flight before closing; a stalled handshake times out; TCP port 0
// works; stale socket files are replaced, other files are not; stop() answers or refuses
// (ESHUTDOWN) what is in flight, closes connections, removes the socket file, and finishes
// within its grace period even when a client stops reading. Every wait is bounded by socket
// timeouts or future deadlines.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <future>
#include <map>
#include <optional>
#include <random>
#include <thread>

#include "tandem/common/units.h"
#include "tandem/engine/volume.h"
#include "tandem/frontend/errc.h"
#include "tandem/frontend/nbd_protocol.h"
#include "tandem/frontend/nbd_server.h"

namespace tandem::frontend {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Bytes = std::vector<std::uint8_t>;

constexpr std::uint64_t kVolumeBytes = 16 * kMiB;
constexpr std::uint32_t kPayloadMax = 1024 * 1024;
// Every socket read or write in the client gives up after this long.
constexpr int kSocketTimeoutS = 10;

// ------------------------------------------------------------------------ raw NBD client

struct Reply {
  std::uint64_t handle = 0;
  std::uint32_t error = 0;
  Bytes data;
  bool structured = false;
};

class Client {
 public:
  Client() = default;
  ~Client() {
    if (fd_ >= 0) ::close(fd_);
  }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  bool connect_unix(const std::string& path) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, path.c_str(), sizeof(sa.sun_path) - 1);
    set_timeouts();
    return ::connect(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
  }
  bool connect_tcp(std::uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    set_timeouts();
    return ::connect(fd_, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
  }

  bool send_all(const void* p, std::size_t n) {
    const auto* b = static_cast<const std::uint8_t*>(p);
    while (n > 0) {
      const ssize_t r = ::send(fd_, b, n, MSG_NOSIGNAL);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return false;
      b += r;
      n -= static_cast<std::size_t>(r);
    }
    return true;
  }
  bool recv_all(void* p, std::size_t n) {
    auto* b = static_cast<std::uint8_t*>(p);
    while (n > 0) {
      const ssize_t r = ::recv(fd_, b, n, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return false;
      b += r;
      n -= static_cast<std::size_t>(r);
    }
    return true;
  }
  // True when the server closed the connection (EOF or reset) within the socket timeout.
  bool wait_closed() {
    std::uint8_t b[4096];
    for (;;) {
      const ssize_t r = ::recv(fd_, b, sizeof b, 0);
      if (r < 0 && errno == EINTR) continue;
      if (r == 0) return true;
      if (r < 0) return errno == ECONNRESET;
    }
  }

  // Fixed-newstyle handshake with NBD_OPT_GO on the default export; optionally negotiates
  // structured replies first.
  void handshake(bool structured, std::string_view name = "") {
    std::uint8_t greet[nbd::kGreetingBytes];
    ASSERT_TRUE(recv_all(greet, sizeof greet));
    ASSERT_EQ(get_be64(greet), nbd::kNbdMagic);
    ASSERT_EQ(get_be64(greet + 8), nbd::kOptMagic);
    std::uint8_t cf[4];
    put_be32(cf, nbd::kClientFlagFixedNewstyle | nbd::kClientFlagNoZeroes);
    ASSERT_TRUE(send_all(cf, 4));
    if (structured) {
      send_option(nbd::kOptStructuredReply, {});
      auto [type, data] = read_option_reply();
      ASSERT_EQ(type, nbd::kRepAck);
      structured_ = true;
    }
    Bytes go(4);
    put_be32(go.data(), static_cast<std::uint32_t>(name.size()));
    go.insert(go.end(), name.begin(), name.end());
    go.push_back(0);
    go.push_back(0);
    send_option(nbd::kOptGo, go);
    for (;;) {
      auto [type, data] = read_option_reply();
      if (type == nbd::kRepAck) break;
      ASSERT_EQ(type, nbd::kRepInfo);
      if (get_be16(data.data()) == nbd::kInfoExport) {
        size_ = get_be64(data.data() + 2);
        flags_ = get_be16(data.data() + 10);
      }
    }
  }
  void send_option(std::uint32_t opt, const Bytes& data) {
    Bytes b(16);
    put_be64(b.data(), nbd::kOptMagic);
    put_be32(b.data() + 8, opt);
    put_be32(b.data() + 12, static_cast<std::uint32_t>(data.size()));
    b.insert(b.end(), data.begin(), data.end());
    ASSERT_TRUE(send_all(b.data(), b.size()));
  }
  std::pair<std::uint32_t, Bytes> read_option_reply() {
    std::uint8_t h[nbd::kOptionReplyHeaderBytes];
    if (!recv_all(h, sizeof h)) return {0, {}};
    EXPECT_EQ(get_be64(h), nbd::kOptReplyMagic);
    Bytes d(get_be32(h + 16));
    if (!recv_all(d.data(), d.size())) return {0, {}};
    return {get_be32(h + 12), d};
  }

  // Sends one request (and its payload for WRITE) and remembers it for read_reply().
  bool send(std::uint16_t type, std::uint64_t offset, std::uint32_t length, std::uint16_t flags = 0,
            const Bytes* payload = nullptr) {
    const std::uint64_t handle = next_handle_++;
    return send_with_handle(handle, type, offset, length, flags, payload);
  }
  bool send_with_handle(std::uint64_t handle, std::uint16_t type, std::uint64_t offset, std::uint32_t length,
                        std::uint16_t flags = 0, const Bytes* payload = nullptr) {
    std::array<std::uint8_t, nbd::kRequestHeaderBytes> h{};
    nbd::encode_request(nbd::Request{flags, type, handle, offset, length}, h);
    pending_[handle] = nbd::Request{flags, type, handle, offset, length};
    last_handle_ = handle;
    if (!send_all(h.data(), h.size())) return false;
    return payload == nullptr || send_all(payload->data(), payload->size());
  }
  std::uint64_t last_handle() const { return last_handle_; }

  // Reads one complete reply (all chunks of a structured one). nullopt on EOF/timeout or a
  // malformed reply (which also fails the test).
  std::optional<Reply> read_reply() {
    std::uint8_t m[4];
    if (!recv_all(m, 4)) return std::nullopt;
    const std::uint32_t magic = get_be32(m);
    Reply r;
    if (magic == nbd::kSimpleReplyMagic) {
      std::uint8_t h[12];
      if (!recv_all(h, 12)) return std::nullopt;
      r.error = get_be32(h);
      r.handle = get_be64(h + 4);
      auto it = pending_.find(r.handle);
      if (it == pending_.end()) {
        ADD_FAILURE() << "reply for unknown handle " << r.handle;
        return std::nullopt;
      }
      if (it->second.type == nbd::kCmdRead && r.error == 0) {
        r.data.resize(it->second.length);
        if (!recv_all(r.data.data(), r.data.size())) return std::nullopt;
      }
      pending_.erase(it);
      return r;
    }
    if (magic != nbd::kStructuredReplyMagic) {
      ADD_FAILURE() << "bad reply magic " << magic;
      return std::nullopt;
    }
    r.structured = true;
    for (bool first = true;; first = false) {
      std::uint8_t h[16];
      if (!first) {
        if (!recv_all(m, 4)) return std::nullopt;
        EXPECT_EQ(get_be32(m), nbd::kStructuredReplyMagic);
      }
      if (!recv_all(h, 16)) return std::nullopt;
      const std::uint16_t flags = get_be16(h);
      const std::uint16_t type = get_be16(h + 2);
      r.handle = get_be64(h + 4);
      Bytes payload(get_be32(h + 12));
      if (!recv_all(payload.data(), payload.size())) return std::nullopt;
      auto it = pending_.find(r.handle);
      if (it == pending_.end()) {
        ADD_FAILURE() << "chunk for unknown handle " << r.handle;
        return std::nullopt;
      }
      if (type == nbd::kReplyTypeOffsetData) {
        EXPECT_GE(payload.size(), 9u);
        const std::uint64_t off = get_be64(payload.data());
        EXPECT_GE(off, it->second.offset);
        r.data.resize(it->second.length);
        const std::size_t at = static_cast<std::size_t>(off - it->second.offset);
        EXPECT_LE(at + payload.size() - 8, r.data.size());
        std::memcpy(r.data.data() + at, payload.data() + 8, payload.size() - 8);
      } else if (type == nbd::kReplyTypeError) {
        EXPECT_GE(payload.size(), 6u);
        r.error = get_be32(payload.data());
        EXPECT_LE(6u + get_be16(payload.data() + 4), payload.size());
      } else if (type != nbd::kReplyTypeNone) {
        ADD_FAILURE() << "unexpected chunk type " << type;
      }
      if (flags & nbd::kReplyFlagDone) break;
    }
    pending_.erase(r.handle);
    return r;
  }

  // One request, one reply (nothing else in flight).
  std::optional<Reply> call(std::uint16_t type, std::uint64_t offset, std::uint32_t length, std::uint16_t flags = 0,
                            const Bytes* payload = nullptr) {
    if (!send(type, offset, length, flags, payload)) return std::nullopt;
    auto r = read_reply();
    if (r) {
      EXPECT_EQ(r->handle, last_handle_);
    }
    return r;
  }
  std::uint32_t write(std::uint64_t offset, const Bytes& data, std::uint16_t flags = 0) {
    auto r = call(nbd::kCmdWrite, offset, static_cast<std::uint32_t>(data.size()), flags, &data);
    return r ? r->error : 0xffffffffu;
  }
  std::optional<Bytes> read(std::uint64_t offset, std::uint32_t length) {
    auto r = call(nbd::kCmdRead, offset, length);
    if (!r || r->error != 0) return std::nullopt;
    return r->data;
  }
  std::uint32_t error_of(std::uint16_t type, std::uint64_t offset, std::uint32_t length, std::uint16_t flags = 0) {
    auto r = call(type, offset, length, flags);
    return r ? r->error : 0xffffffffu;
  }

  [[nodiscard]] std::uint64_t size() const { return size_; }
  [[nodiscard]] std::uint16_t flags() const { return flags_; }
  [[nodiscard]] bool structured() const { return structured_; }
  [[nodiscard]] std::size_t pending() const { return pending_.size(); }

 private:
  void set_timeouts() {
    timeval tv{kSocketTimeoutS, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  }

  int fd_ = -1;
  std::uint64_t size_ = 0;
  std::uint16_t flags_ = 0;
  bool structured_ = false;
  std::uint64_t next_handle_ = 0x1000;
  std::uint64_t last_handle_ = 0;
  std::map<std::uint64_t, nbd::Request> pending_;
};

Bytes pattern(std::size_t n, std::uint32_t seed) {
  Bytes b(n);
  std::mt19937 g(seed);
  for (auto& x : b) x = static_cast<std::uint8_t>(g());
  return b;
}

// ------------------------------------------------------------------------------- fixture

template <typename T>
asio::awaitable<void> store_into(asio::awaitable<T> aw, std::optional<T>* out) {
  out->emplace(co_await std::move(aw));
}

class NbdServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/var/tmp/tandem-nbd-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    sock_ = (dir_ / "nbd.sock").string();
    io_thread_ = std::thread([this] { ctx_.run(); });
    // The ring is created on the thread that submits to it, as in the daemon.
    std::optional<Result<std::unique_ptr<engine::DeviceEnv>>> e;
    on_io([&] { e.emplace(engine::make_uring_env(ctx_)); });
    ASSERT_TRUE(e->ok()) << e->error().message();
    env_ = std::move(*e).value();
    engine::VolumeOptions vo{"vol0", (dir_ / "data.img").string(), kVolumeBytes, (dir_ / "vol0.meta").string(), {}};
    std::optional<Result<std::unique_ptr<engine::Volume>>> v;
    run_on_io(store_into(engine::Volume::open(*env_, std::move(vo)), &v));
    ASSERT_TRUE(v.has_value() && v->ok()) << (v ? v->error().message() : "no result");
    volume_ = std::move(*v).value();
    server_ = start_server(opts(), sock_);
    ASSERT_NE(server_, nullptr);
  }

  void TearDown() override {
    if (!io_thread_.joinable()) return;  // SetUp failed before the io thread started
    if (server_) run_on_io(server_->stop());
    for (auto& s : extra_servers_) run_on_io(s->stop());
    if (volume_) {
      std::optional<Status> st;
      run_on_io(store_into(volume_->close(), &st));
      EXPECT_TRUE(st && st->ok());
    }
    on_io([this] { env_->stop(); });
    work_.reset();
    io_thread_.join();
    extra_servers_.clear();
    server_.reset();
    volume_.reset();
    env_.reset();
    fs::remove_all(dir_);
  }

  static NbdServerOptions opts() {
    NbdServerOptions o;
    o.requests_in_flight_max = 8;
    o.payload_bytes_max = kPayloadMax;
    o.handshake_timeout_ms = 5000;
    return o;
  }

  std::unique_ptr<NbdServer> start_server(NbdServerOptions o, const std::string& sock) {
    std::unique_ptr<NbdServer> s;
    on_io([&] {
      s = std::make_unique<NbdServer>(ctx_.get_executor(), o);
      s->add_export("vol0", *volume_);
      Status st = s->listen_unix(sock);
      EXPECT_TRUE(st.ok()) << st.error().message();
    });
    return s;
  }

  // Starts a coroutine on the server's thread; the future says when it is done.
  std::future<void> start_on_io(asio::awaitable<void> aw) {
    auto done = std::make_shared<std::promise<void>>();
    auto f = done->get_future();
    asio::co_spawn(ctx_, std::move(aw), [done](std::exception_ptr e) {
      if (e) {
        done->set_exception(e);
      } else {
        done->set_value();
      }
    });
    return f;
  }
  // Runs a coroutine on the server's thread and waits for it, bounded.
  void run_on_io(asio::awaitable<void> aw) {
    auto f = start_on_io(std::move(aw));
    if (f.wait_for(30s) != std::future_status::ready) {
      // Its frame refers to this stack: there is no safe way to continue.
      std::fprintf(stderr, "coroutine on the io thread did not finish in 30 s\n");
      std::abort();
    }
    f.get();
  }
  template <typename F>
  void on_io(F fn) {
    std::promise<void> done;
    auto f = done.get_future();
    asio::post(ctx_, [&] {
      fn();
      done.set_value();
    });
    if (f.wait_for(30s) != std::future_status::ready) std::abort();
  }

  void connect(Client& c, bool structured) {
    ASSERT_TRUE(c.connect_unix(sock_));
    c.handshake(structured);
    ASSERT_EQ(c.size(), kVolumeBytes);
  }

  NbdCounters counters() {
    NbdCounters n;
    on_io([&] { n = server_->counters(); });
    return n;
  }

  asio::io_context ctx_;
  asio::executor_work_guard<asio::io_context::executor_type> work_{ctx_.get_executor()};
  std::thread io_thread_;
  fs::path dir_;
  std::string sock_;
  std::unique_ptr<engine::DeviceEnv> env_;
  std::unique_ptr<engine::Volume> volume_;
  std::unique_ptr<NbdServer> server_;
  std::vector<std::unique_ptr<NbdServer>> extra_servers_;
};

// Runs each data-path test with simple and with structured replies.
class NbdDataTest : public NbdServerTest, public ::testing::WithParamInterface<bool> {};

TEST_P(NbdDataTest, ReadAfterWriteAndFlags) {
  Client c;
  connect(c, GetParam());
  EXPECT_EQ(c.structured(), GetParam());
  const std::uint16_t want = nbd::kTxHasFlags | nbd::kTxSendFlush | nbd::kTxSendFua | nbd::kTxSendTrim |
                             nbd::kTxSendWriteZeroes | nbd::kTxSendFastZero | nbd::kTxSendCache | nbd::kTxCanMultiConn;
  EXPECT_EQ(c.flags(), want);

  const Bytes a = pattern(8192, 1);
  EXPECT_EQ(c.write(4096, a), 0u);
  EXPECT_EQ(c.read(4096, 8192), a);
  // Last byte of the volume.
  EXPECT_EQ(c.write(kVolumeBytes - 1, Bytes{0x5a}), 0u);
  EXPECT_EQ(c.read(kVolumeBytes - 1, 1), Bytes{0x5a});
}

TEST_P(NbdDataTest, UnalignedWriteReadBack) {
  Client c;
  connect(c, GetParam());
  const Bytes base = pattern(3 * 4096, 2);
  EXPECT_EQ(c.write(0, base), 0u);
  const Bytes patch = pattern(3000, 3);
  EXPECT_EQ(c.write(4095, patch), 0u);
  Bytes want = base;
  std::copy(patch.begin(), patch.end(), want.begin() + 4095);
  EXPECT_EQ(c.read(0, 3 * 4096), want);
  EXPECT_EQ(c.read(4000, 5000), Bytes(want.begin() + 4000, want.begin() + 9000));
}

TEST_P(NbdDataTest, FuaAndFlush) {
  Client c;
  connect(c, GetParam());
  const std::uint64_t flushes_before = volume_->stats().flushes;
  const Bytes a = pattern(65536, 4);
  EXPECT_EQ(c.write(1 * kMiB, a, nbd::kCmdFlagFua), 0u);
  EXPECT_EQ(c.error_of(nbd::kCmdFlush, 0, 0), 0u);
  EXPECT_EQ(c.error_of(nbd::kCmdFlush, 0, 0, nbd::kCmdFlagFua), 0u);
  EXPECT_EQ(c.read(1 * kMiB, 65536), a);
  std::uint64_t flushes_after = 0;
  on_io([&] { flushes_after = volume_->stats().flushes; });
  EXPECT_GE(flushes_after, flushes_before + 2);
  EXPECT_EQ(c.error_of(nbd::kCmdCache, 0, 65536), 0u);
}

TEST_P(NbdDataTest, TrimAndWriteZeroesReadBackZeros) {
  Client c;
  connect(c, GetParam());
  const Bytes a = pattern(256 * 1024, 5);
  EXPECT_EQ(c.write(2 * kMiB, a), 0u);
  // Trim whole blocks: they read back as zeros on a file.
  EXPECT_EQ(c.error_of(nbd::kCmdTrim, 2 * kMiB, 65536, nbd::kCmdFlagFua), 0u);
  EXPECT_EQ(c.read(2 * kMiB, 65536), Bytes(65536, 0));
  // Unaligned write-zeroes that must stay allocated; the bytes around are untouched.
  const std::uint64_t z0 = 2 * kMiB + 65536 + 1000;
  EXPECT_EQ(c.error_of(nbd::kCmdWriteZeroes, z0, 10000, nbd::kCmdFlagNoHole), 0u);
  auto got = c.read(2 * kMiB + 65536, 20000);
  ASSERT_TRUE(got.has_value());
  Bytes want(a.begin() + 65536, a.begin() + 65536 + 20000);
  std::fill(want.begin() + 1000, want.begin() + 11000, 0);
  EXPECT_EQ(*got, want);
  // Fast zero on a file that can punch holes.
  const std::uint32_t fz =
      c.error_of(nbd::kCmdWriteZeroes, 2 * kMiB + 131072, 131072, nbd::kCmdFlagFastZero | nbd::kCmdFlagFua);
  EXPECT_TRUE(fz == 0 || fz == nbd::kEnotsup) << fz;
  if (fz == 0) {
    EXPECT_EQ(c.read(2 * kMiB + 131072, 131072), Bytes(131072, 0));
  }
}

TEST_P(NbdDataTest, PipelinedRequestsAreAllAnsweredByHandle) {
  Client c;
  connect(c, GetParam());
  // 64 writes of distinct blocks then 64 reads of them, all sent before any reply is read:
  // 8x requests_in_flight_max, so the server must stop reading and resume.
  constexpr int kN = 64;
  std::vector<Bytes> data;
  std::map<std::uint64_t, int> write_handles;
  for (int i = 0; i < kN; ++i) {
    data.push_back(pattern(16384, 100 + static_cast<std::uint32_t>(i)));
    ASSERT_TRUE(c.send(nbd::kCmdWrite, 4 * kMiB + static_cast<std::uint64_t>(i) * 16384, 16384, 0, &data.back()));
    write_handles[c.last_handle()] = i;
  }
  for (int i = 0; i < kN; ++i) {
    auto r = c.read_reply();
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->error, 0u);
    EXPECT_EQ(write_handles.erase(r->handle), 1u);
  }
  std::map<std::uint64_t, int> read_handles;
  for (int i = 0; i < kN; ++i) {
    ASSERT_TRUE(c.send(nbd::kCmdRead, 4 * kMiB + static_cast<std::uint64_t>(i) * 16384, 16384));
    read_handles[c.last_handle()] = i;
  }
  for (int i = 0; i < kN; ++i) {
    auto r = c.read_reply();
    ASSERT_TRUE(r.has_value());
    ASSERT_EQ(read_handles.count(r->handle), 1u);
    EXPECT_EQ(r->data, data[static_cast<std::size_t>(read_handles[r->handle])]);
    read_handles.erase(r->handle);
  }
  EXPECT_EQ(c.pending(), 0u);
}

TEST_P(NbdDataTest, BadRequestsGetErrnoAndTheConnectionStaysUp) {
  Client c;
  connect(c, GetParam());
  const Bytes a = pattern(4096, 6);
  EXPECT_EQ(c.write(0, a), 0u);
  EXPECT_EQ(c.error_of(nbd::kCmdRead, kVolumeBytes, 4096), nbd::kEinval);
  EXPECT_EQ(c.read(0, 4096), a);
  EXPECT_EQ(c.error_of(nbd::kCmdRead, kVolumeBytes - 512, 4096), nbd::kEinval);
  EXPECT_EQ(c.error_of(nbd::kCmdRead, 0, kPayloadMax + 1), nbd::kEinval);
  EXPECT_EQ(c.error_of(nbd::kCmdRead, 0, 512, nbd::kCmdFlagNoHole), nbd::kEinval);
  EXPECT_EQ(c.error_of(nbd::kCmdRead, 0, 0), nbd::kEinval);
  EXPECT_EQ(c.error_of(42, 0, 512), nbd::kEinval);
  EXPECT_EQ(c.error_of(nbd::kCmdBlockStatus, 0, 512), nbd::kEinval);
  EXPECT_EQ(c.error_of(nbd::kCmdFlush, 4096, 0), nbd::kEinval);
  // Refused writes still carry their payload: the stream must stay in sync.
  const Bytes b = pattern(8192, 7);
  EXPECT_EQ(c.write(kVolumeBytes - 4096, b), nbd::kEnospc);
  EXPECT_EQ(c.write(0, b, nbd::kCmdFlagFastZero), nbd::kEinval);
  EXPECT_EQ(c.error_of(nbd::kCmdTrim, kVolumeBytes, 4096), nbd::kEnospc);
  EXPECT_EQ(c.error_of(nbd::kCmdWriteZeroes, kVolumeBytes - 1, 2), nbd::kEnospc);
  EXPECT_EQ(c.read(0, 4096), a);
  EXPECT_GE(counters().request_errors, 12u);
}

INSTANTIATE_TEST_SUITE_P(Replies, NbdDataTest, ::testing::Values(false, true),
                         [](const auto& p) { return p.param ? "structured" : "simple"; });

TEST_F(NbdServerTest, GarbageClosesOnlyThatConnection) {
  Client good;
  connect(good, true);
  Client bad;
  connect(bad, false);
  const Bytes junk = pattern(nbd::kRequestHeaderBytes, 8);
  ASSERT_TRUE(bad.send_all(junk.data(), junk.size()));
  EXPECT_TRUE(bad.wait_closed());

  const Bytes a = pattern(4096, 9);
  EXPECT_EQ(good.write(8 * kMiB, a), 0u);
  EXPECT_EQ(good.read(8 * kMiB, 4096), a);
  Client fresh;
  connect(fresh, false);
  EXPECT_EQ(fresh.read(8 * kMiB, 4096), a);
  EXPECT_EQ(counters().protocol_errors, 1u);
}

TEST_F(NbdServerTest, OversizedWritePayloadClosesTheConnection) {
  Client c;
  connect(c, false);
  ASSERT_TRUE(c.send(nbd::kCmdWrite, 0, kPayloadMax + 1));
  EXPECT_TRUE(c.wait_closed());
  Client d;
  connect(d, false);
  EXPECT_TRUE(d.read(0, 512).has_value());
}

TEST_F(NbdServerTest, ReadOnlyExportRefusesWrites) {
  on_io([&] { volume_->set_access(engine::Access::read_only); });
  Client c;
  connect(c, true);
  EXPECT_NE(c.flags() & nbd::kTxReadOnly, 0);
  EXPECT_EQ(c.write(0, pattern(4096, 10)), nbd::kEperm);
  EXPECT_EQ(c.error_of(nbd::kCmdTrim, 0, 4096), nbd::kEperm);
  EXPECT_EQ(c.error_of(nbd::kCmdWriteZeroes, 0, 4096), nbd::kEperm);
  EXPECT_TRUE(c.read(0, 4096).has_value());
  EXPECT_EQ(c.error_of(nbd::kCmdFlush, 0, 0), 0u);
  on_io([&] { volume_->set_access(engine::Access::read_write); });
}

TEST_F(NbdServerTest, DiscAnswersInFlightRequestsThenCloses) {
  Client c;
  connect(c, false);
  std::vector<Bytes> data;
  for (std::uint32_t i = 0; i < 4; ++i) {
    data.push_back(pattern(65536, 20 + i));
    ASSERT_TRUE(c.send(nbd::kCmdWrite, 10 * kMiB + i * 65536ull, 65536, 0, &data.back()));
  }
  ASSERT_TRUE(c.send(nbd::kCmdDisc, 0, 0));
  for (int i = 0; i < 4; ++i) {
    auto r = c.read_reply();
    ASSERT_TRUE(r.has_value());
    EXPECT_EQ(r->error, 0u);
  }
  EXPECT_TRUE(c.wait_closed());
  Client d;
  connect(d, true);
  for (std::uint32_t i = 0; i < 4; ++i) EXPECT_EQ(d.read(10 * kMiB + i * 65536ull, 65536), data[i]);
}

TEST_F(NbdServerTest, FlushOnAnotherConnection) {
  Client a;
  connect(a, false);
  Client b;
  connect(b, true);
  const Bytes d = pattern(4096, 30);
  EXPECT_EQ(a.write(12 * kMiB, d), 0u);
  EXPECT_EQ(b.error_of(nbd::kCmdFlush, 0, 0), 0u);
  EXPECT_EQ(b.read(12 * kMiB, 4096), d);
  EXPECT_EQ(counters().connections_open, 2u);
}

TEST_F(NbdServerTest, HandshakeOptionsOverTheWire) {
  Client c;
  ASSERT_TRUE(c.connect_unix(sock_));
  std::uint8_t greet[nbd::kGreetingBytes];
  ASSERT_TRUE(c.recv_all(greet, sizeof greet));
  std::uint8_t cf[4];
  put_be32(cf, nbd::kClientFlagFixedNewstyle);
  ASSERT_TRUE(c.send_all(cf, 4));
  c.send_option(nbd::kOptStartTls, {});
  EXPECT_EQ(c.read_option_reply().first, nbd::kRepErrPolicy);
  c.send_option(77, {1, 2});
  EXPECT_EQ(c.read_option_reply().first, nbd::kRepErrUnsup);
  c.send_option(nbd::kOptList, {});
  auto [t1, name] = c.read_option_reply();
  EXPECT_EQ(t1, nbd::kRepServer);
  EXPECT_EQ(std::string(name.begin() + 4, name.end()), "vol0");
  EXPECT_EQ(c.read_option_reply().first, nbd::kRepAck);
  Bytes go{0, 0, 0, 4, 'n', 'o', 'p', 'e', 0, 0};
  c.send_option(nbd::kOptGo, go);
  EXPECT_EQ(c.read_option_reply().first, nbd::kRepErrUnknown);
  c.send_option(nbd::kOptAbort, {});
  EXPECT_EQ(c.read_option_reply().first, nbd::kRepAck);
  EXPECT_TRUE(c.wait_closed());
}

TEST_F(NbdServerTest, ExportNameWithZeroes) {
  Client c;
  ASSERT_TRUE(c.connect_unix(sock_));
  std::uint8_t greet[nbd::kGreetingBytes];
  ASSERT_TRUE(c.recv_all(greet, sizeof greet));
  std::uint8_t cf[4];
  put_be32(cf, nbd::kClientFlagFixedNewstyle);
  ASSERT_TRUE(c.send_all(cf, 4));
  c.send_option(nbd::kOptExportName, {'v', 'o', 'l', '0'});
  std::uint8_t reply[nbd::kExportNameReplyBytes];
  ASSERT_TRUE(c.recv_all(reply, sizeof reply));
  EXPECT_EQ(get_be64(reply), kVolumeBytes);
  std::array<std::uint8_t, nbd::kRequestHeaderBytes> h{};
  nbd::encode_request(nbd::Request{0, nbd::kCmdFlush, 1, 0, 0}, h);
  ASSERT_TRUE(c.send_all(h.data(), h.size()));
  std::uint8_t r[nbd::kSimpleReplyBytes];
  ASSERT_TRUE(c.recv_all(r, sizeof r));
  EXPECT_EQ(get_be32(r), nbd::kSimpleReplyMagic);
  EXPECT_EQ(get_be32(r + 4), 0u);
  EXPECT_EQ(get_be64(r + 8), 1u);
}

TEST_F(NbdServerTest, StalledHandshakeTimesOut) {
  NbdServerOptions o = opts();
  o.handshake_timeout_ms = 200;
  const std::string sock2 = (dir_ / "slow.sock").string();
  extra_servers_.push_back(start_server(o, sock2));
  Client c;
  ASSERT_TRUE(c.connect_unix(sock2));
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(c.wait_closed());  // greeting, then nothing from us
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
}

TEST_F(NbdServerTest, TcpEphemeralPort) {
  Status st;
  std::uint16_t port = 0;
  on_io([&] {
    st = server_->listen_tcp("127.0.0.1:0");
    port = server_->tcp_port();
  });
  ASSERT_TRUE(st.ok()) << st.error().message();
  ASSERT_NE(port, 0);
  Client c;
  ASSERT_TRUE(c.connect_tcp(port));
  c.handshake(true);
  const Bytes d = pattern(10000, 40);
  EXPECT_EQ(c.write(333, d), 0u);
  EXPECT_EQ(c.read(333, 10000), d);
  on_io([&] { st = server_->listen_tcp("no-port-here"); });
  EXPECT_EQ(st.code(), make_error_code(errc::bad_address));
}

TEST_F(NbdServerTest, SocketFileHandling) {
  struct stat st {};
  ASSERT_EQ(::stat(sock_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0660u);

  // A stale socket (bound, never listened on, left behind) is replaced.
  const std::string stale = (dir_ / "stale.sock").string();
  {
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, stale.c_str(), sizeof(sa.sun_path) - 1);
    ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa), 0);
    ::close(fd);
  }
  Status s1, s2, s3;
  on_io([&] {
    s1 = server_->listen_unix(stale);
    s2 = server_->listen_unix(sock_);  // live: ours
    s3 = server_->listen_unix((dir_ / "data.img").string());
  });
  EXPECT_TRUE(s1.ok()) << s1.error().message();
  EXPECT_EQ(s2.code(), make_error_code(errc::address_in_use));
  EXPECT_EQ(s3.code(), make_error_code(errc::not_a_socket));
  EXPECT_TRUE(fs::exists(dir_ / "data.img"));
  Client c;
  ASSERT_TRUE(c.connect_unix(stale));
  c.handshake(false);
  EXPECT_EQ(c.size(), kVolumeBytes);
}

TEST_F(NbdServerTest, StopClosesConnectionsAndRemovesTheSocket) {
  Client c;
  connect(c, true);
  Client h;  // still in the handshake
  ASSERT_TRUE(h.connect_unix(sock_));
  std::uint8_t greet[nbd::kGreetingBytes];
  ASSERT_TRUE(h.recv_all(greet, sizeof greet));
  EXPECT_TRUE(c.read(0, 4096).has_value());
  run_on_io(server_->stop());
  EXPECT_TRUE(c.wait_closed());
  EXPECT_TRUE(h.wait_closed());
  EXPECT_FALSE(fs::exists(sock_));
  EXPECT_EQ(counters().connections_open, 0u);
  Status st;
  on_io([&] { st = server_->listen_unix(sock_); });
  EXPECT_EQ(st.code(), make_error_code(errc::stopped));
}

TEST_F(NbdServerTest, StopWithRequestsInFlightAnswersThemOrRefusesThenCloses) {
  Client c;
  connect(c, true);
  // Fill the connection's in-flight window with durable writes, then stop while they run.
  std::vector<Bytes> data;
  for (std::uint32_t i = 0; i < 8; ++i) {
    data.push_back(pattern(kPayloadMax, 50 + i));
    ASSERT_TRUE(c.send(nbd::kCmdWrite, i * std::uint64_t{kPayloadMax}, kPayloadMax, nbd::kCmdFlagFua, &data.back()));
  }
  auto stopped = start_on_io(server_->stop());
  // Requests after the stop began: answered with ESHUTDOWN, or the connection is gone.
  for (int i = 0; i < 4; ++i) {
    if (!c.send(nbd::kCmdFlush, 0, 0)) break;
  }
  std::size_t replies = 0;
  while (auto r = c.read_reply()) {
    ++replies;
    EXPECT_TRUE(r->error == 0 || r->error == nbd::kEshutdown) << r->error;
  }
  EXPECT_LE(replies, 12u);
  EXPECT_TRUE(c.wait_closed());
  ASSERT_EQ(stopped.wait_for(30s), std::future_status::ready);
  EXPECT_EQ(counters().connections_open, 0u);
}

TEST_F(NbdServerTest, StopIsBoundedWhenAClientDoesNotRead) {
  NbdServerOptions o = opts();
  o.stop_grace_ms = 300;
  const std::string sock2 = (dir_ / "grace.sock").string();
  extra_servers_.push_back(start_server(o, sock2));
  Client c;
  ASSERT_TRUE(c.connect_unix(sock2));
  c.handshake(false);
  // 8 MiB of READ replies that the client never takes: the reply writer blocks on the socket.
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(c.send(nbd::kCmdRead, 0, kPayloadMax));
  NbdServer& srv = *extra_servers_.back();
  // Poll (bounded) until the server has read all eight: their replies cannot all fit in the
  // socket buffer, so the writer is stuck when the stop begins.
  std::uint64_t read_requests = 0;
  for (int i = 0; i < 500 && read_requests < 8; ++i) {
    on_io([&] { read_requests = srv.counters().requests; });
    if (read_requests < 8) std::this_thread::sleep_for(10ms);
  }
  ASSERT_EQ(read_requests, 8u);
  const auto t0 = std::chrono::steady_clock::now();
  auto stopped = start_on_io(srv.stop());
  ASSERT_EQ(stopped.wait_for(20s), std::future_status::ready);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  EXPECT_TRUE(c.wait_closed());
}

}  // namespace
}  // namespace tandem::frontend

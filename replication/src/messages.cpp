#include "tandem/replication/messages.h"

#include <cstring>

#include "tandem/common/units.h"
#include "tandem/engine/metadata.h"
#include "tandem/replication/errc.h"

namespace tandem::replication {
namespace {

// A hello carries the whole generation history a volume keeps: its limit is the superblock's.
constexpr std::size_t kGenerationsMax = engine::Superblock::kGenerationsMax;

class Writer {
 public:
  void u8(std::uint8_t v) { out_.push_back(static_cast<std::byte>(v)); }
  void u16(std::uint16_t v) { put(v, 2); }
  void u32(std::uint32_t v) { put(v, 4); }
  void u64(std::uint64_t v) { put(v, 8); }
  void str(const std::string& s) {
    TANDEM_ASSERT(s.size() <= 0xffff);
    u16(static_cast<std::uint16_t>(s.size()));
    for (char c : s) out_.push_back(static_cast<std::byte>(c));
  }
  void gens(const std::vector<std::uint64_t>& g) {
    TANDEM_ASSERT(g.size() <= kGenerationsMax);
    u8(static_cast<std::uint8_t>(g.size()));
    for (auto x : g) u64(x);
  }
  std::vector<std::byte> take() { return std::move(out_); }

 private:
  void put(std::uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(static_cast<std::byte>(v >> (8 * i)));
  }
  std::vector<std::byte> out_;
};

class Reader {
 public:
  explicit Reader(std::span<const std::byte> p) : p_(p) {}
  bool u8(std::uint8_t& v) { return get(v, 1); }
  bool u16(std::uint16_t& v) { return get(v, 2); }
  bool u32(std::uint32_t& v) { return get(v, 4); }
  bool u64(std::uint64_t& v) { return get(v, 8); }
  bool boolean(bool& b) {
    std::uint8_t v = 0;
    if (!u8(v) || v > 1) return false;
    b = v == 1;
    return true;
  }
  bool str(std::string& s, std::size_t max) {
    std::uint16_t n = 0;
    if (!u16(n) || n > max || n > p_.size() - at_) return false;
    s.assign(reinterpret_cast<const char*>(p_.data() + at_), n);
    at_ += n;
    return true;
  }
  bool gens(std::vector<std::uint64_t>& g) {
    std::uint8_t n = 0;
    if (!u8(n) || n > kGenerationsMax) return false;
    g.resize(n);
    for (auto& x : g) {
      if (!u64(x)) return false;
    }
    return true;
  }
  std::span<const std::byte> rest() const { return p_.subspan(at_); }
  bool done() const { return at_ == p_.size(); }

 private:
  template <typename T>
  bool get(T& v, std::size_t n) {
    if (p_.size() - at_ < n) return false;
    std::uint64_t x = 0;
    for (std::size_t i = 0; i < n; ++i) x |= std::uint64_t{std::to_integer<std::uint8_t>(p_[at_ + i])} << (8 * i);
    v = static_cast<T>(x);
    at_ += n;
    return true;
  }
  std::span<const std::byte> p_;
  std::size_t at_ = 0;
};

Error bad(const char* what) { return Error(errc::bad_message, std::string("malformed ") + what); }

bool valid_id(const std::string& s) { return !s.empty() && s.size() <= kIdBytesMax; }

}  // namespace

std::vector<std::byte> encode(const SessionHello& m) {
  Writer w;
  w.str(m.session_id);
  w.u8(static_cast<std::uint8_t>(m.role));
  TANDEM_ASSERT(m.members.size() <= kMembersMax);
  w.u8(static_cast<std::uint8_t>(m.members.size()));
  for (const auto& mem : m.members) {
    w.str(mem.volume_id);
    w.u64(mem.size_bytes);
  }
  w.gens(m.generations);
  w.u8(m.paired ? 1 : 0);
  w.u8(m.blank ? 1 : 0);
  w.u64(m.committed_cycle);
  w.u64(m.staged_cycle);
  w.u64(m.staged_offset);
  w.u8(static_cast<std::uint8_t>(m.initial));
  w.u64(m.initial_offset);
  w.u8(m.paused ? 1 : 0);
  w.u8(m.phase);
  w.u64(m.failover_gen);
  w.u8(m.initial_compare ? 1 : 0);
  return w.take();
}

Result<SessionHello> decode_session_hello(std::span<const std::byte> p) {
  Reader r(p);
  SessionHello m;
  std::uint8_t role = 0, n = 0, initial = 0;
  if (!r.str(m.session_id, kIdBytesMax) || !valid_id(m.session_id) || !r.u8(role) || (role != 1 && role != 2) ||
      !r.u8(n) || n == 0 || n > kMembersMax) {
    return bad("session hello");
  }
  m.role = static_cast<Role>(role);
  m.members.resize(n);
  for (auto& mem : m.members) {
    if (!r.str(mem.volume_id, kIdBytesMax) || !valid_id(mem.volume_id) || !r.u64(mem.size_bytes) ||
        mem.size_bytes == 0 || mem.size_bytes % 4096 != 0) {
      return bad("session hello member");
    }
  }
  if (!r.gens(m.generations) || !r.boolean(m.paired) || !r.boolean(m.blank) || !r.u64(m.committed_cycle) ||
      !r.u64(m.staged_cycle) || !r.u64(m.staged_offset) || !r.u8(initial) || initial > 2 || !r.u64(m.initial_offset) ||
      !r.boolean(m.paused) || !r.u8(m.phase) || m.phase > 4 || !r.u64(m.failover_gen) ||
      !r.boolean(m.initial_compare) || !r.done()) {
    return bad("session hello");
  }
  m.initial = static_cast<InitialState>(initial);
  return m;
}

std::vector<std::byte> encode(const SyncBegin& m) {
  Writer w;
  w.str(m.session_id);
  w.u8(static_cast<std::uint8_t>(m.mode));
  w.u64(m.cycle);
  w.u64(m.frozen_blocks);
  w.u64(m.start_offset);
  w.u64(m.window_bytes);
  w.gens(m.generations);
  return w.take();
}

Result<SyncBegin> decode_sync_begin(std::span<const std::byte> p) {
  Reader r(p);
  SyncBegin m;
  std::uint8_t mode = 0;
  if (!r.str(m.session_id, kIdBytesMax) || !valid_id(m.session_id) || !r.u8(mode) || mode > 2 || !r.u64(m.cycle) ||
      !r.u64(m.frozen_blocks) || !r.u64(m.start_offset) || m.start_offset % 4096 != 0 || !r.u64(m.window_bytes) ||
      m.window_bytes < (1u << 20) || !r.gens(m.generations) || !r.done()) {
    return bad("sync begin");
  }
  m.mode = static_cast<TransferMode>(mode);
  return m;
}

std::vector<std::byte> encode_extent_header(const Extent& m) {
  Writer w;
  w.str(m.session_id);
  w.u64(m.cycle);
  w.u64(m.offset);
  w.u32(m.length);
  w.u8(m.zero ? 1 : 0);
  w.u64(m.hash);
  return w.take();
}

Result<Extent> decode_extent(std::span<const std::byte> p) {
  Reader r(p);
  Extent m;
  if (!r.str(m.session_id, kIdBytesMax) || !valid_id(m.session_id) || !r.u64(m.cycle) || !r.u64(m.offset) ||
      !r.u32(m.length) || !r.boolean(m.zero) || !r.u64(m.hash)) {
    return bad("extent");
  }
  if (m.length == 0 || m.length % 4096 != 0 || m.offset % 4096 != 0 || m.length > kExtentBytesMax) {
    return bad("extent (length or offset)");
  }
  m.data = r.rest();
  if (m.zero ? !m.data.empty() : m.data.size() != m.length) return bad("extent (data size)");
  return m;
}

std::vector<std::byte> encode(const ExtentHash& m) {
  Writer w;
  w.str(m.session_id);
  w.u64(m.offset);
  w.u32(m.length);
  w.u64(m.hash);
  return w.take();
}

Result<ExtentHash> decode_extent_hash(std::span<const std::byte> p) {
  Reader r(p);
  ExtentHash m;
  if (!r.str(m.session_id, kIdBytesMax) || !valid_id(m.session_id) || !r.u64(m.offset) || !r.u32(m.length) ||
      !r.u64(m.hash) || !r.done() || m.length == 0 || m.length % 4096 != 0 || m.offset % 4096 != 0 ||
      m.length > kExtentBytesMax) {
    return bad("extent hash");
  }
  return m;
}

std::vector<std::byte> encode(const HashResult& m) {
  Writer w;
  w.str(m.session_id);
  w.u64(m.offset);
  w.u32(m.length);
  w.u8(m.match ? 1 : 0);
  return w.take();
}

Result<HashResult> decode_hash_result(std::span<const std::byte> p) {
  Reader r(p);
  HashResult m;
  if (!r.str(m.session_id, kIdBytesMax) || !valid_id(m.session_id) || !r.u64(m.offset) || !r.u32(m.length) ||
      !r.boolean(m.match) || !r.done() || m.length == 0 || m.length % 4096 != 0 || m.length > kExtentBytesMax) {
    return bad("hash result");
  }
  return m;
}

std::vector<std::byte> encode(const Ack& m) {
  Writer w;
  w.str(m.session_id);
  w.u64(m.cycle);
  w.u64(m.durable_offset);
  return w.take();
}

Result<Ack> decode_ack(std::span<const std::byte> p) {
  Reader r(p);
  Ack m;
  if (!r.str(m.session_id, kIdBytesMax) || !valid_id(m.session_id) || !r.u64(m.cycle) || !r.u64(m.durable_offset) ||
      !r.done()) {
    return bad("ack");
  }
  return m;
}

std::vector<std::byte> encode(const CycleEnd& m) {
  Writer w;
  w.str(m.session_id);
  w.u64(m.cycle);
  w.u64(m.end_offset);
  w.gens(m.generations);
  return w.take();
}

Result<CycleEnd> decode_cycle_end(std::span<const std::byte> p) {
  Reader r(p);
  CycleEnd m;
  if (!r.str(m.session_id, kIdBytesMax) || !valid_id(m.session_id) || !r.u64(m.cycle) || !r.u64(m.end_offset) ||
      !r.gens(m.generations) || !r.done()) {
    return bad("cycle end");
  }
  return m;
}

std::vector<std::byte> encode(const Committed& m) {
  Writer w;
  w.str(m.session_id);
  w.u64(m.cycle);
  return w.take();
}

Result<Committed> decode_committed(std::span<const std::byte> p) {
  Reader r(p);
  Committed m;
  if (!r.str(m.session_id, kIdBytesMax) || !valid_id(m.session_id) || !r.u64(m.cycle) || !r.done()) {
    return bad("committed");
  }
  return m;
}

std::vector<std::byte> encode(const Refuse& m) {
  Writer w;
  w.str(m.session_id);
  w.u16(m.code);
  w.str(m.message.substr(0, kMessageTextMax));
  return w.take();
}

Result<Refuse> decode_refuse(std::span<const std::byte> p) {
  Reader r(p);
  Refuse m;
  if (!r.str(m.session_id, kIdBytesMax) || !valid_id(m.session_id) || !r.u16(m.code) ||
      !r.str(m.message, kMessageTextMax) || !r.done()) {
    return bad("refuse");
  }
  return m;
}

std::vector<std::byte> encode(const Control& m) {
  Writer w;
  w.str(m.session_id);
  w.u64(m.request_id);
  w.u8(static_cast<std::uint8_t>(m.op));
  w.u8(m.resume_to_sync ? 1 : 0);
  w.u64(m.value);
  return w.take();
}

Result<Control> decode_control(std::span<const std::byte> p) {
  Reader r(p);
  Control m;
  std::uint8_t op = 0;
  if (!r.str(m.session_id, kIdBytesMax) || !valid_id(m.session_id) || !r.u64(m.request_id) || !r.u8(op) || op == 0 ||
      op > kControlOpMax || !r.boolean(m.resume_to_sync) || !r.u64(m.value) || !r.done()) {
    return bad("control");
  }
  m.op = static_cast<ControlOp>(op);
  return m;
}

std::vector<std::byte> encode(const ControlReply& m) {
  Writer w;
  w.str(m.session_id);
  w.u64(m.request_id);
  w.u8(m.ok ? 1 : 0);
  w.u64(m.restart_offset);
  w.str(m.message.substr(0, kMessageTextMax));
  w.u64(m.value);
  return w.take();
}

Result<ControlReply> decode_control_reply(std::span<const std::byte> p) {
  Reader r(p);
  ControlReply m;
  if (!r.str(m.session_id, kIdBytesMax) || !valid_id(m.session_id) || !r.u64(m.request_id) || !r.boolean(m.ok) ||
      !r.u64(m.restart_offset) || !r.str(m.message, kMessageTextMax) || !r.u64(m.value) || !r.done()) {
    return bad("control reply");
  }
  return m;
}

std::vector<std::byte> encode(const ChangedBlocks& m) {
  Writer w;
  w.str(m.session_id);
  w.u8(m.member);
  TANDEM_ASSERT(m.runs.size() <= kRunsPerMessageMax);
  w.u16(static_cast<std::uint16_t>(m.runs.size()));
  for (const auto& r : m.runs) {
    w.u64(r.first_block);
    w.u32(r.blocks);
  }
  return w.take();
}

Result<ChangedBlocks> decode_changed_blocks(std::span<const std::byte> p) {
  Reader r(p);
  ChangedBlocks m;
  std::uint16_t n = 0;
  if (!r.str(m.session_id, kIdBytesMax) || !valid_id(m.session_id) || !r.u8(m.member) || m.member >= kMembersMax ||
      !r.u16(n) || n > kRunsPerMessageMax) {
    return bad("changed blocks");
  }
  m.runs.resize(n);
  std::uint64_t end = 0;
  for (auto& run : m.runs) {
    // Ascending, non-empty, not overlapping, and no run past 2^52 blocks (a 16 EiB volume).
    if (!r.u64(run.first_block) || !r.u32(run.blocks) || run.blocks == 0 || run.first_block < end ||
        run.first_block > (1ull << 52)) {
      return bad("changed blocks run");
    }
    end = run.first_block + run.blocks;
  }
  if (!r.done()) return bad("changed blocks");
  return m;
}

}  // namespace tandem::replication

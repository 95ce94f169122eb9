// Replication messages: the payloads of transport frames of types 16 and up. Sans-IO codecs
// with strict bounds, so a hostile peer can neither crash the decoder nor make it allocate
// without limit. The grammar is in docs/wire-protocol.md ("Replication messages").
//
// Offsets in a session are global: member i's byte b is at (sum of sizes of members < i) + b,
// so one restart address {cycle, offset} covers a consistency group.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "tandem/common/result.h"

namespace tandem::replication {

enum class MsgType : std::uint16_t {
  session_hello = 16,   // both ways, once per session after the link is up
  sync_begin = 17,      // source → destination: a transfer (initial sync or cycle) starts
  extent = 18,          // source → destination: data (or a zero run) at an offset
  extent_hash = 19,     // source → destination: compare mode, "do you have this?"
  hash_result = 20,     // destination → source: compare mode answer
  ack = 21,             // destination → source: durable up to this offset
  cycle_end = 22,       // source → destination: everything of the transfer was sent
  committed = 23,       // destination → source: the transfer is committed
  refuse = 24,          // either way: the session cannot proceed (split brain, unrelated…)
  control = 25,         // either way: an operator's action that needs both sites (pause, resume)
  control_reply = 26,   // the answer to a control request
  changed_blocks = 27,  // destination → source, reprotect: runs of blocks this side changed
};

inline constexpr std::size_t kIdBytesMax = 64;
inline constexpr std::size_t kMembersMax = 16;
inline constexpr std::uint32_t kExtentBytesMax = 1 << 20;  // one extent's data
inline constexpr std::size_t kMessageTextMax = 512;

enum class Role : std::uint8_t { source = 1, destination = 2 };
enum class TransferMode : std::uint8_t { initial_full = 0, initial_compare = 1, cycle = 2 };
enum class InitialState : std::uint8_t { none = 0, running = 1, done = 2 };

struct MemberInfo {
  std::string volume_id;
  std::uint64_t size_bytes = 0;
  bool operator==(const MemberInfo&) const = default;
};

struct SessionHello {
  std::string session_id;
  Role role = Role::source;
  std::vector<MemberInfo> members;
  std::vector<std::uint64_t> generations;
  bool paired = false;
  bool blank = false;  // destination: holds nothing worth comparing
  std::uint64_t committed_cycle = 0;
  std::uint64_t staged_cycle = 0;   // destination: the cycle its journal holds (0 = none)
  std::uint64_t staged_offset = 0;  // destination: restart address within it
  InitialState initial = InitialState::none;
  std::uint64_t initial_offset = 0;  // destination: restart address of the initial sync
  bool paused = false;               // an operator paused the session on this site
  std::uint8_t phase = 0;            // SessionState::phase (failover progress)
  std::uint64_t failover_gen = 0;    // the shared generation at the failover, when phase != 0
  bool initial_compare = false;      // destination: its running initial sync compares hashes
  bool operator==(const SessionHello&) const = default;
};

struct SyncBegin {
  std::string session_id;
  TransferMode mode = TransferMode::cycle;
  std::uint64_t cycle = 0;
  std::uint64_t frozen_blocks = 0;  // sizes the destination's journal
  std::uint64_t start_offset = 0;
  std::uint64_t window_bytes = 0;  // the source's window: the destination acknowledges well within it
  std::vector<std::uint64_t> generations;
  bool operator==(const SyncBegin&) const = default;
};

struct Extent {
  std::string session_id;
  std::uint64_t cycle = 0;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
  bool zero = false;
  std::uint64_t hash = 0;           // xxh3 of the data (zero extents: 0)
  std::span<const std::byte> data;  // decode: points into the frame payload
};

struct ExtentHash {
  std::string session_id;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
  std::uint64_t hash = 0;
  bool operator==(const ExtentHash&) const = default;
};

struct HashResult {
  std::string session_id;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
  bool match = false;
  bool operator==(const HashResult&) const = default;
};

struct Ack {
  std::string session_id;
  std::uint64_t cycle = 0;
  std::uint64_t durable_offset = 0;
  bool operator==(const Ack&) const = default;
};

struct CycleEnd {
  std::string session_id;
  std::uint64_t cycle = 0;
  std::uint64_t end_offset = 0;  // the transfer covered [start, end)
  std::vector<std::uint64_t> generations;
  bool operator==(const CycleEnd&) const = default;
};

struct Committed {
  std::string session_id;
  std::uint64_t cycle = 0;
  bool operator==(const Committed&) const = default;
};

struct Refuse {
  std::string session_id;
  std::uint16_t code = 0;
  std::string message;
  bool operator==(const Refuse&) const = default;
};

enum class ControlOp : std::uint8_t {
  pause = 1,
  resume = 2,
  failover = 3,          // source → destination, everything committed: take over (value 1: reverse)
  reprotect = 4,         // new source → new destination: send the blocks you changed
  reprotect_commit = 5,  // new source → new destination: they are safe here, forget them
  going_down = 6,        // either way: shutting down for maintenance, back soon (answered once handled)
  failover_check = 7,    // source → destination, before accepting a planned failover: could you take over?
};
inline constexpr std::uint8_t kControlOpMax = 7;

struct Control {
  std::string session_id;
  std::uint64_t request_id = 0;
  ControlOp op = ControlOp::pause;
  bool resume_to_sync = false;  // pause: a synchronization was interrupted (resume goes on with it)
  std::uint64_t value = 0;      // failover: 1 = reverse
  bool operator==(const Control&) const = default;
};

struct ControlReply {
  std::string session_id;
  std::uint64_t request_id = 0;
  bool ok = false;
  std::uint64_t restart_offset = 0;  // pause, answered by a destination: durable up to here
  std::string message;               // why not, when !ok
  std::uint64_t value = 0;           // failover: the new source's generation
  bool operator==(const ControlReply&) const = default;
};

struct BlockRun {
  std::uint64_t first_block = 0;
  std::uint32_t blocks = 0;
  bool operator==(const BlockRun&) const = default;
};
inline constexpr std::size_t kRunsPerMessageMax = 4096;

struct ChangedBlocks {
  std::string session_id;
  std::uint8_t member = 0;
  std::vector<BlockRun> runs;  // ascending, within the member volume
  bool operator==(const ChangedBlocks&) const = default;
};

std::vector<std::byte> encode(const SessionHello& m);
std::vector<std::byte> encode(const SyncBegin& m);
// Encodes the extent header only; the data follows it in the same frame (sent as a second
// buffer, so no copy). encoded_extent_header_bytes() tells the split.
std::vector<std::byte> encode_extent_header(const Extent& m);
std::vector<std::byte> encode(const ExtentHash& m);
std::vector<std::byte> encode(const HashResult& m);
std::vector<std::byte> encode(const Ack& m);
std::vector<std::byte> encode(const CycleEnd& m);
std::vector<std::byte> encode(const Committed& m);
std::vector<std::byte> encode(const Refuse& m);
std::vector<std::byte> encode(const Control& m);
std::vector<std::byte> encode(const ControlReply& m);
std::vector<std::byte> encode(const ChangedBlocks& m);

Result<SessionHello> decode_session_hello(std::span<const std::byte> p);
Result<SyncBegin> decode_sync_begin(std::span<const std::byte> p);
Result<Extent> decode_extent(std::span<const std::byte> p);
Result<ExtentHash> decode_extent_hash(std::span<const std::byte> p);
Result<HashResult> decode_hash_result(std::span<const std::byte> p);
Result<Ack> decode_ack(std::span<const std::byte> p);
Result<CycleEnd> decode_cycle_end(std::span<const std::byte> p);
Result<Committed> decode_committed(std::span<const std::byte> p);
Result<Refuse> decode_refuse(std::span<const std::byte> p);
Result<Control> decode_control(std::span<const std::byte> p);
Result<ControlReply> decode_control_reply(std::span<const std::byte> p);
Result<ChangedBlocks> decode_changed_blocks(std::span<const std::byte> p);

}  // namespace tandem::replication

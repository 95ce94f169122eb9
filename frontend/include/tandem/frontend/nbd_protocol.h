// The NBD wire protocol without any I/O: constants, the fixed-newstyle handshake as a state
// machine, the transmission request decoder and validator, and reply encoders.
//
// Nothing here touches a socket, a clock or a volume, so every parser of untrusted bytes can be
// driven byte by byte from tests and fuzzers (tests/fuzz/nbd_fuzz.cpp). The server
// (nbd_server.cpp) reads exactly `Handshake::bytes_wanted()` bytes at a time, feeds them, and
// sends whatever `take_output()` returns; after the handshake it decodes 28-byte request headers
// with decode_request() and asks check_request() what to do with each.
//
// Facts follow the NBD protocol document (NetworkBlockDevice/nbd doc/proto.md); docs/nbd.md says
// which parts tandem implements. All integers on the wire are big-endian.
//
// Threading: plain values; a Handshake belongs to one connection and is not thread-safe.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace tandem::frontend::nbd {

// --- Magic numbers ---------------------------------------------------------------------------
inline constexpr std::uint64_t kNbdMagic = 0x4e42444d41474943;  // "NBDMAGIC"
inline constexpr std::uint64_t kOptMagic = 0x49484156454F5054;  // "IHAVEOPT"
inline constexpr std::uint64_t kOptReplyMagic = 0x0003e889045565a9;
inline constexpr std::uint32_t kRequestMagic = 0x25609513;
inline constexpr std::uint32_t kSimpleReplyMagic = 0x67446698;
inline constexpr std::uint32_t kStructuredReplyMagic = 0x668e33ef;

// --- Handshake flags (server) and client flags ------------------------------------------------
inline constexpr std::uint16_t kFlagFixedNewstyle = 1u << 0;
inline constexpr std::uint16_t kFlagNoZeroes = 1u << 1;
inline constexpr std::uint32_t kClientFlagFixedNewstyle = 1u << 0;
inline constexpr std::uint32_t kClientFlagNoZeroes = 1u << 1;

// --- Transmission flags -----------------------------------------------------------------------
inline constexpr std::uint16_t kTxHasFlags = 1u << 0;
inline constexpr std::uint16_t kTxReadOnly = 1u << 1;
inline constexpr std::uint16_t kTxSendFlush = 1u << 2;
inline constexpr std::uint16_t kTxSendFua = 1u << 3;
inline constexpr std::uint16_t kTxRotational = 1u << 4;
inline constexpr std::uint16_t kTxSendTrim = 1u << 5;
inline constexpr std::uint16_t kTxSendWriteZeroes = 1u << 6;
inline constexpr std::uint16_t kTxSendDf = 1u << 7;
inline constexpr std::uint16_t kTxCanMultiConn = 1u << 8;
inline constexpr std::uint16_t kTxSendCache = 1u << 10;
inline constexpr std::uint16_t kTxSendFastZero = 1u << 11;

// --- Options (client → server during the handshake) -------------------------------------------
inline constexpr std::uint32_t kOptExportName = 1;
inline constexpr std::uint32_t kOptAbort = 2;
inline constexpr std::uint32_t kOptList = 3;
inline constexpr std::uint32_t kOptStartTls = 5;
inline constexpr std::uint32_t kOptInfo = 6;
inline constexpr std::uint32_t kOptGo = 7;
inline constexpr std::uint32_t kOptStructuredReply = 8;
inline constexpr std::uint32_t kOptListMetaContext = 9;
inline constexpr std::uint32_t kOptSetMetaContext = 10;

// --- Option reply types -----------------------------------------------------------------------
inline constexpr std::uint32_t kRepAck = 1;
inline constexpr std::uint32_t kRepServer = 2;
inline constexpr std::uint32_t kRepInfo = 3;
inline constexpr std::uint32_t kRepErrBit = 1u << 31;
inline constexpr std::uint32_t kRepErrUnsup = kRepErrBit | 1;
inline constexpr std::uint32_t kRepErrPolicy = kRepErrBit | 2;
inline constexpr std::uint32_t kRepErrInvalid = kRepErrBit | 3;
inline constexpr std::uint32_t kRepErrPlatform = kRepErrBit | 4;
inline constexpr std::uint32_t kRepErrTlsReqd = kRepErrBit | 5;
inline constexpr std::uint32_t kRepErrUnknown = kRepErrBit | 6;
inline constexpr std::uint32_t kRepErrShutdown = kRepErrBit | 7;
inline constexpr std::uint32_t kRepErrBlockSizeReqd = kRepErrBit | 8;
inline constexpr std::uint32_t kRepErrTooBig = kRepErrBit | 9;

// --- NBD_REP_INFO types (NBD_OPT_INFO / NBD_OPT_GO) -------------------------------------------
inline constexpr std::uint16_t kInfoExport = 0;
inline constexpr std::uint16_t kInfoName = 1;
inline constexpr std::uint16_t kInfoDescription = 2;
inline constexpr std::uint16_t kInfoBlockSize = 3;

// --- Commands and command flags ---------------------------------------------------------------
inline constexpr std::uint16_t kCmdRead = 0;
inline constexpr std::uint16_t kCmdWrite = 1;
inline constexpr std::uint16_t kCmdDisc = 2;
inline constexpr std::uint16_t kCmdFlush = 3;
inline constexpr std::uint16_t kCmdTrim = 4;
inline constexpr std::uint16_t kCmdCache = 5;
inline constexpr std::uint16_t kCmdWriteZeroes = 6;
inline constexpr std::uint16_t kCmdBlockStatus = 7;

inline constexpr std::uint16_t kCmdFlagFua = 1u << 0;
inline constexpr std::uint16_t kCmdFlagNoHole = 1u << 1;
inline constexpr std::uint16_t kCmdFlagDf = 1u << 2;
inline constexpr std::uint16_t kCmdFlagReqOne = 1u << 3;
inline constexpr std::uint16_t kCmdFlagFastZero = 1u << 4;

// --- Structured replies -----------------------------------------------------------------------
inline constexpr std::uint16_t kReplyFlagDone = 1u << 0;
inline constexpr std::uint16_t kReplyTypeNone = 0;
inline constexpr std::uint16_t kReplyTypeOffsetData = 1;
inline constexpr std::uint16_t kReplyTypeError = (1u << 15) | 1;

// --- Error values in replies (fixed by the protocol, not the host's errno) --------------------
inline constexpr std::uint32_t kEperm = 1;
inline constexpr std::uint32_t kEio = 5;
inline constexpr std::uint32_t kEnomem = 12;
inline constexpr std::uint32_t kEinval = 22;
inline constexpr std::uint32_t kEnospc = 28;
inline constexpr std::uint32_t kEoverflow = 75;
inline constexpr std::uint32_t kEnotsup = 95;
inline constexpr std::uint32_t kEshutdown = 108;

// --- Sizes ------------------------------------------------------------------------------------
inline constexpr std::size_t kGreetingBytes = 18;           // NBDMAGIC, IHAVEOPT, flags
inline constexpr std::size_t kOptionHeaderBytes = 16;       // IHAVEOPT, option, length
inline constexpr std::size_t kOptionReplyHeaderBytes = 20;  // magic, option, type, length
inline constexpr std::size_t kExportNameReplyBytes = 134;   // size, flags, 124 zero bytes
inline constexpr std::size_t kRequestHeaderBytes = 28;
inline constexpr std::size_t kSimpleReplyBytes = 16;
inline constexpr std::size_t kChunkHeaderBytes = 20;
inline constexpr std::size_t kOffsetDataPrefixBytes = kChunkHeaderBytes + 8;
// The protocol's limit on any string (export names, error messages).
inline constexpr std::size_t kStringBytesMax = 4096;

// The transmission flags tandem advertises for a volume.
std::uint16_t transmission_flags(bool writable);

// Names for log lines ("NBD_OPT_GO", "NBD_CMD_WRITE", "option 42").
std::string option_name(std::uint32_t option);
std::string command_name(std::uint16_t type);

// ================================ Handshake ===================================================

// What the handshake knows about one export. The server builds these from its volumes when a
// connection starts.
struct NbdExport {
  std::string name;
  std::string description;
  std::uint64_t size_bytes = 0;
  std::uint16_t transmission_flags = 0;
};

struct HandshakeLimits {
  // Option data is buffered whole before it is parsed. Every option tandem understands fits in
  // 4 + 4096 (longest name) + 2 + 2 * a few info requests; 64 KiB leaves room for clients that
  // send long INFO request lists. Longer options are skipped without buffering and answered
  // with NBD_REP_ERR_TOO_BIG (or the connection closes, for NBD_OPT_EXPORT_NAME).
  std::uint32_t option_bytes_max = 64 * 1024;
  // Options per connection. Real clients send fewer than ten; a client that keeps sending
  // options forever is dropped instead of holding a connection slot.
  std::uint32_t options_max = 1024;
  // Advertised in NBD_INFO_BLOCK_SIZE as the maximum payload. Must be at least 1.
  std::uint32_t payload_bytes_max = 32 * 1024 * 1024;
};

enum class HandshakeOutcome {
  negotiating,  // feed more bytes
  go,           // send the output, then enter transmission with chosen()
  abort,        // the client sent NBD_OPT_ABORT: send the output (the ACK), then close
  close,        // the client broke the protocol or chose an unknown export: close; see reason()
};

// The server side of the fixed-newstyle handshake. Construct it, send take_output() (the
// greeting), then repeatedly read bytes_wanted() bytes, feed() them and send take_output(),
// until outcome() is no longer `negotiating`.
//
// Memory is bounded: at most option_bytes_max bytes of input are buffered, and each option
// produces a bounded reply (at most one NBD_REP_SERVER per export for NBD_OPT_LIST).
class Handshake {
 public:
  Handshake(std::vector<NbdExport> exports, HandshakeLimits limits = {});

  // Bytes to send to the client, in order. Empty when there is nothing to send.
  std::vector<std::uint8_t> take_output();
  [[nodiscard]] bool has_output() const { return !out_.empty(); }

  // How many bytes the machine needs to make progress; 0 once outcome() is decided. Reading
  // exactly this many (or fewer) bytes never reads past the end of the handshake, so the first
  // transmission request stays in the socket for the request reader.
  [[nodiscard]] std::size_t bytes_wanted() const;
  // Consumes a prefix of `in` and returns its length. Stops consuming at a decision; until
  // then it consumes everything it is given.
  std::size_t feed(std::span<const std::uint8_t> in);

  [[nodiscard]] HandshakeOutcome outcome() const { return outcome_; }
  // Why the handshake closed or aborted, for the log.
  [[nodiscard]] const std::string& reason() const { return reason_; }
  // The export chosen by NBD_OPT_GO or NBD_OPT_EXPORT_NAME (valid once outcome() == go).
  [[nodiscard]] const NbdExport& chosen() const;
  [[nodiscard]] bool structured_replies() const { return structured_; }
  [[nodiscard]] bool fixed_newstyle() const { return fixed_; }
  [[nodiscard]] bool no_zeroes() const { return no_zeroes_; }

 private:
  enum class Phase { client_flags, option_header, option_data, option_skip, done };

  const NbdExport* find(std::string_view name) const;
  void on_client_flags();
  void on_option_header();
  void on_option();
  void on_export_name();
  void on_info_or_go();
  void decide(HandshakeOutcome o, std::string reason);
  void reply(std::uint32_t type, std::span<const std::uint8_t> data = {});
  void reply_error(std::uint32_t type, std::string_view message);

  std::vector<NbdExport> exports_;
  HandshakeLimits limits_;
  Phase phase_ = Phase::client_flags;
  HandshakeOutcome outcome_ = HandshakeOutcome::negotiating;
  std::string reason_;
  std::size_t chosen_ = 0;
  // The fixed-size field being assembled (client flags or an option header).
  std::array<std::uint8_t, kOptionHeaderBytes> field_{};
  std::size_t field_have_ = 0;
  std::uint32_t option_ = 0;
  std::uint32_t option_len_ = 0;
  std::vector<std::uint8_t> data_;  // option data, at most limits_.option_bytes_max bytes
  std::uint64_t skip_left_ = 0;
  std::uint32_t options_seen_ = 0;
  bool fixed_ = false;
  bool no_zeroes_ = false;
  bool structured_ = false;
  std::vector<std::uint8_t> out_;
};

// ================================ Transmission ================================================

struct Request {
  std::uint16_t flags = 0;
  std::uint16_t type = 0;
  std::uint64_t handle = 0;
  std::uint64_t offset = 0;
  std::uint32_t length = 0;
};

// Decodes a request header; nullopt when the magic is wrong (the stream is out of sync and the
// connection must close).
std::optional<Request> decode_request(std::span<const std::uint8_t, kRequestHeaderBytes> in);
// The inverse, for clients and tests.
void encode_request(const Request& r, std::span<std::uint8_t, kRequestHeaderBytes> out);

// What the validator needs to know about the export right now.
struct ExportState {
  std::uint64_t size_bytes = 0;
  bool writable = false;
  bool shutting_down = false;
  std::uint32_t payload_bytes_max = 0;
};

enum class Verdict {
  execute,     // run it against the volume
  error,       // reply with `error` without touching the volume
  disconnect,  // NBD_CMD_DISC: finish what is in flight, then close
  close,       // cannot continue in sync (e.g. an oversized WRITE payload): close now
};

struct RequestCheck {
  Verdict verdict = Verdict::execute;
  std::uint32_t error = 0;          // protocol errno, for Verdict::error
  std::uint32_t payload_bytes = 0;  // WRITE data following the header; read it even when refused
  std::string_view reason;          // for error messages and the log (static storage)
};

// Validates a decoded request against the export: command type, flags valid for that
// command, lengths, bounds, writability and shutdown. Never touches the volume.
RequestCheck check_request(const Request& r, const ExportState& s);

// --- Reply encoders ---------------------------------------------------------------------------
void encode_simple_reply(std::span<std::uint8_t, kSimpleReplyBytes> out, std::uint32_t error, std::uint64_t handle);
void encode_chunk_header(std::span<std::uint8_t, kChunkHeaderBytes> out, std::uint16_t flags, std::uint16_t type,
                         std::uint64_t handle, std::uint32_t length);
// Chunk header plus the 8-byte offset of an NBD_REPLY_TYPE_OFFSET_DATA chunk (DONE set) that
// carries `data_bytes` of data after it.
void encode_offset_data_prefix(std::span<std::uint8_t, kOffsetDataPrefixBytes> out, std::uint64_t handle,
                               std::uint64_t offset, std::uint32_t data_bytes);
// A complete NBD_REPLY_TYPE_ERROR chunk with DONE set; the message is cut to kStringBytesMax.
std::vector<std::uint8_t> encode_error_chunk(std::uint64_t handle, std::uint32_t error, std::string_view message);

// Maps an engine (or OS) error to the protocol errno a client sees: out_of_range → EINVAL,
// no_space → ENOSPC, read_only / volume_failed → EPERM, shutting_down → ESHUTDOWN,
// not_supported → ENOTSUP; ENOSPC/EDQUOT/EFBIG from the OS → ENOSPC; anything else → EIO.
std::uint32_t nbd_error_from(std::error_code ec);

}  // namespace tandem::frontend::nbd

#include "tandem/frontend/nbd_protocol.h"

#include <algorithm>
#include <bit>
#include <cerrno>

#include "tandem/common/assert.h"
#include "tandem/common/units.h"
#include "tandem/engine/errc.h"

namespace tandem::frontend::nbd {
namespace {

// Preferred block size advertised in NBD_INFO_BLOCK_SIZE: the volume's block, so aligned
// requests avoid the engine's read-modify-write.
constexpr std::uint32_t kPreferredBlockBytes = 4096;

void append_be16(std::vector<std::uint8_t>& v, std::uint16_t x) {
  std::uint8_t b[2];
  put_be16(b, x);
  v.insert(v.end(), b, b + 2);
}
void append_be32(std::vector<std::uint8_t>& v, std::uint32_t x) {
  std::uint8_t b[4];
  put_be32(b, x);
  v.insert(v.end(), b, b + 4);
}
void append_be64(std::vector<std::uint8_t>& v, std::uint64_t x) {
  std::uint8_t b[8];
  put_be64(b, x);
  v.insert(v.end(), b, b + 8);
}
void append_str(std::vector<std::uint8_t>& v, std::string_view s) { v.insert(v.end(), s.begin(), s.end()); }

// Printable, bounded rendering of a client-chosen name for reasons and messages.
std::string quoted(std::string_view s) {
  constexpr std::size_t kShownMax = 64;
  std::string r = "'";
  for (char c : s.substr(0, kShownMax)) {
    const auto u = static_cast<unsigned char>(c);
    r += (u >= 0x20 && u < 0x7f) ? c : '?';
  }
  if (s.size() > kShownMax) r += "...";
  return r + "'";
}

}  // namespace

std::uint16_t transmission_flags(bool writable) {
  std::uint16_t f = kTxHasFlags | kTxSendFlush | kTxSendFua | kTxSendTrim | kTxSendWriteZeroes | kTxSendFastZero |
                    kTxSendCache | kTxCanMultiConn;
  if (!writable) f |= kTxReadOnly;
  return f;
}

std::string option_name(std::uint32_t option) {
  switch (option) {
    case kOptExportName:
      return "NBD_OPT_EXPORT_NAME";
    case kOptAbort:
      return "NBD_OPT_ABORT";
    case kOptList:
      return "NBD_OPT_LIST";
    case kOptStartTls:
      return "NBD_OPT_STARTTLS";
    case kOptInfo:
      return "NBD_OPT_INFO";
    case kOptGo:
      return "NBD_OPT_GO";
    case kOptStructuredReply:
      return "NBD_OPT_STRUCTURED_REPLY";
    case kOptListMetaContext:
      return "NBD_OPT_LIST_META_CONTEXT";
    case kOptSetMetaContext:
      return "NBD_OPT_SET_META_CONTEXT";
    default:
      return "option " + std::to_string(option);
  }
}

std::string command_name(std::uint16_t type) {
  switch (type) {
    case kCmdRead:
      return "NBD_CMD_READ";
    case kCmdWrite:
      return "NBD_CMD_WRITE";
    case kCmdDisc:
      return "NBD_CMD_DISC";
    case kCmdFlush:
      return "NBD_CMD_FLUSH";
    case kCmdTrim:
      return "NBD_CMD_TRIM";
    case kCmdCache:
      return "NBD_CMD_CACHE";
    case kCmdWriteZeroes:
      return "NBD_CMD_WRITE_ZEROES";
    case kCmdBlockStatus:
      return "NBD_CMD_BLOCK_STATUS";
    default:
      return "command " + std::to_string(type);
  }
}

// ================================ Handshake ===================================================

Handshake::Handshake(std::vector<NbdExport> exports, HandshakeLimits limits)
    : exports_(std::move(exports)), limits_(limits) {
  TANDEM_ASSERT(limits_.payload_bytes_max >= 1);
  TANDEM_ASSERT(limits_.option_bytes_max >= 4 + kStringBytesMax + 2);
  append_be64(out_, kNbdMagic);
  append_be64(out_, kOptMagic);
  append_be16(out_, kFlagFixedNewstyle | kFlagNoZeroes);
  TANDEM_ASSERT(out_.size() == kGreetingBytes);
}

std::vector<std::uint8_t> Handshake::take_output() {
  std::vector<std::uint8_t> o;
  o.swap(out_);
  return o;
}

const NbdExport& Handshake::chosen() const {
  TANDEM_ASSERT(outcome_ == HandshakeOutcome::go);
  TANDEM_ASSERT(chosen_ < exports_.size());
  return exports_[chosen_];
}

std::size_t Handshake::bytes_wanted() const {
  switch (phase_) {
    case Phase::client_flags:
      return 4 - field_have_;
    case Phase::option_header:
      return kOptionHeaderBytes - field_have_;
    case Phase::option_data:
      return option_len_ - data_.size();
    case Phase::option_skip:
      return static_cast<std::size_t>(skip_left_);
    case Phase::done:
      return 0;
  }
  return 0;
}

std::size_t Handshake::feed(std::span<const std::uint8_t> in) {
  std::size_t used = 0;
  while (outcome_ == HandshakeOutcome::negotiating && used < in.size()) {
    const std::size_t avail = in.size() - used;
    const std::uint8_t* p = in.data() + used;
    switch (phase_) {
      case Phase::client_flags:
      case Phase::option_header: {
        const std::size_t need = phase_ == Phase::client_flags ? 4 : kOptionHeaderBytes;
        const std::size_t n = std::min(need - field_have_, avail);
        std::copy(p, p + n, field_.begin() + static_cast<std::ptrdiff_t>(field_have_));
        field_have_ += n;
        used += n;
        if (field_have_ == need) {
          field_have_ = 0;
          if (phase_ == Phase::client_flags) {
            on_client_flags();
          } else {
            on_option_header();
          }
        }
        break;
      }
      case Phase::option_data: {
        const std::size_t n = std::min<std::size_t>(option_len_ - data_.size(), avail);
        data_.insert(data_.end(), p, p + n);
        used += n;
        if (data_.size() == option_len_) on_option();
        break;
      }
      case Phase::option_skip: {
        const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(skip_left_, avail));
        skip_left_ -= n;
        used += n;
        if (skip_left_ == 0) {
          phase_ = Phase::option_header;
          reply_error(kRepErrTooBig, "option data longer than " + std::to_string(limits_.option_bytes_max) + " bytes");
        }
        break;
      }
      case Phase::done:
        TANDEM_ASSERT(false);
    }
  }
  return used;
}

const NbdExport* Handshake::find(std::string_view name) const {
  if (exports_.empty()) return nullptr;
  if (name.empty()) return &exports_.front();  // the default export
  for (const auto& e : exports_) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

void Handshake::decide(HandshakeOutcome o, std::string reason) {
  outcome_ = o;
  reason_ = std::move(reason);
  phase_ = Phase::done;
  data_.clear();
  data_.shrink_to_fit();
}

void Handshake::reply(std::uint32_t type, std::span<const std::uint8_t> data) {
  TANDEM_ASSERT(data.size() <= UINT32_MAX);
  append_be64(out_, kOptReplyMagic);
  append_be32(out_, option_);
  append_be32(out_, type);
  append_be32(out_, static_cast<std::uint32_t>(data.size()));
  out_.insert(out_.end(), data.begin(), data.end());
}

void Handshake::reply_error(std::uint32_t type, std::string_view message) {
  TANDEM_ASSERT((type & kRepErrBit) != 0);
  message = message.substr(0, kStringBytesMax);
  reply(type, {reinterpret_cast<const std::uint8_t*>(message.data()), message.size()});
}

void Handshake::on_client_flags() {
  const std::uint32_t flags = get_be32(field_.data());
  const std::uint32_t known = kClientFlagFixedNewstyle | kClientFlagNoZeroes;
  if ((flags & ~known) != 0) {
    // The protocol requires dropping a client that sets flags it does not know.
    decide(HandshakeOutcome::close, "unknown client flags " + std::to_string(flags));
    return;
  }
  fixed_ = (flags & kClientFlagFixedNewstyle) != 0;
  no_zeroes_ = (flags & kClientFlagNoZeroes) != 0;
  phase_ = Phase::option_header;
}

void Handshake::on_option_header() {
  if (get_be64(field_.data()) != kOptMagic) {
    decide(HandshakeOutcome::close, "bad option magic");
    return;
  }
  option_ = get_be32(field_.data() + 8);
  option_len_ = get_be32(field_.data() + 12);
  if (++options_seen_ > limits_.options_max) {
    decide(HandshakeOutcome::close, "more than " + std::to_string(limits_.options_max) + " options");
    return;
  }
  if (!fixed_ && option_ != kOptExportName) {
    // A client that did not ask for fixed newstyle cannot parse option replies; in plain
    // newstyle the only valid option is EXPORT_NAME and anything else ends the session.
    decide(HandshakeOutcome::close, option_name(option_) + " from a client without fixed newstyle");
    return;
  }
  if (option_len_ > limits_.option_bytes_max) {
    if (option_ == kOptExportName) {
      // EXPORT_NAME cannot be answered with an error.
      decide(HandshakeOutcome::close, "export name of " + std::to_string(option_len_) + " bytes");
      return;
    }
    phase_ = Phase::option_skip;
    skip_left_ = option_len_;
    return;
  }
  data_.clear();
  if (option_len_ == 0) {
    on_option();
    return;
  }
  data_.reserve(option_len_);
  phase_ = Phase::option_data;
}

void Handshake::on_option() {
  TANDEM_ASSERT(data_.size() == option_len_);
  phase_ = Phase::option_header;
  switch (option_) {
    case kOptExportName:
      on_export_name();
      return;
    case kOptAbort:
      reply(kRepAck);
      decide(HandshakeOutcome::abort, "client aborted the handshake");
      return;
    case kOptList: {
      if (option_len_ != 0) {
        reply_error(kRepErrInvalid, "NBD_OPT_LIST takes no data");
        return;
      }
      for (const auto& e : exports_) {
        std::vector<std::uint8_t> d;
        append_be32(d, static_cast<std::uint32_t>(e.name.size()));
        append_str(d, e.name);
        reply(kRepServer, d);
      }
      reply(kRepAck);
      return;
    }
    case kOptStartTls:
      reply_error(kRepErrPolicy,
                  "TLS is not offered on this export; use a Unix socket or a "
                  "trusted network");
      return;
    case kOptInfo:
    case kOptGo:
      on_info_or_go();
      return;
    case kOptStructuredReply:
      if (option_len_ != 0) {
        reply_error(kRepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data");
        return;
      }
      structured_ = true;
      reply(kRepAck);
      return;
    default:
      reply_error(kRepErrUnsup, option_name(option_) + " is not supported");
      return;
  }
}

void Handshake::on_export_name() {
  const std::string_view name(reinterpret_cast<const char*>(data_.data()), data_.size());
  const NbdExport* e = name.size() <= kStringBytesMax ? find(name) : nullptr;
  if (e == nullptr) {
    // No error reply exists for EXPORT_NAME: the protocol says to end the session.
    decide(HandshakeOutcome::close, "unknown export " + quoted(name));
    return;
  }
  chosen_ = static_cast<std::size_t>(e - exports_.data());
  append_be64(out_, e->size_bytes);
  append_be16(out_, e->transmission_flags);
  if (!no_zeroes_) out_.insert(out_.end(), 124, 0);
  decide(HandshakeOutcome::go, {});
}

void Handshake::on_info_or_go() {
  // Data: u32 name length, name, u16 request count, count × u16 info type.
  const std::size_t len = data_.size();
  if (len < 6) {
    reply_error(kRepErrInvalid, "option data too short");
    return;
  }
  const std::uint32_t name_len = get_be32(data_.data());
  if (name_len > len - 6) {
    reply_error(kRepErrInvalid, "export name length exceeds the option data");
    return;
  }
  const std::string_view name(reinterpret_cast<const char*>(data_.data()) + 4, name_len);
  const std::uint16_t count = get_be16(data_.data() + 4 + name_len);
  if (len != 4 + std::size_t{name_len} + 2 + 2 * std::size_t{count}) {
    reply_error(kRepErrInvalid, "information request count does not match the option length");
    return;
  }
  const NbdExport* e = name_len <= kStringBytesMax ? find(name) : nullptr;
  if (e == nullptr) {
    reply_error(kRepErrUnknown, "no export named " + quoted(name));
    return;
  }
  bool want_name = false;
  bool want_description = false;
  for (std::uint16_t i = 0; i < count; ++i) {
    const std::uint16_t type = get_be16(data_.data() + 4 + name_len + 2 + 2 * std::size_t{i});
    if (type == kInfoName) want_name = true;
    if (type == kInfoDescription) want_description = true;
    // NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE are always sent; unknown types are ignored,
    // as the protocol asks.
  }
  std::vector<std::uint8_t> d;
  append_be16(d, kInfoExport);
  append_be64(d, e->size_bytes);
  append_be16(d, e->transmission_flags);
  reply(kRepInfo, d);
  if (want_name) {
    d.clear();
    append_be16(d, kInfoName);
    append_str(d, std::string_view(e->name).substr(0, kStringBytesMax));
    reply(kRepInfo, d);
  }
  if (want_description) {
    d.clear();
    append_be16(d, kInfoDescription);
    append_str(d, std::string_view(e->description).substr(0, kStringBytesMax));
    reply(kRepInfo, d);
  }
  // Any byte offset and length works (the engine does read-modify-write), so the minimum is 1;
  // the preferred size is the engine's block, capped by the maximum.
  const std::uint32_t max = limits_.payload_bytes_max;
  const std::uint32_t preferred = std::min(kPreferredBlockBytes, std::bit_floor(max));
  d.clear();
  append_be16(d, kInfoBlockSize);
  append_be32(d, 1);
  append_be32(d, preferred);
  append_be32(d, max);
  reply(kRepInfo, d);
  reply(kRepAck);
  if (option_ == kOptGo) {
    chosen_ = static_cast<std::size_t>(e - exports_.data());
    decide(HandshakeOutcome::go, {});
  }
}

// ================================ Transmission ================================================

std::optional<Request> decode_request(std::span<const std::uint8_t, kRequestHeaderBytes> in) {
  const std::uint8_t* p = in.data();
  if (get_be32(p) != kRequestMagic) return std::nullopt;
  Request r;
  r.flags = get_be16(p + 4);
  r.type = get_be16(p + 6);
  r.handle = get_be64(p + 8);
  r.offset = get_be64(p + 16);
  r.length = get_be32(p + 24);
  return r;
}

void encode_request(const Request& r, std::span<std::uint8_t, kRequestHeaderBytes> out) {
  std::uint8_t* p = out.data();
  put_be32(p, kRequestMagic);
  put_be16(p + 4, r.flags);
  put_be16(p + 6, r.type);
  put_be64(p + 8, r.handle);
  put_be64(p + 16, r.offset);
  put_be32(p + 24, r.length);
}

RequestCheck check_request(const Request& r, const ExportState& s) {
  const bool is_write = r.type == kCmdWrite;
  if (is_write && r.length > s.payload_bytes_max) {
    // The payload follows the header; refusing it without reading it would desynchronize
    // the stream, and reading it would let a client make us swallow 4 GiB per request.
    return {Verdict::close, 0, 0, "write payload larger than the maximum block size"};
  }
  const std::uint32_t payload = is_write ? r.length : 0;
  auto refuse = [&](std::uint32_t err, std::string_view why) {
    return RequestCheck{Verdict::error, err, payload, why};
  };
  if (r.type == kCmdDisc) return {Verdict::disconnect, 0, 0, "client sent NBD_CMD_DISC"};
  if (s.shutting_down) return refuse(kEshutdown, "server is shutting down");

  std::uint16_t allowed = 0;
  switch (r.type) {
    case kCmdRead:
    case kCmdWrite:
    case kCmdFlush:
    case kCmdTrim:
    case kCmdCache:
      // FUA is valid on every command once SEND_FUA is advertised (ignored where nothing is
      // written).
      allowed = kCmdFlagFua;
      break;
    case kCmdWriteZeroes:
      allowed = kCmdFlagFua | kCmdFlagNoHole | kCmdFlagFastZero;
      break;
    default:
      return refuse(kEinval, "unknown command");
  }
  if ((r.flags & ~allowed) != 0) return refuse(kEinval, "flag not valid for this command");

  const bool in_bounds = r.length <= s.size_bytes && r.offset <= s.size_bytes - r.length;
  switch (r.type) {
    case kCmdFlush:
      if (r.offset != 0 || r.length != 0) return refuse(kEinval, "flush with offset or length");
      break;
    case kCmdRead:
      if (r.length == 0) return refuse(kEinval, "zero-length request");
      if (r.length > s.payload_bytes_max) {
        return refuse(kEinval, "read larger than the maximum block size");
      }
      if (!in_bounds) return refuse(kEinval, "read beyond the end of the export");
      break;
    case kCmdCache:
      if (r.length == 0) return refuse(kEinval, "zero-length request");
      if (!in_bounds) return refuse(kEinval, "cache beyond the end of the export");
      break;
    case kCmdWrite:
    case kCmdTrim:
    case kCmdWriteZeroes:
      if (r.length == 0) return refuse(kEinval, "zero-length request");
      if (!s.writable) return refuse(kEperm, "export is read-only");
      if (!in_bounds) return refuse(kEnospc, "write beyond the end of the export");
      break;
    default:
      TANDEM_ASSERT(false);
  }
  return {Verdict::execute, 0, payload, {}};
}

void encode_simple_reply(std::span<std::uint8_t, kSimpleReplyBytes> out, std::uint32_t error, std::uint64_t handle) {
  put_be32(out.data(), kSimpleReplyMagic);
  put_be32(out.data() + 4, error);
  put_be64(out.data() + 8, handle);
}

void encode_chunk_header(std::span<std::uint8_t, kChunkHeaderBytes> out, std::uint16_t flags, std::uint16_t type,
                         std::uint64_t handle, std::uint32_t length) {
  put_be32(out.data(), kStructuredReplyMagic);
  put_be16(out.data() + 4, flags);
  put_be16(out.data() + 6, type);
  put_be64(out.data() + 8, handle);
  put_be32(out.data() + 16, length);
}

void encode_offset_data_prefix(std::span<std::uint8_t, kOffsetDataPrefixBytes> out, std::uint64_t handle,
                               std::uint64_t offset, std::uint32_t data_bytes) {
  TANDEM_ASSERT(data_bytes >= 1 && data_bytes <= UINT32_MAX - 8);
  encode_chunk_header(out.first<kChunkHeaderBytes>(), kReplyFlagDone, kReplyTypeOffsetData, handle, data_bytes + 8);
  put_be64(out.data() + kChunkHeaderBytes, offset);
}

std::vector<std::uint8_t> encode_error_chunk(std::uint64_t handle, std::uint32_t error, std::string_view message) {
  TANDEM_ASSERT(error != 0);
  message = message.substr(0, kStringBytesMax);
  std::vector<std::uint8_t> v(kChunkHeaderBytes);
  encode_chunk_header(std::span<std::uint8_t, kChunkHeaderBytes>(v.data(), kChunkHeaderBytes), kReplyFlagDone,
                      kReplyTypeError, handle, static_cast<std::uint32_t>(6 + message.size()));
  append_be32(v, error);
  append_be16(v, static_cast<std::uint16_t>(message.size()));
  append_str(v, message);
  return v;
}

std::uint32_t nbd_error_from(std::error_code ec) {
  if (!ec) return 0;
  if (ec.category() == engine::engine_category()) {
    switch (static_cast<engine::errc>(ec.value())) {
      case engine::errc::out_of_range:
        return kEinval;
      case engine::errc::no_space:
        return kEnospc;
      case engine::errc::read_only:
      case engine::errc::volume_failed:
        return kEperm;
      case engine::errc::shutting_down:
        return kEshutdown;
      case engine::errc::not_supported:
        return kEnotsup;
      default:
        return kEio;
    }
  }
  if (ec.category() == std::generic_category() || ec.category() == std::system_category()) {
    // The protocol asks for ENOSPC on a full or over-quota backing store.
    if (ec.value() == ENOSPC || ec.value() == EDQUOT || ec.value() == EFBIG) return kEnospc;
  }
  return kEio;
}

}  // namespace tandem::frontend::nbd

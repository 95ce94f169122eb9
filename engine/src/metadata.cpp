#include "tandem/engine/metadata.h"

#include <algorithm>
#include <cstring>
#include <random>

#include "tandem/common/assert.h"
#include "tandem/common/hash.h"
#include "tandem/common/units.h"
#include "tandem/engine/errc.h"

namespace tandem::engine {
namespace {

unsigned char* u8(std::span<std::byte> s) { return reinterpret_cast<unsigned char*>(s.data()); }
const unsigned char* u8(std::span<const std::byte> s) { return reinterpret_cast<const unsigned char*>(s.data()); }

// Writes header fields and the checksum over header (checksum zeroed) + payload.
void seal(std::span<std::byte> out, std::uint64_t magic, std::uint64_t seq, std::uint32_t payload) {
  TANDEM_ASSERT(RecordHeader::kBytes + payload <= out.size());
  unsigned char* p = u8(out);
  put_le64(p, magic);
  put_le64(p + 8, seq);
  put_le32(p + 16, payload);
  put_le32(p + 20, kFormatVersion);
  put_le64(p + 24, 0);
  const std::uint64_t sum = xxh3_64(p, RecordHeader::kBytes + payload);
  put_le64(p + 24, sum);
}

Result<RecordHeader> unseal(std::span<const std::byte> in, std::uint64_t magic, const char* what) {
  if (in.size() < RecordHeader::kBytes) return Error(errc::corrupt_metadata, std::string(what) + ": short");
  const unsigned char* p = u8(in);
  RecordHeader h;
  h.magic = get_le64(p);
  h.seq = get_le64(p + 8);
  h.payload_bytes = get_le32(p + 16);
  h.version = get_le32(p + 20);
  h.checksum = get_le64(p + 24);
  if (h.magic != magic) return Error(errc::corrupt_metadata, std::string(what) + ": bad magic");
  if (h.payload_bytes > in.size() - RecordHeader::kBytes) {
    return Error(errc::corrupt_metadata, std::string(what) + ": length beyond slot");
  }
  std::vector<unsigned char> copy(p, p + RecordHeader::kBytes + h.payload_bytes);
  put_le64(copy.data() + 24, 0);
  if (xxh3_64(copy.data(), copy.size()) != h.checksum) {
    return Error(errc::corrupt_metadata, std::string(what) + ": checksum mismatch");
  }
  if (h.version != kFormatVersion) {
    return Error(errc::corrupt_metadata,
                 std::string(what) + ": unsupported format version " + std::to_string(h.version));
  }
  return h;
}

bool all_zero(std::span<const std::byte> s) {
  return std::all_of(s.begin(), s.end(), [](std::byte b) { return b == std::byte{0}; });
}

}  // namespace

std::string uuid_to_string(const Uuid& u) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  for (std::size_t i = 0; i < u.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) s.push_back('-');
    s.push_back(kHex[u[i] >> 4]);
    s.push_back(kHex[u[i] & 15]);
  }
  return s;
}

Uuid random_uuid(Clock& clock) {
  Uuid u{};
  for (std::size_t i = 0; i < u.size(); i += 8) {
    const std::uint64_t r = clock.random_u64();
    for (std::size_t j = 0; j < 8; ++j) u[i + j] = static_cast<std::uint8_t>(r >> (8 * j));
  }
  u[6] = static_cast<std::uint8_t>((u[6] & 0x0f) | 0x40);  // RFC 4122 version 4
  u[8] = static_cast<std::uint8_t>((u[8] & 0x3f) | 0x80);
  return u;
}

MetaLayout MetaLayout::for_volume(std::uint64_t size_bytes, std::uint32_t block_bytes) {
  MetaLayout l;
  l.blocks = (size_bytes + block_bytes - 1) / block_bytes;
  l.intent_offset = 2 * kSuperblockSlotBytes;
  l.bitmap_offset = l.intent_offset + 2 * kIntentSlotBytes;
  l.bitmap_pages = (l.blocks + kBlocksPerBitmapPage - 1) / kBlocksPerBitmapPage;
  if (l.bitmap_pages == 0) l.bitmap_pages = 1;
  l.cycle_bitmap_offset = l.bitmap_offset + l.bitmap_pages * kBitmapPageBytes;
  l.total_bytes = l.cycle_bitmap_offset + l.bitmap_pages * kBitmapPageBytes;
  return l;
}

void encode_superblock(const Superblock& sb, std::span<std::byte> out) {
  TANDEM_ASSERT(out.size() >= MetaLayout::kSuperblockSlotBytes);
  TANDEM_ASSERT(sb.generations.size() <= Superblock::kGenerationsMax);
  TANDEM_ASSERT(sb.session_blob.size() <= Superblock::kSessionBlobBytesMax);
  std::memset(out.data(), 0, MetaLayout::kSuperblockSlotBytes);
  unsigned char* p = u8(out) + RecordHeader::kBytes;
  unsigned char* const start = p;
  std::memcpy(p, sb.volume_uuid.data(), 16);
  p += 16;
  put_le64(p, sb.size_bytes);
  p += 8;
  put_le32(p, sb.block_bytes);
  p += 4;
  put_le32(p, sb.region_bytes);
  p += 4;
  put_le32(p, static_cast<std::uint32_t>(sb.role));
  p += 4;
  put_le32(p, sb.session_state);
  p += 4;
  put_le64(p, sb.restart.cycle);
  p += 8;
  put_le64(p, sb.restart.offset);
  p += 8;
  put_le32(p, static_cast<std::uint32_t>(sb.generations.size()));
  p += 4;
  for (auto g : sb.generations) {
    put_le64(p, g);
    p += 8;
  }
  put_le32(p, static_cast<std::uint32_t>(sb.session_blob.size()));
  p += 4;
  if (!sb.session_blob.empty()) std::memcpy(p, sb.session_blob.data(), sb.session_blob.size());
  p += sb.session_blob.size();
  seal(out.first(MetaLayout::kSuperblockSlotBytes), kSuperblockMagic, sb.seq, static_cast<std::uint32_t>(p - start));
}

Result<Superblock> decode_superblock(std::span<const std::byte> in) {
  if (in.size() > MetaLayout::kSuperblockSlotBytes) in = in.first(MetaLayout::kSuperblockSlotBytes);
  auto h = unseal(in, kSuperblockMagic, "superblock");
  if (!h) return h.error();
  const unsigned char* p = u8(in) + RecordHeader::kBytes;
  const unsigned char* const end = p + h->payload_bytes;
  auto need = [&](std::size_t n) { return static_cast<std::size_t>(end - p) >= n; };
  Superblock sb;
  sb.seq = h->seq;
  constexpr std::size_t kFixed = 16 + 8 + 4 + 4 + 4 + 4 + 8 + 8 + 4;
  if (!need(kFixed)) return Error(errc::corrupt_metadata, "superblock: payload too short");
  std::memcpy(sb.volume_uuid.data(), p, 16);
  p += 16;
  sb.size_bytes = get_le64(p);
  p += 8;
  sb.block_bytes = get_le32(p);
  p += 4;
  sb.region_bytes = get_le32(p);
  p += 4;
  const std::uint32_t role = get_le32(p);
  p += 4;
  sb.session_state = get_le32(p);
  p += 4;
  sb.restart.cycle = get_le64(p);
  p += 8;
  sb.restart.offset = get_le64(p);
  p += 8;
  const std::uint32_t gens = get_le32(p);
  p += 4;
  if (role > 2) return Error(errc::corrupt_metadata, "superblock: unknown role");
  sb.role = static_cast<Role>(role);
  if (sb.block_bytes != 4096) return Error(errc::corrupt_metadata, "superblock: block size is not 4096");
  if (gens > Superblock::kGenerationsMax || !need(std::size_t{gens} * 8 + 4)) {
    return Error(errc::corrupt_metadata, "superblock: bad generation count");
  }
  for (std::uint32_t i = 0; i < gens; ++i, p += 8) sb.generations.push_back(get_le64(p));
  const std::uint32_t blob = get_le32(p);
  p += 4;
  if (blob > Superblock::kSessionBlobBytesMax || !need(blob)) {
    return Error(errc::corrupt_metadata, "superblock: bad session blob length");
  }
  sb.session_blob.assign(p, p + blob);
  return sb;
}

void encode_intent(const IntentRecord& r, std::span<std::byte> out) {
  TANDEM_ASSERT(out.size() >= MetaLayout::kIntentSlotBytes);
  TANDEM_ASSERT(r.regions.size() <= MetaLayout::kIntentEntriesMax);
  unsigned char* p = u8(out) + RecordHeader::kBytes;
  put_le32(p, static_cast<std::uint32_t>(r.regions.size()));
  p += 4;
  for (auto reg : r.regions) {
    put_le32(p, reg);
    p += 4;
  }
  const auto payload = static_cast<std::uint32_t>(4 + 4 * r.regions.size());
  // Zero the tail of the written area so stale entries never look like data.
  const std::size_t used = RecordHeader::kBytes + payload;
  const std::size_t rounded = (used + 4095) / 4096 * 4096;
  std::memset(out.data() + used, 0, rounded - used);
  seal(out, kIntentMagic, r.seq, payload);
}

Result<IntentRecord> decode_intent(std::span<const std::byte> in) {
  if (in.size() > MetaLayout::kIntentSlotBytes) in = in.first(MetaLayout::kIntentSlotBytes);
  auto h = unseal(in, kIntentMagic, "intent log");
  if (!h) return h.error();
  const unsigned char* p = u8(in) + RecordHeader::kBytes;
  if (h->payload_bytes < 4) return Error(errc::corrupt_metadata, "intent log: payload too short");
  const std::uint32_t n = get_le32(p);
  if (n > MetaLayout::kIntentEntriesMax || std::size_t{h->payload_bytes} != 4 + std::size_t{n} * 4) {
    return Error(errc::corrupt_metadata, "intent log: bad entry count");
  }
  IntentRecord r;
  r.seq = h->seq;
  r.regions.reserve(n);
  for (std::uint32_t i = 0; i < n; ++i) r.regions.push_back(get_le32(p + 4 + 4 * i));
  return r;
}

asio::awaitable<Result<MetaStore::Opened>> MetaStore::open(std::unique_ptr<BlockDevice> dev, BufferArena& arena,
                                                           Superblock fresh) {
  TANDEM_ASSERT(fresh.size_bytes > 0 && fresh.block_bytes == 4096);
  const MetaLayout layout = MetaLayout::for_volume(fresh.size_bytes, fresh.block_bytes);
  if (dev->size_bytes() < layout.total_bytes) {
    co_return Error(errc::metadata_mismatch, dev->path() + " is " + std::to_string(dev->size_bytes()) +
                                                 " bytes; the metadata of this volume needs " +
                                                 std::to_string(layout.total_bytes));
  }
  std::unique_ptr<MetaStore> ms(new MetaStore(std::move(dev), arena, layout));
  IoBuffer buf = arena.allocate(2 * MetaLayout::kSuperblockSlotBytes);
  TANDEM_CO_TRY(co_await ms->dev_->read(0, 2 * MetaLayout::kSuperblockSlotBytes, buf));
  std::optional<Superblock> best;
  Error last_error;
  bool any_bytes = false;
  for (std::uint64_t slot = 0; slot < 2; ++slot) {
    auto bytes = std::span<const std::byte>(buf.data() + slot * MetaLayout::kSuperblockSlotBytes,
                                            MetaLayout::kSuperblockSlotBytes);
    if (!all_zero(bytes)) any_bytes = true;
    auto sb = decode_superblock(bytes);
    if (!sb) {
      last_error = sb.error();
      continue;
    }
    if (!best || sb->seq > best->seq) best = std::move(sb).value();
  }
  auto intent = co_await ms->read_intent();
  if (!intent) co_return intent.error();
  Opened out;
  if (!best) {
    // Never completed: nothing was exported from this volume before its first superblock was
    // durable, so initializing is safe. Anything else (an intent record, stray bytes) means
    // the metadata existed and is now damaged: refuse rather than forget dirty blocks.
    if (intent->seq != 0 || any_bytes) {
      co_return Error(errc::corrupt_metadata,
                      ms->dev_->path() + ": no superblock slot is valid (" + last_error.message() + ")");
    }
    fresh.seq = 0;
    ms->sb_ = fresh;
    TANDEM_CO_TRY(co_await ms->write_superblock(fresh));
    out.created = true;
  } else {
    if (best->size_bytes != fresh.size_bytes) {
      co_return Error(errc::metadata_mismatch, ms->dev_->path() + " describes a volume of " +
                                                   std::to_string(best->size_bytes) + " bytes but the device has " +
                                                   std::to_string(fresh.size_bytes));
    }
    ms->sb_ = std::move(*best);
  }
  out.store = std::move(ms);
  co_return out;
}

asio::awaitable<Status> MetaStore::write_superblock(Superblock sb) {
  sb.seq = sb_.seq + 1;
  IoBuffer buf = arena_.allocate(MetaLayout::kSuperblockSlotBytes);
  encode_superblock(sb, buf.span(MetaLayout::kSuperblockSlotBytes));
  // Verify right before writing: what goes to disk must decode to what we meant.
  auto check = decode_superblock(buf.span(MetaLayout::kSuperblockSlotBytes));
  TANDEM_ASSERT(check.ok() && check->seq == sb.seq);
  const std::uint64_t slot = sb.seq % 2;
  TANDEM_CO_TRY(
      co_await dev_->write(slot * MetaLayout::kSuperblockSlotBytes, MetaLayout::kSuperblockSlotBytes, buf, false));
  TANDEM_CO_TRY(co_await dev_->flush());
  sb_ = std::move(sb);
  co_return Status{};
}

asio::awaitable<Result<IntentRecord>> MetaStore::read_intent() {
  IoBuffer buf = arena_.allocate(2 * MetaLayout::kIntentSlotBytes);
  TANDEM_CO_TRY(co_await dev_->read(layout_.intent_offset, 2 * MetaLayout::kIntentSlotBytes, buf));
  IntentRecord best;
  for (std::uint64_t slot = 0; slot < 2; ++slot) {
    auto r = decode_intent(
        std::span<const std::byte>(buf.data() + slot * MetaLayout::kIntentSlotBytes, MetaLayout::kIntentSlotBytes));
    if (r && r->seq > best.seq) best = std::move(r).value();
  }
  intent_seq_ = std::max(intent_seq_, best.seq);
  co_return best;
}

asio::awaitable<Status> MetaStore::write_intent(const std::vector<std::uint32_t>& regions) {
  if (regions.size() > MetaLayout::kIntentEntriesMax) co_return errc::intent_log_full;
  IntentRecord r;
  r.seq = ++intent_seq_;
  r.regions = regions;
  const std::size_t used = RecordHeader::kBytes + 4 + 4 * regions.size();
  const std::size_t len = (used + 4095) / 4096 * 4096;
  IoBuffer buf = arena_.allocate(MetaLayout::kIntentSlotBytes);
  encode_intent(r, buf.span(MetaLayout::kIntentSlotBytes));
  const std::uint64_t off = layout_.intent_offset + (r.seq % 2) * MetaLayout::kIntentSlotBytes;
  TANDEM_CO_TRY(co_await dev_->write(off, len, buf, false));
  TANDEM_CO_TRY(co_await dev_->flush());
  ++intent_writes_;
  co_return Status{};
}

asio::awaitable<Status> MetaStore::read_bitmap(std::vector<std::uint64_t>& words, BitmapArea area) {
  const std::uint64_t base = area == BitmapArea::dirty ? layout_.bitmap_offset : layout_.cycle_bitmap_offset;
  const std::uint64_t words_per_page = MetaLayout::kBitmapPageBytes / 8;
  words.assign(layout_.bitmap_pages * words_per_page, 0);
  // Read in chunks of up to 1 MiB to bound the buffer.
  constexpr std::uint64_t kChunkPages = 256;
  IoBuffer buf = arena_.allocate(kChunkPages * MetaLayout::kBitmapPageBytes);
  for (std::uint64_t page = 0; page < layout_.bitmap_pages; page += kChunkPages) {
    const std::uint64_t n = std::min(kChunkPages, layout_.bitmap_pages - page);
    const std::size_t len = n * MetaLayout::kBitmapPageBytes;
    TANDEM_CO_TRY(co_await dev_->read(base + page * MetaLayout::kBitmapPageBytes, len, buf));
    const auto* p = reinterpret_cast<const unsigned char*>(buf.data());
    for (std::uint64_t w = 0; w < n * words_per_page; ++w) {
      words[page * words_per_page + w] = get_le64(p + 8 * w);
    }
  }
  co_return Status{};
}

asio::awaitable<Status> MetaStore::write_bitmap_pages(const std::vector<std::uint64_t>& words, std::uint64_t first_page,
                                                      std::uint64_t count, BitmapArea area) {
  const std::uint64_t base = area == BitmapArea::dirty ? layout_.bitmap_offset : layout_.cycle_bitmap_offset;
  const std::uint64_t words_per_page = MetaLayout::kBitmapPageBytes / 8;
  TANDEM_ASSERT(first_page + count <= layout_.bitmap_pages);
  TANDEM_ASSERT(words.size() >= (first_page + count) * words_per_page);
  constexpr std::uint64_t kChunkPages = 256;
  IoBuffer buf = arena_.allocate(std::min(count, kChunkPages) * MetaLayout::kBitmapPageBytes);
  for (std::uint64_t page = first_page; page < first_page + count; page += kChunkPages) {
    const std::uint64_t n = std::min(kChunkPages, first_page + count - page);
    auto* p = reinterpret_cast<unsigned char*>(buf.data());
    for (std::uint64_t w = 0; w < n * words_per_page; ++w) {
      put_le64(p + 8 * w, words[page * words_per_page + w]);
    }
    TANDEM_CO_TRY(
        co_await dev_->write(base + page * MetaLayout::kBitmapPageBytes, n * MetaLayout::kBitmapPageBytes, buf, false));
  }
  co_return Status{};
}

}  // namespace tandem::engine

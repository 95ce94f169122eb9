// Fuzzer for the on-disk metadata decoders (superblock and intent-log records): a damaged or
// hostile metadata file is rejected with an error, never a crash or an out-of-bounds read; what
// decodes re-encodes to a record that decodes to the same values.
#include <cstring>
#include <vector>

#include "fuzz_driver.h"
#include "tandem/common/assert.h"
#include "tandem/common/hash.h"
#include "tandem/common/units.h"
#include "tandem/engine/metadata.h"

using namespace tandem::engine;

namespace {

void check(const std::byte* bytes, std::size_t size);

// Random bytes almost never pass the checksum, which would leave the payload parsers
// unexercised: also try each input with its checksum made right.
void with_fixed_checksum(const std::uint8_t* data, std::size_t size) {
  if (size < RecordHeader::kBytes) return;
  std::vector<unsigned char> copy(data, data + size);
  const std::uint32_t payload = tandem::get_le32(copy.data() + 16);
  if (payload > size - RecordHeader::kBytes) return;
  tandem::put_le64(copy.data() + 24, 0);
  tandem::put_le64(copy.data() + 24, tandem::xxh3_64(copy.data(), RecordHeader::kBytes + payload));
  check(reinterpret_cast<const std::byte*>(copy.data()), copy.size());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  check(reinterpret_cast<const std::byte*>(data), size);
  with_fixed_checksum(data, size);
  return 0;
}

namespace {

void check(const std::byte* bytes, std::size_t size) {
  if (auto sb = decode_superblock({bytes, size}); sb.ok()) {
    std::vector<std::byte> again(MetaLayout::kSuperblockSlotBytes);
    encode_superblock(*sb, again);
    auto back = decode_superblock(again);
    TANDEM_ASSERT(back.ok());
    TANDEM_ASSERT(back->seq == sb->seq && back->size_bytes == sb->size_bytes);
    TANDEM_ASSERT(back->generations == sb->generations && back->session_blob == sb->session_blob);
  }
  if (auto in = decode_intent({bytes, size}); in.ok()) {
    std::vector<std::byte> again(MetaLayout::kIntentSlotBytes);
    encode_intent(*in, again);
    auto back = decode_intent(again);
    TANDEM_ASSERT(back.ok() && back->regions == in->regions && back->seq == in->seq);
  }
}

}  // namespace

std::vector<std::string> tandem::fuzz::seeds() {
  std::vector<std::string> out;
  Superblock sb;
  sb.seq = 3;
  sb.volume_uuid = random_uuid(system_clock());
  sb.size_bytes = 1 << 30;
  sb.region_bytes = 4 << 20;
  sb.generations = {1, 2};
  sb.session_blob = {9, 9, 9};
  std::vector<std::byte> buf(MetaLayout::kSuperblockSlotBytes);
  encode_superblock(sb, buf);
  out.emplace_back(reinterpret_cast<const char*>(buf.data()), 512);
  std::vector<std::byte> ibuf(MetaLayout::kIntentSlotBytes);
  encode_intent(IntentRecord{5, {0, 7, 100}}, ibuf);
  out.emplace_back(reinterpret_cast<const char*>(ibuf.data()), 64);
  return out;
}

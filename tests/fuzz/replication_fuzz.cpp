// Fuzzer for the replication message decoders: whatever a peer sends decodes or is refused,
// never a crash, an assertion or an unbounded allocation; what decodes re-encodes to bytes that
// decode to the same message.
#include "fuzz_driver.h"
#include "tandem/common/assert.h"
#include "tandem/replication/messages.h"

using namespace tandem::replication;

namespace {

template <typename D>
void check(std::span<const std::byte> p, D decode) {
  auto m = decode(p);
  if (!m.ok()) return;
  auto again = decode(encode(*m));
  TANDEM_ASSERT(again.ok() && *again == *m);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::span<const std::byte> p(reinterpret_cast<const std::byte*>(data), size);
  check(p, decode_session_hello);
  check(p, decode_sync_begin);
  check(p, decode_extent_hash);
  check(p, decode_hash_result);
  check(p, decode_ack);
  check(p, decode_cycle_end);
  check(p, decode_committed);
  check(p, decode_refuse);
  check(p, decode_control);
  check(p, decode_control_reply);
  check(p, decode_changed_blocks);
  if (auto e = decode_extent(p); e.ok()) {
    TANDEM_ASSERT(e->zero ? e->data.empty() : e->data.size() == e->length);
  }
  return 0;
}

std::vector<std::string> tandem::fuzz::seeds() {
  auto s = [](std::vector<std::byte> b) { return std::string(reinterpret_cast<const char*>(b.data()), b.size()); };
  SessionHello h;
  h.session_id = "s-vol0";
  h.members = {{"vol0", 1 << 20}};
  h.generations = {1, 2};
  h.paired = true;
  auto ext = encode_extent_header(Extent{"s", 1, 4096, 4096, false, 5, {}});
  ext.resize(ext.size() + 4096, std::byte{7});
  return {s(encode(h)),
          s(encode(SyncBegin{"s", TransferMode::cycle, 3, 10, 0, 1 << 20, {1}})),
          s(ext),
          s(encode(Ack{"s", 3, 8192})),
          s(encode(CycleEnd{"s", 3, 8192, {1}})),
          s(encode(Refuse{"s", 1, "no"})),
          s(encode(ExtentHash{"s", 0, 4096, 9})),
          s(encode(Control{"s", 7, ControlOp::pause, true})),
          s(encode(ControlReply{"s", 7, true, 65536, "", 9})),
          s(encode(ChangedBlocks{"s", 0, {{0, 3}, {10, 1}}}))};
}

// Plan: every replication message round-trips through its codec, and the decoders refuse what a
// hostile or broken peer could send: truncation, trailing bytes, bounds (ids, members,
// generations, extent sizes), misaligned offsets, data that disagrees with the header.
#include <gtest/gtest.h>

#include <cstring>

#include "tandem/replication/messages.h"

namespace tandem::replication {
namespace {

SessionHello hello() {
  SessionHello h;
  h.session_id = "s-vol0";
  h.role = Role::destination;
  h.members = {{"vol0", 1 << 30}, {"vol1", 8192}};
  h.generations = {3, 2, 1};
  h.paired = true;
  h.blank = false;
  h.committed_cycle = 41;
  h.staged_cycle = 42;
  h.staged_offset = 1 << 20;
  h.initial = InitialState::done;
  h.initial_offset = 0;
  return h;
}

template <typename M, typename D>
void roundtrip(const M& m, D decode) {
  auto bytes = encode(m);
  auto d = decode(bytes);
  ASSERT_TRUE(d.ok()) << d.error().message();
  EXPECT_EQ(*d, m);
  // Every truncation and one trailing byte are refused.
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_FALSE(decode(std::span(bytes).first(n)).ok()) << "truncated to " << n;
  }
  bytes.push_back(std::byte{0});
  EXPECT_FALSE(decode(bytes).ok());
}

TEST(Messages, RoundTrip) {
  roundtrip(hello(), decode_session_hello);
  roundtrip(SyncBegin{"s", TransferMode::initial_compare, 7, 1000, 4096, 8 << 20, {9, 8}}, decode_sync_begin);
  roundtrip(ExtentHash{"s", 8192, 65536, 0xabcdef}, decode_extent_hash);
  roundtrip(HashResult{"s", 8192, 65536, true}, decode_hash_result);
  roundtrip(Ack{"s", 7, 123 * 4096}, decode_ack);
  roundtrip(CycleEnd{"s", 7, 1 << 30, {9, 8}}, decode_cycle_end);
  roundtrip(Committed{"s", 7}, decode_committed);
  roundtrip(Refuse{"s", 3, "split brain: both sides written since 00ff"}, decode_refuse);
  roundtrip(Control{"s", 42, ControlOp::resume, false, 0}, decode_control);
  roundtrip(Control{"s", 43, ControlOp::pause, true, 0}, decode_control);
  roundtrip(Control{"s", 44, ControlOp::failover, false, 1}, decode_control);
  roundtrip(ControlReply{"s", 42, false, 0, "paused on the peer only", 0}, decode_control_reply);
  roundtrip(ControlReply{"s", 43, true, 1 << 20, "", 0x1234}, decode_control_reply);
  roundtrip(ChangedBlocks{"s", 2, {{0, 1}, {5, 100}, {1000, 7}}}, decode_changed_blocks);
  auto overlap = encode(ChangedBlocks{"s", 0, {{0, 10}, {5, 1}}});
  EXPECT_FALSE(decode_changed_blocks(overlap).ok());
  SessionHello h = hello();
  h.paused = true;
  h.phase = 3;
  h.failover_gen = 77;
  h.initial_compare = true;
  roundtrip(h, decode_session_hello);
}

TEST(Messages, ControlRejectsUnknownOps) {
  auto b = encode(Control{"s", 1, ControlOp::pause, false, 0});
  const std::size_t op_at = b.size() - 10;
  b[op_at] = std::byte{9};  // op
  EXPECT_FALSE(decode_control(b).ok());
  b[op_at] = std::byte{1};
  b[op_at + 1] = std::byte{2};  // resume_to_sync is a boolean
  EXPECT_FALSE(decode_control(b).ok());
}

TEST(Messages, ExtentCarriesItsData) {
  std::vector<std::byte> data(8192, std::byte{0x42});
  Extent e{"s", 3, 4096, 8192, false, 77, {}};
  auto bytes = encode_extent_header(e);
  bytes.insert(bytes.end(), data.begin(), data.end());
  auto d = decode_extent(bytes);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->offset, 4096u);
  EXPECT_EQ(d->length, 8192u);
  EXPECT_EQ(d->hash, 77u);
  ASSERT_EQ(d->data.size(), 8192u);
  EXPECT_EQ(std::memcmp(d->data.data(), data.data(), 8192), 0);
  // Data shorter or longer than the header says: refused.
  bytes.pop_back();
  EXPECT_FALSE(decode_extent(bytes).ok());
  // A zero extent has no data.
  Extent z{"s", 3, 0, 4096, true, 0, {}};
  auto zb = encode_extent_header(z);
  EXPECT_TRUE(decode_extent(zb).ok());
  zb.push_back(std::byte{1});
  EXPECT_FALSE(decode_extent(zb).ok());
}

TEST(Messages, BoundsAreEnforced) {
  auto h = hello();
  h.session_id = std::string(65, 'x');
  EXPECT_FALSE(decode_session_hello(encode(h)).ok());
  h = hello();
  h.members[0].size_bytes = 1000;  // not a multiple of 4096
  EXPECT_FALSE(decode_session_hello(encode(h)).ok());
  // Oversized extent, misaligned offset.
  Extent big{"s", 1, 0, (1 << 20) + 4096, true, 0, {}};
  EXPECT_FALSE(decode_extent(encode_extent_header(big)).ok());
  Extent mis{"s", 1, 100, 4096, true, 0, {}};
  EXPECT_FALSE(decode_extent(encode_extent_header(mis)).ok());
  // A generation count over the bound, forged by hand.
  auto bytes = encode(Committed{"s", 1});
  EXPECT_TRUE(decode_committed(bytes).ok());
  auto sb = encode(SyncBegin{"s", TransferMode::cycle, 1, 0, 0, 1 << 20, {}});
  sb.back() = std::byte{33};  // generation count byte
  EXPECT_FALSE(decode_sync_begin(sb).ok());
}

}  // namespace
}  // namespace tandem::replication

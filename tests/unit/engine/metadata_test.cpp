// Plan: metadata records round-trip exactly; any single corrupted byte or a torn slot is
// detected by the checksum and the previous good slot is used; a file whose superblocks are
// damaged but which has other metadata is refused rather than reinitialized.
#include <gtest/gtest.h>

#include <cstring>

#include "fault_env.h"
#include "run_sync.h"
#include "tandem/common/units.h"
#include "tandem/engine/errc.h"
#include "tandem/engine/metadata.h"

namespace tandem::engine {
namespace {

Superblock sample() {
  Superblock sb;
  sb.seq = 7;
  sb.volume_uuid = random_uuid(system_clock());
  sb.size_bytes = 1 << 30;
  sb.region_bytes = 4 << 20;
  sb.generations = {11, 22, 33};
  sb.role = Role::destination;
  sb.session_state = 5;
  sb.restart = {9, 4096 * 3};
  sb.session_blob = {1, 2, 3, 4};
  return sb;
}

TEST(Superblock, RoundTrips) {
  std::vector<std::byte> buf(MetaLayout::kSuperblockSlotBytes);
  const Superblock sb = sample();
  encode_superblock(sb, buf);
  auto d = decode_superblock(buf);
  ASSERT_TRUE(d.ok()) << d.error().message();
  EXPECT_EQ(d->seq, sb.seq);
  EXPECT_EQ(d->volume_uuid, sb.volume_uuid);
  EXPECT_EQ(d->size_bytes, sb.size_bytes);
  EXPECT_EQ(d->region_bytes, sb.region_bytes);
  EXPECT_EQ(d->generations, sb.generations);
  EXPECT_EQ(d->role, sb.role);
  EXPECT_EQ(d->session_state, sb.session_state);
  EXPECT_EQ(d->restart, sb.restart);
  EXPECT_EQ(d->session_blob, sb.session_blob);
}

TEST(Superblock, EveryCorruptedByteIsDetected) {
  std::vector<std::byte> buf(MetaLayout::kSuperblockSlotBytes);
  encode_superblock(sample(), buf);
  // Bytes past the payload are not covered (they are zero padding); everything in the record is.
  const std::size_t used = RecordHeader::kBytes + get_le32(reinterpret_cast<unsigned char*>(buf.data()) + 16);
  for (std::size_t i = 0; i < used; ++i) {
    auto copy = buf;
    copy[i] ^= std::byte{0x40};
    EXPECT_FALSE(decode_superblock(copy).ok()) << "byte " << i;
  }
}

TEST(Intent, RoundTripsAndDetectsCorruption) {
  std::vector<std::byte> buf(MetaLayout::kIntentSlotBytes);
  IntentRecord r{42, {1, 5, 9, 1000}};
  encode_intent(r, buf);
  auto d = decode_intent(buf);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->seq, 42u);
  EXPECT_EQ(d->regions, r.regions);
  for (std::size_t i = 0; i < RecordHeader::kBytes + 4 + 16; ++i) {
    auto copy = buf;
    copy[i] ^= std::byte{1};
    EXPECT_FALSE(decode_intent(copy).ok()) << "byte " << i;
  }
}

TEST(Intent, RejectsLengthBeyondSlot) {
  std::vector<std::byte> buf(MetaLayout::kIntentSlotBytes);
  encode_intent(IntentRecord{1, {1}}, buf);
  put_le32(reinterpret_cast<unsigned char*>(buf.data()) + 16, 0xfffffff0u);
  EXPECT_FALSE(decode_intent(buf).ok());
}

class MetaStoreTest : public ::testing::Test {
 protected:
  asio::io_context ctx;
  test::FaultEnv env;
  const MetaLayout layout = MetaLayout::for_volume(64 << 20, 4096);

  Result<MetaStore::Opened> open_store() {
    Superblock fresh;
    fresh.volume_uuid = random_uuid(system_clock());
    fresh.size_bytes = 64 << 20;
    fresh.region_bytes = 1 << 20;
    fresh.generations = {1};
    auto dev = env.open(OpenSpec{"meta", layout.total_bytes});
    EXPECT_TRUE(dev.ok());
    return test::run_sync(ctx, MetaStore::open(std::move(dev).value(), env.buffers(), fresh));
  }
};

TEST_F(MetaStoreTest, CreatesThenReopensTheSameIdentity) {
  auto a = open_store();
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a->created);
  const Uuid id = a->store->superblock().volume_uuid;
  a->store.reset();
  auto b = open_store();
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->created);
  EXPECT_EQ(b->store->superblock().volume_uuid, id);
}

TEST_F(MetaStoreTest, TornNewestSlotFallsBackToPrevious) {
  auto a = open_store();
  ASSERT_TRUE(a.ok());
  Superblock sb = a->store->superblock();
  sb.restart = {1, 100 * 4096};
  ASSERT_TRUE(test::run_sync(ctx, a->store->write_superblock(sb)).ok());
  sb.restart = {2, 200 * 4096};
  ASSERT_TRUE(test::run_sync(ctx, a->store->write_superblock(sb)).ok());
  const std::uint64_t newest = a->store->superblock().seq;
  a->store.reset();
  // Tear the newest slot: its second half is lost.
  auto disk = env.disk("meta");
  const std::size_t slot_off = (newest % 2) * MetaLayout::kSuperblockSlotBytes;
  std::memset(disk->visible.data() + slot_off + 16, 0xee, 64);
  auto b = open_store();
  ASSERT_TRUE(b.ok()) << b.error().message();
  EXPECT_EQ(b->store->superblock().seq, newest - 1);
  EXPECT_EQ(b->store->superblock().restart.cycle, 1u);
}

TEST_F(MetaStoreTest, BothSlotsDamagedIsRefused) {
  auto a = open_store();
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(test::run_sync(ctx, a->store->write_intent({3})).ok());
  a->store.reset();
  auto disk = env.disk("meta");
  std::memset(disk->visible.data(), 0x5a, 2 * MetaLayout::kSuperblockSlotBytes);
  auto b = open_store();
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.error().code, make_error_code(errc::corrupt_metadata));
}

TEST_F(MetaStoreTest, SizeMismatchIsRefused) {
  ASSERT_TRUE(open_store().ok());
  Superblock fresh;
  fresh.size_bytes = 32 << 20;
  auto dev = env.open(OpenSpec{"meta", std::nullopt});
  ASSERT_TRUE(dev.ok());
  auto r = test::run_sync(ctx, MetaStore::open(std::move(dev).value(), env.buffers(), fresh));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, make_error_code(errc::metadata_mismatch));
}

}  // namespace
}  // namespace tandem::engine

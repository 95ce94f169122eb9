// Plan: the destination's receiving side on its own, over a group of two real volumes on the
// fault-injecting disk, fed the frames a source sends. A cycle is staged (acknowledged in
// durable batches, not yet on the volumes) and applied only at its end, across both members,
// with its observers seeing each member's extents while the volume still holds the old
// blocks; frames of another link, out of order or failing their hash are refused and change
// nothing; a staged cycle reopened after a restart resumes at its durable end and nowhere else;
// a commit record whose apply a crash cut short is applied by recover(); an initial sync is
// written in place with acknowledged checkpoints.
#include "receiver.h"

#include <gtest/gtest.h>

#include <cstring>

#include "fault_env.h"
#include "run_sync.h"
#include "tandem/common/hash.h"
#include "tandem/engine/volume.h"

namespace tandem::replication {
namespace {

constexpr std::uint64_t kVol = 1 << 20;
constexpr std::uint32_t kBlk = 4096;
constexpr std::uint64_t kWindow = 64 << 10;  // acknowledgements every 16 KiB, checkpoints every 32 KiB

struct Sent {
  MsgType type;
  std::vector<std::byte> bytes;
};

// Records what each member looked like when an observer was told of an apply.
class Recorder final : public ApplyObserver {
 public:
  Recorder(engine::DeviceEnv& env, std::vector<engine::Volume*> vols) : env_(env), vols_(std::move(vols)) {}
  asio::awaitable<Status> before_apply(std::size_t member, std::span<const engine::JournalExtent> extents) override {
    for (const auto& e : extents) {
      engine::IoBuffer io = env_.buffers().allocate(e.length);
      TANDEM_CO_TRY(co_await vols_[member]->read(e.offset, e.length, io));
      seen.push_back({member, e.offset, e.length, io.data()[0]});
    }
    co_return Status{};
  }
  struct Seen {
    std::size_t member;
    std::uint64_t offset;
    std::uint32_t length;
    std::byte first_byte_before;  // what the volume held there when told
  };
  std::vector<Seen> seen;

 private:
  engine::DeviceEnv& env_;
  std::vector<engine::Volume*> vols_;
};

class Receive : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* id : {"vol0", "vol1"}) {
      engine::VolumeOptions vo{id, std::string(id) + ".data", kVol, std::string(id) + ".meta", {}};
      auto v = test::run_sync(ctx_, engine::Volume::open(env_, std::move(vo)));
      ASSERT_TRUE(v.ok()) << v.error().message();
      volumes_.push_back(std::move(v).value());
    }
    SessionState s;
    s.role = Role::destination;
    s.paired = true;
    s.initial = InitialState::done;
    s.committed_cycle = 4;
    store_.load({volumes_[0].get(), volumes_[1].get()}, s, {11});
    make();
  }
  void TearDown() override {
    rx_.reset();
    for (auto& v : volumes_) (void)test::run_sync(ctx_, v->close());
  }
  void make() {
    std::vector<ReceiverMember> ms;
    std::uint64_t base = 0;
    for (auto& v : volumes_) {
      ms.push_back({v.get(), &env_, v->id() + ".journal", base});
      base += kVol;
    }
    ReceiverHooks hooks;
    hooks.send = [this](MsgType t, std::vector<std::byte> b) -> asio::awaitable<Status> {
      sent_.push_back({t, std::move(b)});
      co_return Status{};
    };
    hooks.applied = [this](const Applied& a) { applied_.push_back(a); };
    rx_ = std::make_unique<Receiver>(ctx_.get_executor(), ReceiverOptions{"s1", "peer", 8 << 20, 16 << 20},
                                     std::move(ms), store_, env_.clock(), std::move(hooks));
  }
  Status begin(std::uint64_t cycle, std::uint64_t start, std::uint64_t link = 1,
               TransferMode mode = TransferMode::cycle) {
    SyncBegin m{"s1", mode, cycle, 64, start, kWindow, {11}};
    return test::run_sync(ctx_, rx_->on_sync_begin(m, link));
  }
  // One 4 KiB extent at a global offset, every byte `fill`.
  Status extent(std::uint64_t cycle, std::uint64_t global, std::uint64_t fill, std::uint64_t link = 1,
                bool corrupt = false) {
    std::vector<std::byte> data(kBlk, static_cast<std::byte>(fill));
    Extent m{"s1", cycle, global, kBlk, false, xxh3_64(data.data(), data.size()), data};
    if (corrupt) data[100] = static_cast<std::byte>(fill + 1);
    return test::run_sync(ctx_, rx_->on_extent(m, link));
  }
  Status end(std::uint64_t cycle, std::uint64_t end_offset, std::uint64_t link = 1) {
    CycleEnd m{"s1", cycle, end_offset, {11}};
    return test::run_sync(ctx_, rx_->on_cycle_end(m, link));
  }
  std::byte byte_at(std::size_t member, std::uint64_t offset) {
    const auto& disk = env_.disk(volumes_[member]->id() + ".data")->visible;
    return disk.at(offset);
  }
  std::vector<Ack> acks() {
    std::vector<Ack> out;
    for (const auto& s : sent_) {
      if (s.type != MsgType::ack) continue;
      auto a = decode_ack(s.bytes);
      EXPECT_TRUE(a.ok());
      if (a.ok()) out.push_back(*a);
    }
    return out;
  }
  std::vector<std::uint64_t> commits() {
    std::vector<std::uint64_t> out;
    for (const auto& s : sent_) {
      if (s.type != MsgType::committed) continue;
      auto c = decode_committed(s.bytes);
      EXPECT_TRUE(c.ok());
      if (c.ok()) out.push_back(c->cycle);
    }
    return out;
  }

  asio::io_context ctx_;
  test::FaultEnv env_;
  std::vector<std::unique_ptr<engine::Volume>> volumes_;
  StateStore store_;
  std::unique_ptr<Receiver> rx_;
  std::vector<Sent> sent_;
  std::vector<Applied> applied_;
};

TEST_F(Receive, ACycleIsStagedAndAppliedOnlyAtItsEndWithObserversFirst) {
  Recorder rec(env_, {volumes_[0].get(), volumes_[1].get()});
  rx_->observe(&rec);
  ASSERT_TRUE(begin(5, 0).ok());
  EXPECT_EQ(store_.state().transfer_cycle, 5u);
  for (std::uint64_t i = 0; i < 4; ++i) ASSERT_TRUE(extent(5, i * kBlk, 0xA0 + i).ok());
  // 16 KiB staged: a durable batch, acknowledged with the restart address.
  ASSERT_EQ(acks().size(), 1u);
  EXPECT_EQ(acks()[0].cycle, 5u);
  EXPECT_EQ(acks()[0].durable_offset, 4 * kBlk);
  EXPECT_EQ(rx_->staged_end(), 4 * kBlk);
  ASSERT_TRUE(extent(5, kVol + 2 * kBlk, 0xB1).ok());  // member 1
  EXPECT_EQ(byte_at(0, 0), std::byte{0}) << "staged data reached the volume before the commit";
  EXPECT_EQ(byte_at(1, 2 * kBlk), std::byte{0});
  EXPECT_TRUE(commits().empty());

  ASSERT_TRUE(end(5, kVol + 3 * kBlk).ok());
  EXPECT_EQ(commits(), std::vector<std::uint64_t>{5});
  for (std::uint64_t i = 0; i < 4; ++i) EXPECT_EQ(byte_at(0, i * kBlk), std::byte(0xA0 + i));
  EXPECT_EQ(byte_at(1, 2 * kBlk), std::byte{0xB1});
  EXPECT_EQ(store_.state().committed_cycle, 5u);
  EXPECT_EQ(store_.state().transfer_cycle, 0u);
  EXPECT_EQ(store_.state().applying_cycle, 0u);
  EXPECT_EQ(rx_->staged_end(), 0u);
  EXPECT_FALSE(rx_->receiving());
  ASSERT_EQ(applied_.size(), 1u);
  EXPECT_EQ(applied_[0].cycle, 5u);
  EXPECT_EQ(applied_[0].bytes, 5u * kBlk);
  EXPECT_TRUE(applied_[0].took.has_value());
  // The observer heard of all five extents, on their members, before any was overwritten.
  ASSERT_EQ(rec.seen.size(), 5u);
  for (const auto& s : rec.seen) EXPECT_EQ(s.first_byte_before, std::byte{0});
  EXPECT_EQ(rec.seen[4].member, 1u);
  EXPECT_EQ(rec.seen[4].offset, 2 * kBlk);
  EXPECT_FALSE(env_.disks().contains("vol0.journal")) << "the journal outlived its apply";
}

TEST_F(Receive, FramesOfAnotherLinkOutOfOrderOrCorruptAreRefused) {
  ASSERT_TRUE(begin(5, 0, /*link=*/1).ok());
  ASSERT_TRUE(extent(5, 0, 0x11).ok());
  EXPECT_FALSE(extent(5, kBlk, 0x12, /*link=*/2).ok()) << "an extent of another link was taken";
  EXPECT_FALSE(extent(5, 0, 0x13).ok()) << "an extent behind the last one was taken";
  EXPECT_FALSE(extent(6, kBlk, 0x14).ok()) << "an extent of another cycle was taken";
  EXPECT_FALSE(extent(5, 2 * kVol, 0x15).ok()) << "an extent beyond the group was taken";
  const Status bad = extent(5, kBlk, 0x16, 1, /*corrupt=*/true);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message().find("hash"), std::string::npos) << bad.error().message();
  EXPECT_FALSE(end(5, kBlk, /*link=*/2).ok()) << "a cycle end of another link was taken";
  EXPECT_FALSE(end(4, kBlk).ok()) << "the end of another cycle was taken";
  // Still receiving the cycle, which ends normally with just its one good extent.
  ASSERT_TRUE(end(5, kBlk).ok());
  EXPECT_EQ(byte_at(0, 0), std::byte{0x11});
  EXPECT_EQ(byte_at(0, kBlk), std::byte{0});
  EXPECT_EQ(commits(), std::vector<std::uint64_t>{5});
}

TEST_F(Receive, AStagedCycleResumesAfterARestartAtItsDurableEndOnly) {
  ASSERT_TRUE(begin(5, 0).ok());
  for (std::uint64_t i = 0; i < 4; ++i) ASSERT_TRUE(extent(5, i * kBlk, 0x20 + i).ok());  // acknowledged
  ASSERT_TRUE(extent(5, 4 * kBlk, 0x30).ok());  // received, not staged durably: lost with the process
  rx_.reset();
  make();
  ASSERT_TRUE(test::run_sync(ctx_, rx_->recover()).ok());
  EXPECT_EQ(rx_->staged_end(), 4 * kBlk);
  EXPECT_FALSE(begin(5, 5 * kBlk).ok()) << "resumed beyond what was durable";
  EXPECT_FALSE(begin(5, 3 * kBlk).ok()) << "resumed behind what was durable";
  ASSERT_TRUE(begin(5, 4 * kBlk).ok());
  ASSERT_TRUE(extent(5, 4 * kBlk, 0x31).ok());
  ASSERT_TRUE(end(5, 5 * kBlk).ok());
  for (std::uint64_t i = 0; i < 4; ++i) EXPECT_EQ(byte_at(0, i * kBlk), std::byte(0x20 + i));
  EXPECT_EQ(byte_at(0, 4 * kBlk), std::byte{0x31});
  EXPECT_EQ(store_.state().committed_cycle, 5u);
}

TEST_F(Receive, ACommitRecordWithoutItsApplyIsAppliedOnRecovery) {
  ASSERT_TRUE(begin(5, 0).ok());
  for (std::uint64_t i = 0; i < 4; ++i) ASSERT_TRUE(extent(5, i * kBlk, 0x40 + i).ok());
  // The commit record is written and the process dies before the apply.
  ASSERT_TRUE(test::run_sync(ctx_, store_.change("commit record", [](SessionState& s) { s.applying_cycle = 5; })).ok());
  rx_.reset();
  make();
  ASSERT_TRUE(test::run_sync(ctx_, rx_->recover()).ok());
  for (std::uint64_t i = 0; i < 4; ++i) EXPECT_EQ(byte_at(0, i * kBlk), std::byte(0x40 + i));
  EXPECT_EQ(store_.state().committed_cycle, 5u);
  EXPECT_EQ(store_.state().applying_cycle, 0u);
  ASSERT_EQ(applied_.size(), 1u);
  EXPECT_FALSE(applied_[0].took.has_value()) << "a duration for a transfer this process never saw";
}

TEST_F(Receive, AnInitialSyncIsWrittenInPlaceWithAcknowledgedCheckpoints) {
  ASSERT_TRUE(begin(0, 0, 1, TransferMode::initial_full).ok());
  EXPECT_EQ(store_.state().initial, InitialState::running);
  for (std::uint64_t i = 0; i < 8; ++i) ASSERT_TRUE(extent(0, i * kBlk, 0x50 + i).ok());
  // 32 KiB: one checkpoint, flushed and acknowledged as cycle 0.
  ASSERT_EQ(acks().size(), 1u);
  EXPECT_EQ(acks()[0].cycle, 0u);
  EXPECT_EQ(acks()[0].durable_offset, 8 * kBlk);
  EXPECT_EQ(store_.state().initial_offset, 8 * kBlk);
  EXPECT_EQ(env_.disk("vol0.data")->durable.at(7 * kBlk), std::byte{0x57})
      << "a checkpoint before its data was durable";
  ASSERT_TRUE(extent(0, kVol, 0x60).ok());
  ASSERT_TRUE(end(0, 2 * kVol).ok());
  EXPECT_EQ(commits(), std::vector<std::uint64_t>{0});
  EXPECT_EQ(store_.state().initial, InitialState::done);
  EXPECT_EQ(byte_at(1, 0), std::byte{0x60});
}

}  // namespace
}  // namespace tandem::replication

// Plan: a source refuses what its destination could not have said. A source session over a
// real volume (on the fault-injecting disk, faults off) is handed, as if from its peer,
// answers that name no transfer it began: a Committed for cycle 2^64-1, an Ack beyond anything
// sent or for another cycle, a HashResult for a hash never asked (and one that would make it
// read past an extent's buffer). Each must be refused with a reason naming what was wrong, so
// the link closes at once rather than at the keep-alive timeout; and the session must stay
// usable (it stops cleanly afterwards).
#include <gtest/gtest.h>

#include <limits>

#include "fault_env.h"
#include "run_sync.h"
#include "tandem/replication/messages.h"
#include "tandem/replication/session.h"

namespace tandem::replication {
namespace {

constexpr std::uint64_t kSize = 4 << 20;

struct Refusal {
  bool refused = false;
  std::string reason;
};

asio::awaitable<Refusal> give(Session& s, MsgType type, std::vector<std::byte> payload) {
  Status st = co_await s.handle(type, payload);
  co_return Refusal{!st, st ? std::string() : st.error().message()};
}

class SourceAnswers : public ::testing::Test {
 protected:
  void SetUp() override {
    engine::VolumeOptions vo{"vol0", "data", kSize, "meta", {}};
    auto v = test::run_sync(ctx_, engine::Volume::open(env_, std::move(vo)));
    ASSERT_TRUE(v.ok()) << v.error().message();
    volume_ = std::move(v).value();
    SessionOptions so;
    so.id = "s-vol0";
    so.role = Role::source;
    so.members.push_back({volume_.get(), &env_, "state"});
    so.peer_name = "site-b";
    auto s = test::run_sync(ctx_, Session::open(ctx_.get_executor(), std::move(so)));
    ASSERT_TRUE(s.ok()) << s.error().message();
    session_ = std::move(s).value();
  }
  void TearDown() override {
    if (session_) test::run_sync(ctx_, session_->stop());
    session_.reset();
    if (volume_) {
      EXPECT_TRUE(test::run_sync(ctx_, volume_->close()).ok());
    }
  }
  Refusal give(MsgType type, std::vector<std::byte> payload) {
    return test::run_sync(ctx_, replication::give(*session_, type, std::move(payload)));
  }

  asio::io_context ctx_;
  test::FaultEnv env_;
  std::unique_ptr<engine::Volume> volume_;
  std::unique_ptr<Session> session_;
};

TEST_F(SourceAnswers, CommittedForACycleNeverEndedIsRefused) {
  const Refusal r = give(MsgType::committed, encode(Committed{"s-vol0", std::numeric_limits<std::uint64_t>::max()}));
  EXPECT_TRUE(r.refused);
  EXPECT_NE(r.reason.find("committed cycle 18446744073709551615 with no cycle end sent"), std::string::npos)
      << r.reason;
  const Refusal zero = give(MsgType::committed, encode(Committed{"s-vol0", 0}));
  EXPECT_TRUE(zero.refused) << "an initial sync's commit with none under way";
}

TEST_F(SourceAnswers, AckWithNoTransferIsRefused) {
  const Refusal r = give(MsgType::ack, encode(Ack{"s-vol0", 0, 1ull << 40}));
  EXPECT_TRUE(r.refused);
  EXPECT_NE(r.reason.find("no transfer begun on this link"), std::string::npos) << r.reason;
}

TEST_F(SourceAnswers, HashResultNeverAskedIsRefused) {
  const Refusal r = give(MsgType::hash_result, encode(HashResult{"s-vol0", 0, 4096, false}));
  EXPECT_TRUE(r.refused);
  EXPECT_NE(r.reason.find("no hash asked"), std::string::npos) << r.reason;
  // Larger than any extent: a resend of it would overrun the extent buffer.
  const Refusal big = give(MsgType::hash_result, encode(HashResult{"s-vol0", 0, 64u << 20, false}));
  EXPECT_TRUE(big.refused);
}

TEST_F(SourceAnswers, MessagesOnlyADestinationTakesAreRefused) {
  // A destination's messages sent to a source: the source stays a source, untouched.
  const Refusal r = give(MsgType::cycle_end, encode(CycleEnd{"s-vol0", 1, kSize, {}}));
  EXPECT_TRUE(r.refused);
  EXPECT_EQ(session_->role(), Role::source);
}

}  // namespace
}  // namespace tandem::replication

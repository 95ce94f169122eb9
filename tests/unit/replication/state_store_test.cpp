// Plan: the store of a session's durable state, over real volumes on the fault-injecting disk.
// A transition is written before the session sees it (while the write is under way the old
// state shows); a write that fails leaves the state as it was, in memory and on disk; a new
// generation history reaches every member and member 0 carries the state with it; two
// transitions asked at once both take effect (neither overwrites the other's copy).
#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>

#include "fault_env.h"
#include "run_sync.h"
#include "tandem/engine/volume.h"
#include "tandem/replication/state_store.h"

namespace tandem::replication {
namespace {

class Store : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* id : {"vol0", "vol1"}) {
      engine::VolumeOptions vo{id, std::string(id) + ".data", 1 << 20, std::string(id) + ".meta", {}};
      auto v = test::run_sync(ctx_, engine::Volume::open(env_, std::move(vo)));
      ASSERT_TRUE(v.ok()) << v.error().message();
      volumes_.push_back(std::move(v).value());
    }
    SessionState s;
    s.role = Role::destination;
    store_.load({volumes_[0].get(), volumes_[1].get()}, s, {11});
  }
  void TearDown() override {
    env_.dead = false;
    for (auto& v : volumes_) (void)test::run_sync(ctx_, v->close());
  }
  // The state as member 0's superblock holds it.
  SessionState on_disk() {
    const auto& blob = volumes_[0]->meta().superblock().session_blob;
    auto st = decode_state(blob, Role::source);
    EXPECT_TRUE(st.ok());
    return st.ok() ? *st : SessionState{};
  }

  asio::io_context ctx_;
  test::FaultEnv env_;
  std::vector<std::unique_ptr<engine::Volume>> volumes_;
  StateStore store_;
};

TEST_F(Store, ATransitionIsWrittenBeforeItShows) {
  std::optional<Status> done;
  asio::co_spawn(ctx_, store_.change("paused", [](SessionState& s) { s.paused = true; }),
                 [&](std::exception_ptr e, Status st) {
                   ASSERT_FALSE(e);
                   done = st;
                 });
  // Run until the superblock write has started (the disk posts its completion).
  const auto writes = env_.disk("vol0.meta")->writes;
  for (int i = 0; i < 1000 && env_.disk("vol0.meta")->writes == writes && !done; ++i) ctx_.run_one();
  ASSERT_FALSE(done) << "the write had not begun";
  EXPECT_FALSE(store_.state().paused) << "shown before it was written";
  EXPECT_EQ(store_.transitions(), 0u);
  ctx_.restart();
  ctx_.run();
  ASSERT_TRUE(done && done->ok());
  EXPECT_TRUE(store_.state().paused);
  EXPECT_TRUE(on_disk().paused);
  EXPECT_EQ(on_disk().role, Role::destination);
  EXPECT_EQ(store_.last_transition(), "paused");
  EXPECT_EQ(store_.transitions(), 1u);
}

TEST_F(Store, AFailedWriteChangesNothing) {
  ASSERT_TRUE(test::run_sync(ctx_, store_.change("cycle cut", [](SessionState& s) { s.transfer_cycle = 3; })).ok());
  env_.dead = true;  // every disk operation fails from here
  Status st = test::run_sync(ctx_, store_.change("promoted", {12, 11}, [](SessionState& s) { s.role = Role::source; }));
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(store_.state().role, Role::destination);
  EXPECT_EQ(store_.state().transfer_cycle, 3u);
  EXPECT_EQ(store_.generations(), (std::vector<std::uint64_t>{11}));
  EXPECT_EQ(store_.last_transition(), "cycle cut");
  EXPECT_EQ(store_.transitions(), 1u);
  env_.dead = false;
  EXPECT_EQ(on_disk().role, Role::destination);
}

TEST_F(Store, GenerationsReachEveryMemberWithTheState) {
  Status st = test::run_sync(ctx_, store_.change("promoted", {12, 11}, [](SessionState& s) { s.role = Role::source; }));
  ASSERT_TRUE(st.ok()) << st.error().message();
  for (auto& v : volumes_) EXPECT_EQ(v->meta().superblock().generations, (std::vector<std::uint64_t>{12, 11}));
  EXPECT_EQ(volumes_[0]->meta().superblock().role, engine::Role::source);
  EXPECT_EQ(on_disk().role, Role::source);
  EXPECT_EQ(store_.generations(), (std::vector<std::uint64_t>{12, 11}));
  // Without a history, only member 0 is written.
  const auto seq1 = volumes_[1]->meta().superblock().seq;
  ASSERT_TRUE(test::run_sync(ctx_, store_.change("paused", [](SessionState& s) { s.paused = true; })).ok());
  EXPECT_EQ(volumes_[1]->meta().superblock().seq, seq1);
}

TEST_F(Store, TransitionsAskedAtOnceAllTakeEffectInOrder) {
  std::vector<std::string> order;
  auto ask = [&](std::string name, StateStore::Edit edit) {
    asio::co_spawn(ctx_, store_.change(name, std::move(edit)), [&order, name](std::exception_ptr e, Status st) {
      ASSERT_FALSE(e);
      EXPECT_TRUE(st.ok());
      order.push_back(name);
    });
  };
  ask("paused", [](SessionState& s) { s.paused = true; });
  ask("cycle cut", [](SessionState& s) { s.transfer_cycle = 7; });
  ask("next", [](SessionState& s) { s.next_cycle = s.transfer_cycle + 1; });  // sees the cut
  ctx_.restart();
  ctx_.run();
  EXPECT_EQ(order, (std::vector<std::string>{"paused", "cycle cut", "next"}));
  for (const SessionState& s : {store_.state(), on_disk()}) {
    EXPECT_TRUE(s.paused);
    EXPECT_EQ(s.transfer_cycle, 7u);
    EXPECT_EQ(s.next_cycle, 8u);
  }
  EXPECT_EQ(store_.transitions(), 3u);
}

}  // namespace
}  // namespace tandem::replication

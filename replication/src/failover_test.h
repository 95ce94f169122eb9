// FailoverTest: the images of a failover test on a destination, one per member volume.
//
// Each image is the member as of the committed cycle the test started at, writable: the test's
// writes go to an overlay file beside the volume, and a block that a later cycle overwrites in
// the volume is first copied into the overlay (TestImage), so the image never changes under the
// test while replication goes on. It is an observer of the destination's apply: before a
// cycle's extents overwrite a member, before_apply() keeps what the image needs.
//
// On disk: <state_dir>/<volume>.test-overlay and .test-meta. A test whose files are all there
// when the daemon starts goes on (reopened); a partial set is removed.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "receiver.h"
#include "tandem/common/result.h"
#include "tandem/engine/cycle_journal.h"
#include "tandem/engine/test_image.h"
#include "tandem/engine/volume.h"
#include "tandem/replication/session.h"

namespace tandem::replication {

class FailoverTest final : public ApplyObserver {
 public:
  // Creates the images (resume: reopens the ones a stopped daemon left) over the members.
  static asio::awaitable<Result<std::unique_ptr<FailoverTest>>> open(const std::string& session_id,
                                                                     const std::vector<SessionMember>& members,
                                                                     bool resume);
  // Whether every member has a test's overlay on disk (a test that was running goes on).
  static bool left_behind(const std::vector<SessionMember>& members);
  // Removes the files of a test that was not whole.
  static Status remove_leftovers(const std::vector<SessionMember>& members);
  ~FailoverTest() override;
  FailoverTest(const FailoverTest&) = delete;
  FailoverTest& operator=(const FailoverTest&) = delete;

  // What the daemon exports: each image, with the volume it is an image of.
  [[nodiscard]] std::vector<TestImageExport> exports() const;
  // Blocks the test wrote or kept (the overlay's size in blocks).
  [[nodiscard]] std::uint64_t overlay_blocks() const;
  // Closes the images and discards their overlays. The test is over.
  asio::awaitable<void> close();

  asio::awaitable<Status> before_apply(std::size_t member, std::span<const engine::JournalExtent> extents) override;

 private:
  struct Image {
    SessionMember member;
    std::unique_ptr<engine::TestImage> image;
    std::unique_ptr<engine::DeviceEnv> env;  // opens the image as a device
    std::unique_ptr<engine::Volume> volume;  // the volume over it, as exported
  };
  explicit FailoverTest(std::string session_id) : session_id_(std::move(session_id)) {}
  std::string session_id_;
  std::vector<Image> images_;
};

}  // namespace tandem::replication

#include "failover_test.h"

#include <spdlog/spdlog.h>

#include <filesystem>

namespace tandem::replication {
namespace {

constexpr std::uint64_t kBlock = 4096;

std::string overlay_path(const SessionMember& m) { return m.state_dir + "/" + m.volume->id() + ".test-overlay"; }
std::string meta_path(const SessionMember& m) { return m.state_dir + "/" + m.volume->id() + ".test-meta"; }

}  // namespace

bool FailoverTest::left_behind(const std::vector<SessionMember>& members) {
  for (const auto& m : members) {
    if (!std::filesystem::exists(overlay_path(m))) return false;
  }
  return !members.empty();
}

Status FailoverTest::remove_leftovers(const std::vector<SessionMember>& members) {
  for (const auto& m : members) {
    TANDEM_TRY(m.env->remove(overlay_path(m)));
    TANDEM_TRY(m.env->remove(meta_path(m)));
  }
  return {};
}

asio::awaitable<Result<std::unique_ptr<FailoverTest>>> FailoverTest::open(const std::string& session_id,
                                                                          const std::vector<SessionMember>& members,
                                                                          bool resume) {
  std::unique_ptr<FailoverTest> t(new FailoverTest(session_id));
  Status st;
  for (const auto& m : members) {
    Image img;
    img.member = m;
    const std::string image_path = "test-image:" + m.volume->id();
    auto ti = resume ? engine::TestImage::reopen(*m.env, overlay_path(m), *m.volume)
                     : engine::TestImage::create(*m.env, overlay_path(m), *m.volume);
    if (!ti) {
      st = ti.error();
      break;
    }
    img.image = std::move(ti).value();
    img.env = engine::make_test_image_env(*m.env, image_path, *img.image);
    if (!resume) {
      st = m.env->remove(meta_path(m));
      if (!st) break;
    }
    engine::VolumeOptions vo;
    vo.id = m.volume->id() + "-test";  // its metadata's name; the export uses the member's id
    vo.path = image_path;
    vo.meta_path = meta_path(m);
    // Kept in the list before the volume opens, so a failure below cleans up the overlay too.
    t->images_.push_back(std::move(img));
    auto v = co_await engine::Volume::open(*t->images_.back().env, std::move(vo));
    if (!v) {
      st = v.error();
      break;
    }
    t->images_.back().volume = std::move(v).value();
    t->images_.back().volume->set_access(engine::Access::read_write);
  }
  if (!st) {
    co_await t->close();
    co_return st.error();
  }
  co_return t;
}

FailoverTest::~FailoverTest() = default;

std::vector<TestImageExport> FailoverTest::exports() const {
  std::vector<TestImageExport> out;
  for (const auto& img : images_) out.push_back({img.member.volume->id(), img.volume.get()});
  return out;
}

std::uint64_t FailoverTest::overlay_blocks() const {
  std::uint64_t n = 0;
  for (const auto& img : images_) n += img.image ? img.image->overlay_blocks() : 0;
  return n;
}

asio::awaitable<void> FailoverTest::close() {
  for (auto& img : images_) {
    if (img.volume) {
      auto st = co_await img.volume->close();
      if (!st) {
        spdlog::warn("session {}: closing the test image of {}: {}", session_id_, img.member.volume->id(),
                     st.error().message());
      }
      img.volume.reset();
      (void)img.member.env->remove(meta_path(img.member));
    }
    img.env.reset();
    if (img.image) (void)img.image->discard();
    img.image.reset();
  }
  images_.clear();
}

asio::awaitable<Status> FailoverTest::before_apply(std::size_t member, std::span<const engine::JournalExtent> extents) {
  if (member >= images_.size() || !images_[member].image) co_return Status{};
  auto& image = *images_[member].image;
  // The image shows the member as of the test's start: keep what the cycle overwrites.
  for (const auto& e : extents) TANDEM_CO_TRY(co_await image.preserve(e.offset / kBlock, e.length / kBlock));
  co_return co_await image.sync();  // preserved before the base changes
}

}  // namespace tandem::replication

#include "tandem/replication/state_store.h"

#include <spdlog/spdlog.h>

#include "tandem/common/assert.h"
#include "tandem/engine/volume.h"

namespace tandem::replication {

void StateStore::load(std::vector<engine::Volume*> volumes, SessionState state,
                      std::vector<std::uint64_t> generations) {
  TANDEM_ASSERT(!volumes.empty() && volumes_.empty());
  volumes_ = std::move(volumes);
  state_ = state;
  generations_ = std::move(generations);
}

asio::awaitable<Status> StateStore::change(std::string_view name, const Edit& edit) {
  return change_impl(std::string(name), std::nullopt, edit);
}

asio::awaitable<Status> StateStore::change(std::string_view name, std::vector<std::uint64_t> generations,
                                           const Edit& edit) {
  return change_impl(std::string(name), std::move(generations), edit);
}

asio::awaitable<Status> StateStore::change_impl(std::string name, std::optional<std::vector<std::uint64_t>> generations,
                                                Edit edit) {
  TANDEM_ASSERT(!volumes_.empty());
  while (writing_) co_await turn_.wait();
  writing_ = true;
  SessionState next = state_;
  if (edit) edit(next);  // none: only the generations change
  Status st = co_await write(next, generations ? &*generations : nullptr);
  if (st) {
    state_ = next;
    if (generations) generations_ = std::move(*generations);
    last_ = std::move(name);
    ++count_;
  } else {
    spdlog::warn("session state: transition '{}' not written: {}", name, st.error().message());
  }
  writing_ = false;
  turn_.notify_one();
  co_return st;
}

asio::awaitable<Status> StateStore::write(const SessionState& next, const std::vector<std::uint64_t>* generations) {
  for (std::size_t i = volumes_.size(); i-- > 0;) {
    if (generations == nullptr && i != 0) continue;
    auto& meta = volumes_[i]->meta();
    engine::Superblock sb = meta.superblock();
    if (generations != nullptr) sb.generations = *generations;
    if (i == 0) {
      sb.session_blob = encode_state(next);
      sb.role = next.role == Role::source ? engine::Role::source : engine::Role::destination;
    }
    TANDEM_CO_TRY(co_await meta.write_superblock(std::move(sb)));
  }
  co_return Status{};
}

}  // namespace tandem::replication

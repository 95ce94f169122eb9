#include "tandem/importer/manager.h"

#include <spdlog/spdlog.h>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <filesystem>

#include "tandem/common/file_util.h"

namespace tandem::importer {

ImportManager::ImportManager(asio::any_io_executor ex, ImportManagerOptions opts)
    : ex_(ex), opts_(std::move(opts)), timer_(ex) {
  opts_.import.dir = opts_.dir;
}

ImportManager::~ImportManager() = default;

Result<std::vector<ImportRecord>> ImportManager::load_records() const {
  std::vector<ImportRecord> out;
  std::error_code ec;
  if (!std::filesystem::exists(opts_.dir, ec)) return out;
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(opts_.dir, ec)) {
    if (e.path().extension() == ".json") files.push_back(e.path());
  }
  if (ec) return Error(ec, "cannot list " + opts_.dir);
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    auto text = read_whole_file(f.string());
    if (!text) return text.error();
    auto rec = parse_record(*text, f.string());
    if (!rec) return rec.error();
    if (rec->id != f.stem().string()) {
      return Error(std::make_error_code(std::errc::invalid_argument),
                   f.string() + ": its id is " + rec->id + ", not the file's name");
    }
    out.push_back(std::move(rec).value());
  }
  return out;
}

void ImportManager::adopt(std::unique_ptr<Import> im) {
  Import* p = im.get();
  imports_.push_back(std::move(im));
  p->set_hooks(Import::Hooks{.changed = [this](Import& i) { changed(i); }});
  p->start();
  admit();
}

Import* ImportManager::find(const std::string& id) const {
  for (const auto& im : imports_) {
    if (im->record().id == id) return im.get();
  }
  return nullptr;
}

std::vector<Import*> ImportManager::all() const {
  std::vector<Import*> out;
  for (const auto& im : imports_) out.push_back(im.get());
  return out;
}

Import* ImportManager::filling(const std::string& volume_id) const {
  for (const auto& im : imports_) {
    if (im->record().volume_id == volume_id && filters_host_io(im->record().state)) return im.get();
  }
  return nullptr;
}

void ImportManager::changed(Import& im) {
  const ImportState s = im.record().state;
  if (s == ImportState::cancelled || s == ImportState::import_completed) {
    ++finishing_;
    asio::co_spawn(ex_, finish(&im), AbortOnException{"an import's end"});
  }
  admit();
}

asio::awaitable<void> ImportManager::finish(Import* im) {
  if (on_final) co_await on_final(*im);
  co_await im->stop();
  --finishing_;
  idle_.notify_all();
}

// Scheduled ones whose time has come become Queued; Queued ones start while slots are free,
// oldest first. Runs as its own coroutine: the transitions are durable writes.
void ImportManager::admit() {
  if (stopping_ || admitting_) return;
  admitting_ = true;
  asio::co_spawn(
      ex_,
      [this]() -> asio::awaitable<void> {
        for (bool again = true; again && !stopping_;) {
          again = false;
          const std::int64_t now = unix_now_ms();
          std::uint32_t held = 0;
          for (const auto& im : imports_) {
            const ImportState s = im->record().state;
            if (s == ImportState::copy_in_progress || s == ImportState::paused) ++held;
          }
          std::vector<Import*> queued;
          for (const auto& im : imports_) {
            const ImportRecord& r = im->record();
            if (r.state == ImportState::scheduled && (!r.scheduled_ms || *r.scheduled_ms <= now)) {
              if (Status st = co_await im->set_queued(); !st) {
                spdlog::error("import {}: {}", r.id, st.error().message());
              }
            }
            if (im->record().state == ImportState::queued) queued.push_back(im.get());
          }
          std::sort(queued.begin(), queued.end(),
                    [](Import* a, Import* b) { return a->record().created_ms < b->record().created_ms; });
          for (Import* im : queued) {
            if (held >= opts_.max_concurrent || stopping_) break;
            if (im->record().state != ImportState::queued) continue;
            if (Status st = co_await im->begin_copy(); !st) {
              spdlog::error("import {}: cannot start the copy: {}", im->record().id, st.error().message());
              continue;
            }
            ++held;
            again = true;
          }
        }
        admitting_ = false;
        idle_.notify_all();
      },
      AbortOnException{"the import admission"});
}

void ImportManager::start() {
  if (running_) return;
  running_ = true;
  asio::co_spawn(ex_, scheduler(), AbortOnException{"the import scheduler"});
}

// A start time is honoured within a second.
asio::awaitable<void> ImportManager::scheduler() {
  while (!stopping_) {
    timer_.expires_after(std::chrono::seconds(1));
    co_await timer_.async_wait(asio::as_tuple(asio::use_awaitable));
    if (stopping_) break;
    bool due = false;
    const std::int64_t now = unix_now_ms();
    for (const auto& im : imports_) {
      const ImportRecord& r = im->record();
      due = due || (r.state == ImportState::scheduled && (!r.scheduled_ms || *r.scheduled_ms <= now)) ||
            r.state == ImportState::queued;
    }
    if (due) admit();
  }
  running_ = false;
  scheduler_done_.notify_all();
}

asio::awaitable<Status> ImportManager::act(Import& im, ImportAction a) {
  switch (a) {
    case ImportAction::pause:
      co_return co_await im.pause();
    case ImportAction::resume:
      co_return co_await im.resume();
    case ImportAction::cutover:
      co_return co_await im.cutover();
    case ImportAction::cancel:
      co_return co_await im.cancel(false);
    case ImportAction::cancel_force:
      co_return co_await im.cancel(true);
    case ImportAction::remove:
      co_return co_await remove(im.record().id);
  }
  co_return Status{};
}

asio::awaitable<Status> ImportManager::remove(const std::string& id) {
  auto it = std::find_if(imports_.begin(), imports_.end(), [&](const auto& im) { return im->record().id == id; });
  if (it == imports_.end()) co_return Status{};
  std::unique_ptr<Import> im = std::move(*it);
  imports_.erase(it);
  co_await im->stop();
  co_return im->remove_files();
}

asio::awaitable<void> ImportManager::settle() {
  while (finishing_ > 0) co_await idle_.wait();
}

asio::awaitable<void> ImportManager::stop() {
  stopping_ = true;
  timer_.cancel();
  while (running_) co_await scheduler_done_.wait();
  while (admitting_ || finishing_ > 0) co_await idle_.wait();
  for (auto& im : imports_) co_await im->stop();
}

}  // namespace tandem::importer

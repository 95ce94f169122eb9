#include "tandem/importer/import.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "tandem/common/assert.h"
#include "tandem/common/file_util.h"
#include "tandem/engine/errc.h"

namespace tandem::importer {

namespace {

constexpr std::uint64_t kBlock = engine::Volume::kBlockBytes;
constexpr std::uint64_t kPage = 4096;
constexpr std::uint64_t kBitsPerPage = kPage * 8;
constexpr std::uint64_t kMapMagic = 0x3150414d494e4454ULL;  // "TNDIMAP1"
constexpr std::uint64_t kExtentsAhead = 256ULL << 20;       // block status asked this far ahead
constexpr auto kTuple = asio::as_tuple(asio::use_awaitable);

std::uint64_t align_down(std::uint64_t v) { return v / kBlock * kBlock; }
std::uint64_t align_up(std::uint64_t v) { return (v + kBlock - 1) / kBlock * kBlock; }

// How far the restart address may lag the copy before it is written again: 1/400 of the volume
// (a crash re-copies at most that, plus the chunks in flight), at least 1 MiB, at most 64 MiB.
std::uint64_t checkpoint_bytes(std::uint64_t size) {
  return std::clamp<std::uint64_t>(size / 400 / kBlock * kBlock, 1ULL << 20, 64ULL << 20);
}

Error source_unreachable(const std::string& why) {
  return Error(engine::errc::io_error, "the import's source is unreachable (" + why +
                                           "); blocks not yet copied cannot be read until it is back");
}

bool is_down_error(const Status& st, const ForeignSource* s) {
  return st.code() == std::make_error_code(std::errc::not_connected) || (s != nullptr && s->is_down());
}

}  // namespace

std::int64_t unix_now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// ---- record ---------------------------------------------------------------------------------

std::string render_record(const ImportRecord& r) {
  nlohmann::json j = {
      {"id", r.id},
      {"name", r.name},
      {"state", std::string(to_string(r.state))},
      {"source_uri", r.source_uri},
      {"source_size", r.source_size},
      {"volume_id", r.volume_id},
      {"volume_created", r.volume_created},
      {"automatic_cutover", r.automatic_cutover},
      {"scheduled_ms", r.scheduled_ms ? nlohmann::json(*r.scheduled_ms) : nlohmann::json(nullptr)},
      {"rate_limit", r.rate_limit},
      {"restart_address", r.restart_address},
      {"copied_bytes", r.copied_bytes},
      {"skipped_bytes", r.skipped_bytes},
      {"source_missing_blocks", r.source_missing_blocks},
      {"error_code", r.error_code},
      {"error_message", r.error_message},
      {"created_ms", r.created_ms},
      {"last_update_ms", r.last_update_ms},
  };
  return j.dump(2) + "\n";
}

Result<ImportRecord> parse_record(const std::string& text, const std::string& where) {
  auto bad = [&](const std::string& why) {
    return Error(std::make_error_code(std::errc::invalid_argument), where + ": " + why);
  };
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
  ImportRecord r;
  try {
    r.id = j.at("id").get<std::string>();
    r.name = j.at("name").get<std::string>();
    auto st = import_state_from(j.at("state").get<std::string>());
    if (!st) return bad("unknown state " + j.at("state").dump());
    r.state = *st;
    r.source_uri = j.at("source_uri").get<std::string>();
    r.source_size = j.at("source_size").get<std::uint64_t>();
    r.volume_id = j.at("volume_id").get<std::string>();
    r.volume_created = j.at("volume_created").get<bool>();
    r.automatic_cutover = j.at("automatic_cutover").get<bool>();
    if (!j.at("scheduled_ms").is_null()) r.scheduled_ms = j.at("scheduled_ms").get<std::int64_t>();
    r.rate_limit = j.at("rate_limit").get<std::uint64_t>();
    r.restart_address = j.at("restart_address").get<std::uint64_t>();
    r.copied_bytes = j.at("copied_bytes").get<std::uint64_t>();
    r.skipped_bytes = j.at("skipped_bytes").get<std::uint64_t>();
    r.source_missing_blocks = j.at("source_missing_blocks").get<std::uint64_t>();
    r.error_code = j.at("error_code").get<std::string>();
    r.error_message = j.at("error_message").get<std::string>();
    r.created_ms = j.at("created_ms").get<std::int64_t>();
    r.last_update_ms = j.at("last_update_ms").get<std::int64_t>();
  } catch (const nlohmann::json::exception& e) {
    return bad(e.what());
  }
  if (r.id.empty() || r.volume_id.empty()) return bad("id and volume_id must not be empty");
  if (r.source_size == 0 || r.source_size % kBlock != 0) return bad("source_size is not a multiple of 4096");
  if (r.restart_address > r.source_size || r.restart_address % kBlock != 0) return bad("restart_address is invalid");
  return r;
}

// ---- life cycle -----------------------------------------------------------------------------

Import::Import(asio::any_io_executor ex, engine::DeviceEnv* env, engine::Volume* vol, ImportRecord rec,
               ImportOptions opts)
    : ex_(ex),
      env_(env),
      vol_(vol),
      rec_(std::move(rec)),
      opts_(std::move(opts)),
      blocks_(vol != nullptr ? vol->size_bytes() / kBlock : 0),
      copied_(blocks_),
      missing_(blocks_),
      unflushed_(blocks_),
      run_timer_(ex),
      tick_timer_(ex) {
  region_blocks_ = std::max<std::uint32_t>(1, opts_.region_bytes / static_cast<std::uint32_t>(kBlock));
}

std::unique_ptr<Import> Import::record_only(asio::any_io_executor ex, ImportRecord rec, ImportOptions opts) {
  TANDEM_ASSERT(is_final(rec.state));
  std::unique_ptr<Import> im(new Import(ex, nullptr, nullptr, std::move(rec), std::move(opts)));
  im->detached_ = true;
  im->started_ = true;
  return im;
}

Import::~Import() {
  TANDEM_ASSERT_MSG(loops_ == 0, "import destroyed with its loops running");
  if (!detached_ && vol_->host_filter() == this) vol_->set_host_filter(nullptr);
}

asio::awaitable<Result<std::unique_ptr<Import>>> Import::create(asio::any_io_executor ex, engine::DeviceEnv& env,
                                                                engine::Volume& volume, ImportRecord rec,
                                                                std::unique_ptr<ForeignSource> source,
                                                                ImportOptions opts, bool volume_reads_zero) {
  TANDEM_ASSERT(source && source->size() == volume.size_bytes());
  std::unique_ptr<Import> im(new Import(ex, &env, &volume, std::move(rec), std::move(opts)));
  im->reads_zero_ = volume_reads_zero;
  im->src_ = std::shared_ptr<ForeignSource>(std::move(source));
  im->connected_ = true;
  Status st = co_await im->open_map(true);
  if (st) st = co_await im->persist_record();
  if (!st) {
    co_await im->src_->close();
    std::error_code ec;
    std::filesystem::remove(im->map_path(), ec);
    co_return st.error();
  }
  volume.set_host_filter(im.get());
  co_return im;
}

asio::awaitable<Result<std::unique_ptr<Import>>> Import::recover(asio::any_io_executor ex, engine::DeviceEnv& env,
                                                                 engine::Volume& volume, ImportRecord rec,
                                                                 ImportOptions opts) {
  std::unique_ptr<Import> im(new Import(ex, &env, &volume, std::move(rec), std::move(opts)));
  if (volume.size_bytes() != im->rec_.source_size) {
    co_return Error(std::make_error_code(std::errc::invalid_argument),
                    "import " + im->rec_.id + ": volume " + volume.id() + " is " + std::to_string(volume.size_bytes()) +
                        " bytes, the import's source " + std::to_string(im->rec_.source_size));
  }
  if (!filters_host_io(im->rec_.state)) co_return im;  // nothing runs; kept for its record
  // Resumed without knowing how the unwritten part of the volume reads: zeros are written.
  im->reads_zero_ = false;
  im->copied_.set_range(0, im->rec_.restart_address / kBlock);
  im->next_ = im->rec_.restart_address;
  im->durable_restart_ = im->rec_.restart_address;
  if (im->rec_.state == ImportState::cutover_in_progress) im->rec_.state = ImportState::ready_for_cutover;
  TANDEM_CO_TRY(co_await im->open_map(false));
  auto src = co_await open_source(ex, env, im->rec_.source_uri, im->opts_.source);
  if (src && (*src)->size() != im->rec_.source_size) {
    const std::uint64_t got = (*src)->size();
    co_await (*src)->close();
    src = Error(std::make_error_code(std::errc::invalid_argument),
                "the source is now " + std::to_string(got) + " bytes, was " + std::to_string(im->rec_.source_size));
  }
  if (src) {
    im->src_ = std::shared_ptr<ForeignSource>(std::move(src).value());
    im->connected_ = true;
    im->clear_error();
  } else {
    im->set_error("source_unreachable", src.error().message());
    spdlog::warn("import {}: source {} unreachable at start: {}", im->rec_.id, redact_uri(im->rec_.source_uri),
                 src.error().message());
  }
  TANDEM_CO_TRY(co_await im->recover_hot_regions());
  TANDEM_CO_TRY(co_await im->persist_record());
  volume.set_host_filter(im.get());
  co_return im;
}

std::string Import::map_path() const { return opts_.dir + "/" + rec_.id + ".map"; }
std::string Import::record_path() const { return opts_.dir + "/" + rec_.id + ".json"; }

asio::awaitable<Status> Import::open_map(bool create) {
  const std::uint64_t regions = (blocks_ + region_blocks_ - 1) / region_blocks_;
  intent_pages_ = (regions + kBitsPerPage - 1) / kBitsPerPage;
  missing_pages_ = (blocks_ + kBitsPerPage - 1) / kBitsPerPage;
  const std::uint64_t bytes = (1 + intent_pages_ + missing_pages_) * kPage;
  if (create) {
    std::error_code ec;
    std::filesystem::remove(map_path(), ec);
  }
  auto dev = env_->open(engine::OpenSpec{map_path(), bytes});
  if (!dev) co_return Error(dev.error().code, "import " + rec_.id + ": map file: " + dev.error().message());
  map_ = std::move(dev).value();
  if (map_->size_bytes() != bytes) {
    co_return Error(engine::errc::metadata_mismatch, "import " + rec_.id + ": map file " + map_path() + " is " +
                                                         std::to_string(map_->size_bytes()) + " bytes, expected " +
                                                         std::to_string(bytes));
  }
  engine::IoBuffer page = env_->buffers().allocate(kPage);
  if (create) {
    std::memset(page.data(), 0, kPage);
    const std::uint64_t hdr[3] = {kMapMagic, blocks_, region_blocks_};
    std::memcpy(page.data(), hdr, sizeof hdr);
    TANDEM_CO_TRY(co_await map_->write(0, kPage, page, false));
    co_return co_await map_->flush();
  }
  TANDEM_CO_TRY(co_await map_->read(0, kPage, page));
  std::uint64_t hdr[3];
  std::memcpy(hdr, page.data(), sizeof hdr);
  if (hdr[0] != kMapMagic || hdr[1] != blocks_) {
    co_return Error(engine::errc::metadata_mismatch,
                    "import " + rec_.id + ": map file " + map_path() + " does not describe this volume");
  }
  region_blocks_ = static_cast<std::uint32_t>(hdr[2]);
  const std::uint64_t rest = (intent_pages_ + missing_pages_) * kPage;
  engine::IoBuffer all = env_->buffers().allocate(rest);
  TANDEM_CO_TRY(co_await map_->read(kPage, rest, all));
  std::vector<std::uint64_t> words(rest / 8);
  std::memcpy(words.data(), all.data(), rest);
  const std::uint64_t iw = intent_pages_ * kPage / 8;
  for (std::uint64_t w = 0; w < iw; ++w) {
    for (std::uint64_t bits = words[w]; bits != 0; bits &= bits - 1) {
      durable_hot_.insert(w * 64 + static_cast<std::uint64_t>(std::countr_zero(bits)));
    }
  }
  std::vector<std::uint64_t> mw(words.begin() + static_cast<std::ptrdiff_t>(iw), words.end());
  mw.resize(std::max<std::size_t>(mw.size(), (blocks_ + 63) / 64));
  for (std::uint64_t b = blocks_; b < mw.size() * 64; ++b) mw[b / 64] &= ~(1ULL << (b % 64));
  missing_ = engine::BlockBitmap(blocks_, std::move(mw));
  rec_.source_missing_blocks = missing_.count();
  co_return Status{};
}

// Every region hot at the crash: the blocks the volume is authoritative for go to the source (or
// are recorded missing when it is down); the source is authoritative for the rest, which the
// copy (or a host read) takes from it. Then the intent log is emptied.
asio::awaitable<Status> Import::recover_hot_regions() {
  if (durable_hot_.empty()) co_return Status{};
  spdlog::info("import {}: making {} write-intent region(s) equal on both copies", rec_.id, durable_hot_.size());
  engine::IoBuffer buf = env_->buffers().allocate(static_cast<std::size_t>(region_blocks_) * kBlock);
  for (std::uint64_t r : durable_hot_) {
    const std::uint64_t first = r * region_blocks_;
    if (first >= blocks_) continue;
    const std::uint64_t count = std::min<std::uint64_t>(region_blocks_, blocks_ - first);
    auto guard = co_await vol_->lock_blocks(first, count);
    for (std::uint64_t b = first; b < first + count;) {
      if (!is_copied(b)) {
        ++b;
        continue;
      }
      std::uint64_t e = b;
      while (e < first + count && is_copied(e)) ++e;
      Status st;
      if (connected_) {
        st = co_await vol_->read_locked(b * kBlock, (e - b) * kBlock, buf);
        if (st) st = co_await src_->write(b * kBlock, (e - b) * kBlock, buf, false);
        if (!st && !is_down_error(st, src_.get())) co_return st;
        if (!st) source_failed(st.error());
      }
      if (!connected_) TANDEM_CO_TRY(co_await add_missing(b, e - b));
      b = e;
    }
  }
  if (connected_) {
    Status st = co_await src_->flush();
    if (!st) source_failed(st.error());
  }
  hot_.clear();
  co_return co_await write_intent();
}

void Import::start() {
  if (started_) return;
  started_ = true;
  if (!filters_host_io(rec_.state)) return;
  loops_ += 2;
  rate_started_ms_ = unix_now_ms();
  rate_started_bytes_ = rec_.copied_bytes;
  asio::co_spawn(ex_, run(), AbortOnException{"an import's run loop"});
  asio::co_spawn(ex_, ticker(), AbortOnException{"an import's ticker"});
}

asio::awaitable<void> Import::stop() {
  stopping_ = true;
  run_timer_.cancel();
  tick_timer_.cancel();
  wake();
  while (loops_ > 0) {
    co_await loops_done_.wait();
    run_timer_.cancel();
    tick_timer_.cancel();
    wake();
  }
  if (!detached_ && vol_->host_filter() == this) vol_->set_host_filter(nullptr);
  detached_ = true;  // the volume may go away from here on
  if (src_) {
    auto s = std::move(src_);
    co_await s->close();
  }
  connected_ = false;
}

Status Import::remove_files() {
  std::error_code ec;
  std::filesystem::remove(map_path(), ec);
  if (ec) return Error(ec, "cannot remove " + map_path());
  std::filesystem::remove(record_path(), ec);
  if (ec) return Error(ec, "cannot remove " + record_path());
  return {};
}

asio::awaitable<Status> Import::persist_record() {
  rec_.last_update_ms = unix_now_ms();
  rec_.source_missing_blocks = missing_.count();
  co_return write_file_durably(record_path(), render_record(rec_));
}

asio::awaitable<Status> Import::set_state(ImportState s) {
  const ImportState was = rec_.state;
  rec_.state = s;
  Status st = co_await persist_record();
  if (!st) {
    rec_.state = was;
    co_return st;
  }
  spdlog::info("import {}: {} -> {}", rec_.id, to_string(was), to_string(s));
  if (s == ImportState::copy_in_progress) {
    rate_started_ms_ = unix_now_ms();
    rate_started_bytes_ = rec_.copied_bytes;
    samples_.clear();
  }
  wake();
  if (hooks_.changed) hooks_.changed(*this);
  co_return Status{};
}

void Import::set_error(const std::string& code, const std::string& message) {
  rec_.error_code = code;
  rec_.error_message = message;
}

void Import::clear_error() {
  rec_.error_code.clear();
  rec_.error_message.clear();
}

ImportStatus Import::status() const {
  ImportStatus s;
  s.record = rec_;
  s.record.source_missing_blocks = missing_.count();
  s.source_connected = connected_;
  const std::uint64_t size = rec_.source_size;
  const std::uint64_t restart = in_flight_.empty() ? next_ : *in_flight_.begin();
  s.record.restart_address = std::max(rec_.restart_address, filters_host_io(rec_.state) ? restart : 0);
  if (is_final(rec_.state) && rec_.state == ImportState::import_completed) s.record.restart_address = size;
  s.progress = size == 0 ? 0 : 100.0 * static_cast<double>(s.record.restart_address) / static_cast<double>(size);
  if (rec_.state == ImportState::copy_in_progress) {
    const std::int64_t now = unix_now_ms();
    const double secs = static_cast<double>(now - rate_started_ms_) / 1000.0;
    if (secs > 0) s.average_rate = static_cast<double>(rec_.copied_bytes - rate_started_bytes_) / secs;
    if (samples_.size() >= 2) {
      const auto& [t0, b0] = samples_.front();
      const auto& [t1, b1] = samples_.back();
      if (t1 > t0) s.current_rate = static_cast<double>(b1 - b0) * 1000.0 / static_cast<double>(t1 - t0);
    } else {
      s.current_rate = 0.0;
    }
    // The rate over the distance still to go, counted in source bytes scanned (holes go fast).
    if (scan_samples_.size() >= 2) {
      const auto& [t0, a0] = scan_samples_.front();
      const auto& [t1, a1] = scan_samples_.back();
      if (t1 > t0 && a1 > a0) {
        const double per_ms = static_cast<double>(a1 - a0) / static_cast<double>(t1 - t0);
        s.eta_ms = now + static_cast<std::int64_t>(static_cast<double>(size - s.record.restart_address) / per_ms);
      }
    }
  }
  s.host_reads_from_source = host_reads_from_source_;
  s.host_writes_mirrored = host_writes_mirrored_;
  return s;
}

// ---- blocks ---------------------------------------------------------------------------------

bool Import::is_copied(std::uint64_t block) const { return copied_.test(block) || missing_.test(block); }

std::vector<std::pair<std::uint64_t, std::uint64_t>> Import::uncopied_runs(std::uint64_t first,
                                                                           std::uint64_t count) const {
  std::vector<std::pair<std::uint64_t, std::uint64_t>> runs;
  const std::uint64_t end = std::min(first + count, blocks_);
  for (std::uint64_t b = first; b < end;) {
    if (is_copied(b)) {
      ++b;
      continue;
    }
    std::uint64_t e = b + 1;
    while (e < end && !is_copied(e)) ++e;
    runs.emplace_back(b, e - b);
    b = e;
  }
  return runs;
}

asio::awaitable<Status> Import::fetch_locked(std::uint64_t first, std::uint64_t count) {
  for (auto [b, n] : uncopied_runs(first, count)) {
    if (!connected_) co_return source_unreachable(rec_.error_message);
    auto src = src_;
    engine::IoBuffer buf = env_->buffers().allocate(n * kBlock);
    Status st = co_await src->read(b * kBlock, n * kBlock, buf);
    if (!st) {
      if (is_down_error(st, src.get())) source_failed(st.error());
      co_return Error(engine::errc::io_error,
                      "reading blocks not yet copied from the import's source: " + st.error().message());
    }
    TANDEM_CO_TRY(co_await vol_->fill_locked(b * kBlock, n * kBlock, buf));
    copied_.set_range(b, n);
    ++host_reads_from_source_;
  }
  co_return Status{};
}

// ---- host I/O -------------------------------------------------------------------------------

asio::awaitable<Status> Import::before_read(std::uint64_t first, std::uint64_t count) {
  if (rec_.state == ImportState::cancelled) co_return Error(engine::errc::io_error, "the import was cancelled");
  co_return co_await fetch_locked(first, count);
}

asio::awaitable<Status> Import::before_write(std::uint64_t offset, std::uint64_t len) {
  if (rec_.state == ImportState::cancelled) {
    co_return Error(engine::errc::read_only, "the import was cancelled: the host must go back to the source");
  }
  const std::uint64_t a0 = align_down(offset);
  const std::uint64_t a1 = align_up(offset + len);
  for (ReadAhead& r : reads_ahead_) {
    if (r.first < a1 / kBlock && a0 / kBlock < r.first + r.count) r.stale = true;
  }
  TANDEM_CO_TRY(co_await pin_regions(a0 / kBlock, (a1 - a0) / kBlock));
  // Partial edge blocks keep bytes the host did not write: they must be current first.
  Status st;
  if (offset != a0) st = co_await fetch_locked(a0 / kBlock, 1);
  if (st && offset + len != a1) st = co_await fetch_locked(a1 / kBlock - 1, 1);
  if (!st) unpin_regions(a0 / kBlock, (a1 - a0) / kBlock);
  co_return st;
}

asio::awaitable<Status> Import::mirror(std::uint64_t offset, std::uint64_t len, const engine::IoBuffer* src, bool fua) {
  if (!connected_) co_return Error(std::make_error_code(std::errc::not_connected), rec_.error_message);
  auto s = src_;
  // (No co_await inside ?: — GCC 12 miscompiles the temporaries.)
  Status st;
  if (src != nullptr) {
    st = co_await s->write(offset, len, *src, fua);
  } else {
    st = co_await s->zero(offset, len, fua);
  }
  if (st) {
    unflushed_.set_range(offset / kBlock, len / kBlock);
    ++host_writes_mirrored_;
  }
  co_return st;
}

asio::awaitable<Status> Import::after_write(std::uint64_t offset, std::uint64_t len, Status local, Status mirrored) {
  const std::uint64_t first = align_down(offset) / kBlock;
  const std::uint64_t count = (align_up(offset + len) - align_down(offset)) / kBlock;
  ++write_seq_;
  for (std::uint64_t r = first / region_blocks_; r <= (first + count - 1) / region_blocks_; ++r) {
    auto it = hot_.find(r);
    if (it != hot_.end()) it->second.last_write = write_seq_;
  }
  Status out = local;
  if (local) {
    copied_.set_range(first, count);  // the volume now holds these blocks whole
    if (!mirrored) {
      if (is_down_error(mirrored, src_.get())) source_failed(mirrored.error());
      Status st = co_await add_missing(first, count);
      if (!st) {
        out = Error(engine::errc::io_error,
                    "the source did not take the write and it could not be recorded: " + st.error().message());
      } else if (rec_.error_code.empty()) {
        set_error("source_write_failed", mirrored.error().message());
      }
    }
  }
  unpin_regions(first, count);
  co_return out;
}

asio::awaitable<Status> Import::flush() {
  if (rec_.state == ImportState::cancelled) co_return Status{};
  if (!connected_) {
    // Writes the source took but may not have made durable before it went away.
    co_return co_await unflushed_to_missing();
  }
  engine::BlockBitmap snapshot = unflushed_;
  auto s = src_;
  Status st = co_await s->flush();
  if (st) {
    unflushed_.subtract(snapshot);
    co_return Status{};
  }
  if (is_down_error(st, s.get())) source_failed(st.error());
  missing_.merge(snapshot);
  unflushed_.subtract(snapshot);
  co_return co_await write_missing_pages(0, missing_pages_);
}

asio::awaitable<Status> Import::unflushed_to_missing() {
  if (unflushed_.empty()) co_return Status{};
  missing_.merge(unflushed_);
  unflushed_.clear_all();
  co_return co_await write_missing_pages(0, missing_pages_);
}

// ---- intent log and missing set ---------------------------------------------------------------

asio::awaitable<Status> Import::pin_regions(std::uint64_t first_block, std::uint64_t count) {
  const std::uint64_t r0 = first_block / region_blocks_;
  const std::uint64_t r1 = (first_block + count - 1) / region_blocks_;
  bool need = false;
  for (std::uint64_t r = r0; r <= r1; ++r) {
    ++hot_[r].pins;
    if (!durable_hot_.contains(r)) need = true;
  }
  if (!need) co_return Status{};
  Status st = co_await write_intent();
  if (!st) unpin_regions(first_block, count);
  co_return st;
}

void Import::unpin_regions(std::uint64_t first_block, std::uint64_t count) {
  const std::uint64_t r0 = first_block / region_blocks_;
  const std::uint64_t r1 = (first_block + count - 1) / region_blocks_;
  for (std::uint64_t r = r0; r <= r1; ++r) {
    auto it = hot_.find(r);
    if (it != hot_.end() && it->second.pins > 0) --it->second.pins;
  }
}

// Writes the hot set as it is now (concurrent callers share the write that follows their change).
asio::awaitable<Status> Import::write_intent() {
  auto guard = co_await map_mu_.scoped();
  std::set<std::uint64_t> want;
  for (const auto& [r, h] : hot_) want.insert(r);
  if (want == durable_hot_) co_return Status{};
  const std::uint64_t bytes = intent_pages_ * kPage;
  engine::IoBuffer buf = env_->buffers().allocate(bytes);
  std::memset(buf.data(), 0, bytes);
  auto* words = reinterpret_cast<std::uint64_t*>(buf.data());
  for (std::uint64_t r : want) words[r / 64] |= 1ULL << (r % 64);
  TANDEM_CO_TRY(co_await map_->write(kPage, bytes, buf, false));
  TANDEM_CO_TRY(co_await map_->flush());
  // Regions pinned while this was written may be missing from `want`: they wait for the next.
  durable_hot_ = std::move(want);
  co_return Status{};
}

asio::awaitable<Status> Import::add_missing(std::uint64_t first_block, std::uint64_t count) {
  missing_.set_range(first_block, count);
  co_return co_await write_missing_pages(first_block / kBitsPerPage, (first_block + count - 1) / kBitsPerPage + 1);
}

asio::awaitable<Status> Import::write_missing_pages(std::uint64_t first_page, std::uint64_t end_page) {
  auto guard = co_await map_mu_.scoped();
  end_page = std::min(end_page, missing_pages_);
  if (first_page >= end_page) co_return Status{};
  const std::uint64_t bytes = (end_page - first_page) * kPage;
  engine::IoBuffer buf = env_->buffers().allocate(bytes);
  std::memset(buf.data(), 0, bytes);
  const auto& words = missing_.words();
  const std::uint64_t w0 = first_page * kPage / 8;
  const std::uint64_t w1 = std::min<std::uint64_t>(words.size(), end_page * kPage / 8);
  if (w1 > w0) std::memcpy(buf.data(), words.data() + w0, (w1 - w0) * 8);
  TANDEM_CO_TRY(co_await map_->write((1 + intent_pages_ + first_page) * kPage, bytes, buf, false));
  co_return co_await map_->flush();
}

// ---- background work ------------------------------------------------------------------------

void Import::source_failed(const Error& e) {
  if (!connected_) return;
  connected_ = false;
  set_error("source_unreachable", e.message());
  spdlog::warn("import {}: source {} unreachable: {}", rec_.id, redact_uri(rec_.source_uri), e.message());
  wake();
}

asio::awaitable<void> Import::sleep_ms(std::uint64_t ms) {
  run_timer_.expires_after(std::chrono::milliseconds(ms));
  co_await run_timer_.async_wait(kTuple);
}

asio::awaitable<void> Import::run() {
  std::uint64_t backoff = opts_.reconnect_min_ms;
  while (!stopping_ && filters_host_io(rec_.state)) {
    if (!connected_) {
      co_await reconnect();
      if (!connected_ && !stopping_) {
        co_await sleep_ms(backoff);
        backoff = std::min<std::uint64_t>(backoff * 2, opts_.reconnect_max_ms);
      } else {
        backoff = opts_.reconnect_min_ms;
      }
      continue;
    }
    if (!missing_.empty() && rec_.state != ImportState::cancel_in_progress) {
      Status st = co_await catch_up();
      if (!st && connected_ && !stopping_) {
        set_error("source_write_failed", st.error().message());
        co_await sleep_ms(backoff);
        backoff = std::min<std::uint64_t>(backoff * 2, opts_.reconnect_max_ms);
      }
      continue;
    }
    if (rec_.state == ImportState::copy_in_progress) {
      co_await copy();
      continue;
    }
    co_await wake_.wait();
  }
  --loops_;
  loops_done_.notify_all();
}

asio::awaitable<void> Import::ticker() {
  while (!stopping_ && filters_host_io(rec_.state)) {
    if (!checkpoint_asked_) {
      tick_timer_.expires_after(std::chrono::milliseconds(opts_.checkpoint_ms));
      co_await tick_timer_.async_wait(kTuple);
    }
    checkpoint_asked_ = false;
    if (stopping_) break;
    const std::int64_t now = unix_now_ms();
    samples_.emplace_back(now, rec_.copied_bytes + rec_.skipped_bytes);
    scan_samples_.emplace_back(now, in_flight_.empty() ? next_ : *in_flight_.begin());
    while (samples_.size() > 5) samples_.pop_front();
    while (scan_samples_.size() > 5) scan_samples_.pop_front();
    if (connected_ && filters_host_io(rec_.state)) {
      Status st = co_await checkpoint();
      if (!st) spdlog::warn("import {}: checkpoint: {}", rec_.id, st.error().message());
    }
  }
  --loops_;
  loops_done_.notify_all();
}

// Closes the dead source, keeps what it may have lost as missing, and opens it again. One
// attempt at a time: a second caller waits for the first's result.
asio::awaitable<void> Import::reconnect() {
  if (reconnecting_) {
    while (reconnecting_) co_await reconnected_.wait();
    co_return;
  }
  reconnecting_ = true;
  co_await reconnect_once();
  reconnecting_ = false;
  reconnected_.notify_all();
}

asio::awaitable<void> Import::reconnect_once() {
  if (connected_) co_return;
  if (src_) {
    auto old = std::move(src_);
    co_await old->close();
  }
  Status st = co_await unflushed_to_missing();
  if (!st) spdlog::error("import {}: cannot record blocks the source lacks: {}", rec_.id, st.error().message());
  auto src = co_await open_source(ex_, *env_, rec_.source_uri, opts_.source);
  if (stopping_) {
    if (src) co_await (*src)->close();
    co_return;
  }
  if (!src) {
    rec_.error_message = src.error().message();
    co_return;
  }
  if ((*src)->size() != rec_.source_size) {
    rec_.error_message =
        "the source is now " + std::to_string((*src)->size()) + " bytes, was " + std::to_string(rec_.source_size);
    co_await (*src)->close();
    co_return;
  }
  src_ = std::shared_ptr<ForeignSource>(std::move(src).value());
  connected_ = true;
  clear_error();
  spdlog::info("import {}: source {} is back; {} block(s) to write to it first", rec_.id, redact_uri(rec_.source_uri),
               missing_.count());
  (void)co_await persist_record();
}

// Writes the blocks the source lacks to it, from the volume, a range at a time under the range
// lock (a host write in between either is mirrored or makes the block missing again), then
// flushes the source and forgets them, durably.
asio::awaitable<Status> Import::catch_up() {
  const std::uint64_t max_blocks = opts_.chunk_bytes / kBlock;
  engine::BlockBitmap done(blocks_);
  for (std::uint64_t b = missing_.next_set(0); b < blocks_ && !stopping_;) {
    if (!connected_) co_return source_unreachable(rec_.error_message);
    std::uint64_t e = b + 1;
    while (e < blocks_ && e - b < max_blocks && missing_.test(e)) ++e;
    {
      auto guard = co_await vol_->lock_blocks(b, e - b);
      engine::IoBuffer buf = env_->buffers().allocate((e - b) * kBlock);
      TANDEM_CO_TRY(co_await vol_->read_locked(b * kBlock, (e - b) * kBlock, buf));
      auto s = src_;
      Status st = co_await s->write(b * kBlock, (e - b) * kBlock, buf, false);
      if (!st) {
        if (is_down_error(st, s.get())) source_failed(st.error());
        co_return st;
      }
      done.set_range(b, e - b);
    }
    b = missing_.next_set(e);
  }
  if (stopping_) co_return Status{};
  auto s = src_;
  Status st = co_await s->flush();
  if (!st) {
    if (is_down_error(st, s.get())) source_failed(st.error());
    co_return st;
  }
  // Blocks that went missing again meanwhile (a failed mirror) stay: only what was written and
  // is not newer is forgotten. A failed mirror sets the bit again after this point anyway.
  missing_.subtract(done);
  TANDEM_CO_TRY(co_await write_missing_pages(0, missing_pages_));
  spdlog::info("import {}: the source has every block again", rec_.id);
  if (rec_.error_code == "source_write_failed") clear_error();
  co_return co_await persist_record();
}

asio::awaitable<Status> Import::checkpoint() {
  auto guard = co_await ckpt_mu_.scoped();
  const std::uint64_t restart = in_flight_.empty() ? next_ : *in_flight_.begin();
  const std::uint64_t seq = write_seq_;
  bool cool = false;
  for (const auto& [r, h] : hot_) cool = cool || (h.pins == 0);
  const bool advance = restart > durable_restart_;
  if (!advance && !cool) co_return Status{};
  // Both copies durable up to here: the restart address may cover what was copied, and regions
  // whose writes are all older may leave the intent log.
  TANDEM_CO_TRY(co_await vol_->flush_data());
  if (cool && connected_) {
    engine::BlockBitmap snapshot = unflushed_;
    auto s = src_;
    Status st = co_await s->flush();
    if (st) {
      unflushed_.subtract(snapshot);
      flushed_seq_ = seq;
    } else {
      if (is_down_error(st, s.get())) source_failed(st.error());
    }
  }
  if (advance) {
    rec_.restart_address = restart;
    TANDEM_CO_TRY(co_await persist_record());
    durable_restart_ = restart;
    last_checkpoint_bytes_ = restart;
  }
  if (cool) {
    for (auto it = hot_.begin(); it != hot_.end();) {
      if (it->second.pins == 0 && it->second.last_write <= flushed_seq_) {
        it = hot_.erase(it);
      } else {
        ++it;
      }
    }
    TANDEM_CO_TRY(co_await write_intent());
  }
  co_return Status{};
}

// The background copy: chunks in offset order, copy_depth at once, until paused, done, stopped
// or the source fails.
asio::awaitable<void> Import::copy() {
  const std::uint64_t size = rec_.source_size;
  const std::uint64_t ckpt = checkpoint_bytes(size);
  TaskGroup group(ex_);
  std::uint64_t failed_at = size;
  while (!stopping_ && rec_.state == ImportState::copy_in_progress && connected_ && missing_.empty() && next_ < size &&
         group.first_error().ok()) {
    if (extents_.empty() || extents_.back().offset + extents_.back().length <= next_) {
      auto s = src_;
      auto ext = co_await s->extents(next_, std::min(kExtentsAhead, size - next_));
      if (!ext) {
        if (is_down_error(ext.error(), s.get())) {
          source_failed(ext.error());
        } else {
          set_error("source_read_failed", ext.error().message());
          co_await sleep_ms(opts_.reconnect_min_ms);
        }
        break;
      }
      extents_ = std::move(ext).value();
    }
    while (!extents_.empty() && extents_.front().offset + extents_.front().length <= next_) {
      extents_.erase(extents_.begin());
    }
    if (extents_.empty()) continue;
    const SourceExtent e = extents_.front();
    const std::uint64_t e_end = e.offset + e.length;
    if (e.zero && reads_zero_) {
      // Holes and zeros the volume already reads as zeros: nothing to move.
      const std::uint64_t first = next_ / kBlock;
      const std::uint64_t n = (e_end - next_) / kBlock;
      std::uint64_t skip = 0;
      for (std::uint64_t b = first; b < first + n; ++b) skip += is_copied(b) ? 0U : 1U;
      copied_.set_range(first, n);
      rec_.skipped_bytes += skip * kBlock;
      next_ = e_end;
      continue;
    }
    const std::uint64_t len = std::min<std::uint64_t>(e.zero ? (64ULL << 20) : opts_.chunk_bytes, e_end - next_);
    if (!e.zero && rec_.rate_limit > 0) {
      // Paced by the bytes moved: each chunk starts no sooner than its share of the limit.
      const double now = static_cast<double>(unix_now_ms());
      if (pace_next_ms_ > now) co_await sleep_ms(static_cast<std::uint64_t>(pace_next_ms_ - now));
      pace_next_ms_ =
          std::max(pace_next_ms_, now) + static_cast<double>(len) * 1000.0 / static_cast<double>(rec_.rate_limit);
      if (stopping_ || rec_.state != ImportState::copy_in_progress) break;
    }
    co_await group.wait_below(opts_.copy_depth);
    if (!group.first_error().ok()) break;
    const std::uint64_t at = next_;
    in_flight_.insert(at);
    next_ += len;
    group.spawn(copy_chunk(at, len, e.zero));
    if (next_ - last_checkpoint_bytes_ >= ckpt && !checkpoint_asked_) {
      // The ticker writes it now, beside the copy (a flush inline would stall the pipeline).
      checkpoint_asked_ = true;
      tick_timer_.cancel();
    }
  }
  Status st = co_await group.wait();
  if (!in_flight_.empty()) {
    // Chunks that failed: the copy goes on from the first of them.
    failed_at = *in_flight_.begin();
    in_flight_.clear();
    next_ = std::min(next_, failed_at);
    extents_.clear();
  }
  if (!st) {
    if (!connected_ || is_down_error(st, src_.get())) {
      source_failed(st.error());
    } else {
      set_error("copy_failed", st.error().message());
      spdlog::warn("import {}: copy at {}: {}; retrying", rec_.id, failed_at, st.error().message());
      co_await sleep_ms(opts_.reconnect_min_ms);
    }
    co_return;
  }
  if (stopping_) co_return;
  if (next_ >= size && in_flight_.empty() && missing_.empty() && rec_.state == ImportState::copy_in_progress) {
    Status cst = co_await checkpoint();
    if (!cst) {
      set_error("checkpoint_failed", cst.error().message());
      co_await sleep_ms(opts_.reconnect_min_ms);
      co_return;
    }
    if (rec_.error_code == "copy_failed" || rec_.error_code == "source_read_failed") clear_error();
    spdlog::info("import {}: copy complete ({} bytes copied, {} skipped)", rec_.id, rec_.copied_bytes,
                 rec_.skipped_bytes);
    if (!(co_await set_state(ImportState::ready_for_cutover))) co_return;
    if (rec_.automatic_cutover) {
      Status c = co_await cutover();
      if (!c) spdlog::error("import {}: automatic cutover: {}", rec_.id, c.error().message());
    }
  }
}

asio::awaitable<Status> Import::copy_chunk(std::uint64_t offset, std::uint64_t len, bool zero) {
  const std::uint64_t first = offset / kBlock;
  const std::uint64_t count = len / kBlock;
  // Data is read from the source before the range lock is taken, so host I/O to these blocks
  // never waits behind the source. A host write to them meanwhile marks the read stale: the
  // locked pass then reads again whatever is still not copied.
  struct Run {
    std::uint64_t block;
    std::uint64_t count;
    engine::IoBuffer buf;
  };
  std::vector<Run> ahead;
  if (!zero) {
    auto mark = reads_ahead_.insert(reads_ahead_.end(), ReadAhead{first, count, false});
    Status st;
    for (auto [b, n] : uncopied_runs(first, count)) {
      if (!connected_) {
        st = source_unreachable(rec_.error_message);
        break;
      }
      auto s = src_;
      engine::IoBuffer buf = env_->buffers().allocate(n * kBlock);
      st = co_await s->read(b * kBlock, n * kBlock, buf);
      if (!st) break;
      ahead.push_back(Run{b, n, std::move(buf)});
    }
    const bool stale = mark->stale;
    reads_ahead_.erase(mark);
    TANDEM_CO_TRY(std::move(st));
    if (stale) ahead.clear();
  }
  {
    auto guard = co_await vol_->lock_blocks(first, count);
    for (auto [b, n] : uncopied_runs(first, count)) {
      if (zero) {
        TANDEM_CO_TRY(co_await vol_->zero_fill_locked(b * kBlock, n * kBlock));
        rec_.skipped_bytes += n * kBlock;
        copied_.set_range(b, n);
        continue;
      }
      // Blocks only ever become copied, so a run now lies inside one run read ahead.
      auto run = std::find_if(ahead.begin(), ahead.end(),
                              [&](const Run& r) { return r.block <= b && b + n <= r.block + r.count; });
      engine::IoBuffer buf;
      if (run != ahead.end() && run->block == b && run->count == n) {
        buf = std::move(run->buf);
      } else if (run != ahead.end()) {
        buf = env_->buffers().allocate(n * kBlock);
        std::memcpy(buf.data(), run->buf.data() + (b - run->block) * kBlock, n * kBlock);
      } else {
        if (!connected_) co_return source_unreachable(rec_.error_message);
        auto s = src_;
        buf = env_->buffers().allocate(n * kBlock);
        TANDEM_CO_TRY(co_await s->read(b * kBlock, n * kBlock, buf));
      }
      TANDEM_CO_TRY(co_await vol_->fill_locked(b * kBlock, n * kBlock, buf));
      rec_.copied_bytes += n * kBlock;
      copied_.set_range(b, n);
    }
  }
  in_flight_.erase(offset);
  co_return Status{};
}

// ---- actions --------------------------------------------------------------------------------

asio::awaitable<Status> Import::begin_copy() { co_return co_await set_state(ImportState::copy_in_progress); }

asio::awaitable<Status> Import::set_queued() { co_return co_await set_state(ImportState::queued); }

asio::awaitable<Status> Import::pause() { co_return co_await set_state(ImportState::paused); }

asio::awaitable<Status> Import::resume() { co_return co_await set_state(ImportState::copy_in_progress); }

asio::awaitable<Status> Import::cutover() {
  TANDEM_CO_TRY(co_await set_state(ImportState::cutover_in_progress));
  // No host write in flight across the switch: each one went to both copies or goes to the
  // volume alone.
  co_await vol_->hold_writes();
  Status st = co_await vol_->flush_data();
  if (!st) {
    vol_->release_writes();
    (void)co_await set_state(ImportState::ready_for_cutover);
    co_return st;
  }
  vol_->set_host_filter(nullptr);
  vol_->release_writes();
  stopping_ = true;  // the loops end; stop() (by the owner) closes the source
  run_timer_.cancel();
  tick_timer_.cancel();
  rec_.restart_address = rec_.source_size;
  TANDEM_CO_TRY(co_await set_state(ImportState::import_completed));
  std::error_code ec;
  std::filesystem::remove(map_path(), ec);
  co_return Status{};
}

asio::awaitable<Status> Import::cancel(bool force) {
  if (!force) TANDEM_CO_TRY(co_await set_state(ImportState::cancel_in_progress));
  // The copy stops dispatching on the state change; wait for the volume's writes to drain so no
  // write is half mirrored when the source is judged complete.
  co_await vol_->hold_writes();
  if (!force) {
    Status st;
    if (!connected_) {
      co_await reconnect();
      if (!connected_) st = source_unreachable(rec_.error_message);
    }
    if (st) st = co_await unflushed_to_missing();
    if (st && !missing_.empty()) st = co_await catch_up();
    if (st) {
      auto s = src_;
      st = co_await s->flush();
    }
    if (!st) {
      vol_->release_writes();
      set_error("cancel_failed", "the source could not be brought up to date: " + st.error().message());
      (void)co_await set_state(ImportState::cancel_failed);
      co_return Error(st.error().code, rec_.error_message);
    }
  } else {
    // What the source lacks is said in the record.
    (void)co_await unflushed_to_missing();
  }
  // From here host I/O to the volume is refused (the filter stays to refuse it).
  stopping_ = true;
  run_timer_.cancel();
  tick_timer_.cancel();
  Status st = co_await set_state(ImportState::cancelled);
  vol_->release_writes();
  co_return st;
}

}  // namespace tandem::importer

// ImportManager: every import of this daemon, their records, and admission.
//
// Admission: an import starts Scheduled (a start time in the future) or Queued; when its time
// has come it is Queued, and a Queued import starts copying once fewer than max_concurrent
// imports hold a slot (Copy_In_Progress or Paused: a paused import keeps its slot, so a resume
// never has to wait). Host I/O through the import's volume is served in every state from
// creation on: only the background copy waits.
//
// Threading: one io_context thread. stop() must complete before destruction.
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/steady_timer.hpp>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tandem/importer/import.h"

namespace tandem::importer {

struct ImportManagerOptions {
  std::string dir;  // <state_dir>/imports
  std::uint32_t max_concurrent = 2;
  ImportOptions import;  // dir is set from the above
};

class ImportManager {
 public:
  ImportManager(asio::any_io_executor ex, ImportManagerOptions opts);
  ~ImportManager();

  // The records kept in dir (after a restart), each parsed strictly; a file that does not parse
  // is an error naming it.
  Result<std::vector<ImportRecord>> load_records() const;
  [[nodiscard]] const ImportManagerOptions& options() const { return opts_; }

  // Takes an import (new, or recovered after a restart) and starts it.
  void adopt(std::unique_ptr<Import> im);
  [[nodiscard]] Import* find(const std::string& id) const;
  [[nodiscard]] std::vector<Import*> all() const;
  // The import that fills this volume and still filters its I/O, if any.
  [[nodiscard]] Import* filling(const std::string& volume_id) const;

  // An action of the contract's table; the caller checked import_action_allowed().
  asio::awaitable<Status> act(Import& im, ImportAction a);
  // Forgets a finished import (its record and map file); the caller checked the state.
  asio::awaitable<Status> remove(const std::string& id);

  // Called once an import has ended Cancelled or Import_Completed (by action or by itself). A
  // cancelled import still refuses host I/O through its filter: the owner withdraws the export,
  // then calls the import's stop() (idempotent; the manager calls it afterwards in any case)
  // before it closes and removes the volume.
  std::function<asio::awaitable<void>(Import&)> on_final;

  // Starts the scheduler (start times, admission).
  void start();
  // Until no import's end is being handled (shutdown waits for a cancelled one's removal).
  asio::awaitable<void> settle();
  // Stops every import (records stay) and the scheduler.
  asio::awaitable<void> stop();

 private:
  void admit();
  asio::awaitable<void> scheduler();
  void changed(Import& im);
  asio::awaitable<void> finish(Import* im);

  asio::any_io_executor ex_;
  ImportManagerOptions opts_;
  std::vector<std::unique_ptr<Import>> imports_;
  asio::steady_timer timer_;
  bool running_ = false;
  bool stopping_ = false;
  bool admitting_ = false;
  std::uint32_t finishing_ = 0;  // final-state handlers running
  WaitQueue scheduler_done_;
  WaitQueue idle_;
};

}  // namespace tandem::importer

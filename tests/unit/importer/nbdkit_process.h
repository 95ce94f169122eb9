// Test helper: an nbdkit server started as a child process on a Unix socket in a test's own
// directory, stopped (by its PID) when the helper goes away. Waits, bounded, for the socket.
#pragma once

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace tandem::test {

class NbdkitProcess {
 public:
  // args: the filters, plugin and plugin arguments, e.g. {"--filter=delay", "memory", "1M"}.
  NbdkitProcess(const std::string& nbdkit, const std::filesystem::path& socket, std::vector<std::string> args)
      : socket_(socket) {
    std::filesystem::remove(socket_);
    std::vector<std::string> all = {nbdkit, "-f", "-U", socket_.string()};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : all) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (::posix_spawn(&pid_, argv[0], nullptr, nullptr, argv.data(), environ) != 0) {
      throw std::runtime_error("cannot start nbdkit");
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!std::filesystem::exists(socket_)) {
      if (std::chrono::steady_clock::now() > deadline) throw std::runtime_error("nbdkit did not create its socket");
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("nbdkit exited at start");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  ~NbdkitProcess() { stop(SIGTERM); }
  NbdkitProcess(const NbdkitProcess&) = delete;
  NbdkitProcess& operator=(const NbdkitProcess&) = delete;

  [[nodiscard]] std::string uri() const { return "nbd+unix:///?socket=" + socket_.string(); }
  [[nodiscard]] pid_t pid() const { return pid_; }
  void stop(int sig) {
    if (pid_ <= 0) return;
    ::kill(pid_, sig);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }

 private:
  std::filesystem::path socket_;
  pid_t pid_ = -1;
};

}  // namespace tandem::test

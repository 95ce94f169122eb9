// Stand-alone driver for tandem's fuzzers when libFuzzer is not used (GCC builds, ctest).
//
//   <fuzzer> [--iterations N] [--seed S] [--start K] [--max-len L] [FILE...]
//
// Runs every FILE given as one input, then iterations K..K+N-1. Input k is derived from
// (S, k) alone: with probability 1/8 random bytes, otherwise a seed from tandem::fuzz::seeds()
// put through 1-8 random mutations (bit flips, byte sets, boundary integers, inserts, deletes,
// duplicated ranges, splices with another seed, truncation). The run is deterministic, so a
// failure replays with `--seed S --start k --iterations 1`; on a crash signal the driver
// prints exactly that line and writes the input to ./crash-S-k.
//
// Bounded: inputs are at most --max-len bytes (default 64 KiB), and ctest passes an
// iteration count that keeps each fuzzer to a few seconds.
#include <fcntl.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "fuzz_driver.h"

namespace {

// Where a crash handler finds the input being run (async-signal-safe reads only).
const std::uint8_t* g_input = nullptr;
std::size_t g_input_size = 0;
std::uint64_t g_seed = 0;
std::uint64_t g_iteration = 0;
bool g_in_iteration = false;
bool g_replayable = false;  // a generated input (not a file or a seed as is)

void write_str(int fd, const char* s) { (void)!::write(fd, s, std::strlen(s)); }

// Decimal rendering without allocation, for the signal handler.
void write_u64(int fd, std::uint64_t v) {
  char buf[24];
  int i = 23;
  buf[i] = '\0';
  do {
    buf[--i] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v != 0 && i > 0);
  write_str(fd, buf + i);
}

void on_crash(int sig) {
  if (g_in_iteration) {
    write_str(2, "\nfuzz driver: crash (signal ");
    write_u64(2, static_cast<std::uint64_t>(sig));
    if (g_replayable) {
      write_str(2, "); replay with: --seed ");
      write_u64(2, g_seed);
      write_str(2, " --start ");
      write_u64(2, g_iteration);
      write_str(2, " --iterations 1\n");
    } else {
      write_str(2, ") on a file or seed input\n");
    }
    char name[64] = "crash-";
    std::size_t n = std::strlen(name);
    auto append = [&](std::uint64_t v) {
      char tmp[24];
      int i = 0;
      do {
        tmp[i++] = static_cast<char>('0' + v % 10);
        v /= 10;
      } while (v != 0 && i < 23);
      while (i > 0 && n < sizeof name - 1) name[n++] = tmp[--i];
    };
    append(g_seed);
    name[n++] = '-';
    append(g_iteration);
    name[n] = '\0';
    const int fd = ::open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      (void)!::write(fd, g_input, g_input_size);
      ::close(fd);
      write_str(2, "fuzz driver: input written to ");
      write_str(2, name);
      write_str(2, "\n");
    }
  }
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

using Input = std::vector<std::uint8_t>;

std::uint64_t mix(std::uint64_t seed, std::uint64_t k) {
  // splitmix64 of (seed, k): independent streams per iteration, so any one replays alone.
  std::uint64_t z = seed + 0x9e3779b97f4a7c15ull * (k + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

class Mutator {
 public:
  Mutator(std::uint64_t seed, const std::vector<Input>& seeds, std::size_t max_len)
      : rng_(seed), seeds_(seeds), max_len_(max_len) {}

  Input make() {
    if (seeds_.empty() || pick(8) == 0) return random_bytes(pick(max_len_ < 512 ? max_len_ : 512) + 1);
    Input in = seeds_[pick(seeds_.size())];
    const std::size_t n = 1 + pick(8);
    for (std::size_t i = 0; i < n; ++i) mutate(in);
    if (in.size() > max_len_) in.resize(max_len_);
    return in;
  }

 private:
  std::size_t pick(std::size_t n) { return n == 0 ? 0 : static_cast<std::size_t>(rng_() % n); }
  std::uint8_t byte() { return static_cast<std::uint8_t>(rng_()); }
  Input random_bytes(std::size_t n) {
    Input b(n);
    for (auto& x : b) x = byte();
    return b;
  }

  void mutate(Input& in) {
    const std::size_t at = pick(in.size() + 1);
    switch (pick(9)) {
      case 0:  // flip a bit
        if (!in.empty()) in[pick(in.size())] ^= static_cast<std::uint8_t>(1u << pick(8));
        break;
      case 1:  // set a byte
        if (!in.empty()) in[pick(in.size())] = byte();
        break;
      case 2: {  // a boundary integer, big-endian (the byte order of tandem's wire formats)
        static constexpr std::uint64_t kInteresting[] = {0,
                                                         1,
                                                         0x7f,
                                                         0x80,
                                                         0xff,
                                                         0x100,
                                                         0x7fff,
                                                         0x8000,
                                                         0xffff,
                                                         0x10000,
                                                         0x7fffffff,
                                                         0x80000000,
                                                         0xffffffff,
                                                         0x100000000ull,
                                                         0x7fffffffffffffffull,
                                                         0xffffffffffffffffull};
        const std::uint64_t v = kInteresting[pick(std::size(kInteresting))];
        const std::size_t width = std::size_t{1} << pick(4);  // 1, 2, 4 or 8 bytes
        for (std::size_t i = 0; i < width && at + i < in.size(); ++i) {
          in[at + i] = static_cast<std::uint8_t>(v >> (8 * (width - 1 - i)));
        }
        break;
      }
      case 3: {  // insert random bytes
        const Input r = random_bytes(1 + pick(16));
        in.insert(in.begin() + static_cast<std::ptrdiff_t>(at), r.begin(), r.end());
        break;
      }
      case 4: {  // delete a range
        const std::size_t n = pick(std::min<std::size_t>(64, in.size() - at) + 1);
        in.erase(in.begin() + static_cast<std::ptrdiff_t>(at), in.begin() + static_cast<std::ptrdiff_t>(at + n));
        break;
      }
      case 5: {  // duplicate a range (repeats a message)
        if (in.empty()) break;
        const std::size_t from = pick(in.size());
        const std::size_t n = 1 + pick(std::min<std::size_t>(64, in.size() - from));
        const Input r(in.begin() + static_cast<std::ptrdiff_t>(from),
                      in.begin() + static_cast<std::ptrdiff_t>(from + n));
        in.insert(in.begin() + static_cast<std::ptrdiff_t>(at), r.begin(), r.end());
        break;
      }
      case 6: {  // splice: our head, another seed's tail
        const Input& o = seeds_[pick(seeds_.size())];
        const std::size_t from = pick(o.size() + 1);
        in.resize(at);
        in.insert(in.end(), o.begin() + static_cast<std::ptrdiff_t>(from), o.end());
        break;
      }
      case 7:  // truncate
        in.resize(at);
        break;
      default: {  // swap two bytes
        if (in.size() < 2) break;
        std::swap(in[pick(in.size())], in[pick(in.size())]);
        break;
      }
    }
  }

  std::mt19937_64 rng_;
  const std::vector<Input>& seeds_;
  std::size_t max_len_;
};

void run(const Input& in, std::uint64_t iteration, bool replayable) {
  g_input = in.data();
  g_input_size = in.size();
  g_iteration = iteration;
  g_replayable = replayable;
  g_in_iteration = true;
  LLVMFuzzerTestOneInput(in.data(), in.size());
  g_in_iteration = false;
}

[[noreturn]] void usage(const char* argv0) {
  std::fprintf(stderr, "usage: %s [--iterations N] [--seed S] [--start K] [--max-len L] [FILE...]\n", argv0);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  std::uint64_t iterations = 10000;
  std::uint64_t seed = 20240601;
  std::uint64_t start = 0;
  std::size_t max_len = 64 * 1024;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::uint64_t {
      if (i + 1 >= argc) usage(argv[0]);
      return std::strtoull(argv[++i], nullptr, 0);
    };
    if (a == "--iterations") {
      iterations = value();
    } else if (a == "--seed") {
      seed = value();
    } else if (a == "--start") {
      start = value();
    } else if (a == "--max-len") {
      max_len = static_cast<std::size_t>(value());
    } else if (a.starts_with("--")) {
      usage(argv[0]);
    } else {
      files.push_back(a);
    }
  }
  if (max_len == 0) usage(argv[0]);
  for (int sig : {SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL}) std::signal(sig, on_crash);
  g_seed = seed;

  for (const auto& f : files) {
    std::ifstream is(f, std::ios::binary);
    if (!is) {
      std::fprintf(stderr, "cannot read %s\n", f.c_str());
      return 2;
    }
    const Input in((std::istreambuf_iterator<char>(is)), std::istreambuf_iterator<char>());
    std::fprintf(stderr, "running %s (%zu bytes)\n", f.c_str(), in.size());
    run(in, 0, false);
  }

  std::vector<Input> seeds;
  for (const auto& s : tandem::fuzz::seeds()) seeds.emplace_back(s.begin(), s.end());
  std::printf("fuzz driver: seed=%llu start=%llu iterations=%llu seeds=%zu max-len=%zu\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(start),
              static_cast<unsigned long long>(iterations), seeds.size(), max_len);
  std::fflush(stdout);
  // Every seed as is first: the well-formed paths must pass before their mutations.
  if (start == 0) {
    for (const auto& s : seeds) run(s, 0, false);
  }
  for (std::uint64_t k = start; k < start + iterations; ++k) {
    Mutator m(mix(seed, k), seeds, max_len);
    run(m.make(), k, true);
  }
  std::printf("fuzz driver: %llu inputs ok\n", static_cast<unsigned long long>(iterations));
  return 0;
}

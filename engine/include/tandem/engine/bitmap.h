// BlockBitmap: a set of 4 KiB blocks, one bit per block, with fast counting, run iteration and
// rank (the position of a set bit among the set bits, used to place a block in a dense file).
//
// Value type; not thread-safe. Words are u64, block b at bit b % 64 of word b / 64, the layout
// of the on-disk bitmaps (docs/metadata-format.md).
#pragma once

#include <bit>
#include <cstdint>
#include <vector>

#include "tandem/common/assert.h"

namespace tandem::engine {

class BlockBitmap {
 public:
  BlockBitmap() = default;
  explicit BlockBitmap(std::uint64_t blocks) : blocks_(blocks), words_((blocks + 63) / 64, 0) {}
  BlockBitmap(std::uint64_t blocks, std::vector<std::uint64_t> words) : blocks_(blocks), words_(std::move(words)) {
    TANDEM_ASSERT(words_.size() >= (blocks + 63) / 64);
    recount();
  }

  [[nodiscard]] std::uint64_t blocks() const { return blocks_; }
  [[nodiscard]] std::uint64_t count() const { return count_; }
  [[nodiscard]] bool empty() const { return count_ == 0; }
  [[nodiscard]] const std::vector<std::uint64_t>& words() const { return words_; }

  [[nodiscard]] bool test(std::uint64_t b) const {
    TANDEM_ASSERT(b < blocks_);
    return ((words_[b / 64] >> (b % 64)) & 1u) != 0;
  }
  void set(std::uint64_t b) {
    TANDEM_ASSERT(b < blocks_);
    const std::uint64_t m = 1ull << (b % 64);
    if ((words_[b / 64] & m) == 0) {
      words_[b / 64] |= m;
      ++count_;
      ranks_valid_ = false;
    }
  }
  void set_range(std::uint64_t first, std::uint64_t n) {
    for (std::uint64_t b = first; b < first + n; ++b) set(b);
  }
  void reset(std::uint64_t b) {
    TANDEM_ASSERT(b < blocks_);
    const std::uint64_t m = 1ull << (b % 64);
    if ((words_[b / 64] & m) != 0) {
      words_[b / 64] &= ~m;
      --count_;
      ranks_valid_ = false;
    }
  }
  void reset_range(std::uint64_t first, std::uint64_t n) {
    for (std::uint64_t b = first; b < first + n; ++b) reset(b);
  }
  void clear_all() {
    std::fill(words_.begin(), words_.end(), 0);
    count_ = 0;
    ranks_valid_ = false;
  }
  // this &= ~other
  void subtract(const BlockBitmap& other) {
    TANDEM_ASSERT(other.blocks_ == blocks_);
    for (std::size_t i = 0; i < words_.size(); ++i) words_[i] &= ~other.words_[i];
    recount();
  }
  // this |= other
  void merge(const BlockBitmap& other) {
    TANDEM_ASSERT(other.blocks_ == blocks_);
    for (std::size_t i = 0; i < words_.size(); ++i) words_[i] |= other.words_[i];
    recount();
  }

  // First set block >= from, or blocks() if none.
  [[nodiscard]] std::uint64_t next_set(std::uint64_t from) const {
    if (from >= blocks_) return blocks_;
    std::size_t w = from / 64;
    std::uint64_t word = words_[w] & (~0ull << (from % 64));
    while (word == 0) {
      if (++w >= words_.size()) return blocks_;
      word = words_[w];
    }
    const std::uint64_t b = w * 64 + static_cast<std::uint64_t>(std::countr_zero(word));
    return b < blocks_ ? b : blocks_;
  }
  // First clear block >= from, or blocks() if none.
  [[nodiscard]] std::uint64_t next_clear(std::uint64_t from) const {
    if (from >= blocks_) return blocks_;
    std::size_t w = from / 64;
    std::uint64_t word = ~words_[w] & (~0ull << (from % 64));
    while (word == 0) {
      if (++w >= words_.size()) return blocks_;
      word = ~words_[w];
    }
    const std::uint64_t b = w * 64 + static_cast<std::uint64_t>(std::countr_zero(word));
    return b < blocks_ ? b : blocks_;
  }

  // Number of set blocks before b (b itself excluded).
  [[nodiscard]] std::uint64_t rank(std::uint64_t b) const {
    TANDEM_ASSERT(b < blocks_);
    if (!ranks_valid_) build_ranks();
    const std::size_t w = b / 64;
    const std::uint64_t below = words_[w] & ((1ull << (b % 64)) - 1);
    return ranks_[w] + static_cast<std::uint64_t>(std::popcount(below));
  }

  bool operator==(const BlockBitmap& o) const { return blocks_ == o.blocks_ && words_ == o.words_; }

 private:
  void recount() {
    count_ = 0;
    for (auto w : words_) count_ += static_cast<std::uint64_t>(std::popcount(w));
    ranks_valid_ = false;
  }
  void build_ranks() const {
    ranks_.resize(words_.size());
    std::uint64_t acc = 0;
    for (std::size_t i = 0; i < words_.size(); ++i) {
      ranks_[i] = acc;
      acc += static_cast<std::uint64_t>(std::popcount(words_[i]));
    }
    ranks_valid_ = true;
  }

  std::uint64_t blocks_ = 0;
  std::uint64_t count_ = 0;
  std::vector<std::uint64_t> words_;
  mutable std::vector<std::uint64_t> ranks_;
  mutable bool ranks_valid_ = false;
};

}  // namespace tandem::engine

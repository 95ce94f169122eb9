// BufferArena and IoBuffer: page-aligned memory for O_DIRECT I/O.
//
// The arena is one mmap'd region registered with the volume's io_uring, so reads and writes on
// its memory use READ_FIXED/WRITE_FIXED (no per-I/O page pinning). Allocation is a buddy
// allocator in 4 KiB pages. When the arena is exhausted or a request is larger than it, the
// allocation falls back to an aligned heap buffer (buf_index() == -1) that uses plain
// READ/WRITE: slower, never a failure, so a burst of large requests cannot deadlock.
//
// Threading: the arena and its buffers belong to one io_context thread. IoBuffer is move-only
// and returns its memory to the arena on destruction; the arena must outlive its buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace tandem::engine {

class BufferArena;

class IoBuffer {
 public:
  IoBuffer() = default;
  ~IoBuffer() { reset(); }
  IoBuffer(IoBuffer&& o) noexcept { *this = std::move(o); }
  IoBuffer& operator=(IoBuffer&& o) noexcept;
  IoBuffer(const IoBuffer&) = delete;
  IoBuffer& operator=(const IoBuffer&) = delete;

  [[nodiscard]] std::byte* data() const { return data_; }
  [[nodiscard]] std::size_t capacity() const { return capacity_; }
  // Index of the registered buffer this memory lies in, or -1 for heap memory.
  [[nodiscard]] int buf_index() const { return buf_index_; }
  [[nodiscard]] std::span<std::byte> span(std::size_t len) const { return {data_, len}; }
  explicit operator bool() const { return data_ != nullptr; }
  void reset();

 private:
  friend class BufferArena;
  std::byte* data_ = nullptr;
  std::size_t capacity_ = 0;
  int buf_index_ = -1;
  std::uint32_t first_page_ = 0;
  std::uint8_t order_ = 0;
  BufferArena* arena_ = nullptr;
};

class BufferArena {
 public:
  static constexpr std::size_t kPageBytes = 4096;
  // arena_bytes is rounded down to a power of two pages (the buddy allocator's top order).
  explicit BufferArena(std::size_t arena_bytes);
  ~BufferArena();
  BufferArena(const BufferArena&) = delete;
  BufferArena& operator=(const BufferArena&) = delete;

  // A buffer of at least `bytes` (rounded up to whole pages), page aligned. Never fails short
  // of the process running out of memory.
  IoBuffer allocate(std::size_t bytes);

  [[nodiscard]] std::byte* base() const { return base_; }
  [[nodiscard]] std::size_t size_bytes() const { return pages_ * kPageBytes; }
  [[nodiscard]] std::size_t pages_free() const { return pages_free_; }
  [[nodiscard]] std::uint64_t heap_fallbacks() const { return heap_fallbacks_; }
  // Set by the ring once the arena is registered as fixed buffer 0.
  void set_registered(bool r) { registered_ = r; }

 private:
  friend class IoBuffer;
  void release(IoBuffer& b);
  void push_free(std::uint32_t page, std::uint8_t order);
  void unlink_free(std::uint32_t page, std::uint8_t order);

  static constexpr std::uint32_t kNil = 0xffffffffu;
  std::byte* base_ = nullptr;
  std::uint32_t pages_ = 0;
  std::uint8_t max_order_ = 0;
  std::size_t pages_free_ = 0;
  std::uint64_t heap_fallbacks_ = 0;
  bool registered_ = false;
  // Per free-list head, and per page: links of the free block starting there and its order
  // (0xff when the page does not start a free block).
  std::vector<std::uint32_t> head_;
  std::vector<std::uint32_t> next_, prev_;
  std::vector<std::uint8_t> free_order_;
};

}  // namespace tandem::engine

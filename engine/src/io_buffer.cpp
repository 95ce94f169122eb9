#include "tandem/engine/io_buffer.h"

#include <sys/mman.h>

#include <bit>
#include <cstdlib>
#include <new>

#include "tandem/common/assert.h"

namespace tandem::engine {

IoBuffer& IoBuffer::operator=(IoBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    data_ = o.data_;
    capacity_ = o.capacity_;
    buf_index_ = o.buf_index_;
    first_page_ = o.first_page_;
    order_ = o.order_;
    arena_ = o.arena_;
    o.data_ = nullptr;
    o.capacity_ = 0;
    o.arena_ = nullptr;
    o.buf_index_ = -1;
  }
  return *this;
}

void IoBuffer::reset() {
  if (data_ == nullptr) return;
  if (arena_ != nullptr) {
    arena_->release(*this);
  } else {
    std::free(data_);
  }
  data_ = nullptr;
  capacity_ = 0;
  arena_ = nullptr;
  buf_index_ = -1;
}

BufferArena::BufferArena(std::size_t arena_bytes) {
  std::size_t pages = arena_bytes / kPageBytes;
  if (pages == 0) pages = 1;
  pages = std::bit_floor(pages);
  // The page index is a u32 and the order a u8: 2^31 pages (8 TiB) is far beyond any arena.
  TANDEM_ASSERT(pages <= (std::size_t{1} << 31));
  pages_ = static_cast<std::uint32_t>(pages);
  max_order_ = static_cast<std::uint8_t>(std::countr_zero(pages_));
  void* p = ::mmap(nullptr, pages * kPageBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TANDEM_ASSERT_MSG(p != MAP_FAILED, "cannot map the I/O buffer arena");
  base_ = static_cast<std::byte*>(p);
  head_.assign(max_order_ + 1u, kNil);
  next_.assign(pages_, kNil);
  prev_.assign(pages_, kNil);
  free_order_.assign(pages_, 0xff);
  push_free(0, max_order_);
  pages_free_ = pages_;
}

BufferArena::~BufferArena() {
  // Every buffer must have come home: a buffer outliving its arena would be a use-after-free
  // in an I/O completion.
  TANDEM_ASSERT(pages_free_ == pages_);
  ::munmap(base_, std::size_t{pages_} * kPageBytes);
}

void BufferArena::push_free(std::uint32_t page, std::uint8_t order) {
  free_order_[page] = order;
  prev_[page] = kNil;
  next_[page] = head_[order];
  if (head_[order] != kNil) prev_[head_[order]] = page;
  head_[order] = page;
}

void BufferArena::unlink_free(std::uint32_t page, std::uint8_t order) {
  TANDEM_ASSERT(free_order_[page] == order);
  if (prev_[page] != kNil) {
    next_[prev_[page]] = next_[page];
  } else {
    head_[order] = next_[page];
  }
  if (next_[page] != kNil) prev_[next_[page]] = prev_[page];
  free_order_[page] = 0xff;
}

IoBuffer BufferArena::allocate(std::size_t bytes) {
  IoBuffer b;
  const std::size_t pages = (bytes + kPageBytes - 1) / kPageBytes;
  const std::size_t want = pages == 0 ? 1 : std::bit_ceil(pages);
  const auto order = static_cast<unsigned>(std::countr_zero(want));
  if (order <= max_order_) {
    unsigned o = order;
    while (o <= max_order_ && head_[o] == kNil) ++o;
    if (o <= max_order_) {
      const std::uint32_t page = head_[o];
      unlink_free(page, static_cast<std::uint8_t>(o));
      while (o > order) {  // split, keeping the lower half
        --o;
        push_free(page + (1u << o), static_cast<std::uint8_t>(o));
      }
      pages_free_ -= want;
      b.data_ = base_ + std::size_t{page} * kPageBytes;
      b.capacity_ = want * kPageBytes;
      b.first_page_ = page;
      b.order_ = static_cast<std::uint8_t>(order);
      b.arena_ = this;
      b.buf_index_ = registered_ ? 0 : -1;
      return b;
    }
  }
  ++heap_fallbacks_;
  const std::size_t len = pages * kPageBytes == 0 ? kPageBytes : pages * kPageBytes;
  void* p = std::aligned_alloc(kPageBytes, len);
  if (p == nullptr) throw std::bad_alloc();
  b.data_ = static_cast<std::byte*>(p);
  b.capacity_ = len;
  b.arena_ = nullptr;
  b.buf_index_ = -1;
  return b;
}

void BufferArena::release(IoBuffer& b) {
  std::uint32_t page = b.first_page_;
  unsigned order = b.order_;
  pages_free_ += std::size_t{1} << order;
  while (order < max_order_) {
    const std::uint32_t buddy = page ^ (1u << order);
    if (free_order_[buddy] != order) break;
    unlink_free(buddy, static_cast<std::uint8_t>(order));
    page = page < buddy ? page : buddy;
    ++order;
  }
  push_free(page, static_cast<std::uint8_t>(order));
}

}  // namespace tandem::engine

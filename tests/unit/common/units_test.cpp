// Plan: parse_bytes accepts what operators write in configs and rejects everything else,
// including overflow; format_bytes renders sizes readably.
#include <gtest/gtest.h>

#include "tandem/common/units.h"

namespace tandem {
namespace {

TEST(ParseBytes, AcceptsPlainAndSuffixed) {
  EXPECT_EQ(parse_bytes("4096"), 4096u);
  EXPECT_EQ(parse_bytes("1GiB"), kGiB);
  EXPECT_EQ(parse_bytes("1G"), kGiB);
  EXPECT_EQ(parse_bytes("512 MiB"), 512 * kMiB);
  EXPECT_EQ(parse_bytes("10MB"), 10'000'000u);
  EXPECT_EQ(parse_bytes("2kib"), 2048u);
  EXPECT_EQ(parse_bytes("7B"), 7u);
}

TEST(ParseBytes, RejectsGarbageAndOverflow) {
  EXPECT_FALSE(parse_bytes(""));
  EXPECT_FALSE(parse_bytes("GiB"));
  EXPECT_FALSE(parse_bytes("-1"));
  EXPECT_FALSE(parse_bytes("1XB"));
  EXPECT_FALSE(parse_bytes("1GiBs"));
  EXPECT_FALSE(parse_bytes("99999999999999999999"));
  EXPECT_FALSE(parse_bytes("20000000PiB"));
}

TEST(FormatBytes, Readable) {
  EXPECT_EQ(format_bytes(kGiB), "1GiB");
  EXPECT_EQ(format_bytes(1536), "1.5KiB");
  EXPECT_EQ(format_bytes(100), "100B");
}

TEST(Endian, RoundTrips) {
  unsigned char b[8];
  put_be64(b, 0x0102030405060708ull);
  EXPECT_EQ(b[0], 1);
  EXPECT_EQ(get_be64(b), 0x0102030405060708ull);
  put_le32(b, 0xa1b2c3d4u);
  EXPECT_EQ(b[0], 0xd4);
  EXPECT_EQ(get_le32(b), 0xa1b2c3d4u);
}

}  // namespace
}  // namespace tandem

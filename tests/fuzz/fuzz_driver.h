// The contract between a fuzzer and the stand-alone driver (fuzz_driver.cpp).
//
// A fuzzer is one .cpp defining LLVMFuzzerTestOneInput (the libFuzzer entry point) and
// tandem::fuzz::seeds(): well-formed inputs that the driver mutates when it runs without
// libFuzzer (the default build, under ctest). With libFuzzer (TANDEM_FUZZ, the `fuzz` preset)
// seeds() is unused; write them to a corpus directory instead if wanted.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace tandem::fuzz {

// Well-formed example inputs, each exercising a different path of the parser.
std::vector<std::string> seeds();

}  // namespace tandem::fuzz

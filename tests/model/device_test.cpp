// model::parse_device: the exact accepted syntax, the exact error lines, and (on a machine with
// CUDA) that cuda:N resolves to the index given. Without CUDA, every well-formed cuda name must
// fail with the availability message rather than the syntax one.
#include <gtest/gtest.h>

#include <string>

#include "core/error.h"
#include "model/device.h"

using ftune::model::parse_device;

namespace {

std::string error_of(const std::string& s) {
  try {
    parse_device(s, "eval: --device");
  } catch (const ftune::Error& e) {
    return e.what();
  }
  return "";
}

TEST(ParseDevice, Cpu) { EXPECT_EQ(parse_device("cpu", "x"), at::Device(at::kCPU)); }

TEST(ParseDevice, RejectsMalformedNamesWithTheSyntaxError) {
  for (const char* s : {"gpu", "cuda:", "cuda:1x", "cuda:-1", "cuda:+1", "cuda: 1", "cuda:1 ",
                        "CPU", "cpu:0", "cuda0", "", "cuda:99999999999999999999", "cudax"}) {
    EXPECT_EQ(error_of(s),
              std::string("eval: --device: expected cpu, cuda or cuda:N, got \"") + s + "\"")
        << s;
  }
}

TEST(ParseDevice, CudaNames) {
  if (!at::hasCUDA()) {
    for (const char* s : {"cuda", "cuda:0", "cuda:3"}) {
      EXPECT_EQ(error_of(s), std::string("eval: --device: ") + s +
                                 ": no CUDA device available to this build/machine");
    }
    return;
  }
  EXPECT_EQ(parse_device("cuda", "x"), at::Device(at::kCUDA, 0));
  EXPECT_EQ(parse_device("cuda:0", "x"), at::Device(at::kCUDA, 0));
  const auto n = static_cast<int>(at::getNumGPUs());
  EXPECT_EQ(parse_device("cuda:" + std::to_string(n - 1), "x"), at::Device(at::kCUDA, n - 1));
  EXPECT_EQ(error_of("cuda:" + std::to_string(n)),
            "eval: --device: cuda:" + std::to_string(n) +
                ": no such CUDA device (this machine has " + std::to_string(n) + ")");
}

}  // namespace

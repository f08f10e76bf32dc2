// ftune's single exception type and its check macros.
// Library code throws ftune::Error with context "where: field: what was expected"; main() catches
// it, prints one line and exits non-zero. Keeping one type lets every caller handle bad input the
// same way instead of crashing on an ATen or STL exception deep in a loader.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace ftune {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

// Throws ftune::Error built from the streamed arguments, e.g.
// fail(path, ": header: length ", n, " exceeds file size ", size).
template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(detail::concat(std::forward<Args>(args)...));
}

}  // namespace ftune

// FTUNE_CHECK(cond, parts...): throw ftune::Error(parts...) when cond is false.
#define FTUNE_CHECK(cond, ...)                   \
  do {                                           \
    if (!(cond)) ::ftune::fail(__VA_ARGS__);     \
  } while (0)

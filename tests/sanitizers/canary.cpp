// Sanitizer canary for `make test-asan`: each mode commits one bug the build must catch (a use
// after free for ASan, a signed overflow for UBSan, a leak for LSan), so a build that silently lost
// its -fsanitize flags, or an environment that turned leak checking off, fails the test instead
// of passing every unit test vacuously. tests/sanitizers/CMakeLists.txt matches the reports.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace {
// volatile keeps the optimizer from folding the bug away at -O1.
int* volatile g_sink = nullptr;
volatile int g_index = 3;
volatile int g_big = std::numeric_limits<int>::max();
}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "";
  if (std::strcmp(mode, "use-after-free") == 0) {
    int* a = new int[8];
    g_sink = a;
    delete[] a;
    std::printf("%d\n", g_sink[g_index % 8]);  // UBSan's object-size check cannot see this one
  } else if (std::strcmp(mode, "signed-overflow") == 0) {
    int v = g_big;
    v += 1;
    std::printf("%d\n", v);
  } else if (std::strcmp(mode, "leak") == 0) {
    g_sink = new int[3];
    g_sink = nullptr;
  } else {
    std::fprintf(stderr, "usage: sanitizer_canary use-after-free|signed-overflow|leak\n");
    return 2;
  }
  return 0;
}

// Reads this process's memory counters for the memory tests of the model tools (model_tool,
// loss_tool): a "VmRSS:" / "VmHWM:" line of /proc/self/status, in bytes (-1 when absent).
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

inline int64_t proc_status_bytes(const std::string& key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::stoll(line.substr(key.size() + 1)) * 1024;
  }
  return -1;
}

// Atomic file writes (temp + fsync + rename) and whole-file reads; see fs.h.
#include "core/fs.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace ftune {
namespace fs = std::filesystem;

namespace {
void fsync_path(const fs::path& p, bool dir) {
  int fd = ::open(p.c_str(), dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) return;  // best effort: durability, not correctness, depends on it
  ::fsync(fd);
  ::close(fd);
}
}  // namespace

void write_file_atomic(const fs::path& path, const std::function<void(std::ostream&)>& write) {
  fs::path parent = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  std::error_code ec;
  fs::create_directories(parent, ec);
  fs::path tmp = path;
  tmp += ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    FTUNE_CHECK(out, path.string(), ": cannot open for writing: ", std::strerror(errno));
    write(out);
    out.flush();
    if (!out) {
      fs::remove(tmp, ec);
      fail(path.string(), ": write failed: ", std::strerror(errno));
    }
  }
  fsync_path(tmp, false);
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    fail(path.string(), ": cannot rename temp file into place: ", ec.message());
  }
  fsync_path(parent, true);
}

void write_file_atomic(const fs::path& path, const std::string& content) {
  write_file_atomic(path, [&](std::ostream& os) { os.write(content.data(), content.size()); });
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  FTUNE_CHECK(in, path.string(), ": cannot read: ",
              fs::exists(path) ? std::strerror(errno) : "no such file");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void replace_dir_atomic(const fs::path& tmp_dir, const fs::path& dir) {
  std::error_code ec;
  fs::path old = dir;
  old += ".old-" + std::to_string(::getpid());
  bool had_old = fs::exists(dir);
  if (had_old) {
    fs::rename(dir, old, ec);
    FTUNE_CHECK(!ec, dir.string(), ": cannot move aside: ", ec.message());
  }
  fs::rename(tmp_dir, dir, ec);
  if (ec) {
    if (had_old) fs::rename(old, dir, ec);
    fail(dir.string(), ": cannot rename ", tmp_dir.string(), " into place");
  }
  if (had_old) fs::remove_all(old, ec);
  fsync_path(dir.parent_path().empty() ? fs::path(".") : dir.parent_path(), true);
}

}  // namespace ftune

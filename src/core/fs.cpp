// Atomic file writes (temp + fsync + rename), directory swaps and whole-file reads; see fs.h.
#include "core/fs.h"

#include <fcntl.h>
#include <stdio.h>  // renameat2 (glibc >= 2.28, _GNU_SOURCE)
#include <unistd.h>

#include <atomic>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace ftune {
namespace fs = std::filesystem;

namespace {

std::atomic<CrashHook> g_crash_hook{nullptr};
std::atomic<bool> g_force_fallback{false};

void fsync_path(const fs::path& p, bool dir) {
  int fd = ::open(p.c_str(), dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) return;  // best effort: durability, not correctness, depends on it
  ::fsync(fd);
  ::close(fd);
}

fs::path parent_of(const fs::path& p) {
  return p.parent_path().empty() ? fs::path(".") : p.parent_path();
}

// Where the fallback keeps the old dir: hidden, and named so no user's own "x.old" is touched.
fs::path aside_of(const fs::path& dir) {
  return parent_of(dir) / ("." + dir.filename().string() + ".ftune-old");
}

}  // namespace

void set_crash_hook(CrashHook hook) { g_crash_hook.store(hook); }

void crash_point(const char* point) {
  if (CrashHook hook = g_crash_hook.load()) hook(point);
}

void set_replace_dir_fallback_for_testing(bool force) { g_force_fallback.store(force); }

AtomicFile::AtomicFile(const fs::path& path) : path_(path), tmp_(path) {
  std::error_code ec;
  fs::create_directories(parent_of(path), ec);
  tmp_ += ".tmp-" + std::to_string(::getpid());
  out_.open(tmp_, std::ios::binary | std::ios::trunc);
  FTUNE_CHECK(out_, path.string(), ": cannot open for writing: ", std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (done_) return;
  out_.close();
  std::error_code ec;
  fs::remove(tmp_, ec);  // a failed writer leaves nothing behind, not even its temp file
}

void AtomicFile::commit() {
  FTUNE_CHECK(!done_, path_.string(), ": committed twice");
  out_.flush();
  const bool ok = static_cast<bool>(out_);
  out_.close();
  FTUNE_CHECK(ok && !out_.fail(), path_.string(), ": write failed: ", std::strerror(errno));
  fsync_path(tmp_, false);
  std::error_code ec;
  fs::rename(tmp_, path_, ec);
  FTUNE_CHECK(!ec, path_.string(), ": cannot rename temp file into place: ", ec.message());
  done_ = true;
  fsync_path(parent_of(path_), true);
}

void write_file_atomic(const fs::path& path, const std::function<void(std::ostream&)>& write) {
  AtomicFile file(path);
  write(file.stream());
  file.commit();
}

void write_file_atomic(const fs::path& path, const std::string& content) {
  write_file_atomic(path, [&](std::ostream& os) { os.write(content.data(), content.size()); });
}

std::string read_file(const fs::path& path) {
  std::error_code ec;
  FTUNE_CHECK(!fs::is_directory(path, ec), path.string(), ": cannot read: is a directory, not a file");
  std::ifstream in(path, std::ios::binary);
  FTUNE_CHECK(in, path.string(), ": cannot read: ",
              fs::exists(path, ec) ? std::strerror(errno) : "no such file");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool recover_replaced_dir(const fs::path& dir) {
  const fs::path old = aside_of(dir);
  std::error_code ec;
  if (!fs::is_directory(old, ec)) return false;
  if (fs::exists(dir, ec)) {
    fs::remove_all(old, ec);  // the switch completed; only the cleanup was cut short
  } else {
    fs::rename(old, dir, ec);  // cut between the two renames: the old dir is the complete one
    FTUNE_CHECK(!ec, dir.string(), ": cannot restore ", old.string(), ": ", ec.message());
  }
  fsync_path(parent_of(dir), true);
  return true;
}

void replace_dir_atomic(const fs::path& tmp_dir, const fs::path& dir) {
  recover_replaced_dir(dir);
  std::error_code ec;
  const fs::path parent = parent_of(dir);
  crash_point("replace_dir:before_switch");
  if (!fs::exists(dir, ec)) {
    fs::rename(tmp_dir, dir, ec);
    FTUNE_CHECK(!ec, dir.string(), ": cannot rename ", tmp_dir.string(), " into place: ",
                ec.message());
    fsync_path(parent, true);
    crash_point("replace_dir:after_switch");
    return;
  }
  if (!g_force_fallback.load()) {
    // One atomic step: afterwards `dir` holds the new content and `tmp_dir` the old.
    if (::renameat2(AT_FDCWD, tmp_dir.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) == 0) {
      fsync_path(parent, true);
      crash_point("replace_dir:after_switch");
      fs::remove_all(tmp_dir, ec);
      crash_point("replace_dir:after_cleanup");
      return;
    }
    const int err = errno;
    FTUNE_CHECK(err == EINVAL || err == ENOSYS || err == ENOTSUP || err == EOPNOTSUPP,
                dir.string(), ": cannot swap in ", tmp_dir.string(), ": ", std::strerror(err));
  }
  // Fallback for filesystems without RENAME_EXCHANGE: keep the old dir beside as <dir>.old until
  // the new one is in place (recover_replaced_dir restores it if we die in between).
  const fs::path old = aside_of(dir);
  fs::rename(dir, old, ec);
  FTUNE_CHECK(!ec, dir.string(), ": cannot move aside: ", ec.message());
  crash_point("replace_dir:fallback_between_renames");
  fs::rename(tmp_dir, dir, ec);
  if (ec) {
    const std::string why = ec.message();
    fs::rename(old, dir, ec);
    fail(dir.string(), ": cannot rename ", tmp_dir.string(), " into place: ", why);
  }
  fsync_path(parent, true);
  crash_point("replace_dir:after_switch");
  fs::remove_all(old, ec);
  crash_point("replace_dir:after_cleanup");
}

}  // namespace ftune

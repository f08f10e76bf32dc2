// File helpers shared by every writer: atomic replacement and whole-file reads.
// Writers never touch the destination until the new content is complete and fsync'ed: they write
// "<path>.tmp-<pid>" and rename() over it, so a killed run leaves the previous file intact.
// Directories are swapped in one renameat2(RENAME_EXCHANGE); where the filesystem lacks it, the
// old directory is kept aside until the new one is in place, and recover_replaced_dir()
// puts it back after a crash. crash_point() is the seam through which tests kill a writer at each
// step (a null hook in production).
#pragma once

#include <filesystem>
#include <fstream>
#include <functional>
#include <ostream>
#include <string>

namespace ftune {

// Writes `path` atomically: calls `write(stream)` on a temp file beside it, flushes and fsyncs it,
// then renames it over `path`. Throws ftune::Error naming the path on any failure; an exception
// from `write` removes the temp file and propagates.
void write_file_atomic(const std::filesystem::path& path,
                       const std::function<void(std::ostream&)>& write);
void write_file_atomic(const std::filesystem::path& path, const std::string& content);

// write_file_atomic for a writer that fills the file across several calls (a streamed
// safetensors file): opens the temp file beside `path`; commit() flushes, fsyncs and renames it
// over `path`. Destroyed uncommitted (an error on the way), it removes the temp file and leaves
// `path` untouched. The stream is seekable (binary).
class AtomicFile {
 public:
  explicit AtomicFile(const std::filesystem::path& path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  std::ostream& stream() { return out_; }
  const std::filesystem::path& path() const { return path_; }
  void commit();

 private:
  std::filesystem::path path_, tmp_;
  std::ofstream out_;
  bool done_ = false;
};

// Reads a whole file; throws ftune::Error "<path>: cannot read: <reason>" if it cannot (a
// directory included).
std::string read_file(const std::filesystem::path& path);

// Replaces `dir` (if any) by the fully written directory `tmp_dir` in one atomic step, so readers
// see either the old or the new directory, never none or a half-written one. Without
// RENAME_EXCHANGE the old dir is moved aside to ".<name>.ftune-old" first and removed once the new
// one is in place; a crash in between leaves that, which recover_replaced_dir() moves back (every
// replace_dir_atomic on the same dir calls it first).
void replace_dir_atomic(const std::filesystem::path& tmp_dir, const std::filesystem::path& dir);

// After a crash inside replace_dir_atomic's fallback: when `dir` is missing and its aside copy
// exists, moves it back; when both exist, removes the aside copy. Returns whether it did anything.
bool recover_replaced_dir(const std::filesystem::path& dir);

// Test seam. Writers call crash_point("<what>:<where>") at each step of an atomic switch; tests
// install a hook that ends the process at a chosen point (in a forked child) and then check that
// the files on disk are still usable. Without a hook it does nothing.
using CrashHook = void (*)(const char* point);
void set_crash_hook(CrashHook hook);
void crash_point(const char* point);
// Test seam: makes replace_dir_atomic use its two-rename fallback (as on a filesystem without
// RENAME_EXCHANGE), so tests cover both paths.
void set_replace_dir_fallback_for_testing(bool force);

}  // namespace ftune

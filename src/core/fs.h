// File helpers shared by every writer: atomic replacement and whole-file reads.
// Writers never touch the destination until the new content is complete and fsync'ed: they write
// "<path>.tmp-<pid>" and rename() over it, so a killed run leaves the previous file intact.
#pragma once

#include <filesystem>
#include <functional>
#include <ostream>
#include <string>

namespace ftune {

// Writes `path` atomically: calls `write(stream)` on a temp file beside it, flushes and fsyncs it,
// then renames it over `path`. Throws ftune::Error naming the path on any failure.
void write_file_atomic(const std::filesystem::path& path,
                       const std::function<void(std::ostream&)>& write);
void write_file_atomic(const std::filesystem::path& path, const std::string& content);

// Reads a whole file; throws ftune::Error "<path>: cannot read: <reason>" if it cannot.
std::string read_file(const std::filesystem::path& path);

// Renames a fully written directory `tmp_dir` to `dir` (replacing an existing one) so readers
// see either the old or the new directory, never a half-written one.
void replace_dir_atomic(const std::filesystem::path& tmp_dir, const std::filesystem::path& dir);

}  // namespace ftune

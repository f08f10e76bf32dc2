// Shared fixtures for the data tests: a byte-level tokenizer (ids are the UTF-8 bytes, then <s>=256,
// </s>=257, <pad>=258, with a ChatML template) written to a temp dir, so expected ids can be
// computed from the text alone, plus small file helpers.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>
#include <vector>

#include "data/dataset.h"
#include "model/hf_io.h"
#include "tokenizer/tokenizer.h"

namespace ftune::data::testing {

inline void remove_tree(const std::filesystem::path& dir) {
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

inline std::filesystem::path temp_dir(const std::string& name) {
  auto dir = std::filesystem::temp_directory_path() /
             ("ftune_data_test_" + name + "_" + std::to_string(::getpid()));
  remove_tree(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

inline tok::Tokenizer byte_tokenizer(const std::filesystem::path& dir) {
  model::write_byte_level_tokenizer(dir);
  return tok::Tokenizer::load(dir);
}

constexpr int64_t kBos = 256, kEos = 257, kPad = 258;

inline std::vector<int64_t> bytes(const std::string& s) {
  std::vector<int64_t> out;
  for (unsigned char c : s) out.push_back(c);
  return out;
}

inline std::filesystem::path write_text(const std::filesystem::path& path, const std::string& s) {
  std::ofstream(path, std::ios::binary) << s;
  return path;
}

}  // namespace ftune::data::testing

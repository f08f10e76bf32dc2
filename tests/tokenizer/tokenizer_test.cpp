// Unit tests for src/tokenizer that need no Python: the GPT-2 byte alphabet, UTF-8 repair, the
// BPE merge loop on hand-made vocabularies, the tokenizer.json pipeline on small hand-written
// files (expected ids follow from the format's definition or from HF tokenizers' own unit
// tests), config-file handling and error messages. The oracle comparison with HF tokenizers and
// sentencepiece on trained tokenizers lives in tests/python/test_tokenizer.py.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <thread>

#include "core/error.h"
#include "tokenizer/bpe.h"
#include "tokenizer/json_text.h"
#include "tokenizer/regex.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

namespace ftune::tok {
namespace {

using nlohmann::json;

std::string u8(const char8_t* s) {
  return std::string(reinterpret_cast<const char*>(s));
}

// Message of the ftune::Error `fn` throws ("" if it does not throw).
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const ftune::Error& e) {
    return e.what();
  }
  return "";
}

TEST(ByteAlphabet, MatchesGpt2Definition) {
  const auto& table = byte_to_unicode_table();
  std::set<std::string> distinct(table.begin(), table.end());
  EXPECT_EQ(distinct.size(), 256u);
  for (int b = '!'; b <= '~'; ++b) EXPECT_EQ(table[b], std::string(1, static_cast<char>(b)));
  EXPECT_EQ(table[' '], u8(u8"\u0120"));   // "Ġ"
  EXPECT_EQ(table['\n'], u8(u8"\u010A"));  // "Ċ"
  EXPECT_EQ(table[0], u8(u8"\u0100"));
  EXPECT_EQ(table[0xAD], u8(u8"\u0143"));  // soft hyphen, the last unprintable byte
  EXPECT_EQ(table[0xE9], u8(u8"\u00E9"));  // printable Latin-1 maps to itself
  for (int b = 0; b < 256; ++b) {
    size_t i = 0;
    const char32_t cp = utf8_next(table[b], i);
    ASSERT_EQ(unicode_to_byte(cp), static_cast<uint8_t>(b));
  }
  EXPECT_FALSE(unicode_to_byte(U' ').has_value());
}

TEST(Utf8, LossyFollowsMaximalSubpartRule) {
  // Unicode 15 Table 3-8, and truncated / surrogate / overlong sequences (Python agrees).
  EXPECT_EQ(utf8_lossy("\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64"),
            u8(u8"a\uFFFD\uFFFD\uFFFDb\uFFFDc\uFFFD\uFFFDd"));
  EXPECT_EQ(utf8_lossy("\xF0\x80\x80\xED\xA0\x80\xE2\x82"),
            u8(u8"\uFFFD\uFFFD\uFFFD\uFFFD\uFFFD\uFFFD\uFFFD"));
  const std::string ok = u8(u8"h\u00E9llo \u4E16\u754C \U0001F600");
  EXPECT_EQ(utf8_lossy(ok), ok);
  EXPECT_FALSE(utf8_invalid_at(ok).has_value());
  EXPECT_EQ(utf8_invalid_at("ab\xC3"), 2u);
}

TEST(Regex, Gpt2PatternSplitsLikeHf) {
  // HF tokenizers' byte_level.rs pre_tokenization test, before the byte mapping.
  Regex re(R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)");
  const std::string text = "Hello my friend, how is your day going?";
  std::vector<std::pair<size_t, size_t>> m;
  re.find_all(text, m);
  std::vector<std::string> words;
  for (auto [a, b] : m) words.push_back(text.substr(a, b - a));
  EXPECT_EQ(words, (std::vector<std::string>{"Hello", " my", " friend", ",", " how", " is", " your",
                                             " day", " going", "?"}));
  m.clear();
  const std::string spaces = "Hello there       dear";
  re.find_all(spaces, m);
  ASSERT_EQ(m.size(), 4u);
  EXPECT_EQ(spaces.substr(m[2].first, m[2].second - m[2].first), "      ");
  EXPECT_THROW(Regex("(unclosed"), ftune::Error);
}

BpeModel small_bpe(BpeOptions options = {}) {
  std::unordered_map<std::string, int32_t> vocab = {
      {"a", 0},  {"b", 1},     {"c", 2},      {"ab", 3}, {"bc", 4},     {"abc", 5},
      {"aa", 6}, {"<unk>", 7}, {"<0x78>", 8}, {"ca", 9}, {"<0xC3>", 10}};
  return BpeModel(vocab, {{"a", "b"}, {"b", "c"}, {"ab", "c"}, {"a", "a"}}, options, "test");
}

std::vector<int32_t> bpe_ids(const BpeModel& m, const std::string& word) {
  std::vector<int32_t> out;
  m.tokenize(word, out);
  return out;
}

TEST(Bpe, MergesLowestRankFirstLeftmostOnTies) {
  const BpeModel m = small_bpe();
  EXPECT_EQ(bpe_ids(m, "abc"), (std::vector<int32_t>{5}));      // a+b (rank 0), then ab+c
  EXPECT_EQ(bpe_ids(m, "bcab"), (std::vector<int32_t>{4, 3}));  // a+b first, b+c after
  EXPECT_EQ(bpe_ids(m, "aaa"), (std::vector<int32_t>{6, 0}));   // leftmost pair wins the tie
  EXPECT_EQ(bpe_ids(m, "ca"), (std::vector<int32_t>{2, 0}));    // "ca" has no merge
  // Without an unk token an unknown character is dropped, and its neighbours may then merge.
  EXPECT_EQ(bpe_ids(m, "azb"), (std::vector<int32_t>{3}));
  EXPECT_EQ(bpe_ids(m, "abc"), (std::vector<int32_t>{5}));  // cached path agrees
}

TEST(Bpe, UnknownCharactersUnkFuseAndByteFallback) {
  BpeOptions unk;
  unk.unk_token = "<unk>";
  EXPECT_EQ(bpe_ids(small_bpe(unk), "zza"), (std::vector<int32_t>{7, 7, 0}));
  unk.fuse_unk = true;
  EXPECT_EQ(bpe_ids(small_bpe(unk), "zza"), (std::vector<int32_t>{7, 0}));
  BpeOptions fallback = unk;
  fallback.byte_fallback = true;
  EXPECT_EQ(bpe_ids(small_bpe(fallback), "xa"), (std::vector<int32_t>{8, 0}));  // <0x78>
  // "é" is C3 A9; <0xA9> is missing, so the character falls back to unk as a whole.
  EXPECT_EQ(bpe_ids(small_bpe(fallback), u8(u8"\u00E9a")), (std::vector<int32_t>{7, 0}));
  BpeOptions missing_unk;
  missing_unk.unk_token = "<missing>";
  EXPECT_THROW(bpe_ids(small_bpe(missing_unk), "z"), ftune::Error);
}

TEST(Bpe, IgnoreMergesPrefixAndSuffix) {
  BpeOptions ignore;
  ignore.ignore_merges = true;
  EXPECT_EQ(bpe_ids(small_bpe(ignore), "ca"), (std::vector<int32_t>{9}));
  BpeOptions prefix;
  prefix.continuing_subword_prefix = "##";
  BpeModel p({{"a", 0}, {"##b", 1}, {"ab", 2}}, {{"a", "##b"}}, prefix, "test");
  EXPECT_EQ(bpe_ids(p, "ab"), (std::vector<int32_t>{2}));
  BpeOptions suffix;
  suffix.end_of_word_suffix = "</w>";
  BpeModel s({{"a", 0}, {"b</w>", 1}, {"ab</w>", 2}}, {{"a", "b</w>"}}, suffix, "test");
  EXPECT_EQ(bpe_ids(s, "ab"), (std::vector<int32_t>{2}));
  EXPECT_THROW(BpeModel({{"a", 0}}, {{"a", "q"}}, {}, "test"), ftune::Error);
}

// A byte-level tokenizer.json whose vocab is the 256 byte symbols with id == byte value and no
// merges, so the ids of any text are exactly its UTF-8 bytes.
json byte_tokenizer(bool add_prefix_space = false) {
  json vocab = json::object();
  const auto& table = byte_to_unicode_table();
  for (int b = 0; b < 256; ++b) vocab[table[b]] = b;
  return json{
      {"version", "1.0"},
      {"added_tokens", json::array({json{{"id", 256},
                                         {"content", "<|special|>"},
                                         {"single_word", false},
                                         {"lstrip", false},
                                         {"rstrip", false},
                                         {"normalized", false},
                                         {"special", true}},
                                    json{{"id", 257},
                                         {"content", "<|end|>"},
                                         {"single_word", false},
                                         {"lstrip", false},
                                         {"rstrip", false},
                                         {"normalized", false},
                                         {"special", true}}})},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "ByteLevel"},
        {"add_prefix_space", add_prefix_space},
        {"trim_offsets", true},
        {"use_regex", true}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", json::array({json{{"SpecialToken", {{"id", "<|special|>"}, {"type_id", 0}}}},
                                json{{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                json{{"SpecialToken", {{"id", "<|end|>"}, {"type_id", 0}}}}})},
        {"pair", json::array()},
        {"special_tokens",
         {{"<|special|>", {{"id", "<|special|>"}, {"ids", {256}}, {"tokens", {"<|special|>"}}}},
          {"<|end|>", {{"id", "<|end|>"}, {"ids", {257}}, {"tokens", {"<|end|>"}}}}}}}},
      {"decoder",
       {{"type", "ByteLevel"},
        {"add_prefix_space", true},
        {"trim_offsets", true},
        {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"vocab", vocab},
        {"merges", json::array()}}}};
}

std::vector<int64_t> bytes_of(const std::string& s) {
  std::vector<int64_t> out;
  for (unsigned char c : s) out.push_back(c);
  return out;
}

TEST(HfTokenizer, ByteLevelIdsAreBytesAndDecodeRoundTrips) {
  const Tokenizer t = Tokenizer::from_json(byte_tokenizer(), nullptr, "test.json");
  const std::vector<std::string> texts = {
      "Hello world",
      u8(u8"caf\u00E9 na\u00EFve \u4E2D\u6587 \U0001F600\U0001F44D\U0001F3FD"),
      "  two\n\nlines\t\ttabs   ",
      "",
      " ",
      "x"};
  for (const std::string& text : texts) {
    const auto ids = t.encode(text);
    EXPECT_EQ(ids, bytes_of(text)) << text;
    EXPECT_EQ(t.decode(ids), text);
  }
  EXPECT_EQ(t.vocab_size(), 258);
  EXPECT_EQ(t.token_to_id("<|end|>"), 257);
  EXPECT_EQ(t.id_to_token(256), "<|special|>");
  EXPECT_EQ(t.id_to_token(32), u8(u8"\u0120"));
  EXPECT_THROW(t.id_to_token(999), ftune::Error);
  EXPECT_FALSE(t.token_to_id("nope").has_value());
}

TEST(HfTokenizer, SpecialTokensSplitPostProcessAndSkip) {
  const Tokenizer t = Tokenizer::from_json(byte_tokenizer(), nullptr, "test.json");
  std::vector<int64_t> expected = bytes_of("hi ");
  expected.push_back(256);
  for (int64_t b : bytes_of(" there")) expected.push_back(b);
  EXPECT_EQ(t.encode("hi <|special|> there"), expected);
  std::vector<int64_t> with = expected;
  with.insert(with.begin(), 256);
  with.push_back(257);
  EXPECT_EQ(t.encode("hi <|special|> there", /*add_special_tokens=*/true), with);
  EXPECT_EQ(t.decode(expected, /*skip_special_tokens=*/true), "hi  there");
  EXPECT_EQ(t.decode(expected, /*skip_special_tokens=*/false), "hi <|special|> there");
  // A lone byte of a multi-byte character decodes to U+FFFD, as from_utf8_lossy does.
  EXPECT_EQ(t.decode({0xE4, 'a'}), u8(u8"\uFFFDa"));
  EXPECT_EQ(t.decode({9999, 'a'}), "a");  // unknown ids are dropped
}

TEST(HfTokenizer, ByteLevelPrefixSpaceAppliesToEachPiece) {
  const Tokenizer t = Tokenizer::from_json(byte_tokenizer(true), nullptr, "test.json");
  std::vector<int64_t> expected = bytes_of(" hi");
  expected.push_back(256);
  for (int64_t b : bytes_of(" there")) expected.push_back(b);
  EXPECT_EQ(t.encode("hi<|special|>there"), expected);
  EXPECT_EQ(t.encode(" hi"), bytes_of(" hi"));  // no second space
}

TEST(HfTokenizer, AddedTokenOptionsFollowHfSemantics) {
  // HF tokenizers' added_vocabulary.rs "options_use_cases" test: Lowercase normalizer, tokens
  // "my" (lstrip, rstrip), "name", "ony" (single_word), specials [CLS] and [SEP].
  json tj = byte_tokenizer();
  auto added = [](int id, const char* content, bool special, bool lstrip, bool rstrip,
                  bool single) {
    return json{{"id", id},          {"content", content}, {"single_word", single},
                {"lstrip", lstrip},  {"rstrip", rstrip},   {"normalized", !special},
                {"special", special}};
  };
  tj["added_tokens"] = json::array(
      {added(256, "my", false, true, true, false), added(257, "name", false, false, false, false),
       added(258, "ony", false, false, false, true), added(259, "[CLS]", true, false, false, false),
       added(260, "[SEP]", true, false, false, false)});
  tj["post_processor"] = nullptr;
  tj["normalizer"] = {{"type", "Lowercase"}};
  const Tokenizer t = Tokenizer::from_json(tj, nullptr, "test.json");
  std::vector<int64_t> expected = {259, 256, 257};
  for (int64_t b : bytes_of(" is anthony ")) expected.push_back(b);
  expected.push_back(260);
  EXPECT_EQ(t.encode("[CLS] My name is Anthony [SEP]"), expected);
  // single_word: "ony" at a word boundary matches, inside a word it does not.
  std::vector<int64_t> single = bytes_of("x ");
  single.push_back(258);
  EXPECT_EQ(t.encode("x ony"), single);
  EXPECT_EQ(t.encode("xony"), bytes_of("xony"));
}

// Llama-2-style tokenizer.json: Prepend/Replace normalizer, no pre-tokenizer, byte_fallback,
// Replace/ByteFallback/Fuse/Strip decoder.
json llama2_style() {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  char name[8];
  for (int b = 0; b < 256; ++b) {
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  vocab[u8(u8"\u2581")] = 259;
  vocab["h"] = 260;
  vocab["i"] = 261;
  vocab[u8(u8"\u2581h")] = 262;
  vocab[u8(u8"\u2581hi")] = 263;
  auto special = [](int id, const char* content) {
    return json{{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
                {"rstrip", false}, {"normalized", false}, {"special", true}};
  };
  return json{
      {"added_tokens", json::array({special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")})},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers", json::array({json{{"type", "Prepend"}, {"prepend", u8(u8"\u2581")}},
                                     json{{"type", "Replace"},
                                          {"pattern", {{"String", " "}}},
                                          {"content", u8(u8"\u2581")}}})}}},
      {"pre_tokenizer", nullptr},
      {"post_processor", nullptr},
      {"decoder",
       {{"type", "Sequence"},
        {"decoders",
         json::array(
             {json{
                  {"type", "Replace"}, {"pattern", {{"String", u8(u8"\u2581")}}}, {"content", " "}},
              json{{"type", "ByteFallback"}}, json{{"type", "Fuse"}},
              json{{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}})}}},
      {"model",
       {{"type", "BPE"},
        {"unk_token", "<unk>"},
        {"fuse_unk", true},
        {"byte_fallback", true},
        {"vocab", vocab},
        {"merges", json::array({u8(u8"\u2581 h"), json::array({u8(u8"\u2581h"), "i"})})}}}};
}

TEST(HfTokenizer, Llama2StyleNormalizerByteFallbackAndDecoder) {
  const Tokenizer t = Tokenizer::from_json(llama2_style(), nullptr, "test.json");
  EXPECT_EQ(t.encode("hi hi"), (std::vector<int64_t>{263, 263}));
  const std::string accented = u8(u8"h\u00E9");  // é = C3 A9
  EXPECT_EQ(t.encode(accented), (std::vector<int64_t>{262, 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(t.decode(t.encode(accented)), accented);
  EXPECT_EQ(t.decode({262, 3 + 0xC3}), u8(u8"h\uFFFD"));  // an incomplete byte run
  // Each piece around an added token is normalized (and so prefixed) on its own.
  EXPECT_EQ(t.encode("hi<s>hi"), (std::vector<int64_t>{263, 1, 263}));
  EXPECT_EQ(t.decode({1, 263, 2}, false), "<s> hi</s>");
}

TEST(HfTokenizer, ConcurrentEncodeAgreesWithSerial) {
  // encode() is const and shared across data-loader threads; the word cache must not race.
  const Tokenizer t = Tokenizer::from_json(llama2_style(), nullptr, "test.json");
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i)
    texts.push_back("hi " + std::string(i % 7, 'h') + u8(u8" h\u00E9 ") + std::to_string(i));
  std::vector<std::vector<int64_t>> serial;
  for (const auto& text : texts) serial.push_back(t.encode(text));
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      for (int rep = 0; rep < 20; ++rep) {
        for (size_t i = 0; i < texts.size(); ++i) mismatches[k] += t.encode(texts[i]) != serial[i];
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches, std::vector<int>(4, 0));
}

struct TempDir {
  std::filesystem::path path;
  TempDir() {
    path = std::filesystem::temp_directory_path() /
           ("ftune_tok_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter()++));
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  void write(const std::string& name, const std::string& content) const {
    std::ofstream(path / name) << content;
  }
  static int& counter() {
    static int n = 0;
    return n;
  }
};

TEST(TokenizerLoad, ConfigFilesResolveSpecialTokensAndTemplate) {
  TempDir dir;
  dir.write("tokenizer.json", llama2_style().dump());
  dir.write("tokenizer_config.json",
            json{{"bos_token", {{"__type", "AddedToken"}, {"content", "<s>"}, {"lstrip", false}}},
                 {"eos_token", "</s>"},
                 {"pad_token", nullptr},
                 {"add_bos_token", true},
                 {"chat_template", json::array({json{{"name", "tool_use"}, {"template", "T"}},
                                                json{{"name", "default"}, {"template", "D"}}})}}
                .dump());
  Tokenizer t = Tokenizer::load(dir.path);
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.eos_id(), 2);
  EXPECT_EQ(t.bos_token(), "<s>");
  EXPECT_FALSE(t.pad_id().has_value());
  EXPECT_EQ(t.chat_template(), "D");
  // special_tokens_map.json overrides tokenizer_config.json.
  dir.write("special_tokens_map.json", json{{"eos_token", {{"content", "<unk>"}}}}.dump());
  t = Tokenizer::load(dir.path);
  EXPECT_EQ(t.eos_id(), 0);
  EXPECT_EQ(t.eos_token(), "<unk>");
}

// Found by sentencepiece_fuzz (tests/fuzz/seeds/sentencepiece/crash-empty-piece.model): a unigram
// model with an empty piece made libsentencepiece's trie builder throw Darts::Exception, which
// escaped instead of one error line.
TEST(TokenizerLoad, SentencePieceLibraryExceptionsBecomeOneLine) {
  const char* src = std::getenv("FTUNE_SOURCE_DIR");
  if (!src) GTEST_SKIP() << "FTUNE_SOURCE_DIR not set (run through ctest)";
  std::ifstream in(std::string(src) + "/tests/fuzz/seeds/sentencepiece/crash-empty-piece.model",
                   std::ios::binary);
  ASSERT_TRUE(in.good());
  TempDir dir;
  dir.write("tokenizer.model", std::string(std::istreambuf_iterator<char>(in), {}));
  const std::string err = error_of([&] { Tokenizer::load(dir.path); });
  EXPECT_NE(err.find("tokenizer.model: cannot load SentencePiece model: "), std::string::npos) << err;
  EXPECT_NE(err.find("zero-length key"), std::string::npos) << err;
}

TEST(TokenizerLoad, ErrorsNameTheFileAndField) {
  TempDir dir;
  EXPECT_NE(
      error_of([&] { Tokenizer::load(dir.path); }).find(": no tokenizer.json or tokenizer.model"),
      std::string::npos);
  dir.write("tokenizer.json", "{\"model\": ");
  EXPECT_NE(error_of([&] { Tokenizer::load(dir.path); }).find("tokenizer.json: invalid JSON"),
            std::string::npos);

  json wordpiece = llama2_style();
  wordpiece["model"]["type"] = "WordPiece";
  dir.write("tokenizer.json", wordpiece.dump());
  std::string err = error_of([&] { Tokenizer::load(dir.path); });
  EXPECT_NE(err.find("tokenizer.json: model.type: unsupported model type 'WordPiece'"),
            std::string::npos)
      << err;

  json bad_merge = llama2_style();
  bad_merge["model"]["merges"] = json::array({"h q"});
  dir.write("tokenizer.json", bad_merge.dump());
  err = error_of([&] { Tokenizer::load(dir.path); });
  EXPECT_NE(err.find("model.merges[0]: token 'q' is not in model.vocab"), std::string::npos) << err;

  json bad_pre = llama2_style();
  bad_pre["pre_tokenizer"] = {{"type", "Sequence"},
                              {"pretokenizers", json::array({json{{"type", "Bogus"}}})}};
  dir.write("tokenizer.json", bad_pre.dump());
  err = error_of([&] { Tokenizer::load(dir.path); });
  EXPECT_NE(err.find("pre_tokenizer.pretokenizers[0].type: unsupported pre-tokenizer 'Bogus'"),
            std::string::npos)
      << err;

  json bad_regex = llama2_style();
  bad_regex["pre_tokenizer"] = {{"type", "Split"},
                                {"pattern", {{"Regex", "(unclosed"}}},
                                {"behavior", "Isolated"}};
  dir.write("tokenizer.json", bad_regex.dump());
  err = error_of([&] { Tokenizer::load(dir.path); });
  EXPECT_NE(err.find("tokenizer.json: pre_tokenizer.pattern.Regex: regex /(unclosed/:"),
            std::string::npos)
      << err;

  dir.write("tokenizer.json", llama2_style().dump());
  dir.write("tokenizer_config.json", json{{"bos_token", "<nope>"}}.dump());
  err = error_of([&] { Tokenizer::load(dir.path); });
  EXPECT_NE(err.find("tokenizer_config.json: bos_token: token '<nope>' is not in the vocabulary"),
            std::string::npos)
      << err;
  dir.write("tokenizer_config.json", json{{"chat_template", 42}}.dump());
  err = error_of([&] { Tokenizer::load(dir.path); });
  EXPECT_NE(err.find("tokenizer_config.json: chat_template:"), std::string::npos) << err;

  const Tokenizer t = Tokenizer::from_json(llama2_style(), nullptr, "x");
  err = error_of([&] { t.encode("bad \xC3 utf8"); });
  EXPECT_NE(err.find("not valid UTF-8 (byte offset 4)"), std::string::npos) << err;
}

// The id rules of tokenizer.json: ids index an embedding, so they are non-negative, unique and
// below the number of vocab entries plus added tokens (byte_tokenizer(): 256 + 2 = 258).
TEST(TokenizerIds, ImpossibleIdsNameTheFileAndField) {
  const std::string bound = " is not below 258 (the number of vocab entries plus added tokens)";
  auto err = [](const json& tj) {
    return error_of([&] { Tokenizer::from_json(tj, nullptr, "d/tokenizer.json"); });
  };
  const std::string a = byte_to_unicode_table()['a'];
  json tj = byte_tokenizer();
  tj["model"]["vocab"][a] = 2147483647;
  EXPECT_EQ(err(tj), "d/tokenizer.json: model.vocab.a: 2147483647" + bound);
  tj["model"]["vocab"][a] = -1;
  EXPECT_EQ(err(tj), "d/tokenizer.json: model.vocab.a: -1 is negative");
  tj["model"]["vocab"][a] = 1.5;
  EXPECT_EQ(err(tj), "d/tokenizer.json: model.vocab.a: expected an integer id, got 1.5");
  tj["model"]["vocab"][a] = 18446744073709551615u;
  EXPECT_EQ(err(tj), "d/tokenizer.json: model.vocab.a: 18446744073709551615" + bound);
  tj["model"]["vocab"][a] = 258;
  EXPECT_EQ(err(tj), "d/tokenizer.json: model.vocab.a: 258" + bound);
  tj = byte_tokenizer();
  tj["model"]["vocab"][a] = 98;
  const std::string dup = err(tj);
  EXPECT_TRUE(dup == "d/tokenizer.json: model.vocab.a: 98 is also the id of 'b'" ||
              dup == "d/tokenizer.json: model.vocab.b: 98 is also the id of 'a'")
      << dup;

  tj = byte_tokenizer();
  tj["added_tokens"][1]["id"] = 2147483647;
  EXPECT_EQ(err(tj), "d/tokenizer.json: added_tokens[1].id: 2147483647" + bound);
  tj["added_tokens"][1]["id"] = -5;
  EXPECT_EQ(err(tj), "d/tokenizer.json: added_tokens[1].id: -5 is negative");
  tj["added_tokens"][1]["id"] = 256;  // the id of added_tokens[0]
  EXPECT_EQ(err(tj),
            "d/tokenizer.json: added_tokens[1].id: 256 differs from the id 257 that tokenizers "
            "assigns to '<|end|>' (the next free id, or its id in model.vocab)");
  tj = byte_tokenizer();
  tj["post_processor"]["special_tokens"]["<|end|>"]["ids"] = {2147483647};
  EXPECT_EQ(err(tj),
            "d/tokenizer.json: post_processor.special_tokens.<|end|>.ids[0]: 2147483647" + bound);
  // An id below the bound may leave a hole (97 here), but tokenizers would then give an added
  // token an id model.vocab already uses.
  tj = byte_tokenizer();
  tj["model"]["vocab"][a] = 257;
  EXPECT_EQ(err(tj), "d/tokenizer.json: added_tokens[1]: tokenizers gives '<|end|>' the id 257, "
                     "which model.vocab already gives to 'a'");
  tj["added_tokens"] = json::array();
  tj["post_processor"] = nullptr;
  EXPECT_EQ(err(tj), "d/tokenizer.json: model.vocab.a: 257 is not below 256 (the number of vocab "
                     "entries plus added tokens)");
}

TEST(TokenizerIds, ConfigAddedTokensDecoder) {
  TempDir dir;
  dir.write("tokenizer.json", byte_tokenizer().dump());
  const std::string cfg = (dir.path / "tokenizer_config.json").string();
  auto err = [&](const json& decoder) {
    dir.write("tokenizer_config.json", json{{"added_tokens_decoder", decoder}}.dump());
    return error_of([&] { Tokenizer::load(dir.path); });
  };
  const json end = {{"content", "<|end|>"}, {"special", true}};
  EXPECT_EQ(err(json{{"257", end}}), "");  // agrees with tokenizer.json
  EXPECT_EQ(err(json{{"2147483647", end}}),
            cfg + ": added_tokens_decoder.2147483647: 2147483647 is not below 259 (the "
                  "tokenizer's vocabulary plus added_tokens_decoder)");
  EXPECT_EQ(err(json{{"99999999999999999999", end}}),
            cfg + ": added_tokens_decoder.99999999999999999999: 99999999999999999999 is not "
                  "below 259 (the tokenizer's vocabulary plus added_tokens_decoder)");
  EXPECT_EQ(err(json{{"-1", end}}),
            cfg + ": added_tokens_decoder.-1: expected a non-negative integer id as key");
  EXPECT_EQ(err(json{{"200", end}}),
            cfg + ": added_tokens_decoder.200: token '<|end|>' has id 257 in tokenizer.json");
  EXPECT_EQ(err(json{{"257", end}, {"258", end}}),
            cfg + ": added_tokens_decoder.258: token '<|end|>' is also added_tokens_decoder.257 "
                  "(one token, two ids)");
}

TEST(TokenizerIds, CheckFitsVocabNamesBothFiles) {
  const Tokenizer t = Tokenizer::from_json(byte_tokenizer(), nullptr, "d/tokenizer.json");
  EXPECT_EQ(error_of([&] { check_fits_vocab(t, 258, "d/config.json"); }), "");
  EXPECT_EQ(error_of([&] { check_fits_vocab(t, 300, "d/config.json"); }), "");
  EXPECT_EQ(error_of([&] { check_fits_vocab(t, 257, "d/config.json"); }),
            "d/tokenizer.json: token '<|end|>' (id 257): id is not below the model's vocab_size "
            "257 (d/config.json)");
  EXPECT_EQ(error_of([&] { check_fits_vocab(t, 100, "preset tiny"); }),
            "d/tokenizer.json: token 'd' (id 100): id is not below the model's vocab_size 100 "
            "(preset tiny)");
}

TEST(JsonText, InvalidUtf8NamesTheField) {
  auto where = [](const std::string& text) {
    const auto p = find_invalid_utf8_in_json(text);
    return p ? describe(*p, true) : std::string("valid");
  };
  EXPECT_EQ(where(R"({"a": [1, "x"]})"), "valid");
  EXPECT_EQ(where("{\"a\": [1, \"x\xff\"]}"), "a[1]: invalid UTF-8 at line 1 (byte 12)");
  EXPECT_EQ(where("{\"a\": {\n\"k\xc3\": 1}}"), "a (a key): invalid UTF-8 at line 2 (byte 10)");
  EXPECT_EQ(where("[\"\xff\", \"\xfe\"]"), "[0]: invalid UTF-8 at line 1 (byte 2)");
  EXPECT_EQ(where("{\"a\": 1\xff}"), "invalid UTF-8 at line 1 (byte 7)");  // not in a string
  // The marker that locates the field cannot collide with text already in the file.
  EXPECT_EQ(where(u8(u8"{\"m\": \"\U000E0000\", \"n\": \"\xff\"}")),
            "n: invalid UTF-8 at line 1 (byte 20)");
  EXPECT_EQ(error_of([] { parse_json_text("{\"a\": \"\xff\"}", "f.json"); }),
            "f.json: a: invalid UTF-8 at line 1 (byte 7)");
  EXPECT_NE(error_of([] { parse_json_text("{\"a\": ", "f.json"); }).find("f.json: invalid JSON: "),
            std::string::npos);
}

TEST(TokenizerLoad, InvalidUtf8InFilesNamesFileAndField) {
  TempDir dir;
  std::string text = byte_tokenizer().dump();
  text.replace(text.find("<|end|>"), 7, "<|end\xff|>");
  dir.write("tokenizer.json", text);
  const std::string err = error_of([&] { Tokenizer::load(dir.path); });
  EXPECT_EQ(err, (dir.path / "tokenizer.json").string() + ": added_tokens[1].content: invalid UTF-8 at line 1 (byte " +
                     std::to_string(text.find('\xff')) + ")");
  dir.write("tokenizer.json", byte_tokenizer().dump());
  dir.write("chat_template.jinja", "ok\n{{ x }}\xe2\x82");
  EXPECT_EQ(error_of([&] { Tokenizer::load(dir.path); }),
            (dir.path / "chat_template.jinja").string() + ": invalid UTF-8 at line 2 (byte 10)");
}

}  // namespace
}  // namespace ftune::tok

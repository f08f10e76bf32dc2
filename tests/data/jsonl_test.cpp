// Tests for JSONL loading: token ids and loss masks of the three formats, computed independently
// from the text (the byte-level tokenizer maps each UTF-8 byte to its value), and every
// malformed-input error with its exact "<file>:<line>: <field>: <problem>" message.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fs.h"
#include "test_util.h"

namespace ftune::data {
namespace {

using namespace testing;
namespace fs = std::filesystem;

class JsonlTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = temp_dir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    tok_ = std::make_unique<tok::Tokenizer>(byte_tokenizer(dir_ / "tok"));
  }
  void TearDown() override { remove_tree(dir_); }
  fs::path file(const std::string& content) { return write_text(dir_ / "d.jsonl", content); }
  // The error message load_jsonl throws for `content`, or "" if it loads.
  std::string error_of(const std::string& content, Format format) {
    try {
      load_jsonl(file(content), format, *tok_);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  }
  fs::path dir_;
  std::unique_ptr<tok::Tokenizer> tok_;
};

std::vector<int64_t> ignore(size_t n) { return std::vector<int64_t>(n, kIgnoreIndex); }

std::vector<int64_t> cat(std::vector<int64_t> a, const std::vector<int64_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

TEST_F(JsonlTest, TextAppendsEosAndTrainsOnEverything) {
  auto ex = load_jsonl(file("{\"text\": \"h\\u00e9llo\"}\n\n  \n{\"text\": \"ab\", \"extra\": 1}\n"),
                       Format::kText, *tok_);
  ASSERT_EQ(ex.size(), 2u);
  EXPECT_EQ(ex[0].ids, cat(bytes("h\xc3\xa9llo"), {kEos}));
  EXPECT_EQ(ex[0].labels, ex[0].ids);
  EXPECT_EQ(ex[1].ids, cat(bytes("ab"), {kEos}));
}

TEST_F(JsonlTest, AlpacaMasksThePrompt) {
  const std::string no_input =
      "Below is an instruction that describes a task. Write a response that appropriately "
      "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n";
  const std::string with_input =
      "Below is an instruction that describes a task, paired with an input that provides further "
      "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
      "Define it.\n\n### Input:\nword\n\n### Response:\n";
  auto ex = load_jsonl(file("{\"instruction\": \"Say hi.\", \"output\": \"hi\"}\n"
                            "{\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"hi\"}\n"
                            "{\"instruction\": \"Say hi.\", \"input\": null, \"output\": \"hi\"}\n"
                            "{\"instruction\": \"Define it.\", \"input\": \"word\", \"output\": \"w\"}\n"),
                       Format::kAlpaca, *tok_);
  ASSERT_EQ(ex.size(), 4u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(ex[i].ids, cat(cat(bytes(no_input), bytes("hi")), {kEos})) << i;
    EXPECT_EQ(ex[i].labels, cat(cat(ignore(no_input.size()), bytes("hi")), {kEos})) << i;
  }
  EXPECT_EQ(ex[3].ids, cat(cat(bytes(with_input), bytes("w")), {kEos}));
  EXPECT_EQ(ex[3].labels, cat(cat(ignore(with_input.size()), bytes("w")), {kEos}));
}

TEST_F(JsonlTest, ChatTrainsOnAssistantTurnsAndTheirEndOfTurn) {
  nlohmann::json line = {{"messages",
                          {{{"role", "system"}, {"content", "Be brief."}},
                           {{"role", "user"}, {"content", "Q1"}},
                           {{"role", "assistant"}, {"content", "A1"}},
                           {{"role", "user"}, {"content", "Q2"}},
                           {{"role", "assistant"}, {"content", "A2!"}}}}};
  auto ex = load_jsonl(file(line.dump() + "\n"), Format::kChat, *tok_);
  ASSERT_EQ(ex.size(), 1u);
  // The ChatML template of write_byte_level_tokenizer, rendered by hand.
  const std::string a1 = "A1<|im_end|>\n", a2 = "A2!<|im_end|>\n";
  const std::string p1 = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                         "<|im_start|>assistant\n";
  const std::string p2 = "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n";
  EXPECT_EQ(ex[0].ids, bytes(p1 + a1 + p2 + a2));
  EXPECT_EQ(ex[0].labels,
            cat(cat(cat(ignore(p1.size()), bytes(a1)), ignore(p2.size())), bytes(a2)));
}

TEST_F(JsonlTest, ChatTemplateThatIsNotPrefixStableIsAnError) {
  // A template that writes the message count first renders prefixes that do not tokenize to a
  // prefix of the whole conversation.
  nlohmann::json cfg = nlohmann::json::parse(read_file(dir_ / "tok" / "tokenizer_config.json"));
  cfg["chat_template"] =
      "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}";
  write_text(dir_ / "tok" / "tokenizer_config.json", cfg.dump());
  *tok_ = tok::Tokenizer::load(dir_ / "tok");
  const std::string msg = error_of(
      R"({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})"
      "\n",
      Format::kChat);
  EXPECT_NE(msg.find(":1: messages[1]: chat template is not prefix-stable"), std::string::npos)
      << msg;
}

TEST_F(JsonlTest, ChatKeepsKeyOrderAndPassesToolsAndToolCalls) {
  // As transformers renders it: dicts in file order, tools=None when the line has none, and an
  // assistant turn that only calls tools may have null content.
  nlohmann::json cfg = nlohmann::json::parse(read_file(dir_ / "tok" / "tokenizer_config.json"));
  cfg["chat_template"] = "{{ tools | tojson }}{% for m in messages %}{{ m | tojson }}{% endfor %}";
  write_text(dir_ / "tok" / "tokenizer_config.json", cfg.dump());
  *tok_ = tok::Tokenizer::load(dir_ / "tok");
  auto ex = load_jsonl(
      file(R"({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": null, "tool_calls": [{"b": 1, "a": 2}]}], "tools": [{"z": 1, "y": 2}]})"
           "\n"
           R"({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})"
           "\n"),
      Format::kChat, *tok_);
  ASSERT_EQ(ex.size(), 2u);
  const std::string user = R"({"role": "user", "content": "q"})";
  const std::string calls = R"({"role": "assistant", "content": null, "tool_calls": [{"b": 1, "a": 2}]})";
  const std::string tools = R"([{"z": 1, "y": 2}])";
  EXPECT_EQ(ex[0].ids, bytes(tools + user + calls));
  EXPECT_EQ(ex[0].labels, cat(ignore(tools.size() + user.size()), bytes(calls)));
  const std::string answer = R"({"role": "assistant", "content": "a"})";
  EXPECT_EQ(ex[1].ids, bytes("null" + user + answer));
  EXPECT_EQ(error_of(R"({"messages": [{"role": "assistant", "content": "a"}], "tools": {}})", Format::kChat),
            (dir_ / "d.jsonl").string() + ":1: tools: expected an array, got object");
  EXPECT_EQ(error_of(R"({"messages": [{"role": "assistant", "content": null}]})", Format::kChat),
            (dir_ / "d.jsonl").string() + ":1: messages[0].content: expected a string, got null");
}

TEST_F(JsonlTest, ChatWithoutTemplateIsAnError) {
  nlohmann::json cfg = nlohmann::json::parse(read_file(dir_ / "tok" / "tokenizer_config.json"));
  cfg.erase("chat_template");
  write_text(dir_ / "tok" / "tokenizer_config.json", cfg.dump());
  *tok_ = tok::Tokenizer::load(dir_ / "tok");
  EXPECT_EQ(error_of(R"({"messages": [{"role": "assistant", "content": "a"}]})", Format::kChat),
            (dir_ / "d.jsonl").string() + ":1: messages: the tokenizer has no chat template");
}

TEST_F(JsonlTest, ErrorsNameFileLineAndField) {
  const std::string f = (dir_ / "d.jsonl").string();
  struct Case {
    std::string content;
    Format format;
    std::string expected;
  };
  const std::string ok = "{\"text\": \"fine\"}\n";
  std::vector<Case> cases = {
      {ok + "\n" + "{\"text\": \"unterminated}\n", Format::kText, f + ":3: not valid JSON"},
      {ok + "{\"text\": \"a\"} trailing\n", Format::kText, f + ":2: not valid JSON"},
      {"[1, 2]\n", Format::kText, f + ":1: expected a JSON object, got array"},
      {"{\"txt\": \"a\"}\n", Format::kText, f + ":1: text: missing"},
      {"{\"text\": 5}\n", Format::kText, f + ":1: text: expected a string, got number"},
      {"{\"instruction\": \"i\"}\n", Format::kAlpaca, f + ":1: output: missing"},
      {"{\"output\": \"o\"}\n", Format::kAlpaca, f + ":1: instruction: missing"},
      {"{\"instruction\": null, \"output\": \"o\"}\n", Format::kAlpaca,
       f + ":1: instruction: expected a string, got null"},
      {"{\"instruction\": \"i\", \"input\": [1], \"output\": \"o\"}\n", Format::kAlpaca,
       f + ":1: input: expected a string, got array"},
      {"{\"instruction\": \"i\", \"output\": {\"a\": 1}}\n", Format::kAlpaca,
       f + ":1: output: expected a string, got object"},
      {"{\"msgs\": []}\n", Format::kChat, f + ":1: messages: missing"},
      {"{\"messages\": \"hi\"}\n", Format::kChat, f + ":1: messages: expected an array, got string"},
      {"{\"messages\": []}\n", Format::kChat, f + ":1: messages: empty"},
      {"{\"messages\": [3]}\n", Format::kChat, f + ":1: messages[0]: expected an object, got number"},
      {"{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"content\": \"a\"}]}\n",
       Format::kChat, f + ":1: messages[1].role: missing"},
      {"{\"messages\": [{\"role\": 1, \"content\": \"q\"}]}\n", Format::kChat,
       f + ":1: messages[0].role: expected a string, got number"},
      {"{\"messages\": [{\"role\": \"assistant\", \"content\": null}]}\n", Format::kChat,
       f + ":1: messages[0].content: expected a string, got null"},
      {"{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n", Format::kChat,
       f + ":1: messages: no assistant message to train on"},
      {"", Format::kText, f + ": empty dataset"},
      {"\n  \n\r\n\t\n", Format::kAlpaca, f + ": empty dataset"},
  };
  for (const Case& c : cases) EXPECT_EQ(error_of(c.content, c.format), c.expected) << c.content;
}

TEST_F(JsonlTest, MissingFileIsAnErrorNamingIt) {
  const fs::path missing = dir_ / "nope.jsonl";
  try {
    load_jsonl(missing, Format::kText, *tok_);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind(missing.string() + ": ", 0), 0u) << e.what();
  }
}

TEST_F(JsonlTest, CrlfLinesAndInvalidUtf8) {
  auto ex = load_jsonl(file("{\"text\": \"a\"}\r\n{\"text\": \"b\"}\r\n"), Format::kText, *tok_);
  ASSERT_EQ(ex.size(), 2u);
  EXPECT_EQ(ex[1].ids, cat(bytes("b"), {kEos}));
  EXPECT_EQ(error_of("{\"text\": \"\xff\"}\n", Format::kText),
            (dir_ / "d.jsonl").string() + ":1: text: invalid UTF-8 at byte 10");
  EXPECT_EQ(error_of("\n{\"messages\": [{\"role\": \"user\", \"con\xc3\": 1}]}\n",
                     Format::kChat),
            (dir_ / "d.jsonl").string() + ":2: messages[0] (a key): invalid UTF-8 at byte 35");
}

TEST(ParseFormat, NamesAndError) {
  EXPECT_EQ(parse_format("text", "x"), Format::kText);
  EXPECT_EQ(parse_format("alpaca", "x"), Format::kAlpaca);
  EXPECT_EQ(parse_format("chat", "x"), Format::kChat);
  EXPECT_THROW(parse_format("sharegpt", "data.format"), Error);
}

TEST(SampleData, ShippedFilesLoad) {
  // The committed sample datasets must stay loadable in their documented formats.
  const char* src = std::getenv("FTUNE_SOURCE_DIR");
  ASSERT_NE(src, nullptr);
  auto dir = temp_dir("sample");
  auto tok = byte_tokenizer(dir / "tok");
  const fs::path data = fs::path(src) / "data";
  EXPECT_GE(load_jsonl(data / "sample_train.jsonl", Format::kAlpaca, tok).size(), 200u);
  EXPECT_GE(load_jsonl(data / "sample_valid.jsonl", Format::kAlpaca, tok).size(), 20u);
  EXPECT_GE(load_jsonl(data / "sample_text.jsonl", Format::kText, tok).size(), 20u);
  EXPECT_GE(load_jsonl(data / "sample_chat.jsonl", Format::kChat, tok).size(), 20u);
  remove_tree(dir);
}

}  // namespace
}  // namespace ftune::data

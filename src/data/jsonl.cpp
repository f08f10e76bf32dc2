// JSONL loading: validates each line of a text/alpaca/chat dataset and tokenizes it into an
// Example whose labels mask everything the model should not learn to produce (alpaca prompts,
// chat turns other than the assistant's). Chat spans come from rendering message prefixes with
// the chat template and tokenizing them, which only works for prefix-stable templates; a template
// that rewrites earlier turns (or tokenization that merges across a turn boundary) is reported as
// an error rather than silently mislabelled. Lines are parsed as ordered_json: transformers sees
// messages as Python dicts in file order, and templates that print them (tojson) show that order.
#include <nlohmann/json.hpp>

#include <string_view>

#include "core/error.h"
#include "core/fs.h"
#include "data/dataset.h"
#include "tokenizer/json_text.h"

namespace ftune::data {
namespace {

using json = nlohmann::ordered_json;
constexpr int64_t kIgnore = kIgnoreIndex;

// "<file>:<line>" prefix of every error about one line.
struct LineRef {
  const std::string& file;
  int64_t line;
};

template <typename... Args>
[[noreturn]] void fail_at(const LineRef& at, Args&&... parts) {
  fail(at.file, ":", at.line, ": ", std::forward<Args>(parts)...);
}

const std::string& require_string(const json& obj, const char* key, const std::string& field,
                                  const LineRef& at) {
  auto it = obj.find(key);
  if (it == obj.end()) fail_at(at, field, ": missing");
  if (!it->is_string()) fail_at(at, field, ": expected a string, got ", it->type_name());
  return it->get_ref<const std::string&>();
}

// Standard Stanford Alpaca prompt (github.com/tatsu-lab/stanford_alpaca, train.py).
std::string alpaca_prompt(const std::string& instruction, const std::string& input) {
  if (input.empty()) {
    return "Below is an instruction that describes a task. Write a response that appropriately "
           "completes the request.\n\n### Instruction:\n" +
           instruction + "\n\n### Response:\n";
  }
  return "Below is an instruction that describes a task, paired with an input that provides "
         "further context. Write a response that appropriately completes the request.\n\n"
         "### Instruction:\n" +
         instruction + "\n\n### Input:\n" + input + "\n\n### Response:\n";
}

void append_eos(Example& ex, const tok::Tokenizer& tokenizer) {
  auto eos = tokenizer.eos_id();
  if (!eos) return;
  if (!ex.ids.empty() && ex.ids.back() == *eos) return;  // post-processor already added it
  ex.ids.push_back(*eos);
  ex.labels.push_back(*eos);
}

Example text_example(const json& j, const tok::Tokenizer& tokenizer, const LineRef& at) {
  const std::string& text = require_string(j, "text", "text", at);
  Example ex;
  ex.ids = tokenizer.encode(text, /*add_special_tokens=*/true);
  ex.labels = ex.ids;
  append_eos(ex, tokenizer);
  return ex;
}

Example alpaca_example(const json& j, const tok::Tokenizer& tokenizer, const LineRef& at) {
  const std::string& instruction = require_string(j, "instruction", "instruction", at);
  std::string input;
  if (auto it = j.find("input"); it != j.end() && !it->is_null()) {
    if (!it->is_string()) fail_at(at, "input: expected a string, got ", it->type_name());
    input = it->get<std::string>();
  }
  const std::string& output = require_string(j, "output", "output", at);
  Example ex;
  ex.ids = tokenizer.encode(alpaca_prompt(instruction, input), /*add_special_tokens=*/true);
  ex.labels.assign(ex.ids.size(), kIgnore);
  std::vector<int64_t> response = tokenizer.encode(output, /*add_special_tokens=*/false);
  ex.ids.insert(ex.ids.end(), response.begin(), response.end());
  ex.labels.insert(ex.labels.end(), response.begin(), response.end());
  if (auto eos = tokenizer.eos_id()) {
    ex.ids.push_back(*eos);
    ex.labels.push_back(*eos);
  }
  return ex;
}

bool is_prefix(const std::vector<int64_t>& prefix, const std::vector<int64_t>& of) {
  return prefix.size() <= of.size() && std::equal(prefix.begin(), prefix.end(), of.begin());
}

std::vector<int64_t> render_ids(const tok::Tokenizer& tokenizer, const json& messages,
                                const json& tools, bool add_generation_prompt, const LineRef& at) {
  std::string text;
  try {
    text = tokenizer.apply_chat_template(messages, add_generation_prompt, tools);
  } catch (const Error& e) {
    fail_at(at, "messages: ", e.what());
  }
  // As transformers' apply_chat_template(tokenize=True): the template writes the special tokens.
  return tokenizer.encode(text, /*add_special_tokens=*/false);
}

Example chat_example(const json& j, const tok::Tokenizer& tokenizer, const LineRef& at) {
  auto it = j.find("messages");
  if (it == j.end()) fail_at(at, "messages: missing");
  const json& messages = *it;
  if (!messages.is_array()) fail_at(at, "messages: expected an array, got ", messages.type_name());
  if (messages.empty()) fail_at(at, "messages: empty");
  bool has_assistant = false;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string field = "messages[" + std::to_string(i) + "]";
    if (!messages[i].is_object()) {
      fail_at(at, field, ": expected an object, got ", messages[i].type_name());
    }
    has_assistant |= require_string(messages[i], "role", field + ".role", at) == "assistant";
    // An assistant turn that only calls tools may have no content (OpenAI/HF tool-call format).
    const auto content = messages[i].find("content");
    const bool calls_tools = messages[i].contains("tool_calls");
    if (!(calls_tools && (content == messages[i].end() || content->is_null()))) {
      require_string(messages[i], "content", field + ".content", at);
    }
  }
  json tools = nullptr;  // transformers passes tools=None when there are none
  if (auto t = j.find("tools"); t != j.end() && !t->is_null()) {
    if (!t->is_array()) fail_at(at, "tools: expected an array, got ", t->type_name());
    tools = *t;
  }
  if (!has_assistant) fail_at(at, "messages: no assistant message to train on");
  if (tokenizer.chat_template().empty()) fail_at(at, "messages: the tokenizer has no chat template");

  Example ex;
  ex.ids = render_ids(tokenizer, messages, tools, false, at);
  ex.labels.assign(ex.ids.size(), kIgnore);
  for (size_t i = 0; i < messages.size(); ++i) {
    if (messages[i]["role"] != "assistant") continue;
    json before = json::array();
    for (size_t k = 0; k < i; ++k) before.push_back(messages[k]);
    json upto = before;
    upto.push_back(messages[i]);
    std::vector<int64_t> start = render_ids(tokenizer, before, tools, true, at);
    std::vector<int64_t> end = render_ids(tokenizer, upto, tools, false, at);
    if (!is_prefix(start, end) || !is_prefix(end, ex.ids)) {
      fail_at(at, "messages[", i,
              "]: chat template is not prefix-stable (rendering the conversation up to this "
              "assistant message does not tokenize to a prefix of the whole), so its tokens "
              "cannot be located");
    }
    for (size_t t = start.size(); t < end.size(); ++t) ex.labels[t] = ex.ids[t];
  }
  return ex;
}

bool is_blank(std::string_view line) {
  return line.find_first_not_of(" \t\r\n\f\v") == std::string_view::npos;
}

}  // namespace

Format parse_format(const std::string& s, const std::string& origin) {
  if (s == "text") return Format::kText;
  if (s == "alpaca") return Format::kAlpaca;
  if (s == "chat") return Format::kChat;
  fail(origin, ": expected one of text, alpaca, chat, got \"", s, "\"");
}

std::vector<Example> load_jsonl(const std::filesystem::path& path, Format format,
                                const tok::Tokenizer& tokenizer) {
  const std::string file = path.string();
  const std::string content = read_file(path);
  std::vector<Example> examples;
  int64_t line_no = 0;
  size_t pos = 0;
  while (pos < content.size()) {
    size_t nl = content.find('\n', pos);
    if (nl == std::string::npos) nl = content.size();
    std::string_view line(content.data() + pos, nl - pos);
    pos = nl + 1;
    ++line_no;
    if (is_blank(line)) continue;
    const LineRef at{file, line_no};
    if (const auto bad = tok::find_invalid_utf8_in_json(line)) {
      fail_at(at, tok::describe(*bad, /*with_line=*/false));
    }
    json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) fail_at(at, "not valid JSON");
    if (!j.is_object()) fail_at(at, "expected a JSON object, got ", j.type_name());
    Example ex;
    switch (format) {
      case Format::kText: ex = text_example(j, tokenizer, at); break;
      case Format::kAlpaca: ex = alpaca_example(j, tokenizer, at); break;
      case Format::kChat: ex = chat_example(j, tokenizer, at); break;
    }
    if (ex.ids.empty()) fail_at(at, "encodes to no tokens");
    examples.push_back(std::move(ex));
  }
  if (examples.empty()) fail(file, ": empty dataset");
  return examples;
}

}  // namespace ftune::data

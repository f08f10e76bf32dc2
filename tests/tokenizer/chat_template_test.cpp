// Unit tests for the chat-template interpreter (src/tokenizer/chat_template*), runnable without
// Python. Expected strings were rendered by transformers 4.57.6's own environment
// (_compile_jinja_template, jinja2 3.1.6) for the same template and context; the full byte-for-byte
// comparison over hundreds of templates lives in tests/python/test_chat_template.py. The rest
// checks ftune's own contract: error messages, key order, and bounded recursion.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "tokenizer/chat_template.h"

namespace {

using nlohmann::ordered_json;
using ftune::tok::render_chat_template;

std::string render(const std::string& tpl, const std::string& context_json = "{}") {
  return render_chat_template(tpl, ordered_json::parse(context_json));
}

std::string error_of(const std::string& tpl, const std::string& context_json = "{}") {
  try {
    render(tpl, context_json);
  } catch (const ftune::Error& e) {
    return e.what();
  }
  return "<no error>";
}

struct Golden {
  const char* name;
  const char* tpl;
  const char* context;
  const char* want;
};

const Golden kGolden[] = {
    {"smollm2",
     R"TPL({% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %})TPL",
     R"({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "add_generation_prompt": true})",
     "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"},
    {"zephyr",
     "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
     "eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + "
     "eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
     "{% endfor %}",
     R"({"messages": [{"role": "user", "content": "Hi"}], "eos_token": "</s>", "add_generation_prompt": true})",
     "<|user|>\nHi</s>\n<|assistant|>\n"},
    {"trim_and_lstrip_blocks",
     "  {% if true %}\n  yes\n  {% endif %}\n{{- ' x ' -}}\n  {# c #}\nz  {{ 'v' }}\n    {%+ if true %}k{% endif +%}\nend",
     "{}", "  yes\n x z  v\n    k\nend"},
    {"dash_control", "a  {%- if true -%}  b  {%- endif -%}  c\n\n{{- 'd' }}", "{}", "abcd"},
    {"python_printing",
     R"TPL({{ [1, 2.5, 'it\'s', none, true, {'k': (1,)}] }}|{{ 1e16 }}|{{ 1/3 }}|{{ -7 // 2 }}|{{ -7 % 3 }}|{{ 2 ** 10 }})TPL",
     "{}", R"([1, 2.5, "it's", None, True, {'k': (1,)}]|1e+16|0.3333333333333333|-4|2|1024)"},
    {"unicode_code_points", "{{ s[1:4] }}|{{ s | length }}|{{ s[::-1] }}|{{ s | upper }}",
     R"({"s": "h\u00e9llo \ud83d\ude00"})", "\u00e9ll|7|\U0001F600 oll\u00e9h|H\u00c9LLO \U0001F600"},
    {"loop_filter_break",
     "{% for x in xs if x != 2 %}{{ loop.index }}{{ x }}{{ loop.last }}{% if x == 4 %}{% break %}{% endif %},"
     "{% else %}none{% endfor %}",
     R"({"xs": [1, 2, 3, 4, 5]})", "11False,23False,34False"},
    {"namespace_vs_loop_scope",
     "{% set ns = namespace(n=0) %}{% set x = 0 %}{% for i in range(4) %}{% set ns.n = ns.n + i %}"
     "{% set x = x + i %}{% endfor %}{{ ns.n }} {{ x }}",
     "{}", "6 0"},
    {"filters",
     "{{ msgs | selectattr('role', 'equalto', 'user') | map(attribute='content') | join(', ') }}|{{ '  t  ' | trim }}|"
     "{{ none | default('d') }}|{{ missing | default('d') }}|{{ 'a-b' | title }}|{{ '7' | int + 1 }}",
     R"({"msgs": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]})",
     "a, c|t|None|d|A-B|8"},
    {"tojson_keeps_order_and_unicode", "{{ t | tojson }}|{{ t | tojson(indent=2) }}",
     R"({"t": {"name": "f", "description": "Z\u00fcrich \"q\"", "parameters": {"type": "object", "required": []}}})",
     "{\"name\": \"f\", \"description\": \"Z\u00fcrich \\\"q\\\"\", \"parameters\": {\"type\": \"object\", \"required\": []}}|"
     "{\n  \"name\": \"f\",\n  \"description\": \"Z\u00fcrich \\\"q\\\"\",\n  \"parameters\": {\n    \"type\": \"object\",\n"
     "    \"required\": []\n  }\n}"},
    {"methods",
     "{{ s.strip().split(' ') }}|{{ s.startswith(' a') }}|{{ d.get('x', 'none') }}|"
     "{% for k, v in d.items() %}{{ k }}={{ v }}{% endfor %}",
     R"({"s": " a b ", "d": {"k": 1}})", "['a', 'b']|True|none|k=1"},
    {"markup_from_safe_escapes_plain_side",
     R"TPL({{ "Use '"|safe + name + "'\n"|safe }}{{ ('a'|safe) ~ '<' }}{{ '<'|e }})TPL",
     R"({"name": "<f>"})", "Use '&lt;f&gt;'\na<&lt;"},
    {"macro",
     "{% macro tag(name, body='') %}<{{ name }}>{{ body }}</{{ name }}>{% endmacro %}{{ tag('b', 'x') }}{{ tag(name='i') }}",
     "{}", "<b>x</b><i></i>"},
};

TEST(ChatTemplate, MatchesTransformersGoldenOutputs) {
  for (const auto& g : kGolden) {
    EXPECT_EQ(render(g.tpl, g.context), g.want) << g.name;
  }
}

TEST(ChatTemplate, RaiseExceptionKeepsTheMessage) {
  const std::string tpl =
      "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
      "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
      "{% endif %}{{ m['content'] }}{% endfor %}";
  EXPECT_EQ(render(tpl, R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})"),
            "ab");
  EXPECT_EQ(error_of(tpl, R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})"),
            "chat template: Conversation roles must alternate user/assistant/user/assistant/...");
}

TEST(ChatTemplate, SyntaxErrorsNameTheLine) {
  // jinja2 reports both of these on line 3 as well.
  EXPECT_EQ(error_of("a\nb\n{% if %}"), "chat template: line 3: Expected an expression, got 'end of statement block'");
  EXPECT_EQ(error_of("{% for x in y %}\n\n{{ x | nosuch }}{% endfor %}"), "chat template: line 3: No filter named 'nosuch'.");
  EXPECT_NE(error_of("{% if true %}never closed").find("chat template: line 1: Unexpected end of template"),
            std::string::npos);
  EXPECT_NE(error_of("{{ 'unterminated }}").find("chat template: line 1:"), std::string::npos);
}

TEST(ChatTemplate, UndefinedBehavesLikeJinja) {
  EXPECT_EQ(render("[{{ nope }}]{{ nope is defined }}{{ nope | length }}{% if not nope %}f{% endif %}"), "[]False0f");
  EXPECT_EQ(error_of("{{ nope.attr }}"), "chat template: line 1: 'nope' is undefined");
  EXPECT_EQ(error_of("{{ d.missing.deeper }}", R"({"d": {}})"),
            "chat template: line 1: 'dict object' has no attribute 'missing'");
}

TEST(ChatTemplate, KeepsKeyOrder) {
  // transformers' output for these (a sorted nlohmann::json would give "ab" and
  // {"content": "x", "role": "user"}; render_chat_template(std::string, nlohmann::json) is deleted).
  EXPECT_EQ(render("{% for k in d %}{{ k }}{% endfor %}", R"({"d": {"b": 1, "a": 2}})"), "ba");
  EXPECT_EQ(render("{{ m | tojson }}", R"({"m": {"role": "user", "content": "x"}})"),
            R"({"role": "user", "content": "x"})");
}

TEST(ChatTemplate, InvalidUtf8NamesTheField) {
  ordered_json ctx = {{"messages", ordered_json::array({{{"role", "user"}, {"content", "ok"}},
                                                        {{"role", "user"}, {"content", "a\xff"}}})}};
  try {
    render_chat_template("{{ messages }}", ctx);
    FAIL() << "no error";
  } catch (const ftune::Error& e) {
    EXPECT_STREQ(e.what(), "chat template: messages[1].content: invalid UTF-8 at byte 1");
  }
  try {
    render_chat_template("ab\n{{ 'c\xc3' }}", ordered_json::object());
    FAIL() << "no error";
  } catch (const ftune::Error& e) {
    EXPECT_STREQ(e.what(), "chat template: line 2: invalid UTF-8 at byte 8");
  }
}

TEST(ChatTemplate, PathologicalTemplatesFailInsteadOfCrashing) {
  EXPECT_NE(error_of("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").find("recursion"), std::string::npos);
  EXPECT_NE(error_of("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}").find("nested too deeply"),
            std::string::npos);
  std::string long_expr = "{{ 1";
  for (int i = 0; i < 5000; ++i) long_expr += " + 1";
  EXPECT_NE(error_of(long_expr + " }}").find("expression too long"), std::string::npos);
  EXPECT_NE(error_of("{{ 2 ** 64 }}").find("integer overflow"), std::string::npos);
  EXPECT_NE(error_of("{{ 'ab' * 1000000000 }}").find("too large"), std::string::npos);
  EXPECT_NE(error_of("{{ range(1000000) | length }}").find("Range too big"), std::string::npos);
}

// Found by chat_template_fuzz (seeds tests/fuzz/seeds/chat_template/crash-*): templates that
// ran for hours or exhausted memory. Every render is now bounded in steps (statements plus loop
// iterations) and every string, the output included, in size; each fails with one clear line.
TEST(ChatTemplate, WorkAndSizesAreBounded) {
  const std::string too_large = "string result too large (over 64 MiB)";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
       "chat template: line 1: template too expensive (over 1,000,000 steps)"},
      {"{% for i in range(100000) %}{{ 'x' * 60000000 }}{% endfor %}",
       "chat template: line 1: output too large (over 64 MiB)"},
      {"{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
       "{% endfor %}{{ ns.s | length }}", too_large},
      {"{{ ('x' * 60000000) | replace('x', 'yy') }}", too_large},
      {"{% set s = 'x' * 40000000 %}{{ [s, s] | join('-') }}", too_large},
      {"{% set s = 'x' * 40000000 %}{{ '-'.join([s, s]) }}", too_large},
      {"{{ ['x' * 40000000] * 2 }}", "repetition result too large"},
      {"{{ ['x' * 1000] * 100000 }}", "repetition result too large"},
      {"{{ 'a'.zfill(1000000000000) }}", too_large},
      {"{{ 'a' | center(1000000000000) }}", too_large},
      {"{{ 'a\nb' | indent(1000000000000) }}", too_large},
      {"{{ '%99999999999999999999s' % 'a' }}", "format width or precision too large"},
  };
  for (const auto& [tpl, want] : cases) {
    const std::string e = error_of(tpl);
    EXPECT_NE(e.find(want), std::string::npos) << tpl << " -> " << e;
  }
  // Below the bounds, large work still renders.
  EXPECT_EQ(render("{% for i in range(100000) %}{{ 'x' if i % 2 else '' }}{% endfor %}").size(), 50000u);
  EXPECT_EQ(render("{{ ('x' * 1000000) | replace('x', 'yy') | length }}"), "2000000");
  EXPECT_EQ(render("{{ 'ab' * 3 }}|{{ 'ab' * 0 }}|{{ 'ab' * -2 }}|{{ '' * 5 }}|{{ 2 * 'xyz' }}"),
            "ababab||||xyzxyz");
}

// Found by chat_template_fuzz (seeds/chat_template/crash-float-literal-overflow.jinja): number
// texts out of range threw std::out_of_range from std::stod/stoll/stoul instead of rendering as
// jinja2 does (float literals: inf and 0.0, as Python's float()) or failing with one line.
TEST(ChatTemplate, NumbersOutOfRange) {
  EXPECT_EQ(render("{{ 1e27230 }}|{{ -1e400 }}|{{ 1e-400 }}|{{ 1_0.5e1_0 }}"),
            "inf|-inf|0.0|105000000000.0");  // jinja2 3.1.6
  EXPECT_NE(error_of("{{ 0x10000000000000000 }}").find("integer literal too large: 0x10000000000000000"),
            std::string::npos);
  EXPECT_NE(error_of("{{ '{99999999999999999999}'.format(1) }}").find("Replacement index out of range"),
            std::string::npos);
  EXPECT_NE(error_of("{{ [[1]] | map(attribute='99999999999999999999') | list }}")
                .find("integer too large: 99999999999999999999"),
            std::string::npos);
}

TEST(ChatTemplate, ContextMustBeAnObject) {
  EXPECT_THROW(render("x", "[]"), ftune::Error);
}

}  // namespace

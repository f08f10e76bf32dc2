// A Jinja2 subset interpreter for HF chat templates (no C++ Jinja library exists in Debian).
// Supports what the templates of Llama 2/3, TinyLlama, CodeLlama, SmolLM2 and similar use:
// {% for %} (with loop.index/index0/first/last/length, else), {% if/elif/else %}, {% set %}
// (including namespace()), {{ expressions }} with + ~ and or not in, is defined/none/string,
// comparisons, subscripts, attribute access, slices, string methods (strip, startswith, ...),
// filters (trim, length, upper, lower, tojson, default, ...), raise_exception, whitespace control
// ({%- -%}, {{- -}}). Rendering equals transformers' apply_chat_template (trim_blocks and
// lstrip_blocks on, as transformers sets them).
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace ftune::tok {

// Renders `source` with variables from `context` (a JSON object: messages, bos_token, eos_token,
// add_generation_prompt, ...). Objects keep their key order, as Python dicts do: `tojson` of a
// message or tool schema and `message.items()` match transformers byte for byte only then.
// Throws ftune::Error "chat template: <problem>" on a syntax error, an unsupported construct,
// invalid UTF-8 in the template or a context string (naming the field), or
// raise_exception("...") in the template.
std::string render_chat_template(const std::string& source, const nlohmann::ordered_json& context);

// nlohmann::json sorts object keys ({"content", "role"} where transformers has {"role",
// "content"}); parse with nlohmann::ordered_json instead.
std::string render_chat_template(const std::string& source, const nlohmann::json& context) = delete;

}  // namespace ftune::tok

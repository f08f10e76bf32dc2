// The chat-template lexer: template source -> tokens (text runs, tag delimiters, names,
// literals, operators), with jinja2's whitespace control as transformers configures it
// (trim_blocks, lstrip_blocks, `-`/`+` modifiers), {% raw %} and comments handled here.
// Trade-off: whitespace control is applied while lexing, as jinja2 does, so the parser and
// evaluator never see the stripped text; string literals arrive decoded.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ftune::tok::jinja {

enum class Tok { kData, kVarBegin, kVarEnd, kBlockBegin, kBlockEnd, kName, kString, kInt, kFloat, kOp, kEof };

struct Token {
  Tok type;
  std::string text;  // data, name, operator or decoded string literal
  int line = 1;
  int64_t ival = 0;
  double fval = 0;
};

// Tokens of `source` (valid UTF-8), ending with kEof; throws "chat template: line N: ..." on
// an unterminated tag, comment, raw block or string, or a character jinja2 rejects.
std::vector<Token> tokenize(const std::string& source);

}  // namespace ftune::tok::jinja

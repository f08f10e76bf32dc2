// The chat-template front end after the lexer: tokens -> AST (parser.cpp), then the scope pass
// that marks which names start undefined in each frame (scopes.cpp).
// Trade-off: unknown filter and test names, unsupported tags and over-deep nesting are
// rejected here, at compile time, as jinja2 rejects them, so rendering never meets them.
#pragma once

#include <string>
#include <vector>

#include "tokenizer/chat_template/ast.h"
#include "tokenizer/chat_template/lexer.h"

namespace ftune::tok::jinja {

// The template body; throws "chat template: line N: ..." on a syntax error.
Body parse(std::vector<Token> tokens);

// Fills Stmt::undef / undef_else of every frame-opening statement in `body` and returns the
// names that start undefined at the top level.
std::vector<std::string> analyze_scopes(Body& body);

}  // namespace ftune::tok::jinja

// The chat-template AST: one Expr node type and one Stmt node type, each tagged by kind, built
// by the parser (parser.h), annotated by analyze_scopes() and walked by the evaluator.
// Trade-off: two fat tagged structs instead of a class per node, so the parser, the scope pass
// and the evaluator are each one switch over the kinds; unused fields cost a few words a node.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tokenizer/chat_template/value.h"

namespace ftune::tok::jinja {

enum class EK {
  kLiteral, kName, kList, kTuple, kDict, kAttr, kItem, kSlice, kUnary, kBinary, kAnd, kOr,
  kCompare, kCond, kCall, kFilter, kTest
};

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;
// One node type for all expressions; which fields are used depends on `kind`:
// literal: value; name: name; list/tuple: args; dict: args = k0, v0, k1, v1...; attr: a.name;
// item: a[b] (b may be a slice: a:b:c); unary/binary: name is the operator, a (b); and/or: a, b;
// compare: a then ops[i] args[i]; cond: a if b else c; call: a(args, kwargs);
// filter: a|name(args, kwargs) (a null inside {% filter %}); test: a is [not] name(args).
struct Expr {
  EK kind = EK::kLiteral;
  int line = 0;
  Value value;
  std::string name;
  ExprPtr a, b, c;
  std::vector<ExprPtr> args;
  std::vector<std::string> ops;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negated = false;
};

inline ExprPtr make_expr(EK kind, int line) {
  auto e = std::make_unique<Expr>();
  e->kind = kind;
  e->line = line;
  return e;
}

enum class SK { kText, kPrint, kIf, kFor, kSet, kSetBlock, kMacro, kBreak, kContinue, kFilterBlock, kScope };

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;
struct Stmt {
  SK kind = SK::kText;
  int line = 0;
  std::string text;                  // text; macro name; set: the namespace attribute
  ExprPtr expr;                      // print, set value, for iterable, filter chain
  ExprPtr cond;                      // for ... if cond
  std::vector<std::string> targets;  // for / set names
  bool unpack = false;               // targets are a tuple
  std::vector<std::pair<ExprPtr, Body>> branches;       // if / elif
  Body body, else_body;
  std::vector<std::pair<std::string, ExprPtr>> params;  // macro params (default or null); with
  // Names that start undefined when the frame this statement opens is entered (the for body,
  // the for-else, the macro call, the with / set / filter / generation body); see
  // analyze_scopes().
  std::vector<std::string> undef, undef_else;
};

inline StmtPtr make_stmt(SK kind, int line) {
  auto s = std::make_unique<Stmt>();
  s->kind = kind;
  s->line = line;
  return s;
}

}  // namespace ftune::tok::jinja

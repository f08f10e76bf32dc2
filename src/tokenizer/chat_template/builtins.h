// What jinja2 provides to chat templates by name: the builtin filters and tests (filters.cpp)
// and the globals transformers' environment adds (globals.cpp: range, dict, namespace,
// raise_exception, strftime_now). Trade-off: every jinja2 3.1 filter and test name is known
// (an unknown one is a compile error, as in jinja2) though only those templates use are
// implemented; the rest fail when they run, naming the filter.
#pragma once

#include <memory>
#include <string>

#include "tokenizer/chat_template/value.h"

namespace ftune::tok::jinja {

bool is_jinja_filter(const std::string& n);
bool is_jinja_test(const std::string& n);

// `v | name(a)`; a.line is the line for errors.
Value apply_filter(const std::string& name, const Value& v, CallArgs& a);
// `v is name(a)`.
bool apply_test(const std::string& name, const Value& v, CallArgs& a);

struct Scope;
// A fresh scope holding the globals; the render's variables go in a child of it.
std::shared_ptr<Scope> make_globals();

}  // namespace ftune::tok::jinja

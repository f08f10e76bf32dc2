// The tokenizer.json pipeline stages other than the model: normalizers, pre-tokenizers and
// decoders, each parsed once from its JSON into a closure, reproducing HF tokenizers' semantics
// (NormalizedString::split behaviours, Pattern::find_matches, decode_chain). Offsets are not
// tracked, except the one bit Metaspace(prepend_scheme="first") needs.
// Defines Piece, JsonReader and parse_normalizer / parse_pre_tokenizer / parse_decoder.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace ftune::tok {

// The characters of Oniguruma's Unicode \w, which HF tokenizers' regexes use: Alphabetic, marks,
// decimal digits, connector punctuation and the joiners U+200C/U+200D. PCRE2's \w differs (it
// takes every \p{N} and no joiners), so code that means HF's \w spells this class out.
inline constexpr const char* kOnigWordChars = R"(\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D})";

// A slice of the input moving through the pipeline: text still to be tokenized, or a matched
// added token (token_id >= 0) that later stages leave alone.
struct Piece {
  std::string text;
  int32_t token_id = -1;
  bool at_origin = false;  // starts at byte 0 of the input (Metaspace prepend_scheme "first")
};
using Pieces = std::vector<Piece>;

using Normalizer = std::function<void(std::string&)>;
using PreTokenizer = std::function<void(Pieces&)>;               // splits / rewrites text pieces
using Decoder = std::function<void(std::vector<std::string>&)>;  // one decode_chain step

// Typed access to tokenizer.json fields; every error names origin and the JSON path of the field.
struct JsonReader {
  using json = nlohmann::json;
  std::string origin;

  [[noreturn]] void bad(const std::string& field, const std::string& what) const {
    fail(origin, ": ", field, ": ", what);
  }
  const json& member(const json& obj, const std::string& field, const std::string& key) const {
    if (!obj.is_object() || !obj.contains(key)) bad(field + "." + key, "missing");
    return obj.at(key);
  }
  std::string get_string(const json& obj, const std::string& field, const std::string& key) const {
    const json& v = member(obj, field, key);
    if (!v.is_string()) bad(field + "." + key, "expected a string");
    return v.get<std::string>();
  }
  std::string get_string_or(const json& obj, const std::string& field, const std::string& key,
                            const std::string& fallback) const {
    if (!obj.contains(key) || obj.at(key).is_null()) return fallback;
    return get_string(obj, field, key);
  }
  bool get_bool_or(const json& obj, const std::string& field, const std::string& key,
                   bool fallback) const {
    if (!obj.contains(key) || obj.at(key).is_null()) return fallback;
    if (!obj.at(key).is_boolean()) bad(field + "." + key, "expected true or false");
    return obj.at(key).get<bool>();
  }
  int64_t get_int_or(const json& obj, const std::string& field, const std::string& key,
                     int64_t fallback) const {
    if (!obj.contains(key) || obj.at(key).is_null()) return fallback;
    if (!obj.at(key).is_number_integer()) bad(field + "." + key, "expected an integer");
    return obj.at(key).get<int64_t>();
  }
  std::optional<std::string> get_optional_string(const json& obj, const std::string& field,
                                                 const std::string& key) const {
    if (!obj.contains(key) || obj.at(key).is_null()) return std::nullopt;
    return get_string(obj, field, key);
  }
  std::string type_of(const json& obj, const std::string& field) const {
    if (!obj.is_object()) bad(field, "expected an object");
    return get_string(obj, field, "type");
  }
  const json& get_array(const json& obj, const std::string& field, const std::string& key) const {
    const json& v = member(obj, field, key);
    if (!v.is_array()) bad(field + "." + key, "expected an array");
    return v;
  }
  char32_t get_char(const json& obj, const std::string& field, const std::string& key) const {
    const std::string s = get_string(obj, field, key);
    size_t i = 0;
    if (s.empty()) bad(field + "." + key, "expected one character");
    const char32_t c = utf8_next(s, i);
    if (i != s.size()) bad(field + "." + key, "expected one character, got '" + s + "'");
    return c;
  }
};

// Parse one stage; `field` is its JSON path ("normalizer", "pre_tokenizer.pretokenizers[0]").
// Unknown types are errors listing the supported ones.
Normalizer parse_normalizer(const JsonReader& r, const nlohmann::json& n, const std::string& field);
PreTokenizer parse_pre_tokenizer(const JsonReader& r, const nlohmann::json& p,
                                 const std::string& field);
Decoder parse_decoder(const JsonReader& r, const nlohmann::json& d, const std::string& field);

}  // namespace ftune::tok

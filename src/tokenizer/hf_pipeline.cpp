// tokenizer.json normalizers, pre-tokenizers and decoders (see hf_pipeline.h). Each function
// mirrors the HF tokenizers component of the same name; comments note where HF's behaviour is
// surprising but reproduced on purpose (per-piece prefix spaces, per-character matches).
#include "tokenizer/hf_pipeline.h"

#include <algorithm>
#include <memory>

#include "tokenizer/regex.h"
#include "tokenizer/unicode.h"

namespace ftune::tok {

namespace {

using nlohmann::json;

// One stretch of a string as a pattern sees it: a match or the text between matches.
struct Span {
  size_t start, end;
  bool match;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// What HF calls a Pattern: a regex, a literal string, or a per-character predicate.
class Pattern {
 public:
  static Pattern regex(std::shared_ptr<const Regex> re) {
    Pattern p;
    p.regex_ = std::move(re);
    return p;
  }
  static Pattern literal(std::string s) {
    Pattern p;
    p.literal_ = std::move(s);
    p.is_literal_ = true;
    return p;
  }
  static Pattern predicate(std::function<bool(char32_t)> f) {
    Pattern p;
    p.predicate_ = std::move(f);
    return p;
  }

  // Spans covering all of `s` in order (Pattern::find_matches).
  std::vector<Span> find_matches(std::string_view s, bool invert = false) const {
    std::vector<Span> spans;
    if (s.empty()) {
      spans.push_back({0, 0, invert});
      return spans;
    }
    std::vector<std::pair<size_t, size_t>> matches;
    if (regex_) {
      regex_->find_all(s, matches);
    } else if (is_literal_) {
      if (!literal_.empty()) {
        size_t pos = 0;
        while ((pos = s.find(literal_, pos)) != std::string_view::npos) {
          matches.emplace_back(pos, pos + literal_.size());
          pos += literal_.size();
        }
      }
    } else {
      size_t i = 0;
      while (i < s.size()) {
        const size_t start = i;
        const char32_t c = utf8_next(s, i);
        if (predicate_(c)) matches.emplace_back(start, i);
      }
    }
    size_t prev = 0;
    for (const auto& [start, end] : matches) {
      if (prev != start) spans.push_back({prev, start, invert});
      spans.push_back({start, end, !invert});
      prev = end;
    }
    if (prev != s.size()) spans.push_back({prev, s.size(), invert});
    return spans;
  }

 private:
  std::shared_ptr<const Regex> regex_;
  std::string literal_;
  bool is_literal_ = false;
  std::function<bool(char32_t)> predicate_;
};

// NormalizedString::split: the kept [start, end) ranges for `behavior` (empty ones included).
std::vector<std::pair<size_t, size_t>> split_spans(const std::vector<Span>& spans,
                                                   SplitBehavior behavior) {
  std::vector<std::pair<size_t, size_t>> out;
  bool previous_match = false;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Span& s : spans) out.emplace_back(s.start, s.end);
      break;
    case SplitBehavior::kRemoved:
      for (const Span& s : spans) {
        if (!s.match) out.emplace_back(s.start, s.end);
      }
      break;
    case SplitBehavior::kContiguous:
      for (const Span& s : spans) {
        if (s.match == previous_match && !out.empty()) {
          out.back().second = s.end;
        } else {
          out.emplace_back(s.start, s.end);
        }
        previous_match = s.match;
      }
      break;
    case SplitBehavior::kMergedWithPrevious:
      for (const Span& s : spans) {
        if (s.match && !previous_match && !out.empty()) {
          out.back().second = s.end;
        } else {
          out.emplace_back(s.start, s.end);
        }
        previous_match = s.match;
      }
      break;
    case SplitBehavior::kMergedWithNext:
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->match && !previous_match && !out.empty()) {
          out.back().first = it->start;
        } else {
          out.emplace_back(it->start, it->end);
        }
        previous_match = it->match;
      }
      std::reverse(out.begin(), out.end());
      break;
  }
  return out;
}

// Replaces every text piece by the non-empty pieces `fn` cuts it into (PreTokenizedString::split).
template <typename Fn>
void split_pieces(Pieces& pieces, Fn&& fn) {
  Pieces next;
  next.reserve(pieces.size());
  for (Piece& piece : pieces) {
    if (piece.token_id >= 0) {
      next.push_back(std::move(piece));
      continue;
    }
    fn(piece, next);
  }
  pieces = std::move(next);
}

// Appends the non-empty sub-pieces of `piece` for the given ranges.
void emit_ranges(const Piece& piece, const std::vector<std::pair<size_t, size_t>>& ranges,
                 Pieces& out) {
  for (const auto& [start, end] : ranges) {
    if (end <= start) continue;
    out.push_back(Piece{piece.text.substr(start, end - start), -1, piece.at_origin && start == 0});
  }
}

void split_with(Pieces& pieces, const Pattern& pattern, SplitBehavior behavior,
                bool invert = false) {
  split_pieces(pieces, [&](Piece& piece, Pieces& out) {
    emit_ranges(piece, split_spans(pattern.find_matches(piece.text, invert), behavior), out);
  });
}

std::string replace_all(const std::string& s, const Pattern& pattern, const std::string& content) {
  std::string out;
  out.reserve(s.size());
  for (const Span& span : pattern.find_matches(s)) {
    if (span.match) {
      out += content;
    } else {
      out.append(s, span.start, span.end - span.start);
    }
  }
  return out;
}

// Stage parsers on top of JsonReader's typed getters.
struct StageParser : JsonReader {
  // {"String": "..."} or {"Regex": "..."}
  Pattern pattern(const json& obj, const std::string& field) const {
    const json& p = member(obj, field, "pattern");
    if (p.is_object() && p.contains("String") && p.at("String").is_string()) {
      return Pattern::literal(p.at("String").get<std::string>());
    }
    if (p.is_object() && p.contains("Regex") && p.at("Regex").is_string()) {
      try {
        return Pattern::regex(std::make_shared<const Regex>(p.at("Regex").get<std::string>()));
      } catch (const ftune::Error& e) {
        bad(field + ".pattern.Regex", e.what());  // PCRE2 rejects what Oniguruma accepted
      }
    }
    bad(field + ".pattern", "expected {\"String\": ...} or {\"Regex\": ...}");
  }

  SplitBehavior behavior(const json& obj, const std::string& field,
                         const std::string& fallback) const {
    const std::string b = get_string_or(obj, field, "behavior", fallback);
    if (b == "Removed") return SplitBehavior::kRemoved;
    if (b == "Isolated") return SplitBehavior::kIsolated;
    if (b == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
    if (b == "MergedWithNext") return SplitBehavior::kMergedWithNext;
    if (b == "Contiguous") return SplitBehavior::kContiguous;
    bad(field + ".behavior", "unknown split behavior '" + b + "'");
  }

  // Metaspace's prepend scheme from either the current or the legacy (add_prefix_space) fields.
  std::string prepend_scheme(const json& obj, const std::string& field) const {
    std::string scheme = get_string_or(obj, field, "prepend_scheme", "always");
    if (obj.contains("add_prefix_space") && obj.at("add_prefix_space").is_boolean() &&
        !obj.at("add_prefix_space").get<bool>()) {
      scheme = "never";
    }
    if (scheme != "always" && scheme != "never" && scheme != "first") {
      bad(field + ".prepend_scheme", "expected always, never or first");
    }
    return scheme;
  }

  void require_normalization(const std::string& field, const std::string& type) const {
    if (!have_unicode_normalization()) {
      bad(field,
          "normalizer '" + type + "' needs ICU, which this build lacks (install libicu-dev)");
    }
  }

  Normalizer normalizer(const json& n, const std::string& field) const {
    const std::string type = type_of(n, field);
    if (type == "Sequence") {
      std::vector<Normalizer> steps;
      const json& list = get_array(n, field, "normalizers");
      for (size_t i = 0; i < list.size(); ++i) {
        steps.push_back(normalizer(list[i], field + ".normalizers[" + std::to_string(i) + "]"));
      }
      return [steps](std::string& s) {
        for (const auto& step : steps) step(s);
      };
    }
    if (type == "Prepend") {
      const std::string prefix = get_string(n, field, "prepend");
      return [prefix](std::string& s) {
        if (!s.empty()) s.insert(0, prefix);
      };
    }
    if (type == "Replace") {
      auto pat = std::make_shared<Pattern>(pattern(n, field));
      const std::string content = get_string(n, field, "content");
      return [pat, content](std::string& s) { s = replace_all(s, *pat, content); };
    }
    if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
      require_normalization(field, type);
      const NormalForm form = type == "NFC"    ? NormalForm::kNfc
                              : type == "NFD"  ? NormalForm::kNfd
                              : type == "NFKC" ? NormalForm::kNfkc
                                               : NormalForm::kNfkd;
      return [form](std::string& s) { s = normalize_unicode(s, form); };
    }
    if (type == "Lowercase") {
      require_normalization(field, type);
      return [](std::string& s) { s = lowercase_unicode(s); };
    }
    if (type == "StripAccents") {
      require_normalization(field, type);
      return [](std::string& s) { s = strip_accents(s); };
    }
    if (type == "Strip") {
      const bool left = get_bool_or(n, field, "strip_left", true);
      const bool right = get_bool_or(n, field, "strip_right", true);
      return [left, right](std::string& s) {
        size_t begin = s.size(), end = 0, i = 0;  // first and past-last non-whitespace bytes
        while (i < s.size()) {
          const size_t at = i;
          if (!is_unicode_whitespace(utf8_next(s, i))) {
            begin = std::min(begin, at);
            end = i;
          }
        }
        if (begin > end) {  // all whitespace
          if (left || right) s.clear();
          return;
        }
        s = s.substr(left ? begin : 0, (right ? end : s.size()) - (left ? begin : 0));
      };
    }
    bad(field + ".type", "unsupported normalizer '" + type +
                             "' (supported: Sequence, Prepend, Replace, NFC, NFD, NFKC, NFKD, "
                             "Lowercase, Strip, StripAccents)");
  }

  PreTokenizer pre_tokenizer(const json& p, const std::string& field) const {
    const std::string type = type_of(p, field);
    if (type == "Sequence") {
      std::vector<PreTokenizer> steps;
      const json& list = get_array(p, field, "pretokenizers");
      for (size_t i = 0; i < list.size(); ++i) {
        steps.push_back(
            pre_tokenizer(list[i], field + ".pretokenizers[" + std::to_string(i) + "]"));
      }
      return [steps](Pieces& pieces) {
        for (const auto& step : steps) step(pieces);
      };
    }
    if (type == "ByteLevel") {
      const bool add_prefix_space = get_bool_or(p, field, "add_prefix_space", true);
      const bool use_regex = get_bool_or(p, field, "use_regex", true);
      static const auto gpt2 = std::make_shared<const Regex>(
          R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)");
      const Pattern pat = Pattern::regex(gpt2);
      return [add_prefix_space, use_regex, pat](Pieces& pieces) {
        split_pieces(pieces, [&](Piece& piece, Pieces& out) {
          if (add_prefix_space && (piece.text.empty() || piece.text[0] != ' '))
            piece.text.insert(0, " ");
          if (use_regex) {
            emit_ranges(piece, split_spans(pat.find_matches(piece.text), SplitBehavior::kIsolated),
                        out);
          } else if (!piece.text.empty()) {
            out.push_back(std::move(piece));
          }
        });
        const auto& table = byte_to_unicode_table();
        for (Piece& piece : pieces) {
          if (piece.token_id >= 0) continue;
          std::string mapped;
          mapped.reserve(piece.text.size() * 2);
          for (unsigned char b : piece.text) mapped += table[b];
          piece.text = std::move(mapped);
        }
      };
    }
    if (type == "Split") {
      const Pattern pat = pattern(p, field);
      const SplitBehavior b = behavior(p, field, "Isolated");
      const bool invert = get_bool_or(p, field, "invert", false);
      return [pat, b, invert](Pieces& pieces) { split_with(pieces, pat, b, invert); };
    }
    if (type == "Digits") {
      const bool individual = get_bool_or(p, field, "individual_digits", false);
      static const auto numeric = std::make_shared<const Regex>(R"(\p{N})");
      const Pattern pat = Pattern::regex(numeric);  // \p{N} matches one char: Rust is_numeric
      const SplitBehavior b = individual ? SplitBehavior::kIsolated : SplitBehavior::kContiguous;
      return [pat, b](Pieces& pieces) { split_with(pieces, pat, b); };
    }
    if (type == "Metaspace") {
      const char32_t replacement = get_char(p, field, "replacement");
      const std::string rep = utf8_encode(replacement);
      const std::string scheme = prepend_scheme(p, field);
      const bool split = get_bool_or(p, field, "split", true);
      const Pattern space = Pattern::literal(" ");
      const Pattern meta =
          Pattern::predicate([replacement](char32_t c) { return c == replacement; });
      return [=](Pieces& pieces) {
        split_pieces(pieces, [&](Piece& piece, Pieces& out) {
          piece.text = replace_all(piece.text, space, rep);
          const bool starts = piece.text.compare(0, rep.size(), rep) == 0;
          if (!starts && (scheme == "always" || (scheme == "first" && piece.at_origin))) {
            piece.text.insert(0, rep);
          }
          if (split) {
            emit_ranges(piece,
                        split_spans(meta.find_matches(piece.text), SplitBehavior::kMergedWithNext),
                        out);
          } else if (!piece.text.empty()) {
            out.push_back(std::move(piece));
          }
        });
      };
    }
    if (type == "Whitespace") {
      // HF: \w+|[^\w\s]+ on Oniguruma.
      static const auto words = std::make_shared<const Regex>(
          std::string("[") + kOnigWordChars + "]+|[^" + kOnigWordChars + R"(\s]+)");
      const Pattern pat = Pattern::regex(words);
      return [pat](Pieces& pieces) {
        split_with(pieces, pat, SplitBehavior::kRemoved, /*invert=*/true);
      };
    }
    if (type == "WhitespaceSplit") {
      const Pattern pat = Pattern::predicate(is_unicode_whitespace);
      return [pat](Pieces& pieces) { split_with(pieces, pat, SplitBehavior::kRemoved); };
    }
    if (type == "CharDelimiterSplit") {
      const char32_t delimiter = get_char(p, field, "delimiter");
      const Pattern pat = Pattern::predicate([delimiter](char32_t c) { return c == delimiter; });
      return [pat](Pieces& pieces) { split_with(pieces, pat, SplitBehavior::kRemoved); };
    }
    if (type == "Punctuation") {
      // Rust is_punctuation: ASCII punctuation or Unicode category P.
      static const auto punct = std::make_shared<const Regex>(R"([\p{P}!-/:-@\[-`{-~])");
      const Pattern pat = Pattern::regex(punct);
      const SplitBehavior b = behavior(p, field, "Isolated");
      return [pat, b](Pieces& pieces) { split_with(pieces, pat, b); };
    }
    bad(field + ".type", "unsupported pre-tokenizer '" + type +
                             "' (supported: Sequence, ByteLevel, Split, Digits, Metaspace, "
                             "Whitespace, WhitespaceSplit, CharDelimiterSplit, Punctuation)");
  }

  Decoder decoder(const json& d, const std::string& field) const {
    const std::string type = type_of(d, field);
    if (type == "Sequence") {
      std::vector<Decoder> steps;
      const json& list = get_array(d, field, "decoders");
      for (size_t i = 0; i < list.size(); ++i) {
        steps.push_back(decoder(list[i], field + ".decoders[" + std::to_string(i) + "]"));
      }
      return [steps](std::vector<std::string>& tokens) {
        for (const auto& step : steps) step(tokens);
      };
    }
    if (type == "ByteLevel") {
      return [](std::vector<std::string>& tokens) {
        std::string bytes;
        for (const std::string& t : tokens) {
          std::string mapped;
          bool ok = true;
          size_t i = 0;
          while (i < t.size() && ok) {
            const auto b = unicode_to_byte(utf8_next(t, i));
            if (b) {
              mapped.push_back(static_cast<char>(*b));
            } else {
              ok = false;
            }
          }
          bytes += ok ? mapped : t;
        }
        tokens.assign(1, utf8_lossy(bytes));
      };
    }
    if (type == "Replace") {
      auto pat = std::make_shared<Pattern>(pattern(d, field));
      const std::string content = get_string(d, field, "content");
      return [pat, content](std::vector<std::string>& tokens) {
        for (std::string& t : tokens) t = replace_all(t, *pat, content);
      };
    }
    if (type == "ByteFallback") {
      return [](std::vector<std::string>& tokens) {
        std::vector<std::string> out;
        std::string pending;
        auto flush = [&] {
          if (pending.empty()) return;
          if (!utf8_invalid_at(pending)) {
            out.push_back(pending);
          } else {
            for (size_t k = 0; k < pending.size(); ++k) out.emplace_back("\xEF\xBF\xBD");
          }
          pending.clear();
        };
        for (std::string& t : tokens) {
          int byte = -1;
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') {
            auto hex = [](char c) {
              if (c >= '0' && c <= '9') return c - '0';
              if (c >= 'A' && c <= 'F') return c - 'A' + 10;
              if (c >= 'a' && c <= 'f') return c - 'a' + 10;
              return -1;
            };
            const int hi = hex(t[3]), lo = hex(t[4]);
            if (hi >= 0 && lo >= 0) byte = hi * 16 + lo;
          }
          if (byte >= 0) {
            pending.push_back(static_cast<char>(byte));
          } else {
            flush();
            out.push_back(std::move(t));
          }
        }
        flush();
        tokens = std::move(out);
      };
    }
    if (type == "Fuse") {
      return [](std::vector<std::string>& tokens) {
        std::string joined;
        for (const std::string& t : tokens) joined += t;
        tokens.assign(1, joined);
      };
    }
    if (type == "Strip") {
      const char32_t content = get_char(d, field, "content");
      const int64_t start = get_int_or(d, field, "start", 0);
      const int64_t stop = get_int_or(d, field, "stop", 0);
      return [content, start, stop](std::vector<std::string>& tokens) {
        for (std::string& t : tokens) {
          std::vector<std::pair<size_t, char32_t>> chars;  // (byte offset, code point)
          size_t i = 0;
          while (i < t.size()) {
            const size_t at = i;
            chars.emplace_back(at, utf8_next(t, i));
          }
          size_t start_cut = 0;
          for (size_t k = 0; k < chars.size() && static_cast<int64_t>(k) < start; ++k) {
            if (chars[k].second != content) break;
            start_cut = k + 1;
          }
          size_t stop_cut = chars.size();
          for (int64_t k = 0; k < stop && k < static_cast<int64_t>(chars.size()); ++k) {
            const size_t index = chars.size() - 1 - static_cast<size_t>(k);
            if (chars[index].second != content) break;
            stop_cut = index;
          }
          if (stop_cut <= start_cut) {
            t.clear();
            continue;
          }
          const size_t b0 = start_cut < chars.size() ? chars[start_cut].first : t.size();
          const size_t b1 = stop_cut < chars.size() ? chars[stop_cut].first : t.size();
          t = t.substr(b0, b1 - b0);
        }
      };
    }
    if (type == "Metaspace") {
      const char32_t replacement = get_char(d, field, "replacement");
      const bool strip_first = prepend_scheme(d, field) != "never";
      return [replacement, strip_first](std::vector<std::string>& tokens) {
        for (size_t k = 0; k < tokens.size(); ++k) {
          std::string out;
          size_t i = 0;
          const std::string& t = tokens[k];
          while (i < t.size()) {
            const size_t at = i;
            const char32_t c = utf8_next(t, i);
            if (c == replacement) {
              if (!(k == 0 && strip_first)) out.push_back(' ');
            } else {
              out.append(t, at, i - at);
            }
          }
          tokens[k] = std::move(out);
        }
      };
    }
    bad(field + ".type", "unsupported decoder '" + type +
                             "' (supported: Sequence, ByteLevel, Replace, ByteFallback, Fuse, "
                             "Strip, Metaspace)");
  }
};

}  // namespace

Normalizer parse_normalizer(const JsonReader& r, const json& n, const std::string& field) {
  return StageParser{r}.normalizer(n, field);
}

PreTokenizer parse_pre_tokenizer(const JsonReader& r, const json& p, const std::string& field) {
  return StageParser{r}.pre_tokenizer(p, field);
}

Decoder parse_decoder(const JsonReader& r, const json& d, const std::string& field) {
  return StageParser{r}.decoder(d, field);
}

}  // namespace ftune::tok

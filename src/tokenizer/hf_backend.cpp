// tokenizer.json backend: HF tokenizers' pipeline re-implemented step for step.
//   added tokens (raw) -> normalizer -> added tokens (normalized) -> pre-tokenizer -> BPE
//   -> post-processor (add_special_tokens) ; ids -> tokens -> decoder chain -> text.
// This file owns the model, the added vocabulary and the post-processor; the other stages live
// in hf_pipeline.cpp. Anything the parser does not know is an error naming the field, never a
// silent approximation. Defines make_hf_backend().
#include <algorithm>
#include <memory>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "tokenizer/added_matcher.h"
#include "tokenizer/backend.h"
#include "tokenizer/bpe.h"
#include "tokenizer/hf_pipeline.h"
#include "tokenizer/regex.h"
#include "tokenizer/unicode.h"

namespace ftune::tok {

namespace {

using nlohmann::json;

// An entry of tokenizer.json "added_tokens".
struct AddedToken {
  std::string content;
  bool single_word = false, lstrip = false, rstrip = false, normalized = true, special = false;
  bool operator==(const AddedToken&) const = default;
};

class HfBackend final : public TokenizerBackend {
 public:
  HfBackend(const json& tj, const std::string& origin) {
    JsonReader p{origin};
    if (!tj.is_object()) p.bad("(top level)", "expected a JSON object");
    // Ids index the model's embedding, so the id space must be dense: no real tokenizer has an
    // id at or above its number of vocab entries plus added tokens. (HF tokenizers would accept
    // any u32; a stray 2^31-1 would then cost a 2^31-row table here or in the model.)
    if (tj.contains("added_tokens") && tj.at("added_tokens").is_array()) {
      id_bound_ = static_cast<int64_t>(tj.at("added_tokens").size());
    }
    parse_model(p, p.member(tj, "(top level)", "model"));
    if (tj.contains("normalizer") && !tj.at("normalizer").is_null()) {
      normalizer_ = parse_normalizer(p, tj.at("normalizer"), "normalizer");
    }
    if (tj.contains("pre_tokenizer") && !tj.at("pre_tokenizer").is_null()) {
      pre_tokenizer_ = parse_pre_tokenizer(p, tj.at("pre_tokenizer"), "pre_tokenizer");
    }
    if (tj.contains("decoder") && !tj.at("decoder").is_null()) {
      decoder_ = parse_decoder(p, tj.at("decoder"), "decoder");
    }
    if (tj.contains("added_tokens") && !tj.at("added_tokens").is_null()) {
      parse_added_tokens(p, tj.at("added_tokens"));
    }
    if (tj.contains("post_processor") && !tj.at("post_processor").is_null()) {
      parse_post_processor(p, tj.at("post_processor"), "post_processor");
    }
  }

  std::vector<int64_t> encode(std::string_view text, bool add_special_tokens) const override {
    Pieces pieces;
    // 1. Added tokens that match the raw text.
    split_added(Piece{std::string(text), -1, true}, raw_matcher_, pieces);
    // 2. Normalize the rest, then match the normalized added tokens.
    Pieces normalized;
    for (Piece& piece : pieces) {
      if (piece.token_id >= 0) {
        normalized.push_back(std::move(piece));
        continue;
      }
      if (normalizer_) normalizer_(piece.text);
      split_added(std::move(piece), normalized_matcher_, normalized);
    }
    // 3. Pre-tokenize, 4. run the model on every word.
    if (pre_tokenizer_) pre_tokenizer_(normalized);
    std::vector<int32_t> ids;
    ids.reserve(text.size() / 3 + 4);
    for (const Piece& piece : normalized) {
      if (piece.token_id >= 0) {
        ids.push_back(piece.token_id);
      } else {
        model_->tokenize(piece.text, ids);
      }
    }
    std::vector<int64_t> out;
    out.reserve(ids.size() + prefix_.size() + suffix_.size());
    if (add_special_tokens) out.insert(out.end(), prefix_.begin(), prefix_.end());
    out.insert(out.end(), ids.begin(), ids.end());
    if (add_special_tokens) out.insert(out.end(), suffix_.begin(), suffix_.end());
    return out;
  }

  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const override {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (int64_t id : ids) {
      const std::string* token = nullptr;
      auto it = added_by_id_.find(id);
      if (it != added_by_id_.end()) {
        token = &it->second.content;
      } else if (id >= 0 && id <= INT32_MAX) {
        token = model_->id_to_token(static_cast<int32_t>(id));
      }
      if (token == nullptr) continue;  // unknown ids are dropped, as HF does
      if (skip_special_tokens && special_set_.count(*token)) continue;
      tokens.push_back(*token);
    }
    if (!decoder_) {
      std::string joined;
      for (size_t k = 0; k < tokens.size(); ++k) {
        if (k) joined += ' ';
        joined += tokens[k];
      }
      return joined;
    }
    decoder_(tokens);
    std::string joined;
    for (const std::string& t : tokens) joined += t;
    return joined;
  }

  int64_t vocab_size() const override {
    int64_t max_id = model_->max_id();
    for (const auto& [id, _] : added_by_id_) max_id = std::max<int64_t>(max_id, id);
    return max_id + 1;
  }

  std::optional<int64_t> token_to_id(std::string_view token) const override {
    auto it = added_by_content_.find(std::string(token));
    if (it != added_by_content_.end()) return it->second;
    auto id = model_->token_to_id(token);
    if (id) return *id;
    return std::nullopt;
  }

  std::optional<std::string> id_to_token(int64_t id) const override {
    auto it = added_by_id_.find(id);
    if (it != added_by_id_.end()) return it->second.content;
    if (id < 0 || id > INT32_MAX) return std::nullopt;
    const std::string* token = model_->id_to_token(static_cast<int32_t>(id));
    if (token == nullptr) return std::nullopt;
    return *token;
  }

  bool has_post_processor() const override { return true; }
  // tokenizer.json lists its own added tokens; the config must agree with it.
  void add_config_tokens(const std::vector<ConfigToken>& tokens,
                         const std::string& origin) override {
    for (const ConfigToken& t : tokens) {
      const auto known = token_to_id(t.content);
      if (known && *known != t.id) {
        fail(origin, ": ", t.field, ": token '", t.content, "' has id ", *known,
             " in tokenizer.json");
      }
    }
  }

 private:
  void parse_model(const JsonReader& p, const json& m) {
    if (!m.is_object()) p.bad("model", "expected an object");
    // Old files omit "type"; a model with merges is BPE there too.
    const std::string type =
        m.contains("type") ? p.get_string(m, "model", "type") : (m.contains("merges") ? "BPE" : "");
    if (type != "BPE") {
      p.bad("model.type", "unsupported model type '" + type + "' (ftune supports BPE)");
    }
    if (m.contains("dropout") && !m.at("dropout").is_null()) {
      if (!m.at("dropout").is_number()) p.bad("model.dropout", "expected a number or null");
      if (m.at("dropout").get<double>() > 0.0)
        p.bad("model.dropout", "BPE dropout is not supported");
    }
    const json& vocab = p.member(m, "model", "vocab");
    if (!vocab.is_object()) p.bad("model.vocab", "expected an object {token: id}");
    id_bound_ += static_cast<int64_t>(vocab.size());
    std::unordered_map<std::string, int32_t> v;
    std::unordered_map<int64_t, const std::string*> token_of_id;
    v.reserve(vocab.size());
    token_of_id.reserve(vocab.size());
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      const std::string field = "model.vocab." + it.key();
      const int64_t id = checked_id(p, it.value(), field, id_bound_);
      auto [other, fresh] = token_of_id.emplace(id, &it.key());
      if (!fresh) {
        p.bad(field, std::to_string(id) + " is also the id of '" + *other->second + "'");
      }
      v[it.key()] = static_cast<int32_t>(id);
    }
    std::vector<std::pair<std::string, std::string>> merges;
    if (m.contains("merges") && !m.at("merges").is_null()) {
      const json& list = p.get_array(m, "model", "merges");
      merges.reserve(list.size());
      for (size_t i = 0; i < list.size(); ++i) {
        const json& e = list[i];
        const std::string field = "model.merges[" + std::to_string(i) + "]";
        if (e.is_string()) {
          const std::string s = e.get<std::string>();
          const size_t space = s.find(' ');
          if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
            p.bad(field, "expected \"left right\", got '" + s + "'");
          }
          merges.emplace_back(s.substr(0, space), s.substr(space + 1));
        } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
          merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
        } else {
          p.bad(field, "expected \"left right\" or [\"left\", \"right\"]");
        }
      }
    }
    BpeOptions options;
    options.unk_token = p.get_optional_string(m, "model", "unk_token");
    options.continuing_subword_prefix =
        p.get_optional_string(m, "model", "continuing_subword_prefix");
    options.end_of_word_suffix = p.get_optional_string(m, "model", "end_of_word_suffix");
    options.fuse_unk = p.get_bool_or(m, "model", "fuse_unk", false);
    options.byte_fallback = p.get_bool_or(m, "model", "byte_fallback", false);
    options.ignore_merges = p.get_bool_or(m, "model", "ignore_merges", false);
    model_ = std::make_unique<BpeModel>(std::move(v), merges, std::move(options), p.origin);
  }

  // AddedVocabulary::add_tokens / add_special_tokens as tokenizer.json loading calls them:
  // ids come from the vocab when the content is already there, else the next free id.
  void parse_added_tokens(const JsonReader& p, const json& list) {
    if (!list.is_array()) p.bad("added_tokens", "expected an array");
    std::vector<AddedToken> specials, others;  // in declaration order
    int64_t max_added = -1;                    // highest id given to an added token so far
    for (size_t i = 0; i < list.size(); ++i) {
      const std::string field = "added_tokens[" + std::to_string(i) + "]";
      const json& e = list[i];
      if (!e.is_object()) p.bad(field, "expected an object");
      AddedToken t;
      t.content = p.get_string(e, field, "content");
      t.single_word = p.get_bool_or(e, field, "single_word", false);
      t.lstrip = p.get_bool_or(e, field, "lstrip", false);
      t.rstrip = p.get_bool_or(e, field, "rstrip", false);
      t.special = p.get_bool_or(e, field, "special", false);
      t.normalized = p.get_bool_or(e, field, "normalized", !t.special);
      std::optional<int64_t> stated_id;
      if (e.contains("id")) stated_id = checked_id(p, e.at("id"), field + ".id", id_bound_);
      if (t.content.empty()) continue;
      if (t.special && !special_set_.count(t.content)) {
        special_set_.insert(t.content);
        specials.push_back(t);
      }
      if (auto known = added_by_content_.find(t.content);
          known != added_by_content_.end() && added_by_id_.at(known->second) == t) {
        continue;  // exact duplicate
      }
      int64_t id;
      if (auto known = token_to_id(t.content)) {
        id = *known;
      } else {
        const int64_t model_size = model_->size();
        id = max_added < 0
                 ? model_size
                 : (max_added >= model_size || model_size == 0 ? max_added + 1 : model_size);
        // A vocab with holes makes tokenizers hand out an id a vocab token already has.
        if (const auto taken = id_to_token(id)) {
          p.bad(field, "tokenizers gives '" + t.content + "' the id " + std::to_string(id) +
                           ", which " + (added_by_id_.count(id) ? "added_tokens" : "model.vocab") +
                           " already gives to '" + *taken + "'");
        }
      }
      if (stated_id && *stated_id != id) {
        p.bad(field + ".id", std::to_string(*stated_id) + " differs from the id " +
                                 std::to_string(id) + " that tokenizers assigns to '" + t.content +
                                 "' (the next free id, or its id in model.vocab)");
      }
      added_by_content_[t.content] = id;
      added_by_id_[id] = t;
      max_added = std::max(max_added, id);
      if (!special_set_.count(t.content)) others.push_back(t);
    }
    // Matchers: specials first, then the others; normalized ones match the normalized text.
    std::vector<AddedToken> all = specials;
    all.insert(all.end(), others.begin(), others.end());
    for (const AddedToken& t : all) {
      const int64_t id = added_by_content_.at(t.content);
      if (t.normalized) {
        std::string pattern = t.content;
        if (normalizer_) normalizer_(pattern);
        normalized_matcher_.add(std::move(pattern), id);
      } else {
        raw_matcher_.add(t.content, id);
      }
    }
    raw_matcher_.finish();
    normalized_matcher_.finish();
  }

  // A token id from the file: an integer in [0, bound).
  static int64_t checked_id(const JsonReader& p, const json& v, const std::string& field,
                            int64_t bound) {
    if (!v.is_number_integer()) p.bad(field, "expected an integer id, got " + v.dump());
    if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
      p.bad(field, v.dump() + " is not below " + std::to_string(bound) +
                       " (the number of vocab entries plus added tokens)");
    }
    const int64_t id = v.get<int64_t>();
    if (id < 0) p.bad(field, std::to_string(id) + " is negative");
    if (id >= bound) {
      p.bad(field, std::to_string(id) + " is not below " + std::to_string(bound) +
                       " (the number of vocab entries plus added tokens)");
    }
    return id;
  }

  // AddedVocabulary::find_matches + split_with_indices for one piece.
  void split_added(Piece piece, const AddedMatcher& matcher, Pieces& out) const {
    if (matcher.empty()) {
      if (!piece.text.empty()) out.push_back(std::move(piece));
      return;
    }
    static const Regex word_end(std::string("[") + kOnigWordChars + "]$");
    static const Regex word_start(std::string("^[") + kOnigWordChars + "]");
    const std::string& s = piece.text;
    size_t start_offset = 0, from = 0, start = 0, stop = 0;
    int64_t id = -1;
    auto emit_text = [&](size_t a, size_t b) {
      if (b > a) out.push_back(Piece{s.substr(a, b - a), -1, piece.at_origin && a == 0});
    };
    while (from < s.size() && matcher.next(s, from, start, stop, id)) {
      from = stop;
      const AddedToken& token = added_by_id_.at(id);
      if (token.single_word) {
        const bool start_space =
            start == 0 || !word_end.search(std::string_view(s).substr(0, start));
        const bool stop_space =
            stop == s.size() || !word_start.search(std::string_view(s).substr(stop));
        if (!start_space || !stop_space) continue;
      }
      if (token.lstrip) {
        size_t new_start = start;
        while (new_start > 0) {
          size_t k = new_start - 1;
          while (k > 0 && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
          size_t j = k;
          if (!is_unicode_whitespace(utf8_next(s, j))) break;
          new_start = k;
        }
        start = std::max(new_start, start_offset);
      }
      if (token.rstrip) {
        size_t j = stop;
        while (j < s.size()) {
          size_t k = j;
          if (!is_unicode_whitespace(utf8_next(s, k))) break;
          j = k;
        }
        stop = j;
      }
      emit_text(start_offset, start);
      out.push_back(Piece{s.substr(start, stop - start), static_cast<int32_t>(id), false});
      start_offset = stop;
    }
    emit_text(start_offset, s.size());
  }

  void parse_post_processor(const JsonReader& p, const json& pp, const std::string& field) {
    const std::string type = p.type_of(pp, field);
    if (type == "Sequence") {
      const json& list = p.get_array(pp, field, "processors");
      for (size_t i = 0; i < list.size(); ++i) {
        parse_post_processor(p, list[i], field + ".processors[" + std::to_string(i) + "]");
      }
      return;
    }
    if (type == "ByteLevel") return;  // only trims offsets
    if (type == "TemplateProcessing") {
      const json& single = p.get_array(pp, field, "single");
      const json& specials = p.member(pp, field, "special_tokens");
      std::vector<int64_t> before, after;
      bool seen_sequence = false;
      for (size_t i = 0; i < single.size(); ++i) {
        const std::string f = field + ".single[" + std::to_string(i) + "]";
        const json& item = single[i];
        if (item.is_object() && item.contains("Sequence")) {
          seen_sequence = true;
          continue;
        }
        if (!item.is_object() || !item.contains("SpecialToken"))
          p.bad(f, "expected SpecialToken or Sequence");
        const std::string name = p.get_string(item.at("SpecialToken"), f + ".SpecialToken", "id");
        if (!specials.is_object() || !specials.contains(name)) {
          p.bad(field + ".special_tokens", "no entry for '" + name + "'");
        }
        const json& ids = p.get_array(specials.at(name), field + ".special_tokens." + name, "ids");
        for (size_t k = 0; k < ids.size(); ++k) {
          const std::string f2 = field + ".special_tokens." + name + ".ids[" + std::to_string(k) + "]";
          (seen_sequence ? after : before).push_back(checked_id(p, ids[k], f2, id_bound_));
        }
      }
      prefix_.insert(prefix_.begin(), before.begin(), before.end());
      suffix_.insert(suffix_.end(), after.begin(), after.end());
      return;
    }
    if (type == "BertProcessing" || type == "RobertaProcessing") {
      auto id_of = [&](const std::string& key) {
        const json& v = p.member(pp, field, key);
        if (!v.is_array() || v.size() != 2) p.bad(field + "." + key, "expected [token, id]");
        return checked_id(p, v[1], field + "." + key + "[1]", id_bound_);
      };
      prefix_.insert(prefix_.begin(), id_of("cls"));
      suffix_.push_back(id_of("sep"));
      return;
    }
    p.bad(field + ".type", "unsupported post-processor '" + type +
                               "' (supported: TemplateProcessing, ByteLevel, BertProcessing, "
                               "RobertaProcessing, Sequence)");
  }

  int64_t id_bound_ = 0;  // vocab entries plus added tokens: every id in the file is below it
  std::unique_ptr<BpeModel> model_;
  Normalizer normalizer_;
  PreTokenizer pre_tokenizer_;
  Decoder decoder_;
  std::unordered_map<std::string, int64_t> added_by_content_;
  std::unordered_map<int64_t, AddedToken> added_by_id_;
  std::unordered_set<std::string> special_set_;
  AddedMatcher raw_matcher_, normalized_matcher_;
  std::vector<int64_t> prefix_, suffix_;  // post-processor ids around the sequence
};

}  // namespace

std::unique_ptr<TokenizerBackend> make_hf_backend(const nlohmann::json& tokenizer_json,
                                                  const std::string& origin) {
  return std::make_unique<HfBackend>(tokenizer_json, origin);
}

}  // namespace ftune::tok

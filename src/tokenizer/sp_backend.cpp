// SentencePiece backend for model dirs that ship only tokenizer.model (Llama 1/2, TinyLlama).
// Ground truth is the sentencepiece library itself: text without special-token strings encodes
// to exactly SentencePieceProcessor::Encode's ids. Special tokens written literally in the text
// (<s>, </s>, <unk>, tokens from tokenizer_config.json "added_tokens_decoder") are split out
// first and each remaining piece is encoded separately, as transformers' LlamaTokenizer
// (legacy=True) does; plain SentencePiece would spell them out character by character.
// Defines make_sentencepiece_backend().
#include <sentencepiece_processor.h>

#include <exception>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "tokenizer/added_matcher.h"
#include "tokenizer/backend.h"
#include "tokenizer/unicode.h"

namespace ftune::tok {

namespace {

// Python str.isspace() for one code point: White_Space plus the ASCII separators \x1c-\x1f.
bool python_isspace(char32_t c) {
  return is_unicode_whitespace(c) || (c >= 0x1C && c <= 0x1F);
}

std::string python_rstrip(std::string_view s) {
  size_t end = 0, i = 0;
  while (i < s.size()) {
    if (!python_isspace(utf8_next(s, i))) end = i;
  }
  return std::string(s.substr(0, end));
}

std::string python_lstrip(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const size_t at = i;
    if (!python_isspace(utf8_next(s, i))) return std::string(s.substr(at));
  }
  return {};
}

class SpBackend final : public TokenizerBackend {
 public:
  explicit SpBackend(const std::filesystem::path& model) : origin_(model.string()) {
    sentencepiece::util::Status status;
    try {
      status = sp_.Load(model.string());
    } catch (const std::exception& e) {
      // libsentencepiece's trie builder (darts_clone) throws instead of returning a status, e.g.
      // for an empty piece in a unigram model (found by sentencepiece_fuzz).
      fail(origin_, ": cannot load SentencePiece model: ", e.what());
    }
    FTUNE_CHECK(status.ok(), origin_, ": cannot load SentencePiece model: ", status.ToString());
    // Like LlamaTokenizer, unk/bos/eos are added tokens that split the text.
    for (int id : {sp_.unk_id(), sp_.bos_id(), sp_.eos_id()}) {
      if (id >= 0 && id < sp_.GetPieceSize()) register_token(sp_.IdToPiece(id), id, Flags{});
    }
    matcher_.finish();
  }

  std::vector<int64_t> encode(std::string_view text, bool /*add_special_tokens*/) const override {
    // Split on special tokens (honouring lstrip/rstrip the way the slow tokenizer does).
    struct Part {
      std::string text;
      int64_t id;  // -1: plain text
    };
    std::vector<Part> parts;
    size_t from = 0, start = 0, end = 0, last = 0;
    int64_t id = -1;
    while (from < text.size() && matcher_.next(text, from, start, end, id)) {
      parts.push_back(Part{std::string(text.substr(last, start - last)), -1});
      parts.push_back(Part{std::string(text.substr(start, end - start)), id});
      last = from = end;
    }
    parts.push_back(Part{std::string(text.substr(last)), -1});
    for (size_t k = 0; k < parts.size(); ++k) {
      if (parts[k].id < 0) continue;
      const Flags& f = flags_.at(parts[k].id);
      if (f.rstrip && k + 1 < parts.size()) parts[k + 1].text = python_lstrip(parts[k + 1].text);
      if (f.lstrip && k > 0) parts[k - 1].text = python_rstrip(parts[k - 1].text);
    }
    std::vector<int64_t> out;
    std::vector<int> ids;
    for (const Part& part : parts) {
      if (part.id >= 0) {
        out.push_back(part.id);
        continue;
      }
      if (part.text.empty()) continue;
      ids.clear();
      const auto status = sp_.Encode(part.text, &ids);
      FTUNE_CHECK(status.ok(), origin_, ": SentencePiece encode failed: ", status.ToString());
      out.insert(out.end(), ids.begin(), ids.end());
    }
    return out;
  }

  // transformers' LlamaTokenizer (legacy) decode: with skip_special_tokens the special ids are
  // dropped and the rest decoded as one run; otherwise each special token is written literally,
  // preceded by a space unless it follows another special token or starts the text.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const override {
    std::string out;
    std::vector<int> run;
    bool prev_special = false;
    size_t index = 0;  // position among the tokens that survive filtering
    for (int64_t id : ids) {
      auto it = added_.find(id);
      const bool added = it != added_.end() || is_control(id);
      if (!added && (id < 0 || id >= sp_.GetPieceSize())) continue;  // unknown ids are dropped
      const bool special = added && (it == added_.end() || flags_.at(id).special);
      if (special && skip_special_tokens) continue;
      if (added) {
        if (!prev_special && index != 0) out += ' ';
        out += sp_.DecodeIds(run);
        out += it != added_.end() ? it->second : sp_.IdToPiece(static_cast<int>(id));
        run.clear();
        prev_special = true;
      } else {
        run.push_back(static_cast<int>(id));
        prev_special = false;
      }
      ++index;
    }
    out += sp_.DecodeIds(run);
    return out;
  }

  int64_t vocab_size() const override {
    int64_t size = sp_.GetPieceSize();
    for (const auto& [id, _] : added_) size = std::max(size, id + 1);
    return size;
  }

  std::optional<int64_t> token_to_id(std::string_view token) const override {
    auto it = added_by_content_.find(std::string(token));
    if (it != added_by_content_.end()) return it->second;
    const int id = sp_.PieceToId(std::string(token));
    if (id < 0 || id >= sp_.GetPieceSize() || sp_.IdToPiece(id) != token) return std::nullopt;
    return id;
  }

  std::optional<std::string> id_to_token(int64_t id) const override {
    auto it = added_.find(id);
    if (it != added_.end()) return it->second;
    if (id < 0 || id >= sp_.GetPieceSize()) return std::nullopt;
    return sp_.IdToPiece(static_cast<int>(id));
  }

  bool has_post_processor() const override { return false; }

  void add_config_tokens(const std::vector<ConfigToken>& tokens, const std::string&) override {
    for (const ConfigToken& t : tokens) {
      register_token(t.content, t.id, Flags{t.lstrip, t.rstrip, t.special});
    }
    matcher_.finish();
  }

  std::optional<int64_t> default_bos_id() const override { return valid(sp_.bos_id()); }
  std::optional<int64_t> default_eos_id() const override { return valid(sp_.eos_id()); }
  std::optional<int64_t> default_pad_id() const override { return valid(sp_.pad_id()); }

 private:
  struct Flags {
    bool lstrip = false, rstrip = false, special = true;
  };

  void register_token(const std::string& content, int64_t id, const Flags& flags) {
    if (content.empty()) return;
    added_[id] = content;
    added_by_content_[content] = id;
    flags_[id] = flags;
    matcher_.add(content, id);
  }
  bool is_control(int64_t id) const {
    return id >= 0 && id < sp_.GetPieceSize() && sp_.IsControl(static_cast<int>(id));
  }
  std::optional<int64_t> valid(int id) const {
    if (id < 0 || id >= sp_.GetPieceSize()) return std::nullopt;
    return id;
  }

  std::string origin_;
  sentencepiece::SentencePieceProcessor sp_;
  std::map<int64_t, std::string> added_;  // id -> content of split-out tokens
  std::unordered_map<std::string, int64_t> added_by_content_;
  std::unordered_map<int64_t, Flags> flags_;
  AddedMatcher matcher_;
};

}  // namespace

std::unique_ptr<TokenizerBackend> make_sentencepiece_backend(const std::filesystem::path& model) {
  return std::make_unique<SpBackend>(model);
}

}  // namespace ftune::tok

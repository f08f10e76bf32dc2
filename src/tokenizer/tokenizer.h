// ftune's tokenizer: one class over the backends HF model dirs use.
//  - tokenizer.json (HF tokenizers): BPE, byte-level (GPT-2 / Llama 3 / SmolLM2) or with
//    byte_fallback and a Replace/Prepend normalizer (Llama 2 style); added/special tokens.
//  - tokenizer.model (SentencePiece, through libsentencepiece) when there is no tokenizer.json.
// plus tokenizer_config.json / special_tokens_map.json (bos/eos/pad, add_bos_token,
// chat_template). encode() must give exactly HF tokenizers' ids.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ftune::tok {

class TokenizerBackend;  // tokenizer.json BPE or SentencePiece; defined in the .cpp files
struct ConfigToken;      // an added_tokens_decoder entry (backend.h)

class Tokenizer {
 public:
  // Loads from an HF model dir: tokenizer.json if present, else tokenizer.model; then
  // tokenizer_config.json and special_tokens_map.json if present. Throws ftune::Error
  // "<dir>: no tokenizer.json or tokenizer.model" or naming the bad file and field.
  static Tokenizer load(const std::filesystem::path& dir);
  // Builds from parsed tokenizer.json and tokenizer_config.json contents (config may be null);
  // `origin` names the source in error messages. Used by GGUF import.
  static Tokenizer from_json(const nlohmann::json& tokenizer_json,
                             const nlohmann::json& tokenizer_config, const std::string& origin);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Ids for `text`. Added/special tokens written literally in the text are matched as HF does.
  // add_special_tokens=false equals HF `tokenizer(text, add_special_tokens=False)`; true applies
  // the post-processor (tokenizer.json TemplateProcessing) or add_bos/add_eos (SentencePiece).
  std::vector<int64_t> encode(std::string_view text, bool add_special_tokens = false) const;
  // Text for ids; equals HF `decode(ids, skip_special_tokens=...)`.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = true) const;

  int64_t vocab_size() const;  // including added tokens
  std::optional<int64_t> token_to_id(std::string_view token) const;
  std::string id_to_token(int64_t id) const;

  std::optional<int64_t> bos_id() const { return bos_id_; }
  std::optional<int64_t> eos_id() const { return eos_id_; }
  std::optional<int64_t> pad_id() const { return pad_id_; }
  const std::string& bos_token() const { return bos_token_; }
  const std::string& eos_token() const { return eos_token_; }
  const std::string& chat_template() const { return chat_template_; }  // empty when none
  // The file the vocabulary came from (tokenizer.json, tokenizer.model or from_json's origin).
  const std::string& origin() const { return origin_; }

  // Renders `messages` ([{"role":..., "content":...}, ...]) with the chat template, as
  // transformers' apply_chat_template(tokenize=False) does: the context holds messages, tools
  // and documents (None unless given), add_generation_prompt and the special tokens that are
  // set. Message keys keep their order (Python dicts do, and `tojson` or `.items()` show it),
  // which is why this takes ordered_json: parse data with nlohmann::ordered_json.
  // Throws if there is no template.
  std::string apply_chat_template(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                  const nlohmann::ordered_json& tools = nullptr) const;
  // nlohmann::json sorts object keys, so it would render {"content", "role"}: refused.
  std::string apply_chat_template(const nlohmann::json& messages,
                                  bool add_generation_prompt) const = delete;

 private:
  Tokenizer();
  void apply_config(const nlohmann::json& config, const std::string& origin);
  friend void check_fits_vocab(const Tokenizer&, int64_t, const std::string&);
  std::vector<ConfigToken> config_tokens(const nlohmann::json& decoder,
                                         const std::string& origin) const;
  std::unique_ptr<TokenizerBackend> backend_;
  std::string origin_;
  std::string config_origin_;         // tokenizer_config.json when it declared added tokens
  std::vector<int64_t> config_ids_;   // ids it declared
  std::optional<int64_t> bos_id_, eos_id_, pad_id_;
  std::string bos_token_, eos_token_, pad_token_, unk_token_;
  std::string chat_template_;
  bool add_bos_ = false;  // SentencePiece only; tokenizer.json uses its post_processor
  bool add_eos_ = false;
};

// Checks that every token id of `tokenizer` indexes a row of a model with `vocab_size` rows;
// throws ftune::Error "<tokenizer file>: token '<x>' (id N): id is not below the model's
// vocab_size V (<model_origin>)". Call it wherever a model and a tokenizer meet: without it an
// out-of-range id fails deep in the first forward ("index out of range in self").
void check_fits_vocab(const Tokenizer& tokenizer, int64_t vocab_size,
                      const std::string& model_origin);

}  // namespace ftune::tok

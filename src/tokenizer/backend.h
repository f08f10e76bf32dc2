// The interface between Tokenizer and its two backends (tokenizer.json, SentencePiece), plus
// their factories. Tokenizer owns config handling (bos/eos/pad, chat template); a backend owns
// everything about turning text into ids and back. Kept private to src/tokenizer.
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

// An entry of tokenizer_config.json "added_tokens_decoder", its id already checked.
struct ConfigToken {
  int64_t id = 0;
  std::string content;
  bool lstrip = false, rstrip = false, special = true;
  std::string field;  // "added_tokens_decoder.<id>", for error messages
};

class TokenizerBackend {
 public:
  virtual ~TokenizerBackend() = default;
  // Ids for valid UTF-8 `text`; `add_special_tokens` applies the backend's own post-processor
  // (tokenizer.json); SentencePiece ignores it (Tokenizer adds bos/eos from the config).
  virtual std::vector<int64_t> encode(std::string_view text, bool add_special_tokens) const = 0;
  virtual std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::optional<int64_t> token_to_id(std::string_view token) const = 0;
  virtual std::optional<std::string> id_to_token(int64_t id) const = 0;
  // True when add_special_tokens is handled by encode() (tokenizer.json post_processor).
  virtual bool has_post_processor() const = 0;
  // Registers tokens declared in tokenizer_config.json "added_tokens_decoder" that the backend
  // does not know yet (SentencePiece: pad tokens past the model's vocab), or checks them against
  // its own (tokenizer.json). `origin` names the file.
  virtual void add_config_tokens(const std::vector<ConfigToken>& tokens,
                                 const std::string& origin) = 0;
  // SentencePiece's own bos/eos/pad ids (when the model defines them), used without a config.
  virtual std::optional<int64_t> default_bos_id() const { return std::nullopt; }
  virtual std::optional<int64_t> default_eos_id() const { return std::nullopt; }
  virtual std::optional<int64_t> default_pad_id() const { return std::nullopt; }
};

// tokenizer.json backend; `origin` prefixes error messages ("<file>: <field>: ...").
std::unique_ptr<TokenizerBackend> make_hf_backend(const nlohmann::json& tokenizer_json,
                                                  const std::string& origin);
// SentencePiece tokenizer.model backend.
std::unique_ptr<TokenizerBackend> make_sentencepiece_backend(const std::filesystem::path& model);

}  // namespace ftune::tok

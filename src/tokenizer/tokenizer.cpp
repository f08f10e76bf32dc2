// Tokenizer (see tokenizer.h): picks the backend for a model dir and applies the transformers
// config files on top (bos/eos/pad, add_bos/add_eos, chat template). Precedence follows
// transformers 4.57: special_tokens_map.json overrides tokenizer_config.json (legacy configs
// without added_tokens_decoder only), and chat_template.jinja overrides the config's template.
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <unordered_map>

#include "core/error.h"
#include "core/fs.h"
#include "tokenizer/backend.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/json_text.h"
#include "tokenizer/unicode.h"

namespace ftune::tok {

namespace {

nlohmann::json parse_json_file(const std::filesystem::path& path) {
  return parse_json_text(read_file(path), path.string());
}

// A special-token entry: "<s>", {"content": "<s>", ...}, or null. nullopt when absent or null.
std::optional<std::string> token_string(const nlohmann::json& config, const std::string& key,
                                        const std::string& origin) {
  if (!config.contains(key) || config.at(key).is_null()) return std::nullopt;
  const nlohmann::json& v = config.at(key);
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v.at("content").is_string()) {
    return v.at("content").get<std::string>();
  }
  fail(origin, ": ", key, ": expected a token string or {\"content\": ...}");
}

}  // namespace

std::vector<ConfigToken> Tokenizer::config_tokens(const nlohmann::json& decoder,
                                                  const std::string& origin) const {
  if (!decoder.is_object()) fail(origin, ": added_tokens_decoder: expected an object {id: token}");
  // As for tokenizer.json: ids beyond the tokenizer's vocabulary plus these tokens can't be right.
  const int64_t bound = backend_->vocab_size() + static_cast<int64_t>(decoder.size());
  std::vector<ConfigToken> tokens;
  std::unordered_map<std::string, std::string> field_of;  // content -> field that declared it
  for (auto it = decoder.begin(); it != decoder.end(); ++it) {
    ConfigToken t;
    t.field = "added_tokens_decoder." + it.key();
    const std::string& key = it.key();
    const bool digits = !key.empty() && key.size() <= 18 &&
                        key.find_first_not_of("0123456789") == std::string::npos;
    if (!digits) {
      // Within int64, but possibly far beyond the bound.
      if (!key.empty() && key.find_first_not_of("0123456789") == std::string::npos) {
        fail(origin, ": ", t.field, ": ", key, " is not below ", bound,
             " (the tokenizer's vocabulary plus added_tokens_decoder)");
      }
      fail(origin, ": ", t.field, ": expected a non-negative integer id as key");
    }
    t.id = std::stoll(key);
    if (t.id >= bound) {
      fail(origin, ": ", t.field, ": ", t.id, " is not below ", bound,
           " (the tokenizer's vocabulary plus added_tokens_decoder)");
    }
    const nlohmann::json& v = it.value();
    if (!v.is_object() || !v.contains("content") || !v.at("content").is_string()) {
      fail(origin, ": ", t.field, ": expected {\"content\": ..., ...}");
    }
    auto flag = [&](const char* name, bool fallback) {
      if (!v.contains(name) || v.at(name).is_null()) return fallback;
      if (!v.at(name).is_boolean()) fail(origin, ": ", t.field, ".", name, ": expected true or false");
      return v.at(name).get<bool>();
    };
    t.content = v.at("content").get<std::string>();
    t.lstrip = flag("lstrip", false);
    t.rstrip = flag("rstrip", false);
    t.special = flag("special", true);
    auto [other, fresh] = field_of.emplace(t.content, t.field);
    if (!fresh) {
      fail(origin, ": ", t.field, ": token '", t.content, "' is also ", other->second,
           " (one token, two ids)");
    }
    tokens.push_back(std::move(t));
  }
  return tokens;
}

Tokenizer::Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::filesystem::path& dir) {
  Tokenizer tok;
  const auto json_path = dir / "tokenizer.json";
  const auto model_path = dir / "tokenizer.model";
  if (std::filesystem::is_regular_file(json_path)) {
    tok.origin_ = json_path.string();
    tok.backend_ = make_hf_backend(parse_json_file(json_path), tok.origin_);
  } else if (std::filesystem::is_regular_file(model_path)) {
    tok.origin_ = model_path.string();
    tok.backend_ = make_sentencepiece_backend(model_path);
    // LlamaTokenizer's defaults, overridden by the config files below when they say otherwise.
    tok.bos_id_ = tok.backend_->default_bos_id();
    tok.eos_id_ = tok.backend_->default_eos_id();
    tok.pad_id_ = tok.backend_->default_pad_id();
    if (tok.bos_id_) tok.bos_token_ = *tok.backend_->id_to_token(*tok.bos_id_);
    if (tok.eos_id_) tok.eos_token_ = *tok.backend_->id_to_token(*tok.eos_id_);
    if (tok.pad_id_) tok.pad_token_ = *tok.backend_->id_to_token(*tok.pad_id_);
    tok.unk_token_ = "<unk>";  // LlamaTokenizer's default
    tok.add_bos_ = true;
  } else {
    fail(dir.string(), ": no tokenizer.json or tokenizer.model");
  }
  // transformers reads special_tokens_map.json only for configs without added_tokens_decoder
  // (the legacy layout); there it overrides tokenizer_config.json.
  bool legacy_layout = true;
  const auto config_path = dir / "tokenizer_config.json";
  if (std::filesystem::is_regular_file(config_path)) {
    const nlohmann::json config = parse_json_file(config_path);
    legacy_layout = !(config.is_object() && config.contains("added_tokens_decoder"));
    tok.apply_config(config, config_path.string());
  }
  const auto map_path = dir / "special_tokens_map.json";
  if (legacy_layout && std::filesystem::is_regular_file(map_path)) {
    tok.apply_config(parse_json_file(map_path), map_path.string());
  }
  const auto jinja = dir / "chat_template.jinja";
  if (std::filesystem::is_regular_file(jinja)) {
    tok.chat_template_ = read_file(jinja);
    if (const auto bad = utf8_invalid_at(tok.chat_template_)) {
      const auto line = 1 + std::count(tok.chat_template_.begin(),
                                       tok.chat_template_.begin() + static_cast<std::ptrdiff_t>(*bad), '\n');
      fail(jinja.string(), ": invalid UTF-8 at line ", line, " (byte ", *bad, ")");
    }
  }
  return tok;
}

Tokenizer Tokenizer::from_json(const nlohmann::json& tokenizer_json,
                               const nlohmann::json& tokenizer_config, const std::string& origin) {
  Tokenizer tok;
  tok.origin_ = origin;
  tok.backend_ = make_hf_backend(tokenizer_json, origin);
  if (!tokenizer_config.is_null()) tok.apply_config(tokenizer_config, origin);
  return tok;
}

void Tokenizer::apply_config(const nlohmann::json& config, const std::string& origin) {
  FTUNE_CHECK(config.is_object(), origin, ": expected a JSON object");
  // Extra tokens first, so bos/eos/pad may name them (SentencePiece only; tokenizer.json has them).
  if (config.contains("added_tokens_decoder") && !config.at("added_tokens_decoder").is_null()) {
    const auto tokens = config_tokens(config.at("added_tokens_decoder"), origin);
    backend_->add_config_tokens(tokens, origin);
    config_origin_ = origin;
    for (const ConfigToken& t : tokens) config_ids_.push_back(t.id);
  }
  auto resolve = [&](const std::string& key, std::string& token, std::optional<int64_t>& id) {
    if (!config.contains(key)) return;
    const auto value = token_string(config, key, origin);
    if (!value) {  // explicitly null: no such token
      token.clear();
      id.reset();
      return;
    }
    const auto found = backend_->token_to_id(*value);
    FTUNE_CHECK(found.has_value(), origin, ": ", key, ": token '", *value,
                "' is not in the vocabulary");
    token = *value;
    id = found;
  };
  resolve("bos_token", bos_token_, bos_id_);
  resolve("eos_token", eos_token_, eos_id_);
  resolve("pad_token", pad_token_, pad_id_);
  // Only the chat template sees unk_token; transformers does not require it in the vocabulary.
  if (config.contains("unk_token")) unk_token_ = token_string(config, "unk_token", origin).value_or("");
  for (const char* key : {"add_bos_token", "add_eos_token"}) {
    if (!config.contains(key) || config.at(key).is_null()) continue;
    FTUNE_CHECK(config.at(key).is_boolean(), origin, ": ", key, ": expected true or false");
    (std::string(key) == "add_bos_token" ? add_bos_ : add_eos_) = config.at(key).get<bool>();
  }
  if (config.contains("chat_template") && !config.at("chat_template").is_null()) {
    const nlohmann::json& t = config.at("chat_template");
    if (t.is_string()) {
      chat_template_ = t.get<std::string>();
    } else if (t.is_array()) {
      bool found = false;
      for (size_t i = 0; i < t.size(); ++i) {
        const nlohmann::json& e = t[i];
        FTUNE_CHECK(e.is_object() && e.contains("name") && e.at("name").is_string() &&
                        e.contains("template") && e.at("template").is_string(),
                    origin, ": chat_template[", i,
                    "]: expected {\"name\": ..., \"template\": ...}");
        if (e.at("name").get<std::string>() == "default") {
          chat_template_ = e.at("template").get<std::string>();
          found = true;
        }
      }
      FTUNE_CHECK(found, origin, ": chat_template: no template named \"default\"");
    } else {
      fail(origin, ": chat_template: expected a string or a list of {name, template}");
    }
  }
}

std::vector<int64_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  if (const auto bad = utf8_invalid_at(text)) {
    fail("tokenizer: input text is not valid UTF-8 (byte offset ", *bad, ")");
  }
  std::vector<int64_t> ids = backend_->encode(text, add_special_tokens);
  if (add_special_tokens && !backend_->has_post_processor()) {
    if (add_bos_ && bos_id_) ids.insert(ids.begin(), *bos_id_);
    if (add_eos_ && eos_id_) ids.push_back(*eos_id_);
  }
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  return backend_->decode(ids, skip_special_tokens);
}

int64_t Tokenizer::vocab_size() const {
  return backend_->vocab_size();
}

std::optional<int64_t> Tokenizer::token_to_id(std::string_view token) const {
  return backend_->token_to_id(token);
}

std::string Tokenizer::id_to_token(int64_t id) const {
  auto token = backend_->id_to_token(id);
  FTUNE_CHECK(token.has_value(), "tokenizer: token id ", id, " is not in the vocabulary (size ",
              vocab_size(), ")");
  return *token;
}

std::string Tokenizer::apply_chat_template(const nlohmann::ordered_json& messages,
                                           bool add_generation_prompt,
                                           const nlohmann::ordered_json& tools) const {
  FTUNE_CHECK(!chat_template_.empty(),
              "tokenizer: no chat template (tokenizer_config.json has no chat_template)");
  FTUNE_CHECK(messages.is_array(), "chat template: messages: expected a list of {role, content}");
  // transformers' render_jinja_template: tools and documents are always passed (None when
  // absent, so `tools is defined` holds), then special_tokens_map: only the tokens that are set.
  nlohmann::ordered_json context = {{"messages", messages},
                                    {"tools", tools},
                                    {"documents", nullptr},
                                    {"add_generation_prompt", add_generation_prompt}};
  if (bos_id_) context["bos_token"] = bos_token_;
  if (eos_id_) context["eos_token"] = eos_token_;
  if (!unk_token_.empty()) context["unk_token"] = unk_token_;
  if (pad_id_) context["pad_token"] = pad_token_;
  return render_chat_template(chat_template_, context);
}

void check_fits_vocab(const Tokenizer& tokenizer, int64_t vocab_size,
                      const std::string& model_origin) {
  if (tokenizer.vocab_size() <= vocab_size) return;
  // vocab_size() is the highest id plus one: find the lowest id that does not fit.
  for (int64_t id = std::max<int64_t>(vocab_size, 0); id < tokenizer.vocab_size(); ++id) {
    const auto token = tokenizer.backend_->id_to_token(id);
    if (!token) continue;
    const auto& config = tokenizer.config_ids_;
    const bool from_config = std::find(config.begin(), config.end(), id) != config.end();
    fail(from_config ? tokenizer.config_origin_ : tokenizer.origin_, ": token '", *token, "' (id ", id,
         "): id is not below the model's vocab_size ", vocab_size, " (", model_origin, ")");
  }
}

}  // namespace ftune::tok

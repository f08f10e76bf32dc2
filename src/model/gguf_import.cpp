// GGUF -> HF model dir conversion for Llama models; see gguf_import.h and docs/gguf.md.
// Hyper-parameters come from llama.* metadata (the keys transformers' GGUF loader reads), weights
// from GgufFile::dequantize (bit-exact with gguf-py) renamed to HF names with Q/K un-permuted, and
// the tokenizer from tokenizer.ggml.*: "gpt2" vocabularies become byte-level BPE with the
// pre-tokenizer llama.cpp associates with tokenizer.ggml.pre; "llama" vocabularies become
// Llama-2-style BPE with byte fallback, merges rebuilt from piece scores as transformers does.
#include "model/gguf_import.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <unordered_map>

#include "core/error.h"
#include "core/fs.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "model/hf_io.h"
#include "tokenizer/unicode.h"

namespace ftune::model {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// llama.cpp token types (llama_token_type / gguf-py TokenType).
constexpr int64_t kTokenControl = 3;

// A metadata value for an error line: JSON, invalid UTF-8 replaced, cut to 100 bytes.
std::string brief(const json& v) {
  std::string d = v.dump(-1, ' ', false, json::error_handler_t::replace);
  return d.size() > 100 ? d.substr(0, 100) + "..." : d;
}

struct Meta {
  const json& m;
  const std::string& origin;

  bool has(const std::string& key) const { return m.contains(key) && !m.at(key).is_null(); }
  const json& at(const std::string& key) const {
    FTUNE_CHECK(has(key), origin, ": ", key, ": missing from the GGUF metadata");
    return m.at(key);
  }
  int64_t integer(const std::string& key) const {
    const json& v = at(key);
    FTUNE_CHECK(v.is_number_integer(), origin, ": ", key, ": expected an integer, got ", brief(v));
    FTUNE_CHECK(!v.is_number_unsigned() || v.get<uint64_t>() <= uint64_t{1} << 62, origin, ": ",
                key, ": value ", brief(v), " is out of range");
    return v.get<int64_t>();
  }
  // Sizes: products of two of them must not overflow int64.
  int64_t positive(const std::string& key) const {
    int64_t v = integer(key);
    FTUNE_CHECK(v > 0 && v <= INT32_MAX, origin, ": ", key,
                ": expected a positive integer below 2^31, got ", v);
    return v;
  }
  double positive_number(const io::GgufFile& f, const std::string& key) const;
  double number(const std::string& key) const {
    const json& v = at(key);
    FTUNE_CHECK(v.is_number(), origin, ": ", key, ": expected a number, got ", brief(v));
    return v.get<double>();
  }
  std::string string(const std::string& key) const {
    const json& v = at(key);
    FTUNE_CHECK(v.is_string(), origin, ": ", key, ": expected a string, got ", brief(v));
    return v.get<std::string>();
  }
  bool boolean(const std::string& key, bool dflt) const {
    if (!has(key)) return dflt;
    const json& v = m.at(key);
    FTUNE_CHECK(v.is_boolean(), origin, ": ", key, ": expected true or false, got ", brief(v));
    return v.get<bool>();
  }
  const json& array(const std::string& key) const {
    const json& v = at(key);
    FTUNE_CHECK(v.is_array(), origin, ": ", key, ": expected an array");
    return v;
  }
};

// GGUF stores hyper-parameters like rms_norm_eps as float32; 1e-5 comes back as
// 9.999999747378752e-06. Writing the shortest decimal that rounds to the same float32 keeps
// config.json readable ("1e-05") and loses nothing: both parse to the same fp32 value.
double shortest_f32(double v) {
  const float f = static_cast<float>(v);
  char buf[32];
  for (int p = 1; p <= 9; ++p) {
    std::snprintf(buf, sizeof(buf), "%.*g", p, static_cast<double>(f));
    if (std::strtof(buf, nullptr) == f) return std::strtod(buf, nullptr);
  }
  return static_cast<double>(f);
}

double meta_number(const io::GgufFile& f, const Meta& meta, const std::string& key) {
  double v = meta.number(key);
  return f.metadata_type(key) == io::GgufValueType::F32 ? shortest_f32(v) : v;
}

double Meta::positive_number(const io::GgufFile& f, const std::string& key) const {
  const double v = meta_number(f, *this, key);
  FTUNE_CHECK(std::isfinite(v) && v > 0, origin, ": ", key, ": expected a positive number, got ", v);
  return v;
}

// Strict UTF-8 (no overlong forms, surrogates or code points above U+10FFFF): the JSON writer
// rejects anything else, so a bad token must fail here with its index.
bool valid_utf8(const std::string& s) { return !tok::utf8_invalid_at(s).has_value(); }

struct Vocab {
  std::vector<std::string> tokens;
  std::vector<int64_t> types;  // empty when the file has no token_type
  std::vector<double> scores;  // empty when the file has no scores
};

Vocab read_vocab(const Meta& meta) {
  Vocab v;
  const json& tokens = meta.array("tokenizer.ggml.tokens");
  FTUNE_CHECK(!tokens.empty(), meta.origin, ": tokenizer.ggml.tokens: empty vocabulary");
  v.tokens.reserve(tokens.size());
  for (size_t i = 0; i < tokens.size(); ++i) {
    FTUNE_CHECK(tokens[i].is_string(), meta.origin, ": tokenizer.ggml.tokens[", i,
                "]: expected a string");
    v.tokens.push_back(tokens[i].get<std::string>());
    FTUNE_CHECK(valid_utf8(v.tokens.back()), meta.origin, ": tokenizer.ggml.tokens[", i,
                "]: not valid UTF-8");
  }
  if (meta.has("tokenizer.ggml.token_type")) {
    const json& types = meta.array("tokenizer.ggml.token_type");
    FTUNE_CHECK(types.size() == tokens.size(), meta.origin, ": tokenizer.ggml.token_type: ",
                types.size(), " entries for ", tokens.size(), " tokens");
    for (size_t i = 0; i < types.size(); ++i) {
      FTUNE_CHECK(types[i].is_number_integer(), meta.origin, ": tokenizer.ggml.token_type[", i,
                  "]: expected an integer");
      v.types.push_back(types[i].get<int64_t>());
    }
  }
  if (meta.has("tokenizer.ggml.scores")) {
    const json& scores = meta.array("tokenizer.ggml.scores");
    FTUNE_CHECK(scores.size() == tokens.size(), meta.origin, ": tokenizer.ggml.scores: ",
                scores.size(), " entries for ", tokens.size(), " tokens");
    for (size_t i = 0; i < scores.size(); ++i) {
      FTUNE_CHECK(scores[i].is_number(), meta.origin, ": tokenizer.ggml.scores[", i,
                  "]: expected a number");
      v.scores.push_back(scores[i].get<double>());
    }
  }
  return v;
}

// Token string for a tokenizer.ggml.*_token_id key, or null when the key is absent.
json special_token(const Meta& meta, const Vocab& v, const std::string& key) {
  if (!meta.has(key)) return nullptr;
  const int64_t id = meta.integer(key);
  FTUNE_CHECK(id >= 0 && id < static_cast<int64_t>(v.tokens.size()), meta.origin, ": ", key,
              ": id ", id, " is outside the vocabulary of ", v.tokens.size(), " tokens");
  return v.tokens[static_cast<size_t>(id)];
}

// Merges as [left, right] pairs. GGUF stores "left right"; llama.cpp splits at the first space
// after the first character (a token may itself start with a space).
json read_merges(const Meta& meta) {
  const json& merges = meta.array("tokenizer.ggml.merges");
  json out = json::array();
  for (size_t i = 0; i < merges.size(); ++i) {
    FTUNE_CHECK(merges[i].is_string(), meta.origin, ": tokenizer.ggml.merges[", i,
                "]: expected a string");
    const std::string& s = merges[i].get_ref<const std::string&>();
    const size_t sp = s.find(' ', 1);
    FTUNE_CHECK(sp != std::string::npos && sp + 1 < s.size(), meta.origin,
                ": tokenizer.ggml.merges[", i, "]: expected \"left right\", got \"",
                io::gguf_printable(s), "\"");
    FTUNE_CHECK(valid_utf8(s), meta.origin, ": tokenizer.ggml.merges[", i, "]: not valid UTF-8");
    out.push_back(json::array({s.substr(0, sp), s.substr(sp + 1)}));
  }
  return out;
}

// Merges for a SentencePiece-style vocabulary without stored merges, built as transformers'
// GGUFTokenizerSkeleton does: every split of a piece into two pieces of the vocabulary, ordered
// by the merged piece's score (ties: vocabulary order, then the parts' scores).
json merges_from_scores(const Vocab& v, const std::string& origin) {
  FTUNE_CHECK(!v.scores.empty(), origin,
              ": tokenizer.ggml.scores: needed to build merges for a \"llama\" vocabulary");
  std::unordered_map<std::string, double> score;  // later duplicates win, as in a Python dict
  std::unordered_map<std::string, size_t> order;
  for (size_t i = 0; i < v.tokens.size(); ++i) {
    score[v.tokens[i]] = v.scores[i];
    order.emplace(v.tokens[i], order.size());
  }
  struct Merge {
    std::string l, r;
    double score;
  };
  std::vector<std::pair<size_t, std::string>> pieces;  // dict iteration order: first insertion
  {
    std::set<std::string> seen;
    for (const auto& t : v.tokens) {
      if (seen.insert(t).second) pieces.emplace_back(pieces.size(), t);
    }
  }
  std::vector<Merge> merges;
  for (const auto& [idx, piece] : pieces) {
    std::vector<Merge> local;
    // Every split between two characters (tokens are valid UTF-8, checked in read_vocab).
    for (size_t k = tok::utf8_len(static_cast<unsigned char>(piece[0])); k < piece.size();
         k += tok::utf8_len(static_cast<unsigned char>(piece[k]))) {
      std::string l = piece.substr(0, k), r = piece.substr(k);
      if (score.count(l) && score.count(r)) local.push_back({std::move(l), std::move(r), score.at(piece)});
    }
    std::stable_sort(local.begin(), local.end(), [&](const Merge& a, const Merge& b) {
      const double al = score.at(a.l), bl = score.at(b.l);
      if (al != bl) return al > bl;
      return score.at(a.r) > score.at(b.r);
    });
    merges.insert(merges.end(), local.begin(), local.end());
  }
  std::stable_sort(merges.begin(), merges.end(),
                   [](const Merge& a, const Merge& b) { return a.score > b.score; });
  json out = json::array();
  for (const auto& m : merges) out.push_back(json::array({m.l, m.r}));
  return out;
}

json added_token(int64_t id, const std::string& content, bool special) {
  return {{"id", id},          {"content", content}, {"single_word", false}, {"lstrip", false},
          {"rstrip", false},   {"normalized", false}, {"special", special}};
}

// CONTROL tokens become special added tokens, matched literally before pre-tokenization.
// USER_DEFINED tokens stay plain vocabulary entries: llama.cpp matches them literally too, but
// transformers' GGUF loader (the reference this must reproduce) does not (docs/gguf.md).
json added_tokens(const Vocab& v) {
  json out = json::array();
  for (size_t i = 0; i < v.types.size(); ++i) {
    if (v.types[i] == kTokenControl) {
      out.push_back(added_token(static_cast<int64_t>(i), v.tokens[i], /*special=*/true));
    }
  }
  return out;
}

json byte_level(bool add_prefix_space, bool trim_offsets, bool use_regex) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", add_prefix_space},
          {"trim_offsets", trim_offsets}, {"use_regex", use_regex}};
}

// The HF pre-tokenizer for a "gpt2" vocabulary. transformers' GGUF loader (the reference for
// "tokenizes as HF does") uses GPT-2's byte-level regex whatever tokenizer.ggml.pre says, and so
// does this for every GPT-2-regex family. llama.cpp (llama-vocab.cpp) isolates each \p{N}
// character first for smollm/starcoder/...; on SmolLM2's vocabulary that changes ids only around
// non-ASCII numerals such as " ²" or " ٣" (docs/gguf.md). Llama 3's "llama-bpe" regex
// is too different to ignore (digit triples, case-insensitive contractions), so it is honoured.
json gpt2_pre_tokenizer(const std::string& pre, const std::string& origin) {
  static const std::set<std::string> kGpt2 = {"default", "gpt-2", "gpt2", "smollm", "starcoder",
                                              "refact", "command-r", "codeshell", "exaone",
                                              "minerva-7b"};
  static const std::set<std::string> kLlama3 = {"llama-bpe", "llama3", "llama-v3"};
  if (kGpt2.count(pre)) return byte_level(false, true, true);
  if (kLlama3.count(pre)) {
    const char* re =
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
        "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
    return {{"type", "Sequence"},
            {"pretokenizers",
             json::array({{{"type", "Split"},
                           {"pattern", {{"Regex", re}}},
                           {"behavior", "Isolated"},
                           {"invert", false}},
                          byte_level(false, true, false)})}};
  }
  fail(origin, ": tokenizer.ggml.pre: unsupported pre-tokenizer \"", io::gguf_printable(pre),
       "\" (supported: default, gpt-2, smollm, starcoder, refact, command-r, codeshell, exaone, "
       "minerva-7b, llama-bpe)");
}

// Post-processor adding BOS/EOS around a single sequence, or null when neither is added.
json template_post_processor(const json& bos, bool add_bos, const json& eos, bool add_eos,
                             const Vocab& v) {
  if (!(add_bos && bos.is_string()) && !(add_eos && eos.is_string())) return nullptr;
  json single = json::array(), pair = json::array(), specials = json::object();
  auto special = [&](const json& tok, int64_t type_id) {
    return json{{"SpecialToken", {{"id", tok}, {"type_id", type_id}}}};
  };
  auto seq = [](const char* id, int64_t type_id) {
    return json{{"Sequence", {{"id", id}, {"type_id", type_id}}}};
  };
  auto id_of = [&](const std::string& t) {
    return static_cast<int64_t>(std::find(v.tokens.begin(), v.tokens.end(), t) - v.tokens.begin());
  };
  if (add_bos && bos.is_string()) {
    single.push_back(special(bos, 0));
    specials[bos.get<std::string>()] = {{"id", bos}, {"ids", {id_of(bos)}}, {"tokens", {bos}}};
  }
  single.push_back(seq("A", 0));
  if (add_eos && eos.is_string()) {
    single.push_back(special(eos, 0));
    specials[eos.get<std::string>()] = {{"id", eos}, {"ids", {id_of(eos)}}, {"tokens", {eos}}};
  }
  pair = single;
  if (add_bos && bos.is_string()) pair.push_back(special(bos, 1));
  pair.push_back(seq("B", 1));
  if (add_eos && eos.is_string()) pair.push_back(special(eos, 1));
  return {{"type", "TemplateProcessing"}, {"single", single}, {"pair", pair},
          {"special_tokens", specials}};
}

const std::string kArch = "llama";

}  // namespace

at::Tensor unpermute_qk_rows(const at::Tensor& w, int64_t n_heads) {
  const int64_t rows = w.size(0);
  FTUNE_CHECK(n_heads > 0 && rows % (2 * n_heads) == 0, "unpermute_qk_rows: ", rows,
              " rows cannot be split into ", n_heads, " heads of (head_dim/2, 2)");
  std::vector<int64_t> shape = {n_heads, rows / n_heads / 2, 2};
  for (int64_t d = 1; d < w.dim(); ++d) shape.push_back(w.size(d));
  // llama.cpp: w.reshape(n_head, 2, hd/2, ...).swapaxes(1, 2); this is its inverse.
  return w.reshape(shape).transpose(1, 2).reshape(w.sizes()).contiguous();
}

LlamaConfig gguf_llama_config(const io::GgufFile& f) {
  const std::string& origin = f.origin();
  Meta meta{f.metadata(), origin};
  const std::string arch = meta.string("general.architecture");
  FTUNE_CHECK(arch == kArch, origin, ": general.architecture: expected \"llama\", got \"",
              io::gguf_printable(arch), "\"");
  LlamaConfig c;
  c.hidden_size = meta.positive("llama.embedding_length");
  c.num_hidden_layers = meta.positive("llama.block_count");
  c.intermediate_size = meta.positive("llama.feed_forward_length");
  c.num_attention_heads = meta.positive("llama.attention.head_count");
  c.num_key_value_heads = meta.has("llama.attention.head_count_kv")
                              ? meta.positive("llama.attention.head_count_kv")
                              : c.num_attention_heads;
  c.max_position_embeddings = meta.positive("llama.context_length");
  FTUNE_CHECK(c.num_attention_heads % c.num_key_value_heads == 0, origin,
              ": llama.attention.head_count_kv: ", c.num_key_value_heads,
              " does not divide llama.attention.head_count ", c.num_attention_heads);
  c.rms_norm_eps = meta.positive_number(f, "llama.attention.layer_norm_rms_epsilon");
  c.rope_theta = meta.has("llama.rope.freq_base") ? meta.positive_number(f, "llama.rope.freq_base")
                                                  : 10000.0;
  if (meta.has("llama.attention.key_length")) {
    c.head_dim = meta.positive("llama.attention.key_length");
    FTUNE_CHECK(!meta.has("llama.attention.value_length") ||
                    meta.positive("llama.attention.value_length") == c.head_dim,
                origin, ": llama.attention.value_length: expected ", c.head_dim,
                " (the key length); ftune needs equal key and value head sizes");
  }
  FTUNE_CHECK(c.head_dim > 0 || c.hidden_size % c.num_attention_heads == 0, origin,
              ": llama.embedding_length: ", c.hidden_size, " is not divisible by llama.attention.head_count ",
              c.num_attention_heads, " (and there is no llama.attention.key_length)");
  const int64_t head_dim = c.head_dim > 0 ? c.head_dim : c.hidden_size / c.num_attention_heads;
  FTUNE_CHECK(head_dim % 2 == 0, origin, ": ",
              c.head_dim > 0 ? "llama.attention.key_length" : "llama.embedding_length", ": head size ",
              head_dim, " is odd; RoPE needs an even head size");
  if (head_dim * c.num_attention_heads == c.hidden_size && c.head_dim == head_dim) c.head_dim = 0;
  if (meta.has("llama.rope.dimension_count")) {
    const int64_t rope_dim = meta.positive("llama.rope.dimension_count");
    FTUNE_CHECK(rope_dim == head_dim, origin, ": llama.rope.dimension_count: expected ", head_dim,
                " (the head size), got ", rope_dim, "; partial rotary embeddings are unsupported");
  }
  // RoPE scaling: llama.cpp writes linear scaling as metadata; Llama 3.1's frequency scaling
  // is baked into a rope_freqs tensor whose parameters cannot be recovered exactly.
  std::string scaling = meta.has("llama.rope.scaling.type") ? meta.string("llama.rope.scaling.type")
                                                            : "none";
  if (scaling == "linear") {
    RopeScaling s;
    s.rope_type = "linear";
    s.factor = meta.positive_number(f, "llama.rope.scaling.factor");
    c.rope_scaling = s;
  } else {
    FTUNE_CHECK(scaling == "none", origin, ": llama.rope.scaling.type: expected \"none\" or ",
                "\"linear\", got \"", io::gguf_printable(scaling), "\"");
  }
  FTUNE_CHECK(!f.contains("rope_freqs.weight"), origin,
              ": rope_freqs.weight: Llama 3.1-style RoPE frequency scaling is not supported");

  if (meta.has("llama.vocab_size")) {
    c.vocab_size = meta.positive("llama.vocab_size");
  } else if (meta.has("tokenizer.ggml.tokens")) {
    c.vocab_size = static_cast<int64_t>(meta.array("tokenizer.ggml.tokens").size());
  } else {
    FTUNE_CHECK(f.contains("token_embd.weight"), origin, ": token_embd.weight: missing tensor");
    c.vocab_size = f.tensor_info("token_embd.weight").shape().at(0);
  }
  c.tie_word_embeddings = !f.contains("output.weight");
  c.attention_bias = f.contains("blk.0.attn_q.bias");
  c.mlp_bias = f.contains("blk.0.ffn_up.bias");
  c.torch_dtype = "float32";
  if (meta.has("tokenizer.ggml.bos_token_id")) {
    c.bos_token_id = meta.integer("tokenizer.ggml.bos_token_id");
  }
  for (const char* key : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                          "tokenizer.ggml.eom_token_id"}) {
    if (!meta.has(key)) continue;
    const int64_t id = meta.integer(key);
    if (std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), id) == c.eos_token_ids.end())
      c.eos_token_ids.push_back(id);
  }
  if (meta.has("tokenizer.ggml.padding_token_id"))
    c.pad_token_id = meta.integer("tokenizer.ggml.padding_token_id");
  c.validate(origin);
  return c;
}

namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Every weight of a Llama model with config `c` under its GGUF name, in LlamaForCausalLM's
// parameter order, with its HF name and (PyTorch) shape.
std::vector<GgufTensorPlan> llama_tensors(const LlamaConfig& c) {
  const int64_t h = c.hidden_size, hd = c.dim_head(), q = c.num_attention_heads * hd,
                kv = c.num_key_value_heads * hd, ff = c.intermediate_size;
  std::vector<GgufTensorPlan> out;
  auto add = [&](const std::string& gguf, const std::string& hf, std::vector<int64_t> shape,
                 bool bias, int64_t heads = 0) {
    out.push_back({gguf + ".weight", hf + ".weight", shape, heads});
    if (bias) out.push_back({gguf + ".bias", hf + ".bias", {shape[0]}, heads});
  };
  add("token_embd", "model.embed_tokens", {c.vocab_size, h}, false);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string g = "blk." + std::to_string(i) + ".";
    const std::string p = "model.layers." + std::to_string(i) + ".";
    add(g + "attn_q", p + "self_attn.q_proj", {q, h}, c.attention_bias, c.num_attention_heads);
    add(g + "attn_k", p + "self_attn.k_proj", {kv, h}, c.attention_bias, c.num_key_value_heads);
    add(g + "attn_v", p + "self_attn.v_proj", {kv, h}, c.attention_bias);
    add(g + "attn_output", p + "self_attn.o_proj", {h, q}, c.attention_bias);
    add(g + "ffn_gate", p + "mlp.gate_proj", {ff, h}, c.mlp_bias);
    add(g + "ffn_up", p + "mlp.up_proj", {ff, h}, c.mlp_bias);
    add(g + "ffn_down", p + "mlp.down_proj", {h, ff}, c.mlp_bias);
    add(g + "attn_norm", p + "input_layernorm", {h}, false);
    add(g + "ffn_norm", p + "post_attention_layernorm", {h}, false);
  }
  add("output_norm", "model.norm", {h}, false);
  if (!c.tie_word_embeddings) add("output", "lm_head", {c.vocab_size, h}, false);
  return out;
}

bool is_integer_type(uint32_t type) {
  using io::GgmlType;
  const auto t = static_cast<GgmlType>(type);
  return t == GgmlType::I8 || t == GgmlType::I16 || t == GgmlType::I32 || t == GgmlType::I64;
}

}  // namespace

std::vector<GgufTensorPlan> gguf_tensor_plan(const io::GgufFile& f, const LlamaConfig& c) {
  const std::string& origin = f.origin();
  // llama.block_count bounds the list built below; every layer needs tensors in the file.
  FTUNE_CHECK(c.num_hidden_layers <= static_cast<int64_t>(f.tensors().size()), origin,
              ": llama.block_count: ", c.num_hidden_layers, " layers, but the file has only ",
              f.tensors().size(), " tensors");
  std::vector<GgufTensorPlan> plan = llama_tensors(c);
  std::set<std::string> expected;
  for (const GgufTensorPlan& t : plan) expected.insert(t.gguf_name);
  for (const io::GgufTensorInfo& t : f.tensors()) {
    FTUNE_CHECK(expected.count(t.name), origin, ": tensor '", io::gguf_printable(t.name),
                "': not part of a Llama model with these llama.* values (", c.num_hidden_layers,
                " layers, attention_bias ", c.attention_bias ? "true" : "false", ", mlp_bias ",
                c.mlp_bias ? "true" : "false", ")");
  }
  for (const GgufTensorPlan& p : plan) {
    FTUNE_CHECK(f.contains(p.gguf_name), origin, ": tensor '", p.gguf_name,
                "': missing (a Llama model with these llama.* values needs it)");
    const io::GgufTensorInfo& t = f.tensor_info(p.gguf_name);
    FTUNE_CHECK(t.shape() == p.shape, origin, ": tensor '", t.name, "': shape ", shape_str(t.shape()),
                " (ne reversed), expected ", shape_str(p.shape), " from the llama.* metadata");
    const io::GgmlTypeTraits* tr = io::ggml_type_traits(t.type);
    FTUNE_CHECK(tr->can_dequantize, origin, ": tensor '", t.name, "': ggml type ", tr->name, " (",
                t.type, ") cannot be dequantized by ftune");
    FTUNE_CHECK(!is_integer_type(t.type), origin, ": tensor '", t.name, "': integer ggml type ",
                tr->name, " for a float weight");
  }
  return plan;
}

at::Tensor gguf_import_tensor(const io::GgufFile& f, const GgufTensorPlan& t) {
  at::Tensor w = f.dequantize(t.gguf_name);  // [rows, cols] in PyTorch order
  return t.unpermute_heads > 0 ? unpermute_qk_rows(w, t.unpermute_heads) : w;
}

json gguf_tokenizer_json(const json& metadata, const std::string& origin) {
  Meta meta{metadata, origin};
  const std::string model = meta.string("tokenizer.ggml.model");
  const Vocab v = read_vocab(meta);
  json vocab = json::object();
  for (size_t i = 0; i < v.tokens.size(); ++i) {
    // HF builds {token: i}: for a duplicated token the last id wins, as here.
    vocab[v.tokens[i]] = static_cast<int64_t>(i);
  }
  const json bos = special_token(meta, v, "tokenizer.ggml.bos_token_id");
  const json eos = special_token(meta, v, "tokenizer.ggml.eos_token_id");
  const json unk = special_token(meta, v, "tokenizer.ggml.unknown_token_id");
  json tj = {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr},
             {"added_tokens", added_tokens(v)}};
  if (model == "gpt2") {
    const std::string pre = meta.has("tokenizer.ggml.pre") ? meta.string("tokenizer.ggml.pre")
                                                           : "default";
    tj["normalizer"] = nullptr;
    tj["pre_tokenizer"] = gpt2_pre_tokenizer(pre, origin);
    tj["post_processor"] = template_post_processor(
        bos, meta.boolean("tokenizer.ggml.add_bos_token", false), eos,
        meta.boolean("tokenizer.ggml.add_eos_token", false), v);
    if (tj["post_processor"].is_null()) tj["post_processor"] = byte_level(true, false, true);
    tj["decoder"] = byte_level(true, true, true);
    // Bytes missing from the vocabulary (invalid UTF-8 lead bytes, some control characters)
    // map to the unknown token, as in transformers' GGUF loader.
    tj["model"] = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", unk},
                   {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr},
                   {"fuse_unk", !unk.is_null()}, {"byte_fallback", false},
                   {"ignore_merges", false}, {"vocab", vocab},
                   {"merges", read_merges(meta)}};
  } else if (model == "llama") {
    const bool add_space_prefix = meta.boolean("tokenizer.ggml.add_space_prefix", true);
    json norm = json::array();
    if (add_space_prefix) norm.push_back({{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}});
    norm.push_back(
        {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}});
    tj["normalizer"] = {{"type", "Sequence"}, {"normalizers", norm}};
    tj["pre_tokenizer"] = nullptr;
    tj["post_processor"] = template_post_processor(
        bos, meta.boolean("tokenizer.ggml.add_bos_token", true), eos,
        meta.boolean("tokenizer.ggml.add_eos_token", false), v);
    json dec = json::array({{{"type", "Replace"}, {"pattern", {{"String", "\xE2\x96\x81"}}},
                             {"content", " "}},
                            {{"type", "ByteFallback"}},
                            {{"type", "Fuse"}}});
    if (add_space_prefix) {
      dec.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
    }
    tj["decoder"] = {{"type", "Sequence"}, {"decoders", dec}};
    tj["model"] = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", unk},
                   {"continuing_subword_prefix", nullptr}, {"end_of_word_suffix", nullptr},
                   {"fuse_unk", true}, {"byte_fallback", true}, {"ignore_merges", false},
                   {"vocab", vocab},
                   {"merges", meta.has("tokenizer.ggml.merges") ? read_merges(meta)
                                                               : merges_from_scores(v, origin)}};
  } else {
    fail(origin, ": tokenizer.ggml.model: expected \"gpt2\" (byte-level BPE) or \"llama\" ",
         "(SentencePiece), got \"", io::gguf_printable(model), "\"");
  }
  return tj;
}

json gguf_tokenizer_config(const json& metadata, const std::string& origin) {
  Meta meta{metadata, origin};
  const std::string model = meta.string("tokenizer.ggml.model");
  const Vocab v = read_vocab(meta);
  const bool spm = model == "llama";
  json added_decoder = json::object();
  for (const json& t : added_tokens(v)) {
    json entry = t;
    entry.erase("id");
    added_decoder[std::to_string(t.at("id").get<int64_t>())] = entry;
  }
  json cfg = {
      {"tokenizer_class", spm ? "LlamaTokenizerFast" : "PreTrainedTokenizerFast"},
      {"bos_token", special_token(meta, v, "tokenizer.ggml.bos_token_id")},
      {"eos_token", special_token(meta, v, "tokenizer.ggml.eos_token_id")},
      {"unk_token", special_token(meta, v, "tokenizer.ggml.unknown_token_id")},
      {"pad_token", special_token(meta, v, "tokenizer.ggml.padding_token_id")},
      {"add_bos_token", meta.boolean("tokenizer.ggml.add_bos_token", spm)},
      {"add_eos_token", meta.boolean("tokenizer.ggml.add_eos_token", false)},
      {"clean_up_tokenization_spaces", false},
      {"model_max_length",
       meta.has("llama.context_length") ? meta.integer("llama.context_length") : 1000000},
      {"added_tokens_decoder", added_decoder}};
  // legacy: the Llama-2 normalizer in tokenizer.json. No add_prefix_space key: with it
  // LlamaTokenizerFast rebuilds itself from a tokenizer.model that a GGUF import does not have.
  if (spm) cfg["legacy"] = true;
  if (meta.has("tokenizer.chat_template")) {
    cfg["chat_template"] = meta.string("tokenizer.chat_template");
    FTUNE_CHECK(valid_utf8(cfg["chat_template"].get<std::string>()), origin,
                ": tokenizer.chat_template: not valid UTF-8");
  }
  return cfg;
}

GgufImport import_gguf(const io::GgufFile& f) {
  GgufImport imp;
  imp.config = gguf_llama_config(f);
  imp.tensors = gguf_tensor_plan(f, imp.config);
  imp.tokenizer_json = gguf_tokenizer_json(f.metadata(), f.origin());
  imp.tokenizer_config = gguf_tokenizer_config(f.metadata(), f.origin());
  const int64_t n_tokens = static_cast<int64_t>(imp.tokenizer_json["model"]["vocab"].size());
  FTUNE_CHECK(n_tokens <= imp.config.vocab_size, f.origin(), ": tokenizer.ggml.tokens: ", n_tokens,
              " tokens exceed the model's vocab_size ", imp.config.vocab_size);
  imp.generation_config = imp.config.generation_config_json();
  return imp;
}

std::vector<std::string> gguf_import_files() {
  return {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"};
}

void write_gguf_import(const io::GgufFile& f, const GgufImport& imp, const fs::path& dir,
                       at::ScalarType dtype) {
  FTUNE_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, dir.string(),
              ": dtype: expected float32 or bfloat16");
  std::vector<io::TensorSpec> specs;
  for (const GgufTensorPlan& t : imp.tensors) specs.push_back({t.hf_name, dtype, t.shape});
  // One tensor alive at a time: dequantized (fp32), un-permuted, cast, written, dropped.
  io::save_weights_streamed(dir, specs, [&](size_t i) {
    return gguf_import_tensor(f, imp.tensors[i]).to(dtype);
  });
  LlamaConfig cfg = imp.config;
  cfg.torch_dtype = dtype_name(dtype);
  write_file_atomic(dir / "generation_config.json", imp.generation_config.dump(2) + "\n");
  write_file_atomic(dir / "tokenizer.json", imp.tokenizer_json.dump(2) + "\n");
  write_file_atomic(dir / "tokenizer_config.json", imp.tokenizer_config.dump(2) + "\n");
  // config.json last: a dir whose config.json is new has every other new file.
  write_file_atomic(dir / "config.json", cfg.to_json().dump(2) + "\n");
}

}  // namespace ftune::model

// Training data: JSONL datasets in three formats (text, alpaca, chat), tokenized into examples with
// per-token loss masks, then batched by packing (fixed-length rows of several documents, positions
// reset per document, block-diagonal attention) or by padding. Shuffling is a pure function of
// (seed, epoch), and a BatchStream's whole state is two integers, so resume is exact.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace ftune::data {

constexpr int64_t kIgnoreIndex = -100;  // label that takes no loss (= model::kIgnoreIndex)

enum class Format { kText, kAlpaca, kChat };
Format parse_format(const std::string& s, const std::string& origin);  // "text"|"alpaca"|"chat"

// One tokenized document. labels[i] == ids[i] where the loss applies, -100 elsewhere
// (alpaca/chat prompts). Unshifted, like HF `labels`.
struct Example {
  std::vector<int64_t> ids;
  std::vector<int64_t> labels;
};

// Reads a JSONL file. Each line must be a JSON object with the format's fields:
// text: "text"; alpaca: "instruction", optional "input", "output"; chat: "messages" =
// [{"role", "content"}, ...] rendered with the tokenizer's chat template, loss on assistant
// replies only. text/alpaca get bos (if the tokenizer has one and adds it) and eos appended.
// Errors: "<file>:<line>: <field>: <problem>"; an empty dataset is an error.
std::vector<Example> load_jsonl(const std::filesystem::path& path, Format format,
                                const tok::Tokenizer& tokenizer);

struct Batch {
  at::Tensor input_ids;  // [B, T] int64
  at::Tensor labels;     // [B, T] int64, -100 = no loss (prompt, padding, cross-document)
  at::Tensor positions;  // [B, T] int64, reset to 0 at each packed document
  at::Tensor attn_mask;  // [B, 1, T, T] bool (true = may attend): causal within a document
  // In every row, all target tokens lie in the first segment (one document from position 0; what
  // follows is padding or prompt-only text): plain causal attention then gives the same loss as
  // attn_mask, so the model may skip the mask. Always true when padding.
  bool causal = false;
  int64_t target_tokens = 0;  // count of labels[:, 1:] != -100: the targets the loss predicts
};

struct BatchOptions {
  int64_t seq_len = 512;
  bool packing = true;   // false: one example per row, right-padded to the longest row (<= seq_len)
  int64_t pad_id = 0;    // padding token id (labels are -100 there anyway)
  uint64_t seed = 0;
};

// How many target tokens (labels after the causal shift) a dataset gives once cut into rows.
struct TargetStats {
  int64_t examples = 0;
  int64_t targets = 0;          // target tokens per epoch (packing: before the <= 1 per row that
                                // a document cut at a row end loses)
  int64_t no_targets = 0;       // examples that give no target token at all, of which:
  int64_t cut_to_nothing = 0;   //   padding: every target lies beyond seq_len (a long prompt)
  int64_t truncated = 0;        // padding: examples longer than seq_len (tokens cut off)
};
TargetStats target_stats(const std::vector<Example>& examples, const BatchOptions& opts);

// Deterministic epoch-ordered stream of micro-batches over a dataset.
class BatchStream {
 public:
  BatchStream(std::vector<Example> examples, BatchOptions opts);
  // Next micro-batch of exactly `micro_batch` rows. When an epoch ends mid-batch, the remaining
  // rows come from the start of the next epoch (reshuffled), so every micro-batch has one shape.
  // Sharded (data parallelism): the stream advances by micro_batch * shards rows, the global
  // micro-batch, and this shard gets rows [shard * micro_batch, (shard + 1) * micro_batch) of
  // them. So every rank sees distinct rows, the union is what one process reading
  // micro_batch * shards rows gets, epoch/position stay global (a checkpoint resumes at any
  // world size with the same global batch), and an epoch whose rows do not divide evenly
  // continues into the next one instead of dropping or repeating rows.
  Batch next(int64_t micro_batch, int64_t shard = 0, int64_t shards = 1);
  int64_t epoch() const { return epoch_; }        // epoch of the next row (advances eagerly)
  int64_t position() const { return position_; }  // rows consumed in the current epoch
  int64_t rows_per_epoch() const { return rows_per_epoch_; }  // packed rows or examples
  void restore(int64_t epoch, int64_t position);  // resume exactly where a saved stream was
  // All rows of one pass in order, unshuffled (for evaluation); the last batch may be smaller.
  std::vector<Batch> all_batches(int64_t micro_batch) const;

 private:
  // Order of examples for one pass and where each starts in their concatenated token stream
  // (packing reads row r as tokens [r * seq_len, (r + 1) * seq_len) of that stream).
  struct Layout {
    std::vector<int64_t> order;    // example indices
    std::vector<int64_t> offsets;  // [n + 1] prefix sums of example lengths, in `order`
  };
  struct Row;  // one row's tokens before collation (defined in batching.cpp)
  Layout make_layout(std::vector<int64_t> order) const;
  Row make_row(const Layout& layout, int64_t r) const;
  Batch collate(const std::vector<Row>& rows) const;
  void build_epoch();  // layout_ = this epoch's shuffled order

  std::vector<Example> examples_;
  BatchOptions opts_;
  Layout layout_;
  int64_t rows_per_epoch_ = 0;
  int64_t epoch_ = 0;
  int64_t position_ = 0;
};

// Splits examples into (train, valid) with a seeded shuffle; valid gets round(fraction * n),
// at least 1 when fraction > 0 and n >= 2, at most n - 1; both keep the file order.
std::pair<std::vector<Example>, std::vector<Example>> split_validation(
    std::vector<Example> examples, double fraction, uint64_t seed);

}  // namespace ftune::data

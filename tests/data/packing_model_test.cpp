// Packed batches through a real (small, random) LlamaForCausalLM: each document's logits and loss
// in a packed row equal those of the document run alone, the summed loss and target count equal
// the per-document ones, and perturbing one document's tokens leaves every other document's
// logits unchanged (so no token attends across a boundary). fp32, tolerance 1e-5.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <random>

#include "data/dataset.h"
#include "model/llama.h"
#include "model/loss.h"

namespace ftune::data {
namespace {

constexpr int64_t kVocab = 64, kPad = 0;

model::LlamaForCausalLM tiny_model() {
  model::LlamaConfig c;
  c.vocab_size = kVocab;
  c.hidden_size = 32;
  c.intermediate_size = 64;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  model::LlamaForCausalLM m(c);
  model::init_weights(m, 11);
  // transformers' std 0.02 leaves logits nearly uniform; larger weights make every op matter.
  torch::NoGradGuard no_grad;
  for (auto& p : m->named_parameters()) {
    if (p.key().find("norm") == std::string::npos) p.value().mul_(8.0);
  }
  m->eval();
  return m;
}

std::vector<Example> random_docs(const std::vector<int64_t>& lens, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Example> out;
  for (size_t i = 0; i < lens.size(); ++i) {
    Example ex;
    for (int64_t t = 0; t < lens[i]; ++t) {
      ex.ids.push_back(1 + static_cast<int64_t>(rng() % (kVocab - 1)));
      // Every third document has a 3-token prompt without loss.
      ex.labels.push_back(i % 3 == 1 && t < 3 ? kIgnoreIndex : ex.ids.back());
    }
    out.push_back(ex);
  }
  return out;
}

struct Segment {
  int64_t row, begin, end;
};

// Segments of a batch, from its positions: a segment is a run of consecutive positions. Each
// padding token (position 0, id kPad, which the random documents never use) is its own segment.
std::vector<Segment> segments(const Batch& b) {
  std::vector<Segment> out;
  for (int64_t r = 0; r < b.input_ids.size(0); ++r) {
    auto pos = b.positions[r];
    const int64_t T = b.input_ids.size(1);
    int64_t t = 0;
    while (t < T) {
      int64_t e = t + 1;
      while (e < T && pos[e].item<int64_t>() == pos[e - 1].item<int64_t>() + 1) ++e;
      out.push_back({r, t, e});
      t = e;
    }
  }
  return out;
}

at::Tensor forward(model::LlamaForCausalLM& m, const Batch& b) {
  torch::NoGradGuard no_grad;
  return m->forward(b.input_ids, {.positions = b.positions, .attn_mask = b.attn_mask});
}

void check_against_documents_alone(model::LlamaForCausalLM& m, const Batch& b) {
  torch::NoGradGuard no_grad;
  at::Tensor logits = forward(m, b);  // [B, T, V]
  ASSERT_TRUE(logits.isfinite().all().item<bool>()) << "padding rows must not produce NaN";
  model::LossSum packed = model::causal_lm_loss_sum(logits, b.labels);
  EXPECT_EQ(packed.count, b.target_tokens);
  double alone_sum = 0;
  int64_t alone_count = 0, checked = 0;
  for (const Segment& s : segments(b)) {
    at::Tensor ids = b.input_ids[s.row].slice(0, s.begin, s.end);
    if (ids[0].item<int64_t>() == kPad) {
      EXPECT_EQ(s.end - s.begin, 1);
      EXPECT_EQ(b.labels[s.row][s.begin].item<int64_t>(), kIgnoreIndex);
      continue;
    }
    at::Tensor alone = m->forward(ids.unsqueeze(0));  // default positions and causal mask
    at::Tensor in_row = logits[s.row].slice(0, s.begin, s.end).unsqueeze(0);
    EXPECT_TRUE(at::allclose(in_row, alone, 1e-5, 1e-5))
        << "row " << s.row << " [" << s.begin << ", " << s.end << ") max diff "
        << (in_row - alone).abs().max().item<double>();
    model::LossSum l = model::causal_lm_loss_sum(
        alone, b.labels[s.row].slice(0, s.begin, s.end).unsqueeze(0));
    alone_sum += l.sum.item<double>();
    alone_count += l.count;
    ++checked;
  }
  EXPECT_GT(checked, 0);
  EXPECT_EQ(packed.count, alone_count);
  EXPECT_NEAR(packed.sum.item<double>(), alone_sum, 1e-5 * std::max(1.0, std::abs(alone_sum)));
}

TEST(PackingModel, PerDocumentLossEqualsEachDocumentAlone) {
  auto m = tiny_model();
  // 7 + 12 + 3 + 20 + 5 + 9 + 1 + 4 = 61 tokens in rows of 16: documents split across rows,
  // a 1-token document, and a padded last row.
  auto docs = random_docs({7, 12, 3, 20, 5, 9, 1, 4}, 1);
  BatchStream packed(docs, {.seq_len = 16, .packing = true, .pad_id = kPad, .seed = 2});
  for (int i = 0; i < 3; ++i) check_against_documents_alone(m, packed.next(2));
  for (const Batch& b : packed.all_batches(4)) check_against_documents_alone(m, b);
  BatchStream padded(docs, {.seq_len = 16, .packing = false, .pad_id = kPad, .seed = 2});
  for (int i = 0; i < 3; ++i) check_against_documents_alone(m, padded.next(3));
}

TEST(PackingModel, WholeDocumentsInOneRowMatchRunningThemAlone) {
  // Rows long enough that nothing is split: the packed loss is exactly the sum of the documents'
  // own losses (HF semantics, labels unshifted), and the target count matches.
  auto m = tiny_model();
  auto docs = random_docs({6, 10, 4, 9}, 3);
  BatchStream s(docs, {.seq_len = 29, .packing = true, .pad_id = kPad, .seed = 4});
  ASSERT_EQ(s.rows_per_epoch(), 1);
  Batch b = s.next(1);
  torch::NoGradGuard no_grad;
  model::LossSum packed = model::causal_lm_loss_sum(forward(m, b), b.labels);
  double sum = 0;
  int64_t count = 0;
  for (const Example& ex : docs) {
    at::Tensor ids = at::tensor(ex.ids).unsqueeze(0);
    model::LossSum l = model::causal_lm_loss_sum(m->forward(ids), at::tensor(ex.labels).unsqueeze(0));
    sum += l.sum.item<double>();
    count += l.count;
  }
  EXPECT_EQ(packed.count, count);
  EXPECT_EQ(b.target_tokens, count);
  EXPECT_NEAR(packed.sum.item<double>(), sum, 1e-5 * sum);
}

TEST(PackingModel, NoAttentionAcrossDocumentBoundaries) {
  auto m = tiny_model();
  auto docs = random_docs({5, 6, 7}, 5);  // one row of 18 tokens, 2 of padding
  BatchStream s(docs, {.seq_len = 20, .packing = true, .pad_id = kPad, .seed = 6});
  Batch b = s.next(1);
  auto segs = segments(b);
  at::Tensor base = forward(m, b);
  for (int target = 0; target < 3; ++target) {
    const Segment& victim = segs[target];
    Batch p = b;
    p.input_ids = b.input_ids.clone();
    // Change every token of one document (ids stay in range).
    p.input_ids[0].slice(0, victim.begin, victim.end).add_(7).remainder_(kVocab - 1).add_(1);
    ASSERT_FALSE(at::equal(p.input_ids, b.input_ids));
    at::Tensor out = forward(m, p);
    for (int other = 0; other < 3; ++other) {
      const Segment& o = segs[other];
      at::Tensor diff = (out[0].slice(0, o.begin, o.end) - base[0].slice(0, o.begin, o.end)).abs().max();
      if (other == target) {
        EXPECT_GT(diff.item<double>(), 1e-3) << "the perturbation changes its own document";
      } else {
        EXPECT_LE(diff.item<double>(), 1e-6) << "document " << other << " saw document " << target;
      }
    }
  }
}

}  // namespace
}  // namespace ftune::data

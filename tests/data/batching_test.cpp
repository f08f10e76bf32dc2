// Tests for batching: packed rows (segment boundaries, positions, block-diagonal mask, labels at
// segment starts, padding of the last row, target counts), padding mode, the seeded shuffle, exact
// restore, and split_validation. Expectations are derived here from the examples themselves.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>

#include "core/error.h"
#include "data/dataset.h"

namespace ftune::data {
namespace {

constexpr int64_t kPad = 999;

// Example i has ids 1000 * (i + 1) + t, so every token names its document and offset; its first
// `prompt` labels are ignored.
Example doc(int64_t i, int64_t len, int64_t prompt = 0) {
  Example ex;
  for (int64_t t = 0; t < len; ++t) {
    ex.ids.push_back(1000 * (i + 1) + t);
    ex.labels.push_back(t < prompt ? kIgnoreIndex : 1000 * (i + 1) + t);
  }
  return ex;
}
int64_t doc_of(int64_t id) { return id / 1000 - 1; }
int64_t offset_of(int64_t id) { return id % 1000; }

std::vector<int64_t> row_vec(const at::Tensor& t, int64_t b) {
  at::Tensor r = t[b].contiguous();
  return std::vector<int64_t>(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
}

// The mask a packed/padded row must have, from first principles: token i may attend to j iff
// j <= i and both belong to the same segment (a segment starts where position == 0 or the
// document changes); a padding token attends only to itself.
at::Tensor expected_mask(const std::vector<int64_t>& ids, const std::vector<int64_t>& pos) {
  const auto T = static_cast<int64_t>(ids.size());
  std::vector<int64_t> seg(T);
  int64_t s = -1;
  for (int64_t t = 0; t < T; ++t) {
    if (ids[t] == kPad) {
      seg[t] = -1 - t;  // unique: attends only to itself
      continue;
    }
    if (t == 0 || pos[t] == 0 || ids[t - 1] == kPad || doc_of(ids[t]) != doc_of(ids[t - 1])) ++s;
    seg[t] = s;
  }
  at::Tensor m = at::zeros({T, T}, at::kBool);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j <= i; ++j) m[i][j] = seg[i] == seg[j];
  return m;
}

int64_t count_targets(const at::Tensor& labels) {
  int64_t n = 0;
  auto acc = labels.accessor<int64_t, 2>();
  for (int64_t b = 0; b < labels.size(0); ++b)
    for (int64_t t = 1; t < labels.size(1); ++t) n += acc[b][t] != kIgnoreIndex;
  return n;
}

TEST(Packing, HandCheckedLayout) {
  // Lengths 5, 3, 10, 2 = 20 tokens, seq_len 8, unshuffled (all_batches):
  // row 0: d0[0:5] d1[0:3] | row 1: d2[0:8] | row 2: d2[8:10] d3[0:2] pad pad pad pad
  std::vector<Example> ex = {doc(0, 5, 2), doc(1, 3), doc(2, 10), doc(3, 2)};
  BatchStream s(ex, {.seq_len = 8, .packing = true, .pad_id = kPad, .seed = 1});
  EXPECT_EQ(s.rows_per_epoch(), 3);
  auto batches = s.all_batches(8);
  ASSERT_EQ(batches.size(), 1u);
  const Batch& b = batches[0];
  ASSERT_EQ(b.input_ids.sizes(), (at::IntArrayRef{3, 8}));
  ASSERT_EQ(b.attn_mask.sizes(), (at::IntArrayRef{3, 1, 8, 8}));
  EXPECT_EQ(b.attn_mask.scalar_type(), at::kBool);
  const int64_t I = kIgnoreIndex;
  EXPECT_EQ(row_vec(b.input_ids, 0),
            (std::vector<int64_t>{1000, 1001, 1002, 1003, 1004, 2000, 2001, 2002}));
  EXPECT_EQ(row_vec(b.positions, 0), (std::vector<int64_t>{0, 1, 2, 3, 4, 0, 1, 2}));
  // d0's prompt (2 tokens) and each segment's first token are not targets.
  EXPECT_EQ(row_vec(b.labels, 0), (std::vector<int64_t>{I, I, 1002, 1003, 1004, I, 2001, 2002}));
  EXPECT_EQ(row_vec(b.input_ids, 1),
            (std::vector<int64_t>{3000, 3001, 3002, 3003, 3004, 3005, 3006, 3007}));
  EXPECT_EQ(row_vec(b.positions, 1), (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(row_vec(b.input_ids, 2),
            (std::vector<int64_t>{3008, 3009, 4000, 4001, kPad, kPad, kPad, kPad}));
  // The continuation of d2 is a new segment: positions restart at 0.
  EXPECT_EQ(row_vec(b.positions, 2), (std::vector<int64_t>{0, 1, 0, 1, 0, 0, 0, 0}));
  EXPECT_EQ(row_vec(b.labels, 2), (std::vector<int64_t>{I, 3009, I, 4001, I, I, I, I}));
  for (int64_t r = 0; r < 3; ++r) {
    EXPECT_TRUE(at::equal(b.attn_mask[r][0], expected_mask(row_vec(b.input_ids, r),
                                                           row_vec(b.positions, r))))
        << "row " << r;
  }
  // Targets: row 0: 3 + 2, row 1: 7, row 2: 1 + 1.
  EXPECT_EQ(b.target_tokens, 14);
  EXPECT_EQ(b.target_tokens, count_targets(b.labels));
  // Every mask row lets its token attend to something (a fully masked row gives NaN).
  EXPECT_TRUE(b.attn_mask.any(-1).all().item<bool>());
}

TEST(Packing, RandomDocumentsRoundTrip) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t n = 1 + rng() % 12, T = 2 + rng() % 17;
    std::vector<Example> ex;
    int64_t total = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t len = 1 + rng() % 30;
      ex.push_back(doc(i, len, rng() % (len + 1)));
      total += len;
    }
    BatchStream s(ex, {.seq_len = T, .packing = true, .pad_id = kPad, .seed = static_cast<uint64_t>(trial)});
    ASSERT_EQ(s.rows_per_epoch(), (total + T - 1) / T);
    Batch b = s.next(s.rows_per_epoch());  // exactly one epoch
    ASSERT_EQ(s.epoch(), 1);
    ASSERT_EQ(b.input_ids.size(1), T);
    // Reading the rows in order gives back each document whole, once, in some order; labels
    // equal the document's except at segment starts.
    std::map<int64_t, int64_t> next_offset;
    int64_t prev_doc = -1, targets = 0;
    std::set<int64_t> finished;
    for (int64_t r = 0; r < b.input_ids.size(0); ++r) {
      auto ids = row_vec(b.input_ids, r), pos = row_vec(b.positions, r),
           labels = row_vec(b.labels, r);
      for (int64_t t = 0; t < T; ++t) {
        if (ids[t] == kPad) {
          EXPECT_EQ(labels[t], kIgnoreIndex);
          EXPECT_EQ(r, b.input_ids.size(0) - 1) << "padding only in the last row";
          continue;
        }
        const int64_t d = doc_of(ids[t]), off = offset_of(ids[t]);
        ASSERT_EQ(off, next_offset[d]) << "document tokens in order, nothing skipped";
        next_offset[d] = off + 1;
        if (d != prev_doc) {
          ASSERT_EQ(off, 0);
          ASSERT_TRUE(prev_doc < 0 || next_offset[prev_doc] == int64_t(ex[prev_doc].ids.size()));
          prev_doc = d;
        }
        const bool seg_start = t == 0 || doc_of(ids[t - 1]) != d;
        EXPECT_EQ(pos[t], seg_start ? 0 : pos[t - 1] + 1);
        EXPECT_EQ(labels[t], seg_start ? kIgnoreIndex : ex[d].labels[off]);
        if (t > 0 && labels[t] != kIgnoreIndex) ++targets;
      }
      EXPECT_TRUE(at::equal(b.attn_mask[r][0], expected_mask(ids, pos)));
    }
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(next_offset[i], int64_t(ex[i].ids.size()));
    EXPECT_EQ(b.target_tokens, targets);
  }
}

TEST(Padding, OneExamplePerRowTruncatedAndPadded) {
  std::vector<Example> ex = {doc(0, 3, 2), doc(1, 6), doc(2, 12)};
  BatchStream s(ex, {.seq_len = 8, .packing = false, .pad_id = kPad, .seed = 3});
  EXPECT_EQ(s.rows_per_epoch(), 3);
  auto batches = s.all_batches(2);
  ASSERT_EQ(batches.size(), 2u);
  const int64_t I = kIgnoreIndex;
  // First micro-batch: padded to its longest row (6), not to seq_len.
  const Batch& a = batches[0];
  ASSERT_EQ(a.input_ids.sizes(), (at::IntArrayRef{2, 6}));
  EXPECT_EQ(row_vec(a.input_ids, 0), (std::vector<int64_t>{1000, 1001, 1002, kPad, kPad, kPad}));
  EXPECT_EQ(row_vec(a.labels, 0), (std::vector<int64_t>{I, I, 1002, I, I, I}));
  EXPECT_EQ(row_vec(a.positions, 0).at(2), 2);
  EXPECT_EQ(row_vec(a.labels, 1), (std::vector<int64_t>{I, 2001, 2002, 2003, 2004, 2005}));
  EXPECT_EQ(a.target_tokens, 1 + 5);
  for (int64_t r = 0; r < 2; ++r) {
    EXPECT_TRUE(at::equal(a.attn_mask[r][0],
                          expected_mask(row_vec(a.input_ids, r), row_vec(a.positions, r))));
  }
  // Second: the 12-token example is truncated to seq_len.
  const Batch& c = batches[1];
  ASSERT_EQ(c.input_ids.sizes(), (at::IntArrayRef{1, 8}));
  EXPECT_EQ(row_vec(c.positions, 0), (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(row_vec(c.input_ids, 0).back(), 3007);
  EXPECT_EQ(c.target_tokens, 7);
  EXPECT_TRUE(at::equal(c.attn_mask[0][0], at::ones({8, 8}, at::kBool).tril()));
}

// The sequence of example ids (first token of each row) a stream yields in padding mode.
std::vector<int64_t> firsts(const Batch& b) {
  std::vector<int64_t> out;
  for (int64_t r = 0; r < b.input_ids.size(0); ++r) out.push_back(doc_of(b.input_ids[r][0].item<int64_t>()));
  return out;
}

std::vector<Example> docs(int64_t n) {
  std::vector<Example> ex;
  for (int64_t i = 0; i < n; ++i) ex.push_back(doc(i, 1 + (i * 7) % 11));
  return ex;
}

// Batch::causal (the model may drop the mask) must hold exactly when plain causal attention gives
// every position that predicts a target the same row of attn_mask.
TEST(Causal, FlagIffCausalAttentionMatchesTheMaskAtEveryTarget) {
  std::mt19937_64 rng(5);
  int64_t seen[2] = {0, 0};
  for (bool packing : {true, false}) {
    for (int trial = 0; trial < 40; ++trial) {
      std::vector<Example> ex;
      const int64_t n = 1 + static_cast<int64_t>(rng() % 4);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t len = 1 + static_cast<int64_t>(rng() % 14);
        // Some documents are all prompt: they carry no target.
        ex.push_back(doc(i, len, rng() % 3 == 0 ? len : static_cast<int64_t>(rng() % len)));
      }
      BatchStream s(ex, {.seq_len = 12, .packing = packing, .pad_id = kPad, .seed = 1});
      for (const Batch& b : s.all_batches(2)) {
        const int64_t T = b.input_ids.size(1);
        const at::Tensor tril = at::ones({T, T}, at::kBool).tril();
        bool same = true;
        for (int64_t r = 0; r < b.input_ids.size(0); ++r) {
          const std::vector<int64_t> labels = row_vec(b.labels, r);
          for (int64_t t = 0; t + 1 < T; ++t) {
            if (labels[t + 1] != kIgnoreIndex) same &= at::equal(b.attn_mask[r][0][t], tril[t]);
          }
        }
        EXPECT_EQ(b.causal, same);
        if (!packing) EXPECT_TRUE(b.causal);
        ++seen[b.causal];
      }
    }
  }
  EXPECT_GT(seen[0], 0);
  EXPECT_GT(seen[1], 0);
}

TEST(Shuffle, EveryEpochIsADeterministicPermutation) {
  const int64_t n = 20;
  BatchStream a(docs(n), {.seq_len = 16, .packing = false, .pad_id = kPad, .seed = 42});
  BatchStream b(docs(n), {.seq_len = 16, .packing = false, .pad_id = kPad, .seed = 42});
  BatchStream c(docs(n), {.seq_len = 16, .packing = false, .pad_id = kPad, .seed = 43});
  std::vector<int64_t> identity(n);
  std::iota(identity.begin(), identity.end(), 0);
  std::vector<std::vector<int64_t>> epochs;
  for (int e = 0; e < 3; ++e) {
    auto oa = firsts(a.next(n)), ob = firsts(b.next(n)), oc = firsts(c.next(n));
    EXPECT_EQ(oa, ob) << "same seed, same order";
    EXPECT_NE(oa, oc) << "another seed, another order";
    EXPECT_NE(oa, identity) << "epoch " << e << " is shuffled too";
    auto sorted = oa;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(sorted, identity) << "each example exactly once per epoch";
    epochs.push_back(oa);
  }
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_NE(epochs[1], epochs[2]);
  EXPECT_EQ(a.epoch(), 3);
  EXPECT_EQ(a.position(), 0);
}

void expect_same(const Batch& x, const Batch& y) {
  EXPECT_TRUE(at::equal(x.input_ids, y.input_ids));
  EXPECT_TRUE(at::equal(x.labels, y.labels));
  EXPECT_TRUE(at::equal(x.positions, y.positions));
  EXPECT_TRUE(at::equal(x.attn_mask, y.attn_mask));
  EXPECT_EQ(x.target_tokens, y.target_tokens);
}

TEST(Shuffle, RestoreReproducesTheUninterruptedStream) {
  for (bool packing : {true, false}) {
    BatchOptions opts{.seq_len = 8, .packing = packing, .pad_id = kPad, .seed = 5};
    BatchStream full(docs(13), opts);
    const int64_t mb = 3;  // does not divide rows_per_epoch: batches straddle epochs
    ASSERT_NE(full.rows_per_epoch() % mb, 0) << packing;
    std::vector<Batch> ref;
    std::vector<std::pair<int64_t, int64_t>> states;
    for (int i = 0; i < 12; ++i) {
      states.emplace_back(full.epoch(), full.position());
      ref.push_back(full.next(mb));
    }
    EXPECT_GE(full.epoch(), 2);
    for (int k : {0, 1, 4, 7, 11}) {
      BatchStream resumed(docs(13), opts);
      resumed.restore(states[k].first, states[k].second);
      for (int i = k; i < 12; ++i) expect_same(resumed.next(mb), ref[i]);
      EXPECT_EQ(resumed.epoch(), full.epoch());
      EXPECT_EQ(resumed.position(), full.position());
    }
  }
}

TEST(Shuffle, BadArgumentsAreErrors) {
  BatchStream s(docs(4), {.seq_len = 8, .packing = false, .pad_id = kPad, .seed = 0});
  EXPECT_THROW(s.restore(0, 4), Error);
  EXPECT_THROW(s.restore(-1, 0), Error);
  EXPECT_THROW(s.next(0), Error);
  EXPECT_THROW(BatchStream({}, {}), Error);
  EXPECT_THROW(BatchStream(docs(2), {.seq_len = 1}), Error);
  Example bad = doc(0, 3);
  bad.labels.pop_back();
  EXPECT_THROW(BatchStream({bad}, {}), Error);
}

TEST(SplitValidation, SizesDisjointAndDeterministic) {
  auto ids_of = [](const std::vector<Example>& v) {
    std::vector<int64_t> out;
    for (const Example& e : v) out.push_back(doc_of(e.ids[0]));
    return out;
  };
  auto [train, valid] = split_validation(docs(50), 0.1, 9);
  EXPECT_EQ(valid.size(), 5u);
  EXPECT_EQ(train.size(), 45u);
  auto t = ids_of(train), v = ids_of(valid);
  EXPECT_TRUE(std::is_sorted(t.begin(), t.end()));
  EXPECT_TRUE(std::is_sorted(v.begin(), v.end()));
  std::set<int64_t> all(t.begin(), t.end());
  all.insert(v.begin(), v.end());
  EXPECT_EQ(all.size(), 50u);
  EXPECT_EQ(ids_of(split_validation(docs(50), 0.1, 9).second), v);
  EXPECT_NE(ids_of(split_validation(docs(50), 0.1, 10).second), v);
  EXPECT_NE(v, (std::vector<int64_t>{0, 1, 2, 3, 4})) << "not just the first lines";

  EXPECT_EQ(split_validation(docs(10), 0.01, 1).second.size(), 1u);  // at least 1
  EXPECT_EQ(split_validation(docs(10), 0.0, 1).second.size(), 0u);
  EXPECT_EQ(split_validation(docs(2), 0.9, 1).first.size(), 1u);      // keeps one for training
  EXPECT_THROW(split_validation(docs(10), 1.0, 1), Error);
  EXPECT_THROW(split_validation(docs(10), -0.1, 1), Error);
}

TEST(TargetStats, CountsExamplesThatTrainNothing) {
  // Prompt lengths chosen so that: 0 keeps 3 targets; 1 has its targets only beyond seq_len;
  // 2 has none at all; 3 is truncated but keeps 5 (positions 3..7).
  const std::vector<Example> ex = {doc(0, 5, 2), doc(1, 12, 10), doc(2, 4, 4), doc(3, 10, 3)};
  BatchOptions o;
  o.seq_len = 8;
  o.packing = false;
  o.pad_id = kPad;
  TargetStats st = target_stats(ex, o);
  EXPECT_EQ(st.examples, 4);
  EXPECT_EQ(st.targets, 8);
  EXPECT_EQ(st.no_targets, 2);
  EXPECT_EQ(st.cut_to_nothing, 1);
  EXPECT_EQ(st.truncated, 2);
  // The oracle: the targets the batches really carry.
  int64_t in_batches = 0;
  for (const Batch& b : BatchStream(ex, o).all_batches(3)) in_batches += b.target_tokens;
  EXPECT_EQ(in_batches, st.targets);

  // Packing cuts nothing: every target after a document's first token counts, less at most one
  // per row where a document continues.
  o.packing = true;
  st = target_stats(ex, o);
  EXPECT_EQ(st.targets, 3 + 2 + 0 + 7);
  EXPECT_EQ(st.no_targets, 1);
  EXPECT_EQ(st.cut_to_nothing, 0);
  EXPECT_EQ(st.truncated, 0);
  in_batches = 0;
  BatchStream packed(ex, o);
  for (const Batch& b : packed.all_batches(1)) in_batches += b.target_tokens;
  EXPECT_LE(in_batches, st.targets);
  EXPECT_GE(in_batches, st.targets - packed.rows_per_epoch());

  // Only prompts: nothing to train on.
  st = target_stats({doc(0, 6, 6), doc(1, 3, 3)}, o);
  EXPECT_EQ(st.targets, 0);
  EXPECT_EQ(st.no_targets, 2);
}

}  // namespace
}  // namespace ftune::data

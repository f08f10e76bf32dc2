// Batching: a deterministic shuffle per (seed, epoch), then packing or padding into tensors.
// Packing reads the shuffled examples as one token stream cut into rows of exactly seq_len, so
// no space is wasted and the row count is the same every epoch; a document cut at a row end
// continues as a new segment (positions from 0) in the next row. Rows are built on demand from
// (order, offsets), so the stream's state is just (epoch, position) and resume is exact.
// The shuffle is our own splitmix64 + Fisher-Yates: std::shuffle's result differs between
// standard libraries, which would make runs irreproducible across toolchains.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "data/dataset.h"

namespace ftune::data {
namespace {

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A permutation of 0..n-1 that depends only on (seed, stream).
std::vector<int64_t> permutation(int64_t n, uint64_t seed, uint64_t stream) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  uint64_t mix = seed;
  uint64_t state = splitmix64(mix) ^ (stream * 0xD1B54A32D192ED03ull);
  for (int64_t i = n - 1; i > 0; --i) {
    // Lemire's multiply-shift: bias below (i + 1) / 2^64, far beyond anything observable here.
    const auto bound = static_cast<unsigned __int128>(i + 1);
    const auto j = static_cast<int64_t>((static_cast<unsigned __int128>(splitmix64(state)) * bound) >> 64);
    std::swap(p[static_cast<size_t>(i)], p[static_cast<size_t>(j)]);
  }
  return p;
}

constexpr uint64_t kSplitStream = 0xFFFFFFFFull;  // epochs use streams 0, 1, 2, ...

}  // namespace

// One row before collation. seg gives each token its attention block: a token attends to the
// earlier tokens with the same seg value. Every padding token gets a seg of its own, so it
// attends only to itself (a fully masked row would make softmax produce NaN).
struct BatchStream::Row {
  std::vector<int64_t> ids, labels, positions, seg;
};

BatchStream::BatchStream(std::vector<Example> examples, BatchOptions opts)
    : examples_(std::move(examples)), opts_(opts) {
  FTUNE_CHECK(!examples_.empty(), "data: no examples");
  FTUNE_CHECK(opts_.seq_len >= 2, "data.seq_len: must be at least 2, got ", opts_.seq_len);
  for (const Example& ex : examples_) {
    FTUNE_CHECK(!ex.ids.empty() && ex.ids.size() == ex.labels.size(),
                "data: every example needs as many labels as ids, and at least one token");
  }
  if (opts_.packing) {
    int64_t total = 0;
    for (const Example& ex : examples_) total += static_cast<int64_t>(ex.ids.size());
    rows_per_epoch_ = (total + opts_.seq_len - 1) / opts_.seq_len;
  } else {
    rows_per_epoch_ = static_cast<int64_t>(examples_.size());
  }
  build_epoch();
}

BatchStream::Layout BatchStream::make_layout(std::vector<int64_t> order) const {
  Layout layout;
  layout.offsets.reserve(order.size() + 1);
  layout.offsets.push_back(0);
  for (int64_t i : order) {
    layout.offsets.push_back(layout.offsets.back() +
                             static_cast<int64_t>(examples_[static_cast<size_t>(i)].ids.size()));
  }
  layout.order = std::move(order);
  return layout;
}

void BatchStream::build_epoch() {
  layout_ = make_layout(
      permutation(static_cast<int64_t>(examples_.size()), opts_.seed, static_cast<uint64_t>(epoch_)));
}

BatchStream::Row BatchStream::make_row(const Layout& layout, int64_t r) const {
  const int64_t T = opts_.seq_len;
  Row row;
  int64_t seg = 0;
  auto add_segment = [&](const Example& ex, int64_t begin, int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
      const auto k = static_cast<size_t>(begin + i);
      row.ids.push_back(ex.ids[k]);
      // The first token of a segment is never predicted: the logits before it belong to another
      // segment (or there are none at the row start).
      row.labels.push_back(i == 0 ? kIgnoreIndex : ex.labels[k]);
      row.positions.push_back(i);
      row.seg.push_back(seg);
    }
    ++seg;
  };
  if (!opts_.packing) {
    const Example& ex = examples_[static_cast<size_t>(layout.order[static_cast<size_t>(r)])];
    add_segment(ex, 0, std::min<int64_t>(static_cast<int64_t>(ex.ids.size()), T));
    return row;
  }
  const std::vector<int64_t>& off = layout.offsets;
  const int64_t begin = r * T;
  const int64_t end = std::min(begin + T, off.back());
  // Last document starting at or before `begin` (upper_bound skips empty ones).
  auto k = static_cast<size_t>(std::upper_bound(off.begin(), off.end(), begin) - off.begin() - 1);
  for (int64_t s = begin; s < end; ++k) {
    const Example& ex = examples_[static_cast<size_t>(layout.order[k])];
    const int64_t take = std::min(off[k + 1], end) - s;
    add_segment(ex, s - off[k], take);
    s += take;
  }
  while (static_cast<int64_t>(row.ids.size()) < T) {
    row.ids.push_back(opts_.pad_id);
    row.labels.push_back(kIgnoreIndex);
    row.positions.push_back(0);
    row.seg.push_back(seg++);
  }
  return row;
}

Batch BatchStream::collate(const std::vector<Row>& rows) const {
  const auto B = static_cast<int64_t>(rows.size());
  int64_t T = 0;
  for (const Row& row : rows) T = std::max<int64_t>(T, static_cast<int64_t>(row.ids.size()));
  std::vector<int64_t> ids(B * T), labels(B * T), positions(B * T), seg(B * T);
  for (int64_t b = 0; b < B; ++b) {
    const Row& row = rows[static_cast<size_t>(b)];
    const auto n = static_cast<int64_t>(row.ids.size());
    int64_t next_seg = row.seg.empty() ? 0 : row.seg.back() + 1;
    for (int64_t t = 0; t < T; ++t) {
      const size_t at = static_cast<size_t>(b * T + t);
      if (t < n) {
        ids[at] = row.ids[t];
        labels[at] = row.labels[t];
        positions[at] = row.positions[t];
        seg[at] = row.seg[t];
      } else {  // right padding (padding mode)
        ids[at] = opts_.pad_id;
        labels[at] = kIgnoreIndex;
        positions[at] = 0;
        seg[at] = next_seg++;
      }
    }
  }
  auto to_tensor = [&](std::vector<int64_t>& v) {
    return at::from_blob(v.data(), {B, T}, at::kLong).clone();
  };
  Batch batch;
  batch.input_ids = to_tensor(ids);
  batch.labels = to_tensor(labels);
  batch.positions = to_tensor(positions);
  at::Tensor s = to_tensor(seg);
  at::Tensor causal = at::ones({T, T}, at::kBool).tril();
  batch.attn_mask = (s.unsqueeze(2) == s.unsqueeze(1)).logical_and_(causal).unsqueeze(1);  // [B, 1, T, T]
  batch.target_tokens = batch.labels.slice(1, 1).ne(kIgnoreIndex).sum().item<int64_t>();
  // Causal when no target lies beyond a row's first segment: every position that predicts a
  // target then sees only its own document under plain causal attention too (a segment's first
  // label is always -100, so a target and the position before it share a segment).
  batch.causal = std::all_of(rows.begin(), rows.end(), [&](const Row& row) {
    const auto n = static_cast<int64_t>(row.ids.size());
    int64_t doc = 0;
    while (doc < n && row.seg[doc] == 0) ++doc;
    for (int64_t t = doc; t < n; ++t) {
      if (row.labels[t] != kIgnoreIndex) return false;
    }
    return true;
  });
  return batch;
}

Batch BatchStream::next(int64_t micro_batch, int64_t shard, int64_t shards) {
  FTUNE_CHECK(micro_batch >= 1, "training.micro_batch: must be at least 1, got ", micro_batch);
  FTUNE_CHECK(shards >= 1 && shard >= 0 && shard < shards, "data: shard ", shard, " of ", shards);
  std::vector<Row> rows;
  rows.reserve(static_cast<size_t>(micro_batch));
  for (int64_t i = 0; i < micro_batch * shards; ++i) {
    if (i / micro_batch == shard) rows.push_back(make_row(layout_, position_));
    if (++position_ == rows_per_epoch_) {
      ++epoch_;
      position_ = 0;
      build_epoch();
    }
  }
  return collate(rows);
}

void BatchStream::restore(int64_t epoch, int64_t position) {
  FTUNE_CHECK(epoch >= 0 && position >= 0 && position < rows_per_epoch_,
              "data: cannot restore to epoch ", epoch, " position ", position, " (an epoch has ",
              rows_per_epoch_, " rows)");
  epoch_ = epoch;
  position_ = position;
  build_epoch();
}

std::vector<Batch> BatchStream::all_batches(int64_t micro_batch) const {
  FTUNE_CHECK(micro_batch >= 1, "micro_batch: must be at least 1, got ", micro_batch);
  std::vector<int64_t> order(examples_.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  const Layout layout = make_layout(std::move(order));
  std::vector<Batch> batches;
  for (int64_t r = 0; r < rows_per_epoch_; r += micro_batch) {
    std::vector<Row> rows;
    for (int64_t i = r; i < std::min(r + micro_batch, rows_per_epoch_); ++i) {
      rows.push_back(make_row(layout, i));
    }
    batches.push_back(collate(rows));
  }
  return batches;
}

TargetStats target_stats(const std::vector<Example>& examples, const BatchOptions& opts) {
  TargetStats st;
  st.examples = static_cast<int64_t>(examples.size());
  for (const Example& ex : examples) {
    const auto n = static_cast<int64_t>(ex.labels.size());
    // Padding keeps the first seq_len tokens; packing keeps every token (a document cut at a row
    // end continues in the next row). labels[0] is never a target: nothing precedes it.
    const int64_t kept = opts.packing ? n : std::min(n, opts.seq_len);
    int64_t all = 0, in_row = 0;
    for (int64_t i = 1; i < n; ++i) {
      if (ex.labels[static_cast<size_t>(i)] == kIgnoreIndex) continue;
      ++all;
      in_row += i < kept;
    }
    st.targets += in_row;
    st.truncated += kept < n;
    st.no_targets += in_row == 0;
    st.cut_to_nothing += in_row == 0 && all > 0;
  }
  return st;
}

std::pair<std::vector<Example>, std::vector<Example>> split_validation(
    std::vector<Example> examples, double fraction, uint64_t seed) {
  FTUNE_CHECK(fraction >= 0.0 && fraction < 1.0,
              "data: validation fraction: expected a number in [0, 1), got ", fraction);
  const auto n = static_cast<int64_t>(examples.size());
  int64_t n_valid = std::llround(fraction * static_cast<double>(n));
  if (fraction > 0.0 && n >= 2) n_valid = std::max<int64_t>(n_valid, 1);
  n_valid = std::min<int64_t>(n_valid, std::max<int64_t>(n - 1, 0));  // keep a training example
  std::vector<int64_t> p = permutation(n, seed, kSplitStream);
  std::vector<char> is_valid(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n_valid; ++i) is_valid[static_cast<size_t>(p[static_cast<size_t>(i)])] = 1;
  std::pair<std::vector<Example>, std::vector<Example>> out;
  for (int64_t i = 0; i < n; ++i) {
    auto& dst = is_valid[static_cast<size_t>(i)] ? out.second : out.first;
    dst.push_back(std::move(examples[static_cast<size_t>(i)]));
  }
  return out;
}

}  // namespace ftune::data

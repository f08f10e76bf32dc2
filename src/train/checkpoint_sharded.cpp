// Sharded checkpoints and resharding on load; see checkpoint_sharded.h.
#include "train/checkpoint_sharded.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <map>
#include <memory>
#include <set>

#include "core/error.h"
#include "core/fs.h"
#include "io/safetensors.h"
#include "lora/adapter.h"
#include "model/hf_io.h"

namespace ftune::train {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr char kShardsDir[] = "shards";
constexpr char kIndexFile[] = "index.json";
constexpr int kIndexFormat = 1;
// Each rank file's metadata: its pieces as JSON {name: {offset, length, shape}}, from which rank
// 0 builds the index without another collective.
constexpr char kPiecesMeta[] = "ftune_pieces";
constexpr const char* kStateSuffixes[] = {".exp_avg", ".exp_avg_sq"};

std::string shard_file_name(int rank, int world) {
  return "rank-" + std::to_string(rank) + "-of-" + std::to_string(world) + ".safetensors";
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Rank 0, after every rank wrote its file: shards/index.json from the files' headers. Opening each
// file also checks that it is complete.
void write_index(const fs::path& tmp, int world, const std::string& strategy) {
  json params = json::object(), files = json::array();
  for (int r = 0; r < world; ++r) {
    const std::string file = shard_file_name(r, world);
    const io::SafetensorsReader reader(tmp / kShardsDir / file);
    auto it = reader.metadata().find(kPiecesMeta);
    FTUNE_CHECK(it != reader.metadata().end(), reader.path().string(), ": ", kPiecesMeta,
                ": missing metadata");
    const json pieces = json::parse(it->second);
    for (const auto& [name, pc] : pieces.items()) {
      json& e = params[name];
      if (e.is_null()) {
        e = {{"shape", pc.at("shape")},
             {"dtype", io::safetensors_dtype_name(reader.entry(name).dtype)},
             {"shards", json::object()}};
      }
      e["shards"][file] = {pc.at("offset"), pc.at("length")};
    }
    files.push_back(file);
  }
  // Every element of every parameter must be in some shard, or the checkpoint could not load.
  for (const auto& [name, e] : params.items()) {
    std::vector<SavedRange> saved;
    for (const auto& [file, r] : e.at("shards").items()) {
      saved.push_back({0, r.at(0).get<int64_t>(), r.at(1).get<int64_t>()});
    }
    plan_range_reads(saved, 0, numel_of(e.at("shape").get<std::vector<int64_t>>()),
                     "sharded checkpoint: " + name);
  }
  const json index = {{"format_version", kIndexFormat},
                      {"world_size", world},
                      {"strategy", strategy},
                      {"files", files},
                      {"params", params}};
  write_file_atomic(tmp / kShardsDir / kIndexFile, index.dump(1) + "\n");
}

// A checkpoint's tensors read by flat range: a sharded one (index + rank files) or a
// consolidated one (model weights or adapter, plus optimizer.safetensors, each whole).
class CheckpointSource {
 public:
  explicit CheckpointSource(const fs::path& dir) {
    if (is_sharded_checkpoint(dir)) {
      open_sharded(dir);
    } else {
      open_consolidated(dir);
    }
  }

  const std::string& origin() const { return origin_; }
  const std::map<std::string, std::vector<int64_t>>& shapes() const { return shapes_; }

  // Copies elements [offset, offset + dst.numel()) of parameter `name`'s values (suffix "") or
  // optimizer state (".exp_avg", ".exp_avg_sq"), flattened, into the 1-D `dst`.
  void read(const std::string& name, const std::string& suffix, int64_t offset,
            const at::Tensor& dst) const {
    const std::string key = name + suffix;
    if (!sharded_) {
      const io::SafetensorsReader& r = suffix.empty() ? value_reader(name) : *optimizer_;
      const std::string file_key = suffix.empty() ? value_prefix_ + name : key;
      FTUNE_CHECK(r.contains(file_key), r.path().string(), ": ", file_key, ": missing");
      const at::Tensor t = r.tensor(file_key);
      FTUNE_CHECK(t.numel() == numel_of(shapes_.at(name)), r.path().string(), ": ", file_key,
                  ": ", t.numel(), " elements, the parameter has ", numel_of(shapes_.at(name)));
      dst.copy_(t.reshape({-1}).narrow(0, offset, dst.numel()));
      return;
    }
    const auto& ranges = ranges_.at(name);
    for (const RangeCopy& c : plan_range_reads(ranges, offset, dst.numel(), origin_ + ": " + name)) {
      const io::SafetensorsReader& r = *files_[c.source];
      FTUNE_CHECK(r.contains(key), r.path().string(), ": ", key, ": missing (", origin_,
                  " lists it there)");
      const at::Tensor t = r.tensor(key);
      const auto saved = std::find_if(ranges.begin(), ranges.end(),
                                      [&](const SavedRange& s) { return s.source == c.source; });
      FTUNE_CHECK(t.dim() == 1 && t.numel() == saved->length, r.path().string(), ": ", key,
                  ": expected ", saved->length, " elements (1-D), as ", origin_, " says, got shape ",
                  t.sizes());
      dst.narrow(0, c.dst_offset, c.length).copy_(t.narrow(0, c.src_offset, c.length));
    }
  }

  // The AdamW step count of parameter `name`.
  int64_t step(const std::string& name) const {
    const io::SafetensorsReader& r = sharded_ ? *files_[ranges_.at(name).front().source]
                                              : *optimizer_;
    const std::string key = name + ".step";
    FTUNE_CHECK(r.contains(key), r.path().string(), ": ", key, ": missing optimizer state");
    const at::Tensor t = r.tensor(key);
    FTUNE_CHECK(t.numel() == 1, r.path().string(), ": ", key, ": expected a scalar");
    return t.to(at::kLong).item<int64_t>();
  }

 private:
  bool sharded_ = false;
  std::string origin_;  // index.json or optimizer.safetensors: what errors name
  std::map<std::string, std::vector<int64_t>> shapes_;  // every parameter the checkpoint holds
  // Sharded: the rank files, and where each parameter's ranges are.
  std::vector<std::unique_ptr<io::SafetensorsReader>> files_;
  std::map<std::string, std::vector<SavedRange>> ranges_;
  // Consolidated: the weights (HF model dir files, or a PEFT adapter file whose keys carry
  // value_prefix_) and the optimizer state.
  std::unique_ptr<io::SafetensorsDir> model_;
  std::unique_ptr<io::SafetensorsReader> adapter_, optimizer_;
  std::string value_prefix_;

  const io::SafetensorsReader& value_reader(const std::string& name) const {
    if (adapter_) return *adapter_;
    FTUNE_CHECK(model_->contains(name), origin_, ": ", name, ": no such weight in the checkpoint");
    return model_->reader(name);
  }

  void open_consolidated(const fs::path& dir) {
    const fs::path opt_path = dir / "optimizer.safetensors";
    origin_ = opt_path.string();
    FTUNE_CHECK(fs::exists(opt_path), origin_, ": missing");
    optimizer_ = std::make_unique<io::SafetensorsReader>(opt_path);
    if (fs::exists(dir / lora::kAdapterWeightsFile)) {
      adapter_ = std::make_unique<io::SafetensorsReader>(dir / lora::kAdapterWeightsFile);
      value_prefix_ = lora::kPeftKeyPrefix;
    } else {
      model_ = std::make_unique<io::SafetensorsDir>(dir);
    }
    const std::string step = ".step";
    for (const auto& key : optimizer_->names()) {
      if (key.size() <= step.size() || key.compare(key.size() - step.size(), step.size(), step)) {
        continue;
      }
      const std::string name = key.substr(0, key.size() - step.size());
      const io::SafetensorsReader& r = value_reader(name);
      FTUNE_CHECK(r.contains(value_prefix_ + name), r.path().string(), ": ", value_prefix_ + name,
                  ": missing (", origin_, " has its optimizer state)");
      shapes_[name] = r.entry(value_prefix_ + name).shape;
    }
  }

  void open_sharded(const fs::path& dir) {
    sharded_ = true;
    const fs::path index_path = dir / kShardsDir / kIndexFile;
    origin_ = index_path.string();
    json j;
    try {
      j = json::parse(read_file(index_path));
    } catch (const json::exception& e) {
      fail(origin_, ": not valid JSON: ", e.what());
    }
    FTUNE_CHECK(j.is_object() && j.value("format_version", json()) == kIndexFormat, origin_,
                ": format_version: expected ", kIndexFormat);
    FTUNE_CHECK(j.contains("files") && j.at("files").is_array(), origin_,
                ": files: expected a list of shard file names");
    std::map<std::string, int> source_of;
    for (const json& f : j.at("files")) {
      FTUNE_CHECK(f.is_string() && !f.get<std::string>().empty() &&
                      f.get<std::string>().find('/') == std::string::npos &&
                      f.get<std::string>()[0] != '.',
                  origin_, ": files: expected plain file names in ", kShardsDir, "/, got ",
                  f.dump());
      source_of[f.get<std::string>()] = static_cast<int>(files_.size());
      files_.push_back(std::make_unique<io::SafetensorsReader>(dir / kShardsDir /
                                                               f.get<std::string>()));
    }
    FTUNE_CHECK(j.contains("params") && j.at("params").is_object(), origin_,
                ": params: expected an object");
    for (const auto& [name, e] : j.at("params").items()) {
      const std::string where = origin_ + ": params." + name;
      FTUNE_CHECK(e.is_object() && e.contains("shape") && e.at("shape").is_array() &&
                      e.contains("shards") && e.at("shards").is_object(),
                  where, ": expected {shape, dtype, shards}");
      std::vector<int64_t> shape;
      for (const json& d : e.at("shape")) {
        FTUNE_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0 &&
                        d.get<int64_t>() <= (int64_t{1} << 40),
                    where, ".shape: expected sizes >= 0, got ", e.at("shape").dump());
        shape.push_back(d.get<int64_t>());
      }
      const int64_t total = numel_of(shape);
      auto& ranges = ranges_[name];
      for (const auto& [file, r] : e.at("shards").items()) {
        FTUNE_CHECK(source_of.count(file), where, ".shards: ", file, ": not in files");
        FTUNE_CHECK(r.is_array() && r.size() == 2 && r.at(0).is_number_integer() &&
                        r.at(1).is_number_integer(),
                    where, ".shards.", file, ": expected [offset, length], got ", r.dump());
        const int64_t off = r.at(0).get<int64_t>(), len = r.at(1).get<int64_t>();
        FTUNE_CHECK(off >= 0 && len > 0 && off <= total && len <= total - off, where, ".shards.",
                    file, ": [", off, ", ", len, ") is outside the ", total, " elements");
        ranges.push_back({source_of.at(file), off, len});
      }
      FTUNE_CHECK(!ranges.empty(), where, ".shards: empty");
      shapes_[name] = std::move(shape);
    }
  }
};

}  // namespace

std::vector<RangeCopy> plan_range_reads(const std::vector<SavedRange>& saved, int64_t offset,
                                        int64_t length, const std::string& what) {
  std::vector<SavedRange> sorted;
  for (const SavedRange& s : saved) {
    if (s.length > 0) sorted.push_back(s);
  }
  std::sort(sorted.begin(), sorted.end(),
            [](const SavedRange& a, const SavedRange& b) { return a.offset < b.offset; });
  std::vector<RangeCopy> out;
  const int64_t end = offset + length;
  int64_t at = offset;  // the first element not filled yet
  for (const SavedRange& s : sorted) {
    if (at >= end) break;
    const int64_t s_end = s.offset + s.length;
    if (s_end <= at) continue;
    FTUNE_CHECK(s.offset <= at, what, ": elements [", at, ", ", std::min(s.offset, end),
                ") are in no shard");
    const int64_t n = std::min(s_end, end) - at;
    out.push_back({s.source, at - s.offset, at - offset, n});
    at += n;
  }
  FTUNE_CHECK(at >= end, what, ": elements [", at, ", ", end, ") are in no shard");
  return out;
}

bool is_sharded_checkpoint(const fs::path& dir) {
  std::error_code ec;
  return fs::exists(dir / kShardsDir / kIndexFile, ec);
}

fs::path save_sharded_checkpoint(const fs::path& output_dir, const std::vector<PieceInfo>& layout,
                                 const optim::AdamW& opt, const TrainState& state,
                                 int64_t keep_last, const json& meta,
                                 const fs::path& tokenizer_dir, Strategy& strategy,
                                 at::Device device, double wait_s) {
  const optim::NamedTensors& params = opt.params();
  FTUNE_CHECK(layout.size() == params.size(), "sharded checkpoint: the strategy's piece layout has ",
              layout.size(), " entries for ", params.size(), " optimizer parameters");
  const int rank = strategy.rank(), world = strategy.world_size();
  // One temp dir for all ranks: its name is the same everywhere (no pid), on the shared filesystem.
  const fs::path tmp = output_dir / "checkpoints" / (".tmp-step-" + std::to_string(state.step));
  fs::create_directories(tmp / kShardsDir);

  std::map<std::string, at::Tensor> st;
  for (auto& [key, t] : opt.state()) st.emplace(key, t);
  io::TensorList tensors;
  json pieces = json::object();
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& [name, p] = params[i];
    const PieceInfo& pi = layout[i];
    FTUNE_CHECK(pi.name == name && !pieces.contains(name), "sharded checkpoint: piece ", i, " (",
                name, ") on rank ", rank, ": the layout says ", pi.name,
                "; expected one piece per parameter and rank, in the optimizer's order");
    if (pi.replica) continue;  // another rank writes the same values
    pieces[name] = {{"offset", pi.offset}, {"length", p.numel()}, {"shape", pi.shape}};
    tensors.emplace_back(name, p.detach().reshape({-1}));
    for (const char* s : kStateSuffixes) tensors.emplace_back(name + s, st.at(name + s).reshape({-1}));
    tensors.emplace_back(name + ".step", st.at(name + ".step"));
  }
  io::save_safetensors(tmp / kShardsDir / shard_file_name(rank, world), tensors,
                       {{"format", "pt"}, {kPiecesMeta, pieces.dump()}});
  crash_point("checkpoint:shard_written");  // test seam: a rank killed while the others write
  strategy.barrier("barrier after every rank wrote its checkpoint shard of step " +
                   std::to_string(state.step), wait_s);
  if (!strategy.is_main()) return checkpoint_dir(output_dir, state.step);

  write_index(tmp, world, strategy.name());
  if (!tokenizer_dir.empty()) model::copy_tokenizer_files(tokenizer_dir, tmp);
  write_rng_state(tmp / kRngFile, device);
  return finish_checkpoint(tmp, output_dir, state, keep_last, meta);
}

TrainState load_checkpoint_pieces(const fs::path& dir, std::vector<PieceInfo> layout,
                                  optim::AdamW& opt, at::Device device) {
  const TrainState state = read_checkpoint_info(dir).state;
  const optim::NamedTensors& params = opt.params();
  const bool whole = layout.empty();
  if (whole) {
    for (const auto& [name, p] : params) layout.push_back({name, p.sizes().vec(), 0});
  }
  FTUNE_CHECK(layout.size() == params.size(), "resume: the strategy's piece layout has ",
              layout.size(), " entries for ", params.size(), " optimizer parameters");
  const CheckpointSource src(dir);
  if (whole) {  // every parameter is here: the checkpoint must hold no other
    std::set<std::string> trained;
    for (const auto& [name, p] : params) trained.insert(name);
    for (const auto& [name, shape] : src.shapes()) {
      FTUNE_CHECK(trained.count(name), src.origin(), ": ", name, ": not a trained parameter of "
                  "this run (a checkpoint of another model, or of LoRA vs full fine-tuning?)");
    }
  }
  at::NoGradGuard no_grad;
  std::map<std::string, at::Tensor> st;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& [name, p] = params[i];
    const PieceInfo& pi = layout[i];
    auto it = src.shapes().find(name);
    FTUNE_CHECK(it != src.shapes().end(), src.origin(), ": ", name,
                ": missing (the run trains it; a checkpoint of another model?)");
    FTUNE_CHECK(it->second == pi.shape, src.origin(), ": ", name, ": shape ",
                at::IntArrayRef(it->second), " in the checkpoint, ", at::IntArrayRef(pi.shape),
                " in this run");
    const int64_t n = p.numel();
    FTUNE_CHECK(pi.offset >= 0 && pi.offset + n <= numel_of(pi.shape), "resume: ", name,
                ": piece [", pi.offset, ", +", n, ") is outside the parameter");
    auto read = [&](const std::string& suffix) {
      at::Tensor t = at::empty({n}, at::TensorOptions(p.scalar_type()));
      src.read(name, suffix, pi.offset, t);
      return t.view(p.sizes());
    };
    p.detach().copy_(read(""));
    for (const char* s : kStateSuffixes) st[name + s] = read(s);
    st[name + ".step"] = at::scalar_tensor(src.step(name), at::kLong);
  }
  opt.load_state(st, src.origin());
  restore_rng_state(dir / kRngFile, device);
  return state;
}

}  // namespace ftune::train

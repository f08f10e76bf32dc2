// `ftune eval`: mean next-token NLL and perplexity of a model on a text file, over consecutive
// non-overlapping windows of --seq-len tokens, exactly as a plain transformers loop with
// labels = input_ids computes it (the first token of each window is not predicted; the mean is
// over all predicted tokens; a last shorter window counts when it has at least two tokens).
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "model/loss.h"

namespace ftune::cli {
namespace {

struct EvalArgs {
  std::string model, adapter, text, dtype, device = "cpu";
  int64_t seq_len = 0, batch = 1;
  bool json = false;
};

void run_eval(const EvalArgs& a) {
  const std::string text = read_text_file(a.text, "--text");
  auto m = load_inference_model("eval", a.model, a.dtype, a.device, a.adapter);
  const auto& cfg = m.model->config();
  FTUNE_CHECK(a.seq_len <= cfg.max_position_embeddings, "eval: --seq-len: ", a.seq_len,
              " exceeds max_position_embeddings ", cfg.max_position_embeddings, " of ", a.model,
              "/config.json");
  std::vector<int64_t> ids = m.tokenizer.encode(text, /*add_special_tokens=*/true);
  FTUNE_CHECK(ids.size() >= 2, a.text, ": --text: fewer than 2 tokens, nothing to evaluate");
  at::Tensor all = at::tensor(ids, at::kLong);
  const int64_t n = all.size(0);
  const int64_t full = n / a.seq_len;
  torch::NoGradGuard no_grad;
  double nll_sum = 0;
  int64_t count = 0;
  auto run = [&](const at::Tensor& batch) {
    at::Tensor x = batch.to(m.device);
    auto loss = model::causal_lm_loss_sum(m.model->forward(x), x);
    nll_sum += loss.sum.item<double>();
    count += loss.count;
  };
  at::Tensor windows = all.slice(0, 0, full * a.seq_len).view({full, a.seq_len});
  for (int64_t i = 0; i < full; i += a.batch) run(windows.slice(0, i, std::min(full, i + a.batch)));
  if (n - full * a.seq_len >= 2) run(all.slice(0, full * a.seq_len).unsqueeze(0));
  double nll = nll_sum / static_cast<double>(count);
  double ppl = std::exp(nll);
  if (a.json) {
    std::cout << nlohmann::json{{"nll", nll}, {"perplexity", ppl}, {"tokens", count}}.dump() << "\n";
  } else {
    std::printf("nll %.6f  perplexity %.4f  tokens %lld\n", nll, ppl, static_cast<long long>(count));
  }
}

}  // namespace

void register_eval(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  auto* cmd = app.add_subcommand("eval", "Mean next-token NLL and perplexity over a text file");
  cmd->add_option("--model", a->model, "HF model directory")->required()->type_name("DIR");
  add_adapter_option(cmd, a->adapter);
  cmd->add_option("--text", a->text, "UTF-8 text file to evaluate")->required()->type_name("FILE");
  cmd->add_option("--seq-len", a->seq_len,
                  "Window length in tokens (>= 2); windows are consecutive and non-overlapping")
      ->required()
      ->type_name("INT")
      ->check(int_at_least(2));
  cmd->add_option("--batch", a->batch, "Windows per forward pass (default 1)")
      ->type_name("INT")
      ->check(int_at_least(1));
  cmd->add_option("--dtype", a->dtype, "Compute dtype: fp32 or bf16 (default: the config's)");
  cmd->add_option("--device", a->device, "cpu (default), cuda or cuda:N");
  cmd->add_flag("--json", a->json, "Print {\"nll\", \"perplexity\", \"tokens\"} as JSON");
  cmd->callback([a] { run_eval(*a); });
}

}  // namespace ftune::cli

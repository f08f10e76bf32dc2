// `ftune generate`: continue a prompt (optionally wrapped in the model's chat template) greedily
// or by temperature/top-p sampling, and print the generated text.
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "core/error.h"
#include "model/generate.h"

namespace ftune::cli {
namespace {

struct GenerateArgs {
  std::string model, adapter, prompt, dtype, device = "cpu";
  int64_t max_new_tokens = 64, seed = 0;
  bool greedy = false, chat = false, json = false;
  double temperature = 1.0, top_p = 1.0;
};

void run_generate(const GenerateArgs& a, bool sampling_flags_given) {
  FTUNE_CHECK(!(a.greedy && sampling_flags_given),
              "generate: --greedy: cannot be combined with --temperature, --top-p or --seed");
  require_utf8(a.prompt, "generate", "--prompt");
  auto m = load_inference_model("generate", a.model, a.dtype, a.device, a.adapter);
  std::vector<int64_t> prompt;
  if (a.chat) {
    auto messages = nlohmann::ordered_json::array({{{"role", "user"}, {"content", a.prompt}}});
    // transformers' apply_chat_template(tokenize=True) adds no special tokens of its own.
    prompt = m.tokenizer.encode(m.tokenizer.apply_chat_template(messages, true), false);
  } else {
    prompt = m.tokenizer.encode(a.prompt, /*add_special_tokens=*/true);
  }
  model::GenerateOptions go;
  go.max_new_tokens = a.max_new_tokens;
  go.greedy = !sampling_flags_given;
  go.temperature = a.temperature;
  go.top_p = a.top_p;
  go.seed = static_cast<uint64_t>(a.seed);
  go.eos_ids = m.model->config().eos_token_ids;
  if (m.tokenizer.eos_id()) go.eos_ids.push_back(*m.tokenizer.eos_id());
  std::vector<int64_t> out = model::generate(m.model, prompt, go);
  std::string text = m.tokenizer.decode(out, /*skip_special_tokens=*/true);
  if (a.json) {
    std::cout << nlohmann::json{{"prompt_ids", prompt}, {"ids", out}, {"text", text}}.dump() << "\n";
  } else {
    std::cout << text << "\n";
  }
}

}  // namespace

void register_generate(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  auto* cmd = app.add_subcommand("generate", "Generate text from a prompt");
  cmd->add_option("--model", a->model, "HF model directory")->required()->type_name("DIR");
  add_adapter_option(cmd, a->adapter);
  cmd->add_option("--prompt", a->prompt, "Prompt text (UTF-8)")->required();
  cmd->add_option("--max-new-tokens", a->max_new_tokens, "Tokens to generate at most (default 64)")
      ->type_name("INT")
      ->check(int_at_least(1));
  cmd->add_flag("--greedy", a->greedy, "Greedy decoding (the default when no sampling flag is given)");
  auto* t = cmd->add_option("--temperature", a->temperature, "Sampling temperature, finite and > 0")
                ->type_name("FLOAT")
                ->check(finite_above_zero());
  auto* p = cmd->add_option("--top-p", a->top_p, "Nucleus sampling mass in (0, 1]")
                ->type_name("FLOAT")
                ->check(in_zero_one());
  auto* s = cmd->add_option("--seed", a->seed, "Sampling seed, >= 0 (default 0)")
                ->type_name("INT")
                ->check(int_at_least(0));
  cmd->add_flag("--chat", a->chat, "Wrap the prompt as a user message in the chat template");
  cmd->add_option("--dtype", a->dtype, "Compute dtype: fp32 or bf16 (default: the config's)");
  cmd->add_option("--device", a->device, "cpu (default), cuda or cuda:N");
  cmd->add_flag("--json", a->json, "Print {\"prompt_ids\", \"ids\", \"text\"} as JSON");
  cmd->callback([a, t, p, s] { run_generate(*a, t->count() + p->count() + s->count() > 0); });
}

}  // namespace ftune::cli

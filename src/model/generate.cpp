// Greedy / top-p decoding over the KV cache; see generate.h. Sampling follows transformers'
// TemperatureLogitsWarper then TopPLogitsWarper (drop the lowest-probability tokens whose
// cumulative mass is <= 1 - top_p, always keeping the most likely one).
#include "model/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>

#include "core/error.h"

namespace ftune::model {

std::vector<int64_t> generate(LlamaForCausalLM& m, const std::vector<int64_t>& prompt,
                              const GenerateOptions& opts) {
  FTUNE_CHECK(!prompt.empty(), "generate: empty prompt");
  FTUNE_CHECK(opts.temperature > 0, "--temperature: expected > 0, got ", opts.temperature);
  FTUNE_CHECK(opts.top_p > 0 && opts.top_p <= 1, "--top-p: expected in (0, 1], got ", opts.top_p);
  const int64_t max_pos = m->config().max_position_embeddings;
  FTUNE_CHECK(static_cast<int64_t>(prompt.size()) + opts.max_new_tokens <= max_pos,
              "generate: prompt (", prompt.size(), " tokens) + --max-new-tokens (",
              opts.max_new_tokens, ") exceeds max_position_embeddings ", max_pos);
  torch::NoGradGuard no_grad;
  auto dev = m->parameters().front().device();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(opts.seed);
  KvCache cache;
  ForwardOptions fo;
  fo.cache = &cache;
  at::Tensor input = at::tensor(prompt, at::kLong).unsqueeze(0).to(dev);  // [1, T]
  std::vector<int64_t> out;
  for (int64_t step = 0; step < opts.max_new_tokens; ++step) {
    at::Tensor logits = m->forward(input, fo).select(1, -1).to(at::kFloat).cpu();  // [1, V]
    int64_t next;
    if (opts.greedy) {
      next = logits.argmax(-1).item<int64_t>();
    } else {
      at::Tensor scores = logits / opts.temperature;
      if (opts.top_p < 1.0) {
        auto [sorted, idx] = scores.sort(-1, /*descending=*/false);
        at::Tensor cum = sorted.softmax(-1).cumsum(-1);
        at::Tensor remove = cum <= (1.0 - opts.top_p);
        remove.select(-1, -1).fill_(false);  // keep at least the top token
        scores = scores.scatter(-1, idx, sorted.masked_fill(remove, -INFINITY));
      }
      next = at::multinomial(scores.softmax(-1), 1, false, gen).item<int64_t>();
    }
    out.push_back(next);
    if (std::find(opts.eos_ids.begin(), opts.eos_ids.end(), next) != opts.eos_ids.end()) break;
    input = at::full({1, 1}, next, at::TensorOptions().dtype(at::kLong).device(dev));
  }
  return out;
}

}  // namespace ftune::model

// Config parsing: every key reaches its struct field with its type, overrides win, and every bad
// input (malformed YAML, unknown section/key, wrong type, bad value) is one error that names the
// file, line and key.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "config/train_config.h"
#include "core/error.h"

using ftune::config::parse_train_config;
using ftune::config::TrainConfig;

namespace {

const char kGood[] = R"(# a recipe
model:
  path: preset:tiny
  dtype: bf16
  grad_checkpointing: true
data:
  train: data/sample_train.jsonl
  valid: data/sample_valid.jsonl
  format: alpaca
  seq_len: 128
  packing: false
training:
  steps: 20
  micro_batch: 4
  grad_accum: 2
  lr: 1e-4
  lr_schedule: linear
  warmup_steps: 3
  weight_decay: 0.1
  max_grad_norm: 0.5
  seed: 7
  output_dir: runs/x
  eval_every: 5
  save_every: 10
  keep_last: 3
  resume: none
logging:
  log_every: 2
)";

// The error message of parsing+validating `yaml` with `sets`, or "" when it is accepted.
std::string error_of(const std::string& yaml, std::vector<std::string> sets = {}) {
  try {
    parse_train_config(yaml, "cfg.yaml", sets).validate();
  } catch (const ftune::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(TrainConfig, ParsesEveryKeyWithItsType) {
  TrainConfig c = parse_train_config(kGood, "cfg.yaml");
  c.validate();
  EXPECT_EQ(c.model.path, "preset:tiny");
  EXPECT_EQ(c.model.dtype, "bf16");
  EXPECT_TRUE(c.model.grad_checkpointing);
  EXPECT_EQ(c.data.train, "data/sample_train.jsonl");
  EXPECT_EQ(c.data.format, "alpaca");
  EXPECT_EQ(c.data.seq_len, 128);
  EXPECT_FALSE(c.data.packing);
  EXPECT_EQ(c.training.steps, 20);
  EXPECT_EQ(c.training.micro_batch, 4);
  EXPECT_EQ(c.training.grad_accum, 2);
  EXPECT_DOUBLE_EQ(c.training.lr, 1e-4);
  EXPECT_EQ(c.training.lr_schedule, "linear");
  EXPECT_EQ(c.training.warmup_steps, 3);
  EXPECT_DOUBLE_EQ(c.training.weight_decay, 0.1);
  EXPECT_DOUBLE_EQ(c.training.max_grad_norm, 0.5);
  EXPECT_EQ(c.training.seed, 7);
  EXPECT_EQ(c.training.keep_last, 3);
  EXPECT_EQ(c.training.resume, "none");
  EXPECT_EQ(c.logging.log_every, 2);
  // Untouched keys keep their documented defaults.
  EXPECT_DOUBLE_EQ(c.training.adam_beta2, 0.999);
  EXPECT_EQ(c.model.device, "cpu");
  EXPECT_EQ(c.where("training.lr"), "cfg.yaml:16");
}

TEST(TrainConfig, OverridesWinAndKeepTypes) {
  TrainConfig c = parse_train_config(
      kGood, "cfg.yaml", {"training.lr=3e-5", "data.packing=true", "logging.progress=lines",
                          "data.valid=", "data.valid_fraction=0.1"});
  c.validate();
  EXPECT_DOUBLE_EQ(c.training.lr, 3e-5);
  EXPECT_TRUE(c.data.packing);
  EXPECT_EQ(c.logging.progress, "lines");
  EXPECT_EQ(c.data.valid, "");
  EXPECT_EQ(c.where("training.lr"), "--set training.lr=3e-5");
}

TEST(TrainConfig, ResolvedYamlRoundTrips) {
  TrainConfig a = parse_train_config(kGood, "cfg.yaml", {"training.lr=0.00012345678901234"});
  TrainConfig b = parse_train_config(a.to_yaml(), "resolved.yaml");
  EXPECT_EQ(a.to_yaml(), b.to_yaml());
  EXPECT_EQ(b.training.lr, 0.00012345678901234);  // shortest round-trip text, no precision loss
  EXPECT_EQ(b.data.valid, a.data.valid);
}

// Found by train_config_fuzz (tests/fuzz/seeds/train_config/crash-invalid-utf8.yaml): yaml-cpp
// reads bytes that are not UTF-8 as they are but writes U+FFFD for them, so the resolved config
// (what resume compares with) named another output_dir. Such files are now refused.
TEST(TrainConfig, InvalidUtf8IsRefusedAndUnicodeRoundTrips) {
  // Not UTF-8 (a stray byte, overlong, surrogate, above U+10FFFF, cut short) or a noncharacter.
  for (const std::string bad : {"\xFF", "\xC0\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80", "\xE2\x82",
                                "\xEF\xB7\x90", "\xEF\xBF\xBF", "\xF4\x8F\xBF\xBE"}) {
    const std::string e = error_of("model:\n  path: preset:tiny\ntraining:\n  steps: 1\n"
                                   "  output_dir: runs/" + bad + "x\n");
    EXPECT_NE(e.find("cfg.yaml:5: invalid UTF-8 or a Unicode noncharacter (byte 67)"),
              std::string::npos) << e;
    const std::string o = error_of(kGood, {"training.output_dir=runs/" + bad});
    EXPECT_NE(o.find("--set training.output_dir=runs/"), std::string::npos) << o;
    EXPECT_NE(o.find("training.output_dir: invalid UTF-8 or a Unicode noncharacter in the value"),
              std::string::npos) << o;
  }
  // Two-, three- and four-byte sequences next to the refused ranges survive the round trip.
  const std::string dir = "runs/caf\xC3\xA9/\xE6\x97\xA5\xED\x9F\xBF\xEF\xB7\xB0/"
                          "\xF0\x9F\x98\x80\xF4\x8F\xBF\xBD\tx";
  TrainConfig a = parse_train_config(kGood, "cfg.yaml", {"training.output_dir=" + dir});
  EXPECT_EQ(a.training.output_dir, dir);
  EXPECT_EQ(parse_train_config(a.to_yaml(), "resolved.yaml").training.output_dir, dir);
}

TEST(TrainConfig, ModelParallelDevicesAndSplit) {
  TrainConfig a = parse_train_config(kGood, "cfg.yaml",
                                     {"parallel.strategy=model_parallel",
                                      "parallel.devices=[cuda:0, cuda:1]",
                                      "parallel.split=[0, 12, 22]"});
  a.validate();
  EXPECT_EQ(a.parallel.devices, (std::vector<std::string>{"cuda:0", "cuda:1"}));
  EXPECT_EQ(a.parallel.split, (std::vector<int64_t>{0, 12, 22}));
  TrainConfig b = parse_train_config(a.to_yaml(), "resolved.yaml");
  EXPECT_EQ(b.parallel.split, a.parallel.split);
  EXPECT_EQ(a.to_yaml(), b.to_yaml());
  try {
    parse_train_config(kGood, "cfg.yaml", {"parallel.split=[0, x]"});
    FAIL();
  } catch (const ftune::Error& e) {
    EXPECT_NE(std::string(e.what()).find("parallel.split: expected a list of integers"),
              std::string::npos) << e.what();
  }
}

TEST(TrainConfig, MalformedYamlNamesFileAndLine) {
  std::string e = error_of("model:\n  path: [unclosed\n");
  EXPECT_NE(e.find("cfg.yaml:"), std::string::npos) << e;
  EXPECT_NE(e.find("malformed YAML"), std::string::npos) << e;
}

TEST(TrainConfig, UnknownKeyNamesFileLineAndKey) {
  std::string e = error_of(std::string(kGood) + "  lrr: 3\n", {});
  // "lrr" lands in the logging section (the last one); the message names it fully.
  EXPECT_NE(e.find("cfg.yaml:29: logging.lrr: unknown key"), std::string::npos) << e;
  e = error_of("training:\n  stepz: 3\n");
  EXPECT_NE(e.find("cfg.yaml:2: training.stepz: unknown key"), std::string::npos) << e;
  e = error_of(kGood, {"training.stepz=3"});
  EXPECT_NE(e.find("--set training.stepz=3: training.stepz: unknown key"), std::string::npos) << e;
}

TEST(TrainConfig, UnknownSectionOrParallelKeyIsAnError) {
  std::string e = error_of(std::string(kGood) + "parallel:\n  dp: 2\n");
  EXPECT_NE(e.find("cfg.yaml:30: parallel.dp: unknown key"), std::string::npos) << e;
  e = error_of(std::string(kGood) + "parallel:\n  strategy: fsdp4\n");
  EXPECT_NE(e.find("parallel.strategy"), std::string::npos) << e;
  e = error_of(std::string(kGood) + "parallel:\n  strategy: ddp\n  offload: optimizer\n");
  EXPECT_NE(e.find("parallel.offload: offload: optimizer needs parallel.strategy zero1, zero2 or "
                   "fsdp"), std::string::npos) << e;
  e = error_of(std::string(kGood) + "parallel:\n  strategy: zero2\n  offload: cpu\n");
  EXPECT_NE(e.find("parallel.offload"), std::string::npos) << e;
  e = error_of(std::string(kGood), {"parallel.bucket_mb=0"});
  EXPECT_NE(e.find("--set parallel.bucket_mb=0: parallel.bucket_mb: expected a positive number"),
            std::string::npos)
      << e;
  e = error_of(std::string(kGood), {"parallel.timeout_s=-1"});
  EXPECT_NE(e.find("parallel.timeout_s: expected a positive number of seconds"), std::string::npos)
      << e;
  e = error_of(std::string(kGood) + "optimizer:\n  lr: 1\n");
  EXPECT_NE(e.find("cfg.yaml:29: optimizer: unknown section"), std::string::npos) << e;
}

TEST(TrainConfig, WrongTypeNamesKeyAndExpectedType) {
  std::string e = error_of("training:\n  steps: ten\n");
  EXPECT_NE(e.find("cfg.yaml:2: training.steps: expected an integer, got \"ten\""),
            std::string::npos) << e;
  e = error_of("training:\n  lr: fast\n");
  EXPECT_NE(e.find("training.lr: expected a number"), std::string::npos) << e;
  e = error_of("data:\n  packing: maybe\n");
  EXPECT_NE(e.find("data.packing: expected true or false"), std::string::npos) << e;
  e = error_of("data:\n  train: [a, b]\n");
  EXPECT_NE(e.find("data.train: expected a single value, got a list"), std::string::npos) << e;
  e = error_of("training:\n  micro_batch: 2.5\n");
  EXPECT_NE(e.find("training.micro_batch: expected an integer, got \"2.5\""), std::string::npos)
      << e;
  e = error_of(kGood, {"training.steps=1.5"});
  EXPECT_NE(e.find("--set training.steps=1.5: training.steps: expected an integer"),
            std::string::npos) << e;
  e = error_of("data: 3\n");
  EXPECT_NE(e.find("cfg.yaml:1: data: expected a mapping of keys"), std::string::npos) << e;
}

TEST(TrainConfig, ValidateNamesTheOffendingKeyAndLine) {
  std::string e = error_of(kGood, {"training.micro_batch=0"});
  EXPECT_NE(e.find("--set training.micro_batch=0: training.micro_batch: expected at least 1, got 0"),
            std::string::npos) << e;
  std::string text = kGood;
  text.replace(text.find("micro_batch: 4"), 14, "micro_batch: 0");
  e = error_of(text);
  EXPECT_NE(e.find("cfg.yaml:14: training.micro_batch: expected at least 1"), std::string::npos)
      << e;
  e = error_of(kGood, {"training.epochs=2"});
  EXPECT_NE(e.find("exactly one of training.steps and training.epochs"), std::string::npos) << e;
  e = error_of(kGood, {"training.steps=0"});
  EXPECT_NE(e.find("exactly one of"), std::string::npos) << e;
  e = error_of(kGood, {"training.lr_schedule=step"});
  EXPECT_NE(e.find("training.lr_schedule: expected one of cosine, linear, constant, got \"step\""),
            std::string::npos) << e;
  e = error_of(kGood, {"model.dtype=fp16"});
  EXPECT_NE(e.find("model.dtype: expected one of fp32, bf16"), std::string::npos) << e;
  e = error_of(kGood, {"data.valid_fraction=0.2"});
  EXPECT_NE(e.find("either data.valid or data.valid_fraction"), std::string::npos) << e;
  e = error_of("data:\n  train: x.jsonl\ntraining:\n  steps: 3\n");
  EXPECT_NE(e.find("cfg.yaml: model.path: required"), std::string::npos) << e;
}

TEST(TrainConfig, BadOverrideSyntax) {
  EXPECT_NE(error_of(kGood, {"training.lr"}).find("--set training.lr: expected section.key=value"),
            std::string::npos);
  EXPECT_NE(error_of(kGood, {"lr=3"}).find("expected section.key=value"), std::string::npos);
  EXPECT_NE(error_of(kGood, {"a.b.c=3"}).find("expected section.key=value"), std::string::npos);
}

TEST(TrainConfig, FileErrors) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("ftune_cfg_test_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  try {
    ftune::config::load_train_config(dir / "missing.yaml");
    FAIL() << "no error for a missing file";
  } catch (const ftune::Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.yaml: cannot read"), std::string::npos) << e.what();
  }
  std::ofstream(dir / "list.yaml") << "- a\n- b\n";
  try {
    ftune::config::load_train_config(dir / "list.yaml");
    FAIL() << "no error for a list";
  } catch (const ftune::Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected a mapping of sections"), std::string::npos);
  }
  fs::remove_all(dir);
}

TEST(TrainConfig, DuplicateKeyOrSectionNamesBothLines) {
  // yaml-cpp would silently use the first and PyYAML the last: neither is what the user meant.
  std::string e = error_of("training:\n  steps: 3\n  lr: 1e-3\n  seed: 1\n  lr: 2e-3\n");
  EXPECT_NE(e.find("cfg.yaml:5: training.lr: duplicate key (first at line 3)"), std::string::npos)
      << e;
  e = error_of(std::string(kGood) + "training:\n  lr: 1\n");
  EXPECT_NE(e.find("cfg.yaml:29: training: duplicate section (first at line 12)"),
            std::string::npos) << e;
  // The same key in two different sections is fine.
  EXPECT_EQ(error_of("model:\n  path: preset:tiny\n  dtype: fp32\ndata:\n  train: x.jsonl\n"
                     "training:\n  steps: 3\nlogging:\n  log_every: 1\n"),
            "");
}

TEST(TrainConfig, ResolvedYamlHoldsOnlyTheGivenOfStepsAndEpochs) {
  TrainConfig a = parse_train_config(kGood, "cfg.yaml");
  const std::string ya = a.to_yaml();
  EXPECT_NE(ya.find("  steps: 20\n"), std::string::npos) << ya;
  EXPECT_EQ(ya.find("\n  epochs:"), std::string::npos) << ya;
  TrainConfig b = parse_train_config(kGood, "cfg.yaml", {"training.steps=0", "training.epochs=1.5"});
  b.validate();
  const std::string yb = b.to_yaml();
  EXPECT_NE(yb.find("  epochs: 1.5\n"), std::string::npos) << yb;
  EXPECT_EQ(yb.find("\n  steps:"), std::string::npos) << yb;
  // Both read back as valid configs equal to the originals.
  for (const TrainConfig* c : {&a, &b}) {
    TrainConfig back = parse_train_config(c->to_yaml(), "resolved.yaml");
    back.validate();
    EXPECT_EQ(back.flatten(), c->flatten());
  }
}

TEST(TrainConfig, DiffAndWhichChangesKeepTheRun) {
  TrainConfig a = parse_train_config(kGood, "cfg.yaml");
  TrainConfig b = parse_train_config(kGood, "cfg.yaml",
                                     {"training.lr=2e-4", "logging.log_every=7", "data.seq_len=64"});
  const auto d = ftune::config::diff_configs(a, b);
  ASSERT_EQ(d.size(), 3u);
  EXPECT_EQ(d[0].key, "data.seq_len");
  EXPECT_EQ(d[0].before, "128");
  EXPECT_EQ(d[0].after, "64");
  EXPECT_EQ(d[1].key, "logging.log_every");
  EXPECT_EQ(d[2].key, "training.lr");
  EXPECT_EQ(d[2].before, "1e-04");  // format_double: the shortest text that reads back exactly
  EXPECT_EQ(d[2].after, "2e-04");
  EXPECT_TRUE(ftune::config::diff_configs(a, a).empty());
  using ftune::config::keeps_run_on_resume;
  for (const char* k : {"logging.log_every", "logging.progress", "training.eval_every",
                        "training.save_every", "training.keep_last", "training.stop_after",
                        "training.output_dir", "training.resume"}) {
    EXPECT_TRUE(keeps_run_on_resume(k)) << k;
  }
  for (const char* k : {"training.lr", "data.seq_len", "data.train", "model.path", "training.seed",
                        "training.micro_batch", "model.dtype", "training.adam_fused"}) {
    EXPECT_FALSE(keeps_run_on_resume(k)) << k;
  }
}

TEST(TrainConfig, ConfigThatIsADirectoryNamesTheFlag) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("ftune_cfg_dir_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  try {
    ftune::config::load_train_config(dir);
    FAIL() << "no error for a directory";
  } catch (const ftune::Error& e) {
    EXPECT_EQ(std::string(e.what()),
              dir.string() + ": --config: is a directory (expected a YAML config file)");
  }
  fs::remove_all(dir);
}

TEST(TrainConfig, ConfigThatIsADeviceNamesTheFlag) {
  try {
    ftune::config::load_train_config("/dev/null");
    FAIL() << "no error for a device";
  } catch (const ftune::Error& e) {
    EXPECT_EQ(std::string(e.what()),
              "/dev/null: --config: not a regular file (expected a YAML config file)");
  }
}

TEST(TrainConfig, LoraAndQuantSectionsAreOnWhenPresent) {
  TrainConfig c = parse_train_config(kGood, "cfg.yaml");
  EXPECT_FALSE(c.lora.has_value());
  EXPECT_FALSE(c.quant.has_value());
  // An empty section turns the feature on with PEFT's defaults.
  c = parse_train_config(std::string(kGood) + "lora:\n", "cfg.yaml");
  c.validate();
  ASSERT_TRUE(c.lora.has_value());
  EXPECT_EQ(c.lora->r, 8);
  EXPECT_DOUBLE_EQ(c.lora->alpha, 8);
  EXPECT_DOUBLE_EQ(c.lora->dropout, 0);
  EXPECT_EQ(c.lora->targets, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_FALSE(c.lora->rslora);
  c = parse_train_config(std::string(kGood) +
                             "lora:\n  r: 16\n  alpha: 32\n  dropout: 0.05\n"
                             "  targets: [q_proj, k_proj, down_proj]\n  rslora: true\n"
                             "quant:\n  type: nf4\n  double_quant: false\n  blocksize: 128\n"
                             "  compute_dtype: fp32\n",
                         "cfg.yaml");
  c.validate();
  EXPECT_EQ(c.lora->r, 16);
  EXPECT_DOUBLE_EQ(c.lora->alpha, 32);
  EXPECT_DOUBLE_EQ(c.lora->dropout, 0.05);
  EXPECT_EQ(c.lora->targets, (std::vector<std::string>{"q_proj", "k_proj", "down_proj"}));
  EXPECT_TRUE(c.lora->rslora);
  ASSERT_TRUE(c.quant.has_value());
  EXPECT_FALSE(c.quant->double_quant);
  EXPECT_EQ(c.quant->blocksize, 128);
  EXPECT_EQ(c.quant->compute_dtype, "fp32");
  // A YAML block list, one name as a list of one, and a flow list through --set.
  c = parse_train_config(std::string(kGood) + "lora:\n  targets:\n    - o_proj\n    - up_proj\n",
                         "cfg.yaml");
  EXPECT_EQ(c.lora->targets, (std::vector<std::string>{"o_proj", "up_proj"}));
  c = parse_train_config(kGood, "cfg.yaml", {"lora.targets=all-linear"});
  EXPECT_EQ(c.lora->targets, (std::vector<std::string>{"all-linear"}));
  c = parse_train_config(kGood, "cfg.yaml", {"lora.targets=[k_proj,gate_proj]", "lora.r=4"});
  EXPECT_EQ(c.lora->targets, (std::vector<std::string>{"k_proj", "gate_proj"}));
  EXPECT_EQ(c.lora->r, 4);
}

TEST(TrainConfig, LoraAndQuantErrorsNameTheKey) {
  const std::string good(kGood);  // 28 lines
  std::string e = error_of(good + "quant:\n  type: nf4\n");
  EXPECT_NE(e.find("cfg.yaml:29: quant: needs a lora section"), std::string::npos) << e;
  e = error_of(good + "lora:\nquant:\n  type: fp4\n");
  EXPECT_NE(e.find("cfg.yaml:31: quant.type: expected one of nf4, got \"fp4\""), std::string::npos)
      << e;
  e = error_of(good + "lora:\n  r: 0\n");
  EXPECT_NE(e.find("cfg.yaml:30: lora.r: expected a positive rank, got 0"), std::string::npos)
      << e;
  e = error_of(good + "lora:\n  dropout: 1\n");
  EXPECT_NE(e.find("cfg.yaml:30: lora.dropout: expected a value in [0, 1), got 1"),
            std::string::npos) << e;
  e = error_of(good + "lora:\n  targets: []\n");
  EXPECT_NE(e.find("cfg.yaml:30: lora.targets: expected at least one module name"),
            std::string::npos) << e;
  e = error_of(good + "lora:\n  targets: {q: 1}\n");
  EXPECT_NE(e.find("cfg.yaml:30: lora.targets: expected a list of names, got a mapping"),
            std::string::npos) << e;
  e = error_of(good + "lora:\nquant:\n  blocksize: 48\n");
  EXPECT_NE(e.find("quant.blocksize: expected a power of two from 64 to 4096, got 48"),
            std::string::npos) << e;
  e = error_of(good + "lora:\nquant:\n  compute_dtype: fp16\n");
  EXPECT_NE(e.find("quant.compute_dtype: expected one of bf16, fp32, got \"fp16\""),
            std::string::npos) << e;
  e = error_of(good + "lora:\n  rank: 8\n");
  EXPECT_NE(e.find("cfg.yaml:30: lora.rank: unknown key (lora takes: alpha, dropout, r, rslora, "
                   "targets)"), std::string::npos) << e;
  e = error_of(good, {"quant.type=nf4"});
  EXPECT_NE(e.find("quant: needs a lora section"), std::string::npos) << e;
}

TEST(TrainConfig, LoraAndQuantRoundTripAndCountOnResume) {
  const TrainConfig plain = parse_train_config(kGood, "cfg.yaml");
  const TrainConfig c = parse_train_config(
      std::string(kGood) + "lora:\n  r: 4\n  targets: [q_proj, v_proj]\nquant:\n", "cfg.yaml");
  const std::string yaml = c.to_yaml();
  EXPECT_NE(yaml.find("lora:\n  r: 4\n"), std::string::npos) << yaml;
  EXPECT_NE(yaml.find("  targets: [q_proj, v_proj]\n"), std::string::npos) << yaml;
  EXPECT_NE(yaml.find("quant:\n  type: nf4\n"), std::string::npos) << yaml;
  const TrainConfig again = parse_train_config(yaml, "resolved.yaml");
  EXPECT_TRUE(ftune::config::diff_configs(c, again).empty());
  EXPECT_EQ(plain.to_yaml().find("lora:"), std::string::npos);
  // Turning LoRA on, or changing its rank, is a different run.
  auto d = ftune::config::diff_configs(plain, c);
  ASSERT_FALSE(d.empty());
  bool saw_r = false;
  for (const auto& ch : d) {
    EXPECT_FALSE(ftune::config::keeps_run_on_resume(ch.key)) << ch.key;
    if (ch.key == "lora.r") {
      saw_r = true;
      EXPECT_EQ(ch.before, "(none)");
      EXPECT_EQ(ch.after, "4");
    }
  }
  EXPECT_TRUE(saw_r);
  const TrainConfig r8 = parse_train_config(yaml, "x.yaml", {"lora.r=8"});
  d = ftune::config::diff_configs(c, r8);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].key, "lora.r");
}

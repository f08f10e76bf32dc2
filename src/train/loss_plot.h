// Renders a run's metrics.jsonl as an SVG loss curve (training loss per logged step, and eval loss
// where present). SVG keeps ftune free of plotting dependencies while any browser or image viewer
// can show the result.
#pragma once

#include <filesystem>

namespace ftune::train {

// Reads `metrics_jsonl` and writes `svg` atomically; lines without step/loss are skipped.
void write_loss_plot(const std::filesystem::path& metrics_jsonl, const std::filesystem::path& svg);

}  // namespace ftune::train

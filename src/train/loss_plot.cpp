// SVG loss curve from metrics.jsonl; see loss_plot.h.
#include "train/loss_plot.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <vector>

#include "core/fs.h"

namespace ftune::train {
namespace {

struct Series {
  std::vector<std::pair<double, double>> pts;  // (step, loss)
  const char* name;
  const char* color;
};

std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.4g", v);
  return buf;
}

}  // namespace

void write_loss_plot(const std::filesystem::path& metrics_jsonl, const std::filesystem::path& svg) {
  Series train{{}, "train loss", "#1f77b4"}, eval{{}, "eval loss", "#d62728"};
  std::istringstream lines(read_file(metrics_jsonl));
  for (std::string line; std::getline(lines, line);) {
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("step")) continue;
    double step = j["step"].get<double>();
    if (j.contains("loss") && j["loss"].is_number()) train.pts.emplace_back(step, j["loss"].get<double>());
    if (j.contains("eval_loss") && j["eval_loss"].is_number())
      eval.pts.emplace_back(step, j["eval_loss"].get<double>());
  }
  const double W = 720, H = 420, L = 70, R = 20, T = 40, B = 50;
  double x0 = 0, x1 = 1, y0 = INFINITY, y1 = -INFINITY;
  for (const Series* s : {&train, &eval}) {
    for (auto [x, y] : s->pts) {
      x1 = std::max(x1, x);
      y0 = std::min(y0, y);
      y1 = std::max(y1, y);
    }
  }
  if (!std::isfinite(y0)) y0 = 0, y1 = 1;
  if (y1 - y0 < 1e-9) y1 = y0 + 1;
  const double pad = 0.05 * (y1 - y0);
  y0 -= pad;
  y1 += pad;
  auto px = [&](double x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
  auto py = [&](double y) { return H - B - (y - y0) / (y1 - y0) * (H - T - B); };

  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << W / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">Loss</text>\n";
  for (int i = 0; i <= 5; ++i) {  // y grid and labels
    double y = y0 + (y1 - y0) * i / 5;
    o << "<line x1=\"" << L << "\" x2=\"" << W - R << "\" y1=\"" << py(y) << "\" y2=\"" << py(y)
      << "\" stroke=\"#ddd\"/><text x=\"" << L - 6 << "\" y=\"" << py(y) + 4
      << "\" text-anchor=\"end\">" << num(y) << "</text>\n";
  }
  for (int i = 0; i <= 5; ++i) {  // x labels
    double x = x0 + (x1 - x0) * i / 5;
    o << "<text x=\"" << px(x) << "\" y=\"" << H - B + 18 << "\" text-anchor=\"middle\">"
      << num(std::round(x)) << "</text>\n";
  }
  o << "<text x=\"" << (L + W - R) / 2 << "\" y=\"" << H - 10
    << "\" text-anchor=\"middle\">step</text>\n"
    << "<rect x=\"" << L << "\" y=\"" << T << "\" width=\"" << W - L - R << "\" height=\""
    << H - T - B << "\" fill=\"none\" stroke=\"#333\"/>\n";
  int legend = 0;
  for (const Series* s : {&train, &eval}) {
    if (s->pts.empty()) continue;
    o << "<polyline fill=\"none\" stroke=\"" << s->color << "\" stroke-width=\"2\" points=\"";
    for (auto [x, y] : s->pts) o << px(x) << "," << py(y) << " ";
    o << "\"/>\n";
    for (auto [x, y] : s->pts) {
      if (s == &eval) o << "<circle cx=\"" << px(x) << "\" cy=\"" << py(y) << "\" r=\"3\" fill=\"" << s->color << "\"/>\n";
    }
    const double ly = T + 16 + 18 * legend++;
    o << "<line x1=\"" << W - R - 130 << "\" x2=\"" << W - R - 105 << "\" y1=\"" << ly - 4
      << "\" y2=\"" << ly - 4 << "\" stroke=\"" << s->color << "\" stroke-width=\"2\"/><text x=\""
      << W - R - 100 << "\" y=\"" << ly << "\">" << s->name << "</text>\n";
  }
  o << "</svg>\n";
  write_file_atomic(svg, o.str());
}

}  // namespace ftune::train

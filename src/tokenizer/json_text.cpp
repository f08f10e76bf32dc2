// find_invalid_utf8_in_json / parse_json_text (see json_text.h).
#include "tokenizer/json_text.h"

#include <algorithm>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace ftune::tok {
namespace {

// Depth-first search for the first key or string value containing `marker`.
bool find_marker(const nlohmann::ordered_json& j, const std::string& marker, const std::string& path,
                 std::string& found) {
  if (j.is_string()) {
    if (j.get_ref<const std::string&>().find(marker) == std::string::npos) return false;
    found = path;
    return true;
  }
  if (j.is_array()) {
    for (size_t i = 0; i < j.size(); ++i) {
      if (find_marker(j[i], marker, path + "[" + std::to_string(i) + "]", found)) return true;
    }
    return false;
  }
  if (!j.is_object()) return false;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string child = path.empty() ? it.key() : path + "." + it.key();
    if (it.key().find(marker) != std::string::npos) {
      found = (path.empty() ? std::string("(top level)") : path) + " (a key)";
      return true;
    }
    if (find_marker(it.value(), marker, child, found)) return true;
  }
  return false;
}

}  // namespace

std::optional<JsonUtf8Problem> find_invalid_utf8_in_json(std::string_view text) {
  const auto bad = utf8_invalid_at(text);
  if (!bad) return std::nullopt;
  JsonUtf8Problem p;
  p.offset = *bad;
  p.line = 1 + std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(*bad), '\n');
  // A private-use marker the text does not contain replaces the first invalid subpart; the
  // rest of the text is repaired so that it parses. The string holding the marker is the field.
  std::string marker = "\xF3\xA0\x80\x80";  // U+E0000, unassigned
  while (text.find(marker) != std::string_view::npos) marker += "\xF3\xA0\x80\x81";
  const std::string_view head = text.substr(0, *bad);
  std::string rest = utf8_lossy(text.substr(*bad));  // starts with U+FFFD for the bad subpart
  const std::string repaired = std::string(head) + marker + rest.substr(3);
  const auto parsed = nlohmann::ordered_json::parse(repaired, nullptr, /*allow_exceptions=*/false);
  if (!parsed.is_discarded()) find_marker(parsed, marker, "", p.field);
  return p;
}

std::string describe(const JsonUtf8Problem& p, bool with_line) {
  std::string out = p.field.empty() ? "" : p.field + ": ";
  out += "invalid UTF-8 at ";
  if (with_line) out += "line " + std::to_string(p.line) + " (";
  out += "byte " + std::to_string(p.offset);
  if (with_line) out += ")";
  return out;
}

template <typename Json>
Json parse_json_text(std::string_view text, const std::string& origin) {
  if (const auto bad = find_invalid_utf8_in_json(text)) fail(origin, ": ", describe(*bad, true));
  try {
    return Json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(origin, ": invalid JSON: ", e.what());
  }
}

template nlohmann::json parse_json_text<nlohmann::json>(std::string_view, const std::string&);
template nlohmann::ordered_json parse_json_text<nlohmann::ordered_json>(std::string_view,
                                                                        const std::string&);

}  // namespace ftune::tok

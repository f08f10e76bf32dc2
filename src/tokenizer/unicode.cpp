// UTF-8 helpers, the GPT-2 byte alphabet and ICU-backed normalization (see unicode.h).
// The lossy decoder follows the Unicode "maximal subpart" rule so decode() output matches
// Rust's from_utf8_lossy byte for byte; ICU is optional (FTUNE_HAVE_ICU) because only a few
// tokenizers (NFC/NFKC/Lowercase normalizers) need it.
#include "tokenizer/unicode.h"

#include "core/error.h"

#ifdef FTUNE_HAVE_ICU
#include <unicode/uchar.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>
#endif

namespace ftune::tok {

int utf8_len(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead & 0xE0) == 0xC0) return 2;
  if ((lead & 0xF0) == 0xE0) return 3;
  if ((lead & 0xF8) == 0xF0) return 4;
  return 1;
}

char32_t utf8_next(std::string_view s, size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  const int n = utf8_len(b0);
  if (n == 1 || i + n > s.size()) {
    ++i;
    return b0;
  }
  char32_t cp = n == 2 ? (b0 & 0x1F) : n == 3 ? (b0 & 0x0F) : (b0 & 0x07);
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n;
  return cp;
}

void utf8_append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string utf8_encode(char32_t cp) {
  std::string out;
  utf8_append(out, cp);
  return out;
}

namespace {

// Length of the valid UTF-8 sequence at s[i], or 0 when invalid; `subpart` receives the length of
// the maximal prefix that could still start a valid sequence (at least 1), per Unicode 3.9 D93b.
size_t valid_sequence_at(std::string_view s, size_t i, size_t& subpart) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  subpart = 1;
  if (b0 < 0x80) return 1;
  int n;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    n = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    n = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    n = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (int k = 1; k < n; ++k) {
    if (i + k >= s.size()) return 0;
    const auto b = static_cast<unsigned char>(s[i + k]);
    const unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) return 0;
    subpart = k + 1;
  }
  return n;
}

}  // namespace

std::optional<size_t> utf8_invalid_at(std::string_view s) {
  size_t i = 0, subpart = 0;
  while (i < s.size()) {
    const size_t n = valid_sequence_at(s, i, subpart);
    if (n == 0) return i;
    i += n;
  }
  return std::nullopt;
}

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0, subpart = 0;
  while (i < bytes.size()) {
    const size_t n = valid_sequence_at(bytes, i, subpart);
    if (n == 0) {
      out += "\xEF\xBF\xBD";  // U+FFFD
      i += subpart;
    } else {
      out.append(bytes.substr(i, n));
      i += n;
    }
  }
  return out;
}

bool is_unicode_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

namespace {

struct ByteAlphabet {
  std::array<std::string, 256> to_unicode;
  std::array<int16_t, 324> to_byte;  // code points < 324 cover the whole alphabet
  ByteAlphabet() {
    to_byte.fill(-1);
    auto printable = [](int b) {
      return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    };
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const char32_t cp =
          printable(b) ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      to_unicode[b] = utf8_encode(cp);
      to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

}  // namespace

const std::array<std::string, 256>& byte_to_unicode_table() {
  return byte_alphabet().to_unicode;
}

std::optional<uint8_t> unicode_to_byte(char32_t c) {
  if (c >= 324) return std::nullopt;
  const int16_t b = byte_alphabet().to_byte[c];
  if (b < 0) return std::nullopt;
  return static_cast<uint8_t>(b);
}

#ifdef FTUNE_HAVE_ICU

namespace {

std::u16string to_utf16(std::string_view s) {
  std::u16string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    char32_t cp = utf8_next(s, i);
    if (cp >= 0x10000) {
      cp -= 0x10000;
      out.push_back(static_cast<char16_t>(0xD800 + (cp >> 10)));
      out.push_back(static_cast<char16_t>(0xDC00 + (cp & 0x3FF)));
    } else {
      out.push_back(static_cast<char16_t>(cp));
    }
  }
  return out;
}

std::string from_utf16(const std::u16string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    char32_t cp = s[i];
    if (cp >= 0xD800 && cp <= 0xDBFF && i + 1 < s.size()) {
      cp = 0x10000 + ((cp - 0xD800) << 10) + (s[++i] - 0xDC00);
    }
    utf8_append(out, cp);
  }
  return out;
}

}  // namespace

bool have_unicode_normalization() {
  return true;
}

std::string normalize_unicode(std::string_view s, NormalForm form) {
  UErrorCode status = U_ZERO_ERROR;
  const UNormalizer2* norm = nullptr;
  switch (form) {
    case NormalForm::kNfc:
      norm = unorm2_getNFCInstance(&status);
      break;
    case NormalForm::kNfd:
      norm = unorm2_getNFDInstance(&status);
      break;
    case NormalForm::kNfkc:
      norm = unorm2_getNFKCInstance(&status);
      break;
    case NormalForm::kNfkd:
      norm = unorm2_getNFKDInstance(&status);
      break;
  }
  FTUNE_CHECK(U_SUCCESS(status), "unicode normalization: ICU: ", u_errorName(status));
  const std::u16string in = to_utf16(s);
  std::u16string out(in.size() * 3 + 16, u'\0');
  int32_t n = unorm2_normalize(
      norm, reinterpret_cast<const UChar*>(in.data()), static_cast<int32_t>(in.size()),
      reinterpret_cast<UChar*>(out.data()), static_cast<int32_t>(out.size()), &status);
  if (status == U_BUFFER_OVERFLOW_ERROR) {
    status = U_ZERO_ERROR;
    out.assign(n, u'\0');
    n = unorm2_normalize(norm, reinterpret_cast<const UChar*>(in.data()),
                         static_cast<int32_t>(in.size()), reinterpret_cast<UChar*>(out.data()),
                         static_cast<int32_t>(out.size()), &status);
  }
  FTUNE_CHECK(U_SUCCESS(status), "unicode normalization: ICU: ", u_errorName(status));
  out.resize(n);
  return from_utf16(out);
}

std::string lowercase_unicode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const char32_t cp = utf8_next(s, i);
    if (cp < 0x80) {
      out.push_back(static_cast<char>(cp >= 'A' && cp <= 'Z' ? cp + 32 : cp));
    } else if (cp == 0x130) {
      out += "i\xCC\x87";  // the one unconditional multi-char lowercase: i + combining dot
    } else {
      utf8_append(out, static_cast<char32_t>(u_tolower(static_cast<UChar32>(cp))));
    }
  }
  return out;
}

std::string strip_accents(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const size_t start = i;
    const char32_t cp = utf8_next(s, i);
    if ((U_GET_GC_MASK(static_cast<UChar32>(cp)) & U_GC_M_MASK) == 0)
      out.append(s.substr(start, i - start));
  }
  return out;
}

#else

bool have_unicode_normalization() {
  return false;
}

std::string normalize_unicode(std::string_view, NormalForm) {
  fail("unicode normalization: ftune was built without ICU (install libicu-dev and rebuild)");
}

std::string lowercase_unicode(std::string_view) {
  fail("Lowercase normalizer: ftune was built without ICU (install libicu-dev and rebuild)");
}

std::string strip_accents(std::string_view) {
  fail("StripAccents normalizer: ftune was built without ICU (install libicu-dev and rebuild)");
}

#endif

}  // namespace ftune::tok

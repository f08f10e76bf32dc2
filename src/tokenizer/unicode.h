// UTF-8 and Unicode helpers the tokenizer backends share, written to match the Rust semantics
// HF tokenizers relies on (char::is_whitespace, String::from_utf8_lossy) rather than the C locale.
// Defines: UTF-8 decode/encode, validation, lossy repair, the GPT-2 byte <-> unicode alphabet
// and optional ICU-backed normalization (NFC/NFD/NFKC/NFKD, lowercase). Without ICU the
// normalization functions report that they are unavailable so callers can fail with context.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace ftune::tok {

// Decodes the code point starting at s[i] and advances i; the input must be valid UTF-8.
char32_t utf8_next(std::string_view s, size_t& i);
// Byte length of the UTF-8 sequence whose lead byte is `lead` (1 for continuation bytes).
int utf8_len(unsigned char lead);
void utf8_append(std::string& out, char32_t cp);
std::string utf8_encode(char32_t cp);

// Index of the first byte that is not part of valid UTF-8, or nullopt if `s` is valid.
std::optional<size_t> utf8_invalid_at(std::string_view s);
// Valid UTF-8 copy of `bytes`, each maximal invalid subpart replaced by U+FFFD (the rule
// Rust's String::from_utf8_lossy and Python's errors="replace" follow).
std::string utf8_lossy(std::string_view bytes);

// Rust char::is_whitespace: the Unicode White_Space property.
bool is_unicode_whitespace(char32_t c);

// GPT-2's bytes_to_unicode: printable Latin-1 bytes map to themselves, the other 68 bytes to
// U+0100.. in byte order, so every byte string becomes printable text.
const std::array<std::string, 256>& byte_to_unicode_table();
// Inverse of byte_to_unicode_table() for one code point; nullopt when it is not in the alphabet.
std::optional<uint8_t> unicode_to_byte(char32_t c);

enum class NormalForm { kNfc, kNfd, kNfkc, kNfkd };
// True when built with ICU (normalize / lowercase available).
bool have_unicode_normalization();
// Unicode normalization of valid UTF-8; throws ftune::Error when built without ICU.
std::string normalize_unicode(std::string_view s, NormalForm form);
// Per-character full lowercase mapping (Rust char::to_lowercase, no context rules).
std::string lowercase_unicode(std::string_view s);
// Removes combining marks (general category Mn), as HF's StripAccents after NFD.
std::string strip_accents(std::string_view s);

}  // namespace ftune::tok

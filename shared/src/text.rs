//! The string rules of docs/contract.md section 5: characters are Unicode scalar values, never split.

/// The number of Unicode scalar values in `s`.
pub fn chars(s: &str) -> usize {
    if s.is_ascii() {
        s.len()
    } else {
        s.chars().count()
    }
}

/// `s` when it has at most `n` chars, else its first `n - 1` chars and `…` (U+2026).
/// `n = 0` gives the empty string.
pub fn truncate(s: &str, n: usize) -> String {
    if n == 0 {
        return String::new();
    }
    // A char is at least one byte: a short string needs no counting.
    if s.len() <= n {
        return s.to_owned();
    }
    let mut indices = s.char_indices();
    let Some((cut, _)) = indices.nth(n - 1) else {
        return s.to_owned();
    };
    if indices.next().is_none() {
        return s.to_owned();
    }
    let mut out = String::with_capacity(cut + '…'.len_utf8());
    out.push_str(&s[..cut]);
    out.push('…');
    out
}

/// `s` when it has at most `max` bytes, else as many of its first chars as fit in `max`
/// bytes together with a closing `…` (U+2026, 3 bytes). For the sizes docs/contract.md section 8 caps in
/// bytes: headers, stream fields. `max` below 3 gives the empty string for a long `s`.
pub fn cap_bytes(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return std::borrow::Cow::Borrowed(s);
    }
    let room = max.saturating_sub('…'.len_utf8());
    if max < '…'.len_utf8() {
        return std::borrow::Cow::Borrowed("");
    }
    let mut cut = room;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(cut + '…'.len_utf8());
    out.push_str(&s[..cut]);
    out.push('…');
    std::borrow::Cow::Owned(out)
}

/// `text` with every control character (a newline, ESC, ...), every character that reorders
/// the text around it (the bidirectional overrides and isolates) and every backslash written
/// as a Rust escape (`\n`, `\u{1b}`, `\u{202e}`, `\\`), for every line a command prints: a
/// field taken from a message or a file can then neither forge a row, nor disguise one, nor
/// reach the terminal. Only those are escaped (not quotes, not other scripts) so that ordinary
/// text reads as it is.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| {
        c.is_control()
            || c == '\\'
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if escaped(c) {
            if c.is_control() || c == '\\' {
                out.extend(c.escape_debug());
            } else {
                out.extend(c.escape_unicode());
            }
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The bytes `seg` leaves as they are, the unreserved ones of docs/contract.md section 5:
/// `A-Z a-z 0-9 - . _ ~`. Every other byte, and every byte of a non-ASCII char, is encoded.
const UNRESERVED_KEPT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `s` percent-encoded for a URL path segment or query value: every byte of its UTF-8 form
/// outside `A-Z a-z 0-9 - . _ ~` becomes `%XX` (uppercase hex).
pub fn seg(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, UNRESERVED_KEPT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cap_bytes_table() {
        let table = [
            ("", 4, ""),
            ("abcd", 4, "abcd"),
            ("abcde", 4, "a…"),
            ("abcde", 3, "…"),
            ("abcde", 2, ""),
            ("héllo", 6, "héllo"),
            // "h" + "é" is 3 bytes; with the 3-byte marker that is 6 of 6.
            ("héllo!", 6, "hé…"),
            ("😀😀", 8, "😀😀"),
            ("😀😀😀", 8, "😀…"),
            ("😀😀😀", 6, "…"),
        ];
        for (s, n, expected) in table {
            assert_eq!(cap_bytes(s, n), expected, "cap_bytes({s:?}, {n})");
        }
    }

    #[test]
    fn printable_escapes_what_could_forge_or_disguise_a_line() {
        let table = [
            ("plain, \"quoted\", é 😀", "plain, \"quoted\", é 😀"),
            ("a\nb", "a\\nb"),
            ("\u{1b}[31mred", "\\u{1b}[31mred"),
            ("back\\slash", "back\\\\slash"),
            ("evil\u{202e}txt.exe", "evil\\u{202e}txt.exe"),
            ("\u{0}", "\\0"),
        ];
        for (text, expected) in table {
            assert_eq!(printable(text), expected, "{text:?}");
        }
    }

    #[test]
    fn truncate_table() {
        let table = [
            ("", 0, ""),
            ("abc", 0, ""),
            ("", 5, ""),
            ("abc", 3, "abc"),
            ("abcd", 3, "ab…"),
            ("abcd", 1, "…"),
            ("a", 1, "a"),
            ("héllo wörld", 5, "héll…"),
            ("日本語のテキスト", 4, "日本語…"),
            ("😀😀😀", 2, "😀…"),
            ("😀😀", 2, "😀😀"),
            // Combining marks are scalar values of their own.
            ("e\u{301}e\u{301}", 3, "e\u{301}…"),
        ];
        for (s, n, expected) in table {
            assert_eq!(truncate(s, n), expected, "truncate({s:?}, {n})");
        }
    }

    #[test]
    fn chars_counts_scalar_values() {
        assert_eq!(chars(""), 0);
        assert_eq!(chars("abc"), 3);
        assert_eq!(chars("ü😀…"), 3);
    }

    #[test]
    fn seg_table() {
        let table = [
            ("", ""),
            ("acme", "acme"),
            ("AZaz09-._~", "AZaz09-._~"),
            ("a b", "a%20b"),
            ("a/b", "a%2Fb"),
            ("sentry: 1234", "sentry%3A%201234"),
            ("ü", "%C3%BC"),
            ("😀", "%F0%9F%98%80"),
            ("%?#&=+", "%25%3F%23%26%3D%2B"),
        ];
        for (s, expected) in table {
            assert_eq!(seg(s), expected, "seg({s:?})");
        }
    }

    fn decode(s: &str) -> Vec<u8> {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn cap_bytes_fits_and_keeps_a_prefix(s in any::<String>(), max in 0usize..64) {
            let capped = cap_bytes(&s, max);
            prop_assert!(capped.len() <= max || capped == s);
            prop_assert!(capped.len() <= max.max(s.len()));
            if capped != s {
                prop_assert!(capped.is_empty() || capped.ends_with('…'));
                prop_assert!(s.starts_with(capped.trim_end_matches('…')) || s.starts_with(&capped[..capped.len() - 3]));
            }
        }
    }

    proptest! {
        #[test]
        fn truncate_fits_and_keeps_a_prefix(s in any::<String>(), n in 0usize..40) {
            let out = truncate(&s, n);
            prop_assert!(chars(&out) <= n);
            if chars(&s) <= n {
                prop_assert_eq!(&out, &s);
            } else if n > 0 {
                let kept = out.strip_suffix('…').expect("ends with an ellipsis");
                prop_assert!(s.starts_with(kept));
                prop_assert_eq!(chars(kept), n - 1);
            } else {
                prop_assert_eq!(out, "");
            }
        }

        #[test]
        fn seg_is_unreserved_or_escaped_and_reversible(s in any::<String>()) {
            let out = seg(&s);
            let bytes = out.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                let b = bytes[i];
                if b == b'%' {
                    prop_assert!(i + 2 < bytes.len());
                    for h in &bytes[i + 1..i + 3] {
                        prop_assert!(h.is_ascii_digit() || (b'A'..=b'F').contains(h), "{}", out);
                    }
                    i += 3;
                } else {
                    prop_assert!(b.is_ascii_alphanumeric() || b"-._~".contains(&b), "{}", out);
                    i += 1;
                }
            }
            prop_assert_eq!(decode(&out), s.as_bytes());
        }
    }
}

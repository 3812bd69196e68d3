//! Python's notion of whitespace, so that `split()` / `strip()` behave as in the reference
//! implementations (Python also counts U+001C..U+001F as whitespace; Rust does not).

/// Whether Python's `str.isspace()` holds for `c`.
pub fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `text.split()`: runs of whitespace separate, no empty pieces.
pub fn python_split(text: &str) -> impl Iterator<Item = &str> {
    text.split(is_python_space)
        .filter(|piece| !piece.is_empty())
}

/// Python's `' '.join(text.split())`.
pub fn collapse_whitespace(text: &str) -> String {
    python_split(text).collect::<Vec<_>>().join(" ")
}

/// Python's `text.strip()`.
pub fn python_strip(text: &str) -> &str {
    text.trim_matches(is_python_space)
}

/// Python's `text.rstrip()`.
pub fn python_rstrip(text: &str) -> &str {
    text.trim_end_matches(is_python_space)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn information_separators_are_whitespace_as_in_python() {
        assert_eq!(
            python_split("a\u{1c}b\u{3000}c\u{a0}d\u{200b}e").collect::<Vec<_>>(),
            vec!["a", "b", "c", "d\u{200b}e"]
        );
        assert_eq!(python_strip("\u{1f} x \u{2003}"), "x");
    }
}

//! Text from files and command lines quoted in messages: errors are one
//! line whatever that text holds.

/// `text` with its control characters escaped (`\n`, `\t`, `\u{1b}`...).
pub fn one_line(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn control_characters_are_escaped_and_the_rest_is_kept() {
        assert_eq!(one_line("d\ny\t\u{1b}[31m"), "d\\ny\\t\\u{1b}[31m");
        assert_eq!(
            one_line("\"90000\" is not a port: é"),
            "\"90000\" is not a port: é"
        );
    }
}

//! Text for people: bounded and with its causes. Every layer writes messages and log fields,
//! so these sit at the bottom, beside the value types.

/// `text`, cut at a character boundary to at most `max_bytes` bytes, `…` where it was cut.
pub fn truncated(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let cut = (0..=max_bytes)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}…", &text[..cut])
}

/// `err: cause: cause`, because tonic's transport error alone says only "transport error".
pub fn with_sources(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

//! [`report`]: an error and its causes as one line, for the CLI and the logs.
//!
//! The error types themselves live beside the code that raises them, one enum per
//! subsystem (as aya keeps `MapError` in `maps/`): `datapath::DatapathError` and
//! `PortError`, `ports::WatchError`, `rules::RulesError`, `control::ControlError`, ...
//! Each variant names what it was doing and keeps its source.

/// An error with the causes its own message does not already state, joined by `: `.
#[must_use]
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

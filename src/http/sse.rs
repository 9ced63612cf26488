//! The documented shape of one server-sent event, as a client's parser yields it.
//!
//! A `text/event-stream` body is a sequence of events, and checkers of the document (e.g.
//! schemathesis) validate each event against the media type's schema: documented as a
//! plain string, every streamed 200 read as a violation.

use utoipa::ToSchema;

/// One event of a stream. What `data` holds is JSON text whose shape each route describes
/// per event name.
#[derive(ToSchema)]
pub struct ServerSentEvent {
    /// The event's name (`token`, `done`, `error`, `progress`, ...).
    pub event: Option<String>,
    /// The event's data: JSON text.
    pub data: String,
    pub id: Option<String>,
    /// Reconnection delay in ms, where the server sets one.
    pub retry: Option<u64>,
}

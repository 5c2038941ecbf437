//! One turn of a conversation, as chat templates see it.
use serde::{Deserialize, Serialize};

/// A chat message: `{"role": ..., "content": ...}` plus any other fields the record carries
/// (`tool_calls`, `name`, `tool_call_id`, …), which reach the template unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
    /// Other fields of the message, passed to the template as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    /// A message with only a role and a content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            extra: serde_json::Map::new(),
        }
    }
}

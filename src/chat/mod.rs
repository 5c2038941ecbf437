//! Conversations: messages, and the model's chat template that turns them into tokens.
mod jinja;
pub mod message;
pub mod session;
pub mod template;

pub use message::Message;
pub use session::{ChatSession, Reply};
pub use template::{model_template, ChatTemplate, EncodedChat, CHATML};

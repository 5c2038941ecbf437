//! Conversational training records — chat `{"messages"}`, ShareGPT `{"conversations"}` and
//! Alpaca `{"instruction","input","output"}` — read into one list of [`Message`]s each, with
//! the problems of a record named by its line.
use crate::chat::Message;
use serde_json::Value;

/// The roles a chat record may use.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// How a conversational record is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// `{"messages": [{"role", "content"}, …]}` (Hugging Face / OpenAI).
    Chat,
    /// `{"conversations": [{"from", "value"}, …]}`.
    ShareGpt,
    /// `{"instruction", "input"?, "output"}`: a user turn (the instruction, then the input
    /// after a blank line when there is one) and the assistant's output.
    Alpaca,
}

/// The messages of one record, or what is wrong with it (without file and line: the caller
/// adds them).
pub fn messages(kind: RecordKind, record: &Value) -> Result<Vec<Message>, String> {
    let obj = record
        .as_object()
        .ok_or_else(|| "expected a JSON object".to_string())?;
    let messages = match kind {
        RecordKind::Chat => turns(
            obj.get("messages"),
            "messages",
            "role",
            "content",
            chat_role,
        )?,
        RecordKind::ShareGpt => turns(
            obj.get("conversations"),
            "conversations",
            "from",
            "value",
            sharegpt_role,
        )?,
        RecordKind::Alpaca => {
            let field = |k: &str| match obj.get(k) {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                None | Some(Value::Null) => Ok(None),
                Some(_) => Err(format!("field {k:?} is not a string")),
            };
            let instruction = field("instruction")?.ok_or("no \"instruction\" field")?;
            let output = field("output")?.ok_or("no \"output\" field")?;
            let user = match field("input")? {
                Some(input) if !input.is_empty() => format!("{instruction}\n\n{input}"),
                _ => instruction,
            };
            vec![
                Message::new("user", user),
                Message::new("assistant", output),
            ]
        }
    };
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("the conversation has no assistant turn, so nothing to learn from".into());
    }
    Ok(messages)
}

/// The turns of a list field, each `{role_key, content_key, …}`.
fn turns(
    list: Option<&Value>,
    list_key: &str,
    role_key: &str,
    content_key: &str,
    role: fn(&str) -> Option<&'static str>,
) -> Result<Vec<Message>, String> {
    let list = match list {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(format!("field {list_key:?} is not a list")),
        None => return Err(format!("no {list_key:?} field")),
    };
    if list.is_empty() {
        return Err(format!("{list_key:?} is an empty list"));
    }
    list.iter()
        .enumerate()
        .map(|(i, turn)| {
            let n = i + 1;
            let Some(t) = turn.as_object() else {
                return Err(format!("turn {n} is not a JSON object"));
            };
            let given = match t.get(role_key) {
                Some(Value::String(s)) => s.as_str(),
                _ => return Err(format!("turn {n} has no string {role_key:?}")),
            };
            let Some(name) = role(given) else {
                return Err(format!(
                    "turn {n} has the unknown role {given:?} (expected one of {})",
                    known_roles(role)
                ));
            };
            let content = match t.get(content_key) {
                Some(Value::String(s)) => s.clone(),
                // OpenAI writes a null content beside tool calls.
                Some(Value::Null) if t.contains_key("tool_calls") => String::new(),
                _ => return Err(format!("turn {n} has no string {content_key:?}")),
            };
            let mut m = Message::new(name, content);
            for (k, v) in t {
                if k != role_key && k != content_key {
                    m.extra.insert(k.clone(), v.clone());
                }
            }
            Ok(m)
        })
        .collect()
}

fn chat_role(r: &str) -> Option<&'static str> {
    ROLES.iter().copied().find(|k| *k == r)
}

/// ShareGPT's speaker names: `human`, `gpt`, `system`, plus the chat names and the tool
/// speakers some exports use.
fn sharegpt_role(r: &str) -> Option<&'static str> {
    Some(match r {
        "human" | "user" => "user",
        "gpt" | "assistant" => "assistant",
        "system" => "system",
        "tool" | "function_response" | "observation" => "tool",
        _ => return None,
    })
}

fn known_roles(role: fn(&str) -> Option<&'static str>) -> String {
    let names: &[&str] = if role("human").is_some() {
        &["human", "gpt", "system", "tool"]
    } else {
        &ROLES
    };
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_each_layout() {
        let chat = json!({"messages": [{"role": "user", "content": "a"},
            {"role": "assistant", "content": null, "tool_calls": []}]});
        let m = messages(RecordKind::Chat, &chat).unwrap();
        assert_eq!(
            (m[1].role.as_str(), m[1].content.as_str()),
            ("assistant", "")
        );
        assert!(m[1].extra.contains_key("tool_calls"));
        let sg = json!({"conversations": [{"from": "system", "value": "s"},
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]});
        let m = messages(RecordKind::ShareGpt, &sg).unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        let al = json!({"instruction": "Sum", "input": "1 2", "output": "3"});
        let m = messages(RecordKind::Alpaca, &al).unwrap();
        assert_eq!(m[0].content, "Sum\n\n1 2");
        let al = json!({"instruction": "Hi", "input": "", "output": "Hello"});
        assert_eq!(messages(RecordKind::Alpaca, &al).unwrap()[0].content, "Hi");
    }

    #[test]
    fn names_what_is_wrong() {
        let err = |kind, v: Value| messages(kind, &v).unwrap_err();
        assert!(err(RecordKind::Chat, json!({"messages": []})).contains("empty list"));
        let e = err(
            RecordKind::Chat,
            json!({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}),
        );
        assert!(
            e.contains("turn 2") && e.contains("unknown role \"bot\""),
            "{e}"
        );
        let e = err(
            RecordKind::Chat,
            json!({"messages": [{"role": "user", "content": "q"}]}),
        );
        assert!(e.contains("no assistant turn"), "{e}");
        let e = err(
            RecordKind::ShareGpt,
            json!({"conversations": [{"from": "robot", "value": "q"}]}),
        );
        assert!(e.contains("human, gpt"), "{e}");
        assert!(err(RecordKind::Alpaca, json!({"instruction": "x"})).contains("output"));
        assert!(err(RecordKind::Chat, json!([1])).contains("JSON object"));
    }
}

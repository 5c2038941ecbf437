//! Chat generation: `generate --chat` / `--messages` and the multi-turn `chat` command give
//! transformers' greedy replies on the rendered conversation, turn after turn, with the KV
//! cache carried across turns and the oldest turns dropped when the model's positions run out.
use crate::common;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const NEW: usize = 6;

/// The tiny GPT-J (64 positions, 301 rows) with its byte-level tokenizer extended by ChatML's
/// two special tokens and a ChatML template in tokenizer_config.json, as an Instruct model
/// ships them.
pub(crate) fn chat_model(dir: &Path) -> PathBuf {
    let m = dir.join("chat-model");
    common::copy_dir(&common::fixture("tiny_gptj/hf_safetensors"), &m);
    let path = m.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let added = tok["added_tokens"].as_array_mut().unwrap();
    for (id, content) in [(257, "<|im_start|>"), (258, "<|im_end|>")] {
        added.push(serde_json::json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }));
    }
    std::fs::write(&path, tok.to_string()).unwrap();
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "chat_template": octet::chat::CHATML,
    });
    std::fs::write(m.join("tokenizer_config.json"), config.to_string()).unwrap();
    m
}

struct Oracle {
    prompt_ids: Vec<i64>,
    ids: Vec<i64>,
    text: String,
}

/// transformers' greedy replies to each conversation.
fn oracle(model: &Path, conversations: &serde_json::Value) -> Vec<Oracle> {
    let convs = conversations.to_string();
    let n = NEW.to_string();
    let out = common::script_json(
        "hf_chat_generate.py",
        &[
            model.as_os_str(),
            OsStr::new(&convs),
            OsStr::new(&n),
            OsStr::new("<|im_end|>"),
        ],
    );
    out.as_array()
        .unwrap()
        .iter()
        .map(|r| Oracle {
            prompt_ids: serde_json::from_value(r["prompt_ids"].clone()).unwrap(),
            ids: serde_json::from_value(r["ids"].clone()).unwrap(),
            text: r["text"].as_str().unwrap().to_string(),
        })
        .collect()
}

fn greedy(model: &Path) -> Vec<String> {
    [
        "--model",
        common::s(model),
        "--temperature",
        "0",
        "--max-new-tokens",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([NEW.to_string()])
    .collect()
}

#[test]
fn generate_chat_and_messages_give_the_transformers_reply() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model(tmp.path());
    let want = oracle(
        &model,
        &serde_json::json!([
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "bye"}],
        ]),
    );
    let mut args: Vec<String> = vec!["generate".into(), "--chat".into()];
    args.extend(greedy(&model));
    args.extend(["--prompt", "hi", "--system", "Be brief."].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = common::octet(&refs);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, want[0].text, "{stderr}");
    assert!(stderr.contains(&format!("for {} prompt tokens", want[0].prompt_ids.len())));

    let file = tmp.path().join("conversation.json");
    let conv = serde_json::json!({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}]});
    std::fs::write(&file, conv.to_string()).unwrap();
    let mut args: Vec<String> = vec!["generate".into()];
    args.extend(greedy(&model));
    args.extend(["--messages".into(), common::s(&file).to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, stdout, stderr) = common::octet(&refs);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, want[1].text, "{stderr}");
    let why = if want[1].ids.last() == Some(&258) {
        "end of turn"
    } else {
        "length"
    };
    assert!(stderr.contains(&format!("stopped on {why}")), "{stderr}");

    // Bad conversations are refused before anything is generated.
    std::fs::write(&file, "{\"messages\": []}").unwrap();
    let (ok, stdout, stderr) = common::octet(&[
        "generate",
        "--model",
        common::s(&model),
        "--messages",
        common::s(&file),
    ]);
    assert!(!ok && stdout.is_empty());
    assert!(
        stderr.contains("conversation.json") && stderr.contains("no messages"),
        "{stderr}"
    );
    std::fs::write(&file, "[{\"role\": \"user\"}]").unwrap();
    let (ok, _, stderr) = common::octet(&[
        "generate",
        "--model",
        common::s(&model),
        "--messages",
        common::s(&file),
    ]);
    assert!(!ok && stderr.contains("conversation.json"), "{stderr}");
    let (ok, _, stderr) = common::octet(&[
        "generate",
        "--model",
        common::s(&model),
        "--prompt",
        "hi",
        "--system",
        "x",
    ]);
    assert!(!ok && stderr.contains("--chat"), "{stderr}");
}

/// Three turns on stdin: each reply equals transformers' reply to the conversation so far,
/// computed from scratch; the second turn reuses the first turn's cache; the third no longer
/// fits 64 positions, so the first exchange is dropped (and the cache rolled back to where
/// the conversations agree).
#[test]
fn chat_keeps_the_cache_across_turns_and_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model(tmp.path());
    let mut args: Vec<String> = vec!["chat".into()];
    args.extend(greedy(&model));
    let mut child = Command::new(env!("CARGO_BIN_EXE_octet"))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hi\n\nok\n/reset\nyes\nagain and again\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    let replies: Vec<&str> = stdout.split_terminator('\n').collect();
    assert_eq!(replies.len(), 4, "{stdout:?}\n{stderr}");
    let user = |c: &str| serde_json::json!({"role": "user", "content": c});
    let asst = |c: &str| serde_json::json!({"role": "assistant", "content": c});
    let first = oracle(&model, &serde_json::json!([[user("hi")]]));
    let second = oracle(
        &model,
        &serde_json::json!([[user("hi"), asst(replies[0]), user("ok")]]),
    );
    // After /reset the conversation starts again.
    let third = oracle(&model, &serde_json::json!([[user("yes")]]));
    assert_eq!(replies[0], first[0].text);
    assert_eq!(replies[1], second[0].text, "{stderr}");
    assert_eq!(replies[2], third[0].text, "{stderr}");
    let reused: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix('('))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(reused.len(), 4, "{stderr}");
    assert!(
        reused[1] >= first[0].prompt_ids.len(),
        "turn 2 reused {} tokens, fewer than turn 1's prompt:\n{stderr}",
        reused[1]
    );
    // After /reset the cache is rolled back to the shared "<|im_start|>user\n".
    assert_eq!(reused[2], 6, "{stderr}");
    // The fourth turn, [yes, r3, again and again] plus 6 new tokens, exceeds 64 positions:
    // the first exchange is dropped.
    assert!(
        stderr.contains("the 2 oldest messages were dropped"),
        "{stderr}"
    );
    let fourth = oracle(&model, &serde_json::json!([[user("again and again")]]));
    assert_eq!(replies[3], fourth[0].text, "{stderr}");
    assert_eq!(reused[3], 6, "{stderr}");
}

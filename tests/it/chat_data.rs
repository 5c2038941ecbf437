//! Conversational training data: chat, ShareGPT and Alpaca records through the chat
//! template, assistant-only labels, `--train-on-prompt`, long records, and bad records named
//! by file and line with nothing written.
use crate::common;
use octet::chat::ChatTemplate;
use octet::tokenizer::Tokenizer;
use octet::train::data::{load_sequences_with, DataFormat, ReadOptions, IGNORE_INDEX};
use std::path::{Path, PathBuf};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(common::fixture("tiny_gptj/gpt2_tokenizer")).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const CHAT: &str = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome."}]}
{"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there, friend."}]}
"#;
const SHAREGPT: &str = r#"{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}, {"from": "human", "value": "And Italy?"}, {"from": "gpt", "value": "Rome."}]}
{"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "Hi there, friend."}]}
"#;
const ALPACA: &str = r#"{"instruction": "Capital of France?", "input": "", "output": "Paris."}
{"instruction": "Say", "input": "hi", "output": "Hi there, friend."}
"#;

/// The texts of the labelled runs of each sequence.
fn labelled_texts(tok: &Tokenizer, labels: &[i64]) -> Vec<String> {
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut prev = false;
    for &l in labels {
        let on = l != IGNORE_INDEX;
        if on && !prev {
            runs.push(Vec::new());
        }
        if on {
            runs.last_mut().unwrap().push(l as u32);
        }
        prev = on;
    }
    runs.iter().map(|r| tok.decode(r).unwrap()).collect()
}

#[test]
fn conversations_train_on_the_assistant_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let template = ChatTemplate::chatml(tok.clone()).unwrap();
    let read = ReadOptions {
        template: Some(&template),
        ..ReadOptions::default()
    };
    let load = |name: &str, text: &str, read: &ReadOptions| {
        // Long enough for the longest conversation (99 tokens): none is cut.
        load_sequences_with(&write(dir.path(), name, text), &tok, 128, read).unwrap()
    };
    let (chat, stats) = load("chat.jsonl", CHAT, &read);
    assert_eq!((stats.format, stats.documents), (DataFormat::Chat, 2));
    assert_eq!(
        labelled_texts(&tok, &chat[0].labels),
        ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    );
    assert_eq!(
        labelled_texts(&tok, &chat[1].labels),
        ["Hi there, friend.<|im_end|>"]
    );
    // The same conversations as ShareGPT give the same sequences.
    let (sharegpt, stats) = load("sg.jsonl", SHAREGPT, &read);
    assert_eq!(stats.format, DataFormat::ShareGpt);
    assert_eq!(sharegpt, chat);
    // Alpaca: one user turn (instruction, blank line, input) and the output.
    let (alpaca, stats) = load("alpaca.jsonl", ALPACA, &read);
    assert_eq!(stats.format, DataFormat::Alpaca);
    assert_eq!(
        labelled_texts(&tok, &alpaca[0].labels),
        ["Paris.<|im_end|>"]
    );
    let rendered = template
        .render(
            &[
                octet::chat::Message::new("user", "Say\n\nhi"),
                octet::chat::Message::new("assistant", "Hi there, friend."),
            ],
            false,
        )
        .unwrap();
    let n = tok.encode(&rendered).unwrap().len();
    let ids: Vec<u32> = alpaca[1].input_ids[..n].iter().map(|&i| i as u32).collect();
    assert_eq!(tok.decode(&ids).unwrap(), rendered);
    // --train-on-prompt: every token but the padding.
    let all = ReadOptions {
        train_on_prompt: true,
        ..read
    };
    let (every, _) = load("chat2.jsonl", CHAT, &all);
    for s in &every {
        let real = s.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        assert_eq!(s.labels[..real], s.input_ids[..real]);
        assert!(s.labels[real..].iter().all(|&l| l == IGNORE_INDEX));
    }
    // Longer than seq_len: cut (counted), or dropped with drop_long. At the second record's
    // length the first (system turn and two exchanges) is cut before its first answer, so no
    // trained token is left in it.
    let short = [
        octet::chat::Message::new("user", "Say hi"),
        octet::chat::Message::new("assistant", "Hi there, friend."),
    ];
    let n = template.encode(&short, false).unwrap().len();
    let path = write(dir.path(), "c3.jsonl", CHAT);
    let (cut, stats) = load_sequences_with(&path, &tok, n, &read).unwrap();
    assert_eq!(cut.len(), 1);
    assert_eq!(
        (stats.truncated, stats.dropped, stats.dropped_long),
        (1, 1, 0)
    );
    let drop = ReadOptions {
        drop_long: true,
        ..read
    };
    let (kept, stats) = load_sequences_with(&path, &tok, n, &drop).unwrap();
    assert_eq!((kept.len(), stats.truncated, stats.dropped_long), (1, 0, 1));
    assert_eq!(kept[0], cut[0]);
    let e = load_sequences_with(&path, &tok, n - 1, &drop).unwrap_err();
    assert!(e.to_string().contains("c3.jsonl"), "{e}");
}

#[test]
fn bad_records_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer();
    let chatml = ChatTemplate::chatml(tok.clone()).unwrap();
    let ok = r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#;
    // `body` is line 2, after a good record; `line` is where the error is expected.
    let err_at = |name: &str, body: &str, template: &ChatTemplate, line: &str| {
        let path = write(dir.path(), name, &format!("{ok}\n{body}\n"));
        let read = ReadOptions {
            template: Some(template),
            ..ReadOptions::default()
        };
        let e = load_sequences_with(&path, &tok, 64, &read)
            .unwrap_err()
            .to_string();
        assert!(e.contains(name) && e.contains(line), "{e}");
        e
    };
    let err =
        |name: &str, body: &str, template: &ChatTemplate| err_at(name, body, template, "line 2");
    let e = err(
        "role.jsonl",
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}"#,
        &chatml,
    );
    assert!(e.contains("unknown role \"bot\""), "{e}");
    let e = err("empty.jsonl", r#"{"messages": []}"#, &chatml);
    assert!(e.contains("empty list"), "{e}");
    let e = err(
        "noanswer.jsonl",
        r#"{"messages": [{"role": "user", "content": "q"}]}"#,
        &chatml,
    );
    assert!(e.contains("no assistant turn"), "{e}");
    // Roles out of order, refused by a template that raises; the template's line is named.
    let strict = ChatTemplate::new(
        "{% for m in messages %}\n{% if (m.role == 'user') != (loop.index0 is even) %}\
         {{ raise_exception('roles must alternate') }}{% endif %}{{ m.content }}\n{% endfor %}",
        "strict.jinja",
        tok.clone(),
    )
    .unwrap();
    let e = err(
        "order.jsonl",
        r#"{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}"#,
        &strict,
    );
    assert!(
        e.contains("strict.jinja") && e.contains("line 2") && e.contains("roles must alternate"),
        "{e}"
    );
    // A template that fails to render names its line.
    let broken = ChatTemplate::new(
        "{% for m in messages %}\n\n{{ m.content.nosuchmethod() }}{% endfor %}",
        "broken.jinja",
        tok.clone(),
    )
    .unwrap();
    // It fails on the first record already.
    let e = err_at("render.jsonl", ok, &broken, "line 1");
    assert!(
        e.contains("broken.jinja") && e.contains("template line 3"),
        "{e}"
    );
    // Not UTF-8.
    let path = dir.path().join("latin1.jsonl");
    let mut bytes = format!("{ok}\n").into_bytes();
    bytes.extend(b"{\"messages\": \"caf\xe9\"}\n");
    std::fs::write(&path, bytes).unwrap();
    let read = ReadOptions {
        template: Some(&chatml),
        ..ReadOptions::default()
    };
    let e = load_sequences_with(&path, &tok, 64, &read)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("latin1.jsonl") && e.contains("line 2") && e.contains("UTF-8"),
        "{e}"
    );
}

#[test]
fn train_on_chat_data_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture("tiny_gptj/hf_safetensors");
    let data = write(tmp.path(), "chat.jsonl", &CHAT.repeat(4));
    let out = tmp.path().join("run");
    let args = |data: &Path, extra: &[&str]| {
        let mut a = vec![
            "train".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--data".into(),
            data.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--steps".into(),
            "2".into(),
            "--seq-len".into(),
            "64".into(),
            "--batch-size".into(),
            "2".into(),
            "--grad-accum".into(),
            "2".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| common::octet(&a.iter().map(String::as_str).collect::<Vec<_>>());
    // A bad record: refused with file and line, and no output folder is made.
    let bad = write(
        tmp.path(),
        "bad.jsonl",
        &format!("{CHAT}{{\"messages\": [{{\"role\": \"narrator\", \"content\": \"x\"}}]}}\n"),
    );
    let (ok, _, err) = run(args(&bad, &[]));
    assert!(
        !ok && err.contains("bad.jsonl") && err.contains("line 3"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
    // Forcing a format the records do not have names the first bad line.
    let (ok, _, err) = run(args(&data, &["--format", "alpaca"]));
    assert!(
        !ok && err.contains("line 1") && err.contains("instruction"),
        "{err}"
    );
    let (ok, _, err) = run(args(&data, &[]));
    assert!(ok, "{err}");
    assert!(err.contains("ChatML") && err.contains("as chat"), "{err}");
    assert!(err.contains("loss on the assistant's tokens"), "{err}");
    assert!(out.join("adapter_model.safetensors").exists());
}

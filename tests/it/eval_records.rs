//! `octet eval` on chat records: each record scored on its own, on the assistant's tokens
//! (or every token with --train-on-prompt), equal to transformers on the same rendered
//! conversations.
use crate::chat_generate::chat_model;
use crate::common::{self, s};
use std::ffi::OsStr;

/// Short enough for the tiny model's 64 positions (its tokenizer is byte-level).
fn conversations() -> serde_json::Value {
    serde_json::json!([
        [
            {"role": "system", "content": "Be"},
            {"role": "user", "content": "fox?"},
            {"role": "assistant", "content": "dog."}
        ],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "end."}
        ],
        [
            {"role": "user", "content": "café"},
            {"role": "assistant", "content": "déjà"}
        ]
    ])
}

fn eval(args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = common::octet(&[&["eval", "--json"], args].concat());
    assert!(ok, "eval: {err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn chat_records_score_the_assistant_tokens_like_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let model = chat_model(tmp.path());
    let data = tmp.path().join("chat.jsonl");
    let lines: Vec<String> = conversations()
        .as_array()
        .unwrap()
        .iter()
        .map(|m| serde_json::json!({ "messages": m }).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let convs = conversations().to_string();
    let want = common::script_json("hf_record_nll.py", &[model.as_os_str(), OsStr::new(&convs)]);
    for (flags, key) in [(vec![], "assistant"), (vec!["--train-on-prompt"], "all")] {
        let got = eval(&[&["--model", s(&model), "--data", s(&data)], &flags[..]].concat());
        let (tokens, sum) = (
            want[key]["tokens"].as_u64().unwrap(),
            want[key]["nll_sum"].as_f64().unwrap(),
        );
        assert_eq!(got["tokens"].as_u64(), Some(tokens), "{key}: {got}");
        assert_eq!(got["windows"].as_u64(), Some(3), "{key}: {got}");
        let nll = got["nll"].as_f64().unwrap();
        assert!(
            (nll - sum / tokens as f64).abs() < 1e-5,
            "{key}: octet {nll} vs transformers {}",
            sum / tokens as f64
        );
    }
    // The records alone: the result does not depend on how many run together.
    let one = eval(&[
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--batch-size",
        "1",
    ]);
    let all = eval(&["--model", s(&model), "--data", s(&data)]);
    assert!((one["nll"].as_f64().unwrap() - all["nll"].as_f64().unwrap()).abs() < 1e-6);
}

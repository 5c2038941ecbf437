//! Chat templates against transformers' `apply_chat_template`: token ids for the Llama-3,
//! Qwen2 (ChatML), Gemma-2 and SmolLM2 templates, the same refusals where a template raises,
//! and the assistant mask of `return_assistant_tokens_mask=True` for a template with
//! `{% generation %}` blocks.
use crate::common::{fixture, script_json};
use octet::chat::{ChatTemplate, Message};
use octet::tokenizer::Tokenizer;
use std::path::Path;

#[test]
fn token_ids_and_masks_equal_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = fixture("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let expected = script_json(
        "chat_template_oracle.py",
        &[dir.path().as_os_str(), gguf.as_os_str()],
    );
    let families = expected["families"].as_array().unwrap();
    assert_eq!(families.len(), 5);
    for fam in families {
        let name = fam["name"].as_str().unwrap();
        let model = Path::new(fam["model"].as_str().unwrap());
        let tok = Tokenizer::from_dir(model).unwrap();
        let template = ChatTemplate::load(model, None, tok).unwrap();
        assert!(!template.is_builtin_chatml(), "{name}: its own template");
        let mut masks = 0;
        for case in fam["cases"].as_array().unwrap() {
            let what = format!("{name}/{}/{}", case["name"], case["add_generation_prompt"]);
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let got = template.encode(&messages, gen);
            if let Some(err) = case["error"].as_str() {
                let e = got.expect_err(&what).to_string();
                assert!(e.contains(err), "{what}: {e} should say {err}");
                continue;
            }
            let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
            assert_eq!(got.unwrap(), ids, "{what}");
            if let Some(mask) = case.get("assistant_mask") {
                let mask: Vec<u8> = serde_json::from_value(mask.clone()).unwrap();
                let enc = template.encode_with_assistant_mask(&messages).unwrap();
                assert_eq!(enc.ids, ids, "{what}");
                let got: Vec<u8> = enc.assistant_mask.iter().map(|&m| u8::from(m)).collect();
                assert_eq!(got, mask, "{what}: assistant mask");
                masks += 1;
            }
        }
        if name == "chatml_generation" {
            assert!(masks >= 5, "masks compared");
        }
    }
}

/// The texts of the runs of masked tokens.
fn masked_runs(template: &ChatTemplate, messages: &[Message]) -> Vec<String> {
    let enc = template.encode_with_assistant_mask(messages).unwrap();
    let mut runs: Vec<Vec<u32>> = Vec::new();
    for (i, (&id, &m)) in enc.ids.iter().zip(&enc.assistant_mask).enumerate() {
        if m {
            if i == 0 || !enc.assistant_mask[i - 1] {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(id);
        }
    }
    let tok = template.tokenizer();
    runs.iter().map(|r| tok.decode(r).unwrap()).collect()
}

#[test]
fn prefix_rendering_finds_the_assistant_turns() {
    let dir = tempfile::tempdir().unwrap();
    script_json("chat_template_oracle.py", &[dir.path().as_os_str()]);
    let conv = [
        Message::new("system", "Be brief."),
        Message::new("user", "What is the capital of France?"),
        Message::new("assistant", "Paris."),
        Message::new("user", "And of Italy?"),
        Message::new("assistant", "Rome."),
    ];
    let load = |name: &str| {
        let model = dir.path().join(name);
        let t = ChatTemplate::load(&model, None, Tokenizer::from_dir(&model).unwrap()).unwrap();
        assert!(!t.has_generation_blocks());
        t
    };
    // Hand-checked: the assistant's text, its end-of-turn token and what the template writes
    // after it before the next turn.
    assert_eq!(
        masked_runs(&load("qwen2"), &conv),
        ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]
    );
    assert_eq!(
        masked_runs(&load("llama3"), &conv),
        ["Paris.<|eot_id|>", "Rome.<|eot_id|>"]
    );
    let gemma = load("gemma2");
    assert_eq!(
        masked_runs(&gemma, &conv[1..]),
        ["Paris.<end_of_turn>\n", "Rome.<end_of_turn>\n"]
    );
    // The template raises on a system turn: the error names the template and its message.
    let e = gemma
        .encode_with_assistant_mask(&conv)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("chat_template.jinja") && e.contains("System role not supported"),
        "{e}"
    );
    // End-of-turn tokens, for stopping generation.
    let tok = |t: &ChatTemplate, s: &str| t.tokenizer().inner().token_to_id(s);
    for (name, eot) in [
        ("qwen2", "<|im_end|>"),
        ("llama3", "<|eot_id|>"),
        ("gemma2", "<end_of_turn>"),
    ] {
        let t = load(name);
        assert_eq!(t.end_of_turn_id().unwrap(), tok(&t, eot), "{name}");
    }
}

#[test]
fn builtin_chatml_for_models_without_a_template() {
    let dir = tempfile::tempdir().unwrap();
    script_json("chat_template_oracle.py", &[dir.path().as_os_str()]);
    let model = dir.path().join("qwen2");
    std::fs::remove_file(model.join("chat_template.jinja")).unwrap();
    let tok = Tokenizer::from_dir(&model).unwrap();
    let t = ChatTemplate::load(&model, None, tok.clone()).unwrap();
    assert!(t.is_builtin_chatml() && t.has_generation_blocks());
    let conv = [
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello."),
    ];
    assert_eq!(
        t.render(&conv, false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    );
    assert_eq!(masked_runs(&t, &conv), ["Hello.<|im_end|>"]);
    // --chat-template wins over everything; a broken one is refused with its line.
    let file = dir.path().join("t.jinja");
    std::fs::write(
        &file,
        "{{ bos_token }}\n{% for m in messages %}{{ m.content }\n",
    )
    .unwrap();
    let e = ChatTemplate::load(&model, Some(&file), tok.clone()).unwrap_err();
    assert!(
        e.to_string().contains("t.jinja") && e.to_string().contains("line 2"),
        "{e}"
    );
}

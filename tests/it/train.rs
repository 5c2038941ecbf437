//! LoRA training: checkpointed gradients, the loop's behaviour, resume, and adapters that
//! Hugging Face peft reads and writes.
use crate::common;

use octet::load::{load_model, LoadOptions, QuantizeOptions};
use octet::nn::LoraConfig;
use octet::peft::{attach_lora, load_adapter, trainable_tensors, Targets};
use octet::train::step::forward_backward;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn tiny(dir: &str) -> PathBuf {
    common::fixture(&format!("tiny_gptj/{dir}"))
}

fn text_file(dir: &Path) -> PathBuf {
    let p = dir.join("data.txt");
    std::fs::write(
        &p,
        "the quick brown fox jumps over the lazy dog. ".repeat(120),
    )
    .unwrap();
    p
}

fn train(args: &[&str]) -> (bool, String, String) {
    let mut a = vec!["train"];
    a.extend_from_slice(args);
    common::octet(&a)
}

fn losses(out: &Path) -> Vec<(usize, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap() as usize,
                v["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Gradients of every trainable tensor with and without block recompute agree within 1e-5,
/// also when the recompute reuses pooled de-quantization buffers across steps.
fn assert_checkpointed_matches_plain(targets: &str, wrapped_modules: usize) {
    // Dropout draws from libtorch's one global generator: callers must not interleave.
    let _rng = common::global_rng();
    let opts = LoadOptions {
        quantize: Some(QuantizeOptions::default()),
        ..Default::default()
    };
    let mut m = load_model(&tiny("hf_safetensors"), &opts).unwrap();
    tch::manual_seed(3);
    let targets = Targets::parse(targets).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.3,
        rslora: false,
    };
    let wrapped = attach_lora(m.model.as_mut(), &targets, cfg).unwrap();
    assert_eq!(wrapped.len(), wrapped_modules);
    octet::peft::train_extras(m.model.as_mut(), true, true);
    m.model.visit_layers(&mut |_, l| l.set_training(true));
    // Non-zero B everywhere, so every gradient path is exercised.
    let params = trainable_tensors(m.model.as_mut());
    tch::no_grad(|| {
        for (_, p) in &params {
            let mut p = p.shallow_clone();
            let _ = p.g_add_(&(Tensor::randn_like(&p) * 0.05));
        }
    });
    let ids = Tensor::randint(301, [2, 17], (Kind::Int64, tch::Device::Cpu));
    let labels = ids.shallow_clone();
    let grads_at = |checkpointing: bool, step: u64| -> Vec<Tensor> {
        for (_, p) in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        forward_backward(
            m.model.as_ref(),
            &ids,
            &labels,
            1.0,
            checkpointing,
            11,
            step,
        )
        .unwrap();
        params.iter().map(|(_, p)| p.grad().copy()).collect()
    };
    let grads = |checkpointing: bool| grads_at(checkpointing, 5);
    let plain = grads(false);
    // Twice in one retained pool: the second pass runs on buffers the first one returned.
    let recomputed = octet::nn::scratch::retain(|| {
        let first = grads(true);
        let second = grads(true);
        for ((name, _), (a, b)) in params.iter().zip(first.iter().zip(&second)) {
            assert!(
                a.equal(b),
                "{name}: a pooled recompute changed the gradient"
            );
        }
        second
    });
    for ((name, _), (a, b)) in params.iter().zip(plain.iter().zip(&recomputed)) {
        assert!(
            a.defined() && a.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name}: no gradient"
        );
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{name}: checkpointed gradient differs by {d}");
    }
    // Dropout really is active: another step's masks give other gradients.
    let other = grads_at(true, 6);
    assert!(
        plain.iter().zip(&other).any(|(a, b)| !a.equal(b)),
        "another step's dropout masks left every gradient unchanged"
    );
}

#[test]
fn checkpointed_gradients_equal_plain_autograd_with_dropout() {
    assert_checkpointed_matches_plain("q_proj,v_proj,out_proj,fc_in,fc_out,wte,lm_head", 12);
}

/// Without an adapter on the embedding, block 0's recompute skips its input gradient.
#[test]
fn checkpointed_gradients_match_without_an_embedding_adapter() {
    assert_checkpointed_matches_plain("q_proj,v_proj", 4);
}

#[test]
fn loss_falls_and_outputs_are_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let out = tmp.path().join("run");
    let (ok, _, err) = train(&[
        "--model",
        tiny("hf_safetensors").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "30",
        "--seq-len",
        "32",
        "--lr",
        "3e-3",
        "--lora-r",
        "4",
        "--targets",
        "q_proj,v_proj,fc_in,fc_out",
        "--eval-every",
        "10",
    ]);
    assert!(ok, "{err}");
    let l = losses(&out);
    assert_eq!(l.len(), 30);
    assert!(
        l[29].1 < 0.7 * l[0].1,
        "loss did not fall: {} -> {}",
        l[0].1,
        l[29].1
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.matches("eval_loss").count(), 3);
    assert!(metrics.contains("tokens_per_s") && metrics.contains("\"lr\""));
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "resume/state.json",
        "resume/optimizer.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
}

#[test]
fn resumed_run_reproduces_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let common_args = |out: &Path| -> Vec<String> {
        [
            "--model",
            tiny("hf_safetensors").to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "10",
            "--seq-len",
            "24",
            "--batch-size",
            "3",
            "--grad-accum",
            "2",
            "--lr",
            "2e-3",
            "--lora-r",
            "4",
            "--lora-dropout",
            "0.1",
            "--targets",
            "q_proj,v_proj,fc_in,wte",
            "--seed",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let full = tmp.path().join("full");
    let args = common_args(&full);
    let (ok, _, err) = train(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let part = tmp.path().join("part");
    let mut args = common_args(&part);
    args.extend(["--stop-after".to_string(), "4".to_string()]);
    let (ok, _, err) = train(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert_eq!(losses(&part).len(), 4);
    let mut args = common_args(&part);
    args.extend(["--resume".to_string(), part.to_str().unwrap().to_string()]);
    let (ok, _, err) = train(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let (a, b) = (losses(&full), losses(&part));
    assert_eq!(a.len(), 10);
    assert_eq!(a, b, "resumed losses differ from the uninterrupted run");
    let wa = std::fs::read(full.join("adapter_model.safetensors")).unwrap();
    let wb = std::fs::read(part.join("adapter_model.safetensors")).unwrap();
    assert!(wa == wb, "final adapters differ");
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let out = tmp.path().join("run");
    let (ok, _, err) = train(&[
        "--model",
        tiny("hf_safetensors").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "20",
        "--seq-len",
        "16",
        "--lr",
        "1e30",
        "--warmup",
        "0",
        "--schedule",
        "constant",
        "--max-grad-norm",
        "0",
        "--save-every",
        "1",
        "--optim",
        "adamw",
    ]);
    assert!(!ok, "the run should stop");
    assert!(err.contains("at step"), "{err}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("resume/state.json")).unwrap())
            .unwrap();
    let bad_step: usize = err
        .split("at step ")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(state["step"].as_u64().unwrap() as usize, bad_step - 1);
}

#[test]
fn bad_training_inputs_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_file(tmp.path());
    let model = tiny("hf_safetensors");
    let run = |extra: &[&str], out: &str| {
        let out = tmp.path().join(out);
        let mut a = vec![
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "2",
        ];
        a.extend_from_slice(extra);
        if !extra.contains(&"--seq-len") {
            a.extend(["--seq-len", "16"]);
        }
        train(&a)
    };
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let (ok, _, err) = run(&["--data", empty.to_str().unwrap()], "o1");
    assert!(!ok && err.contains("empty.txt"), "{err}");

    let jsonl = tmp.path().join("bad.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": \"fine line\"}\n{\"body\": \"no text here\"}\n",
    )
    .unwrap();
    let (ok, _, err) = run(&["--data", jsonl.to_str().unwrap()], "o2");
    assert!(
        !ok && err.contains("bad.jsonl") && err.contains("line 2") && err.contains("text"),
        "{err}"
    );

    let (ok, _, err) = run(
        &["--data", data.to_str().unwrap(), "--seq-len", "100"],
        "o3",
    );
    assert!(!ok && err.contains("n_positions"), "{err}");

    let (ok, _, err) = run(
        &[
            "--data",
            data.to_str().unwrap(),
            "--targets",
            "nonexistent_proj",
        ],
        "o4",
    );
    assert!(!ok && err.contains("match no module"), "{err}");

    // Resume checks: another rank, another base.
    let (ok, _, err) = run(&["--data", data.to_str().unwrap(), "--lora-r", "4"], "good");
    assert!(ok, "{err}");
    let good = tmp.path().join("good");
    let (ok, _, err) = run(
        &[
            "--data",
            data.to_str().unwrap(),
            "--lora-r",
            "8",
            "--resume",
            good.to_str().unwrap(),
        ],
        "good",
    );
    assert!(!ok && err.contains("rank"), "{err}");
    let other = tmp.path().join("other_base");
    common::copy_dir(&model, &other);
    let mut tensors: Vec<(String, Tensor)> =
        common::load_safetensors(&other.join("model.safetensors"))
            .into_iter()
            .collect();
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("ln_f.weight") {
            *t = &*t * 1.5;
        }
    }
    octet::io::safetensors::save_tensors(&other.join("model.safetensors"), &tensors, &[]).unwrap();
    let out = good.to_str().unwrap();
    let (ok, _, err) = train(&[
        "--model",
        other.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out,
        "--steps",
        "3",
        "--seq-len",
        "16",
        "--lora-r",
        "4",
        "--resume",
        out,
    ]);
    assert!(!ok && err.contains("another base"), "{err}");
}

/// `--print-config` prints the resolved settings as the TOML `--config` reads: fed back, it
/// prints the same; a flag wins over the file and the file over the default.
#[test]
fn print_config_round_trips_and_flags_beat_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let print = |args: &[&str]| {
        let mut a = vec!["--print-config"];
        a.extend_from_slice(args);
        let (ok, out, err) = train(&a);
        assert!(ok, "{err}");
        out
    };
    let file = tmp.path().join("run.toml");
    std::fs::write(
        &file,
        "model = \"m\"\ndata = \"d.txt\"\nout = \"o\"\nsteps = 50\nlr = 0.01\n\
         lora-r = 4\nno-quantize = true\ntargets = \"q_proj,v_proj\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let first = print(&["--config", f, "--lr", "0.5", "--seed", "3"]);
    let t: toml::Table = toml::from_str(&first).unwrap();
    let int = |k: &str| t[k].as_integer().unwrap();
    // Flag over file, file over default, default where neither says.
    assert_eq!(t["lr"].as_float(), Some(0.5));
    assert_eq!((int("seed"), int("steps"), int("lora-r")), (3, 50, 4));
    assert_eq!(t["no-quantize"].as_bool(), Some(true));
    assert_eq!(t["targets"].as_str(), Some("q_proj,v_proj"));
    assert_eq!((int("batch-size"), int("seq-len")), (4, 128));
    assert_eq!(t["schedule"].as_str(), Some("cosine"));
    // The default warm-up of 10 steps is capped at a tenth of the 50.
    assert_eq!(int("warmup"), 5);
    // Printed, fed back, printed again: the same text.
    let again = tmp.path().join("again.toml");
    std::fs::write(&again, &first).unwrap();
    assert_eq!(print(&["--config", again.to_str().unwrap()]), first);
    // A flag still beats the printed file.
    let third = print(&["--config", again.to_str().unwrap(), "--steps", "60"]);
    assert!(
        third.contains("steps = 60\n") && third.contains("warmup = 5\n"),
        "{third}"
    );
    // The shipped example reads and round-trips too.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/train.toml");
    let printed = print(&["--config", example]);
    assert!(printed.contains("lora-alpha = 16.0\n"), "{printed}");
    std::fs::write(&again, &printed).unwrap();
    assert_eq!(print(&["--config", again.to_str().unwrap()]), printed);
    // A key that is no setting is refused, naming the file and the key.
    std::fs::write(&again, "stepz = 3\n").unwrap();
    let (ok, _, err) = train(&["--print-config", "--config", again.to_str().unwrap()]);
    assert!(
        !ok && err.contains("again.toml") && err.contains("stepz"),
        "{err}"
    );
}

fn ids_file(dir: &Path) -> (PathBuf, Tensor) {
    let ids = common::load_safetensors(&tiny("reference.safetensors"))["input_ids"].shallow_clone();
    let p = dir.join("ids.safetensors");
    Tensor::write_safetensors(&[("input_ids", &ids)], &p).unwrap();
    (p, ids)
}

#[test]
fn octet_adapters_load_in_peft_and_peft_adapters_load_in_octet() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // An 8-bit base, and the same weights de-quantized for transformers.
    let base8 = t.join("base8");
    assert!(
        common::octet(&[
            "convert",
            "--model",
            tiny("hf_safetensors").to_str().unwrap(),
            "--out",
            base8.to_str().unwrap(),
            "--block-size",
            "64"
        ])
        .0
    );
    let hf = t.join("hf");
    octet::export::export_hf(&base8, &hf, Kind::Float, false, |_, _| Ok(())).unwrap();
    let (ids_path, ids) = ids_file(t);

    // octet → peft
    let data = text_file(t);
    let run = t.join("run");
    let (ok, _, err) = train(&[
        "--model",
        base8.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--steps",
        "8",
        "--seq-len",
        "32",
        "--lr",
        "5e-3",
        "--lora-r",
        "4",
        "--lora-alpha",
        "16",
        "--targets",
        "q_proj,v_proj,fc_in,fc_out,wte",
    ]);
    assert!(ok, "{err}");
    let mut m = load_model(&base8, &LoadOptions::default()).unwrap();
    let before = tch::no_grad(|| m.model.forward(&ids).unwrap());
    load_adapter(m.model.as_mut(), &run).unwrap();
    let ours = tch::no_grad(|| m.model.forward(&ids).unwrap());
    assert!(
        (&ours - &before).abs().max().double_value(&[]) > 1e-3,
        "the trained adapter changes nothing"
    );
    let peft_out = t.join("peft_logits.safetensors");
    common::run_script(
        "hf_logits.py",
        &[
            hf.as_os_str(),
            ids_path.as_os_str(),
            peft_out.as_os_str(),
            run.as_os_str(),
        ],
    );
    let theirs = &common::load_safetensors(&peft_out)["logits"];
    let d = (&ours - theirs).abs().max().double_value(&[]);
    assert!(
        d < 1e-4,
        "octet-trained adapter: octet vs peft max |diff| {d}"
    );

    // peft → octet (with an adapter on wte)
    let made = t.join("peft_made");
    let made_logits = t.join("peft_made_logits.safetensors");
    common::run_script(
        "make_peft_adapter.py",
        &[
            hf.as_os_str(),
            made.as_os_str(),
            ids_path.as_os_str(),
            made_logits.as_os_str(),
        ],
    );
    let mut m = load_model(&base8, &LoadOptions::default()).unwrap();
    let cfg = load_adapter(m.model.as_mut(), &made).unwrap();
    assert_eq!(cfg.r, 4);
    let ours = tch::no_grad(|| m.model.forward(&ids).unwrap());
    let theirs = &common::load_safetensors(&made_logits)["logits"];
    let d = (&ours - theirs).abs().max().double_value(&[]);
    assert!(d < 1e-4, "peft-made adapter: octet vs peft max |diff| {d}");
}

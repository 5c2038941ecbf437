//! `make bench`, training part: step time and peak RSS of LoRA training on a true-width GPT-J,
//! (a) 8-bit frozen + checkpointing, (b) f32 frozen + checkpointing, (c) f32 without
//! checkpointing, beside transformers + peft with gradient checkpointing; then one step of the
//! full GPT-J-6B shape in 8-bit. Every configuration runs in its own process so its peak
//! resident set is its own.
mod common;

use common::{env_or, peak_rss_mib};
use octet::adapter::{attach_lora, trainable_tensors, Targets};
use octet::adapters::gptj::{random_layers, Gptj, GptjConfig};
use octet::model::CausalLm;
use octet::nn::LoraConfig;
use octet::train::adam8bit::Adam8bit;
use octet::train::optim::{AdamConfig, Optimizer};
use octet::train::step::forward_backward;
use std::process::Command;
use std::time::Instant;
use tch::{Kind, Tensor};

struct Child {
    layers: usize,
    vocab: usize,
    batch: i64,
    seq: i64,
    kind: Kind,
    eight_bit: bool,
    checkpointing: bool,
    steps: usize,
}

fn child(c: Child) {
    tch::manual_seed(0);
    let cfg: GptjConfig = GptjConfig::from_json(&serde_json::json!({
        "n_embd": 4096, "n_head": 16, "rotary_dim": 64, "n_layer": c.layers, "vocab_size": c.vocab, "n_positions": 2048
    }))
    .expect("bench config");
    let mut layers = random_layers(&cfg, c.eight_bit).expect("random layers");
    let mut model = Gptj::new(cfg, &mut layers, c.kind).expect("model");
    let targets = Targets::Names(vec!["q_proj".into(), "v_proj".into()]);
    attach_lora(&mut model, &targets, LoraConfig::default()).expect("lora");
    if c.kind != Kind::Float {
        model.store_frozen_in(c.kind);
    }
    let params: Vec<Tensor> = trainable_tensors(&mut model)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let mut opt = Adam8bit::new(params, AdamConfig::default()).expect("optimizer");
    let ids = Tensor::randint(
        c.vocab as i64,
        [c.batch, c.seq],
        (Kind::Int64, tch::Device::Cpu),
    );
    let mut times = Vec::new();
    // As `octet train` does: de-quantization buffers persist across steps.
    octet::nn::scratch::retain(|| {
        for step in 0..c.steps + 1 {
            let t = Instant::now();
            opt.zero_grad();
            forward_backward(&model, &ids, &ids, 1.0, c.checkpointing, 0, step as u64);
            opt.step(1e-4).expect("step");
            if step > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
    });
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{}",
        serde_json::json!({"step_s": times[times.len() / 2], "peak_rss_mib": peak_rss_mib()})
    );
}

fn run_child(args: &[String]) -> Option<(f64, f64)> {
    let exe = std::env::current_exe().ok()?;
    let out = Command::new(exe).arg("--child").args(args).output().ok()?;
    if !out.status.success() {
        eprintln!(
            "child {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last()?).ok()?;
    Some((v["step_s"].as_f64()?, v["peak_rss_mib"].as_f64()?))
}

fn run_hf(
    layers: usize,
    vocab: usize,
    batch: i64,
    seq: i64,
    dtype: &str,
    steps: usize,
) -> Option<(f64, f64)> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench_hf_train.py");
    let out = Command::new(python)
        .args([
            script,
            &layers.to_string(),
            &vocab.to_string(),
            &batch.to_string(),
            &seq.to_string(),
            dtype,
            &steps.to_string(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "transformers bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last()?).ok()?;
    Some((v["step_s"].as_f64()?, v["peak_rss_mib"].as_f64()?))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child") {
        let a = &args[1..];
        let n = |i: usize| a[i].parse::<usize>().expect("number");
        return child(Child {
            layers: n(0),
            vocab: n(1),
            batch: n(2) as i64,
            seq: n(3) as i64,
            kind: if a[4] == "bf16" {
                Kind::BFloat16
            } else {
                Kind::Float
            },
            eight_bit: a[5] == "8bit",
            checkpointing: a[6] == "ckpt",
            steps: n(7),
        });
    }
    let layers = env_or("OCTET_BENCH_LAYERS", 2usize);
    let vocab = 8192usize;
    let steps = env_or("OCTET_BENCH_STEPS", 2usize);
    println!("\nLoRA training step, GPT-J width (n_embd 4096, 16 heads, rotary 64), {layers} layers, vocab {vocab}, LoRA r=8 on q_proj,v_proj, adam8bit; median of {steps} steps after a warm-up");
    println!(
        "{:<6} {:>6} {:<5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "tokens", "bxs", "dtype", "(a) s", "(b) s", "(c) s", "hf+peft s", "(a) MiB", "a/b", "b/hf"
    );
    for (batch, seq) in [(1i64, 512i64), (4, 512)] {
        for dtype in ["f32", "bf16"] {
            let cfg = |q: &str, ck: &str| -> Vec<String> {
                [
                    layers.to_string(),
                    vocab.to_string(),
                    batch.to_string(),
                    seq.to_string(),
                    dtype.into(),
                    q.into(),
                    ck.into(),
                    steps.to_string(),
                ]
                .to_vec()
            };
            let a = run_child(&cfg("8bit", "ckpt"));
            let b = run_child(&cfg("f32", "ckpt"));
            let c = run_child(&cfg("f32", "plain"));
            let hf = run_hf(layers, vocab, batch, seq, dtype, steps);
            let f = |x: Option<(f64, f64)>| x.map_or("n/a".to_string(), |v| format!("{:.2}", v.0));
            let ratio = |x: Option<(f64, f64)>, y: Option<(f64, f64)>| match (x, y) {
                (Some(x), Some(y)) => format!("{:.3}", x.0 / y.0),
                _ => "n/a".into(),
            };
            println!(
                "{:<6} {:>6} {:<5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
                batch * seq,
                format!("{batch}x{seq}"),
                dtype,
                f(a),
                f(b),
                f(c),
                f(hf),
                a.map_or("n/a".into(), |v| format!("{:.0}", v.1)),
                ratio(a, b),
                ratio(b, hf)
            );
            let rss =
                |x: Option<(f64, f64)>| x.map_or("n/a".to_string(), |v| format!("{:.0}", v.1));
            println!(
                "{:<6} {:>6} {:<5} peak RSS MiB: (a) {} (b) {} (c) {} hf+peft {}",
                "",
                "",
                "",
                rss(a),
                rss(b),
                rss(c),
                rss(hf)
            );
        }
    }
    if std::env::var_os("OCTET_BENCH_SKIP_6B").is_none() {
        println!("\nfull GPT-J-6B shape (28 layers, vocab 50400), 8-bit frozen weights created directly in 8-bit, LoRA q,v, one step at batch 1 x seq 256:");
        for dtype in ["f32", "bf16"] {
            let args: Vec<String> = ["28", "50400", "1", "256", dtype, "8bit", "ckpt", "1"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            match run_child(&args) {
                Some((s, rss)) => {
                    println!("  {dtype}: step {s:.1} s, peak RSS {:.2} GiB", rss / 1024.0)
                }
                None => println!("  {dtype}: failed"),
            }
        }
    }
}

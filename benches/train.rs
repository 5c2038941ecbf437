//! `make bench`, training part: step time and peak RSS of LoRA training on a true-width GPT-J,
//! (a) 8-bit frozen + checkpointing, (b) f32 frozen + checkpointing, (c) f32 without
//! checkpointing, beside transformers + peft with gradient checkpointing; then one step of the
//! full GPT-J-6B shape with 8-bit and with 4-bit (NF4) frozen weights. Every configuration runs in its own process so its peak
//! resident set (and GPU memory) is its own.
//!
//! Environment: `OCTET_BENCH_LAYERS` (2), `OCTET_BENCH_STEPS` (2), `OCTET_BENCH_EMBD` (4096),
//! `OCTET_BENCH_DEVICE` (cpu; cuda runs every configuration, transformers too, on the GPU),
//! `OCTET_BENCH_SKIP_6B`.
//!
//! `--gpu-check` (or `OCTET_BENCH_MODE=gpu-check`) prints instead the short table of
//! `scripts/gpu-check.sh`: the GPT-J-6B shape (override with `OCTET_BENCH_LAYERS`,
//! `OCTET_BENCH_VOCAB`, `OCTET_BENCH_EMBD`) at the `OCTET_BENCH_SHAPES` batch×seq sizes
//! (`1x256,4x512,8x2048`), bf16 compute: (a) 8-bit and (b) bf16 frozen weights, beside
//! transformers + peft in bf16, with the targets beside the measurements.
mod common;

use common::{bench_device, env_or, gpu_used_mib, peak_rss_mib, python, script, short_error, sync};
use octet::archs::gptj::{random_layers, Gptj, GptjConfig, RandomFrozen};
use octet::model::CausalLm;
use octet::nn::LoraConfig;
use octet::peft::{attach_lora, trainable_tensors, Targets};
use octet::train::adam8bit::{Adam8bit, StateRounding};
use octet::train::optim::{AdamConfig, Optimizer};
use octet::train::step::forward_backward;
use std::process::Command;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

struct Child {
    embd: usize,
    device: Device,
    layers: usize,
    vocab: usize,
    batch: i64,
    seq: i64,
    kind: Kind,
    frozen: RandomFrozen,
    checkpointing: bool,
    steps: usize,
}

fn child(c: Child) {
    tch::manual_seed(0);
    let cfg: GptjConfig = GptjConfig::from_json(&serde_json::json!({
        "n_embd": c.embd, "n_head": heads(c.embd), "rotary_dim": 64, "n_layer": c.layers,
        "vocab_size": c.vocab, "n_positions": 2048
    }))
    .expect("bench config");
    // Frozen weights are created where they live, directly in 8 or 4 bits or in the compute
    // dtype.
    let mut layers = random_layers(&cfg, c.frozen, (c.kind, c.device)).expect("random layers");
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
    let rounding = match c.device {
        Device::Cpu => StateRounding::BitsandbytesCpu,
        _ => StateRounding::Nearest,
    };
    let mut opt = Adam8bit::new(params, AdamConfig::default())
        .expect("optimizer")
        .with_rounding(rounding);
    let ids = Tensor::randint(c.vocab as i64, [c.batch, c.seq], (Kind::Int64, Device::Cpu))
        .to_device(c.device);
    let mut times = Vec::new();
    // As `octet train` does: de-quantization buffers persist across steps.
    octet::nn::scratch::retain(|| {
        for step in 0..c.steps + 1 {
            let t = Instant::now();
            opt.zero_grad();
            forward_backward(&model, &ids, &ids, 1.0, c.checkpointing, 0, step as u64)
                .expect("forward and backward");
            opt.step(1e-4).expect("step");
            sync(c.device);
            if step > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
    });
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{}",
        serde_json::json!({
            "step_s": times[times.len() / 2],
            "peak_rss_mib": peak_rss_mib(),
            "peak_gpu_mib": gpu_used_mib(c.device),
        })
    );
}

/// Attention heads for a GPT-J width: 256-wide heads (GPT-J-6B: 4096 / 16).
fn heads(embd: usize) -> usize {
    (embd / 256).max(1)
}

/// One measurement: median step seconds, peak RSS MiB, peak GPU MiB (NaN on the CPU).
#[derive(Clone, Copy)]
struct Measured {
    step_s: f64,
    rss_mib: f64,
    gpu_mib: f64,
}

fn parse_measured(stdout: &[u8]) -> Option<Measured> {
    let text = String::from_utf8_lossy(stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last()?).ok()?;
    Some(Measured {
        step_s: v["step_s"].as_f64()?,
        rss_mib: v["peak_rss_mib"].as_f64()?,
        gpu_mib: v["peak_gpu_mib"].as_f64().unwrap_or(f64::NAN),
    })
}

fn run_child(args: &[String]) -> Option<Measured> {
    let exe = std::env::current_exe().ok()?;
    let out = Command::new(exe).arg("--child").args(args).output().ok()?;
    if !out.status.success() {
        eprintln!("child {args:?} failed: {}", short_error(&out.stderr));
        return None;
    }
    parse_measured(&out.stdout)
}

#[allow(clippy::too_many_arguments)]
fn run_hf(
    layers: usize,
    vocab: usize,
    batch: i64,
    seq: i64,
    dtype: &str,
    steps: usize,
    embd: usize,
    device: Device,
) -> Option<Measured> {
    let out = Command::new(python())
        .arg(script("bench_hf_train.py"))
        .args([
            &layers.to_string(),
            &vocab.to_string(),
            &batch.to_string(),
            &seq.to_string(),
            dtype,
            &steps.to_string(),
            &embd.to_string(),
            &octet::device::name(device),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("transformers bench failed: {}", short_error(&out.stderr));
        return None;
    }
    parse_measured(&out.stdout)
}

/// The child's arguments, in `main`'s order.
#[allow(clippy::too_many_arguments)]
fn child_args(
    layers: usize,
    vocab: usize,
    batch: i64,
    seq: i64,
    dtype: &str,
    weights: &str,
    ckpt: &str,
    steps: usize,
    embd: usize,
    device: Device,
) -> Vec<String> {
    vec![
        layers.to_string(),
        vocab.to_string(),
        batch.to_string(),
        seq.to_string(),
        dtype.into(),
        weights.into(),
        ckpt.into(),
        steps.to_string(),
        embd.to_string(),
        octet::device::name(device),
    ]
}

/// `scripts/gpu-check.sh`'s training table: the targets printed beside the numbers.
fn gpu_check() {
    let device = bench_device();
    let layers = env_or("OCTET_BENCH_LAYERS", 28usize);
    let vocab = env_or("OCTET_BENCH_VOCAB", 50400usize);
    let embd = env_or("OCTET_BENCH_EMBD", 4096usize);
    let steps = env_or("OCTET_BENCH_STEPS", 1usize);
    let shapes: Vec<(i64, i64)> = std::env::var("OCTET_BENCH_SHAPES")
        .unwrap_or_else(|_| "1x256,4x512,8x2048".into())
        .split(',')
        .filter_map(|s| {
            let (b, t) = s.trim().split_once('x')?;
            Some((b.parse().ok()?, t.parse().ok()?))
        })
        .collect();
    println!(
        "train step on {}: GPT-J shape n_layer {layers}, n_embd {embd}, vocab {vocab}; LoRA r=8 q_proj,v_proj; \
         8-bit Adam; bf16 compute; block recompute; median of {steps} step(s) after a warm-up",
        octet::device::name(device)
    );
    println!(
        "{:<7} {:>14} {:>14} {:>14} {:>14} {:>14}",
        "bxs", "(a) 8-bit", "(b) bf16", "hf+peft bf16", "a/b", "b/hf"
    );
    let secs =
        |m: Option<Measured>| m.map_or("did not fit".into(), |m| format!("{:.3} s", m.step_s));
    let mem = |m: Option<Measured>| {
        m.map_or("-".into(), |m| {
            if m.gpu_mib.is_nan() {
                format!("{:.2} GiB RSS", m.rss_mib / 1024.0)
            } else {
                format!("{:.2} GiB", m.gpu_mib / 1024.0)
            }
        })
    };
    for (i, &(batch, seq)) in shapes.iter().enumerate() {
        let a = run_child(&child_args(
            layers, vocab, batch, seq, "bf16", "8bit", "ckpt", steps, embd, device,
        ));
        let b = run_child(&child_args(
            layers, vocab, batch, seq, "bf16", "float", "ckpt", steps, embd, device,
        ));
        let hf = run_hf(layers, vocab, batch, seq, "bf16", steps, embd, device);
        // Targets: a/b ≤ 1.10 at the smallest size and ≤ 1.05 at the largest; b no slower
        // than transformers + peft.
        let ab_target = if i == 0 {
            1.10
        } else if i + 1 == shapes.len() {
            1.05
        } else {
            f64::NAN
        };
        let ratio = |x: Option<Measured>, y: Option<Measured>, target: f64| match (x, y) {
            (Some(x), Some(y)) => {
                let r = x.step_s / y.step_s;
                if target.is_nan() {
                    format!("{r:.3}")
                } else {
                    format!(
                        "{r:.3} [<={target:.2} {}]",
                        if r <= target { "ok" } else { "MISS" }
                    )
                }
            }
            _ => "n/a".into(),
        };
        println!(
            "{:<7} {:>14} {:>14} {:>14} {:>14} {:>14}",
            format!("{batch}x{seq}"),
            secs(a),
            secs(b),
            secs(hf),
            ratio(a, b, ab_target),
            ratio(b, hf, 1.0)
        );
        println!(
            "{:<7} {:>14} {:>14} {:>14}   peak memory",
            "",
            mem(a),
            mem(b),
            mem(hf)
        );
        if i == 0 {
            if let Some(m) = a.filter(|m| !m.gpu_mib.is_nan()) {
                let gib = m.gpu_mib / 1024.0;
                println!(
                    "        peak GPU memory (a) at {batch}x{seq}: {gib:.2} GiB [target <= 8 GiB: {}]",
                    if gib <= 8.0 { "ok" } else { "MISS" }
                );
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--gpu-check")
        || std::env::var("OCTET_BENCH_MODE").is_ok_and(|m| m == "gpu-check")
    {
        return gpu_check();
    }
    if args.first().map(String::as_str) == Some("--child") {
        let a = &args[1..];
        let n = |i: usize| a[i].parse::<usize>().expect("number");
        return child(Child {
            embd: n(8),
            device: octet::device::from_flag(&a[9]).expect("child device"),
            layers: n(0),
            vocab: n(1),
            batch: n(2) as i64,
            seq: n(3) as i64,
            kind: if a[4] == "bf16" {
                Kind::BFloat16
            } else {
                Kind::Float
            },
            frozen: match a[5].as_str() {
                "8bit" => RandomFrozen::EightBit,
                "4bit" => RandomFrozen::FourBit,
                _ => RandomFrozen::Float,
            },
            checkpointing: a[6] == "ckpt",
            steps: n(7),
        });
    }
    let layers = env_or("OCTET_BENCH_LAYERS", 2usize);
    let vocab = 8192usize;
    let steps = env_or("OCTET_BENCH_STEPS", 2usize);
    let embd = env_or("OCTET_BENCH_EMBD", 4096usize);
    let device = bench_device();
    println!("\nLoRA training step on {}, GPT-J width (n_embd {embd}, {} heads, rotary 64), {layers} layers, vocab {vocab}, LoRA r=8 on q_proj,v_proj, adam8bit; median of {steps} steps after a warm-up", octet::device::name(device), heads(embd));
    println!(
        "{:<6} {:>6} {:<5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>8}",
        "tokens", "bxs", "dtype", "(a) s", "(b) s", "(c) s", "hf+peft s", "(a) MiB", "a/b", "b/hf"
    );
    for (batch, seq) in [(1i64, 512i64), (4, 512)] {
        for dtype in ["f32", "bf16"] {
            let cfg = |q: &str, ck: &str| -> Vec<String> {
                child_args(layers, vocab, batch, seq, dtype, q, ck, steps, embd, device)
            };
            let a = run_child(&cfg("8bit", "ckpt"));
            let b = run_child(&cfg("f32", "ckpt"));
            let c = run_child(&cfg("f32", "plain"));
            let hf = run_hf(layers, vocab, batch, seq, dtype, steps, embd, device);
            let f =
                |x: Option<Measured>| x.map_or("n/a".to_string(), |v| format!("{:.2}", v.step_s));
            let ratio = |x: Option<Measured>, y: Option<Measured>| match (x, y) {
                (Some(x), Some(y)) => format!("{:.3}", x.step_s / y.step_s),
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
                a.map_or("n/a".into(), |v| format!("{:.0}", v.rss_mib)),
                ratio(a, b),
                ratio(b, hf)
            );
            let rss =
                |x: Option<Measured>| x.map_or("n/a".to_string(), |v| format!("{:.0}", v.rss_mib));
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
        println!("\nfull GPT-J-6B shape (28 layers, vocab 50400), frozen weights created directly in 8 or 4 bits (4-bit: NF4 Linear weights, 8-bit embedding), LoRA q,v, one step at batch 1 x seq 256:");
        for weights in ["8bit", "4bit"] {
            for dtype in ["f32", "bf16"] {
                let args = child_args(28, 50400, 1, 256, dtype, weights, "ckpt", 1, 4096, device);
                match run_child(&args) {
                    Some(m) => {
                        println!(
                            "  {weights} {dtype}: step {:.1} s, peak RSS {:.2} GiB",
                            m.step_s,
                            m.rss_mib / 1024.0
                        )
                    }
                    None => println!("  {weights} {dtype}: failed"),
                }
            }
        }
    }
}

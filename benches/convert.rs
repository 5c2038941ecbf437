//! `make bench`, conversion part: a GPT-J-6B-shaped checkpoint of true width (4 layers, so it
//! stays ~5 GB) is generated shard by shard, then converted by `octet convert` and quantized by
//! bitsandbytes in Python, each in its own process, reporting throughput (MB/s of f32 input) and
//! peak RSS, with per-layer figures and the extrapolation to 28 layers.
use octet::io::safetensors::SafetensorsWriter;
use octet::io::Dtype;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

const D: usize = 4096;
const INNER: usize = 16384;
const VOCAB: usize = 50400;

fn layer_tensors(i: usize) -> Vec<(String, Vec<usize>)> {
    let p = |s: &str| format!("transformer.h.{i}.{s}");
    vec![
        (p("ln_1.weight"), vec![D]),
        (p("ln_1.bias"), vec![D]),
        (p("attn.q_proj.weight"), vec![D, D]),
        (p("attn.k_proj.weight"), vec![D, D]),
        (p("attn.v_proj.weight"), vec![D, D]),
        (p("attn.out_proj.weight"), vec![D, D]),
        (p("mlp.fc_in.weight"), vec![INNER, D]),
        (p("mlp.fc_in.bias"), vec![INNER]),
        (p("mlp.fc_out.weight"), vec![D, INNER]),
        (p("mlp.fc_out.bias"), vec![D]),
    ]
}

/// Writes one shard, generating each tensor 16M elements at a time so the generator itself
/// never holds a whole tensor.
fn write_shard(path: &Path, tensors: &[(String, Vec<usize>)]) {
    let plan: Vec<(String, Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|(n, s)| (n.clone(), Dtype::F32, s.clone()))
        .collect();
    let mut w = SafetensorsWriter::create(path, &plan, &[("format".into(), "pt".into())])
        .expect("create shard");
    for (name, shape) in tensors {
        let numel: usize = shape.iter().product();
        let mut bytes = Vec::with_capacity(numel * 4);
        let mut done = 0;
        while done < numel {
            let n = (numel - done).min(1 << 24);
            let t = Tensor::randn([n as i64], (Kind::Float, Device::Cpu)) * 0.02;
            let v = Vec::<f32>::try_from(&t).expect("f32");
            bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            done += n;
        }
        w.write(name, &bytes).expect("write tensor");
    }
    w.finish().expect("finish shard");
}

fn generate(dir: &Path, layers: usize) {
    std::fs::create_dir_all(dir).expect("bench dir");
    let mut shards: Vec<Vec<(String, Vec<usize>)>> =
        vec![vec![("transformer.wte.weight".into(), vec![VOCAB, D])]];
    shards.extend((0..layers).map(layer_tensors));
    shards.push(vec![
        ("transformer.ln_f.weight".into(), vec![D]),
        ("transformer.ln_f.bias".into(), vec![D]),
        ("lm_head.weight".into(), vec![VOCAB, D]),
        ("lm_head.bias".into(), vec![VOCAB]),
    ]);
    let n = shards.len();
    let mut map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        write_shard(&dir.join(&file), shard);
        for (name, _) in shard {
            map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("index");
    let config = serde_json::json!({"architectures": ["GPTJForCausalLM"], "model_type": "gptj", "n_embd": D, "n_head": 16,
        "n_layer": layers, "rotary_dim": 64, "vocab_size": VOCAB, "n_positions": 2048});
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
}

/// Runs a command under GNU time; returns (elapsed s, peak RSS MiB).
fn timed(cmd: &mut Command) -> Option<(f64, f64)> {
    let out = cmd.output().ok()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        eprintln!("{err}");
        return None;
    }
    let last = err.lines().last()?;
    let mut it = last.split_whitespace();
    let secs: f64 = it.next()?.parse().ok()?;
    let kb: f64 = it.next()?.parse().ok()?;
    Some((secs, kb / 1024.0))
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let layers = std::env::var("OCTET_BENCH_CONVERT_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4usize);
    let work = std::env::var_os("OCTET_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/bench-convert"));
    let model = work.join(format!("gptj6b-shape-{layers}l"));
    if !model.join("config.json").exists() {
        eprintln!(
            "generating a {layers}-layer GPT-J-6B-shaped f32 checkpoint in {} ...",
            model.display()
        );
        generate(&model, layers);
    }
    let input_bytes: u64 = std::fs::read_dir(&model)
        .expect("dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let out = work.join("converted");
    let _ = std::fs::remove_dir_all(&out);
    let octet = timed(
        Command::new("/usr/bin/time")
            .args(["-f", "%e %M"])
            .arg(root.join("target/release/octet"))
            .arg("convert")
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&out),
    );
    let bnb = timed(
        Command::new("/usr/bin/time")
            .args(["-f", "%e %M"])
            .arg(root.join(".venv/bin/python"))
            .arg(root.join("scripts/bench_bnb_convert.py"))
            .arg(&model),
    );
    let mb = input_bytes as f64 / 1e6;
    println!("\nconvert: GPT-J-6B width, {layers} layers + embeddings, {mb:.0} MB of f32 input, block 4096");
    println!(
        "{:<26} {:>9} {:>10} {:>13}",
        "", "seconds", "MB/s", "peak RSS MiB"
    );
    for (name, r) in [("octet convert", octet), ("bitsandbytes (Python)", bnb)] {
        match r {
            Some((s, rss)) => println!("{name:<26} {s:>9.1} {:>10.0} {rss:>13.0}", mb / s),
            None => println!("{name:<26} failed"),
        }
    }
    if let (Some((s, rss)), Some((b, _))) = (octet, bnb) {
        let per_layer_mb = (12 * D * D * 4) as f64 / 1e6 + (INNER + 3 * D) as f64 * 4.0 / 1e6;
        let embed_mb = mb - per_layer_mb * layers as f64;
        let est28 = s / mb * (embed_mb + 28.0 * per_layer_mb);
        println!(
            "octet/bitsandbytes speed: {:.2}x; per layer {per_layer_mb:.0} MB f32 -> {:.2} s",
            b / s,
            s / mb * per_layer_mb
        );
        println!("extrapolated to 28 layers (24.2 GB f32): {est28:.0} s; peak RSS does not grow with layers ({rss:.0} MiB here)");
    }
}

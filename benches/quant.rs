//! `make bench`, quantization part: octet's CPU kernels beside bitsandbytes (CPU), naive
//! libtorch indexing and a plain f32 copy, on GPT-J weight shapes. Median of several runs.
use octet::quant::{self, BlockSize, QuantCode};
use std::process::Command;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

const REPEATS: usize = 7;

fn median_secs(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[REPEATS / 2]
}

fn bnb_times(cases: &[String]) -> Vec<Option<(f64, f64)>> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench_bnb_quant.py");
    let out = Command::new(python)
        .arg(script)
        .arg(REPEATS.to_string())
        .args(cases)
        .output();
    let text = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            eprintln!(
                "bitsandbytes bench failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::new()
        }
        Err(e) => {
            eprintln!("bitsandbytes bench could not start: {e}");
            String::new()
        }
    };
    let rows: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    cases
        .iter()
        .map(|c| {
            rows.iter()
                .find(|r| r["case"] == c.as_str())
                .and_then(|r| Some((r["quantize_s"].as_f64()?, r["dequantize_s"].as_f64()?)))
        })
        .collect()
}

fn main() {
    tch::manual_seed(0);
    let shapes = [(4096i64, 4096i64), (16384, 4096)];
    let blocks = [4096i64, 256];
    let cases: Vec<String> = shapes
        .iter()
        .flat_map(|(r, c)| blocks.iter().map(move |b| format!("{r}x{c}:{b}")))
        .collect();
    let bnb = bnb_times(&cases);
    let code = QuantCode::dynamic_signed();
    let code_t = code.to_tensor();
    println!(
        "\nblockwise 8-bit, G elements/s (median of {REPEATS}); threads: {}",
        rayon::current_num_threads()
    );
    println!(
        "{:<10} {:>11} {:>5} {:>8} {:>8} {:>8} {:>8} {:>10} {:>10}",
        "op", "shape", "block", "octet", "bnb-cpu", "torch", "f32copy", "octet/bnb", "octet/copy"
    );
    for (case, bnb) in cases.iter().zip(bnb) {
        let (shape, block) = case.split_once(':').unwrap();
        let (r, c) = shape.split_once('x').unwrap();
        let (r, c): (i64, i64) = (r.parse().unwrap(), c.parse().unwrap());
        let block = BlockSize::new(block.parse().unwrap()).unwrap();
        let n = (r * c) as f64;
        let x = Tensor::randn([r, c], (Kind::Float, Device::Cpu)) * 0.02;
        let qz = quant::quantize(&x, block, &code).unwrap();
        let mut dst = Tensor::empty([r, c], (Kind::Float, Device::Cpu));
        let copy = median_secs(|| {
            dst.copy_(&x);
        });
        let oq = median_secs(|| {
            quant::quantize(&x, block, &code).unwrap();
        });
        let tq = median_secs(|| {
            quant::blockwise::quantize_with_torch_ops(&x, block, &code).unwrap();
        });
        let mut out32 = Tensor::empty([r, c], (Kind::Float, Device::Cpu));
        let mut out16 = Tensor::empty([r, c], (Kind::BFloat16, Device::Cpu));
        let od = median_secs(|| qz.dequantize_into(&mut out32).unwrap());
        let odb = median_secs(|| qz.dequantize_into(&mut out16).unwrap());
        let od_alloc = median_secs(|| {
            let _ = qz.dequantize(Kind::Float).unwrap();
        });
        let td = median_secs(|| {
            let v = code_t.index_select(0, &qz.q.flatten(0, -1).to_kind(Kind::Int64));
            let _ = v.reshape([-1, block.get() as i64]) * qz.absmax.unsqueeze(1);
        });
        let g = |s: f64| n / s / 1e9;
        let ratio = |a: f64, b: Option<f64>| {
            b.map(|b| format!("{:.2}x", b / a))
                .unwrap_or_else(|| "n/a".into())
        };
        let bnb_g = |s: Option<f64>| {
            s.map(|s| format!("{:.2}", g(s)))
                .unwrap_or_else(|| "n/a".into())
        };
        println!(
            "{:<10} {:>11} {:>5} {:>8.2} {:>8} {:>8.2} {:>8.2} {:>10} {:>10.2}",
            "quantize",
            shape,
            block.get(),
            g(oq),
            bnb_g(bnb.map(|b| b.0)),
            g(tq),
            g(copy),
            ratio(oq, bnb.map(|b| b.0)),
            copy / oq
        );
        println!(
            "{:<10} {:>11} {:>5} {:>8.2} {:>8} {:>8.2} {:>8.2} {:>10} {:>10.2}",
            "deq-f32",
            shape,
            block.get(),
            g(od),
            bnb_g(bnb.map(|b| b.1)),
            g(td),
            g(copy),
            ratio(od, bnb.map(|b| b.1)),
            copy / od
        );
        println!(
            "{:<10} {:>11} {:>5} {:>8.2} {:>8} {:>8} {:>8.2} {:>10} {:>10.2}",
            "deq-bf16",
            shape,
            block.get(),
            g(odb),
            "",
            "",
            g(copy),
            "",
            copy / odb
        );
        println!(
            "{:<10} {:>11} {:>5} {:>8.2} {:>8} {:>8} {:>8.2} {:>10} {:>10.2}",
            "deq-alloc",
            shape,
            block.get(),
            g(od_alloc),
            "",
            "",
            g(copy),
            ratio(od_alloc, bnb.map(|b| b.1)),
            copy / od_alloc
        );
    }
    four_bit_table();
}

/// 4-bit NF4 against 8-bit de-quantization on the same shapes and block sizes: time per
/// element (the target is 4-bit within 1.3x of 8-bit).
fn four_bit_table() {
    println!("\n4-bit nf4 vs 8-bit dynamic de-quantization, G elements/s (median of {REPEATS})");
    println!(
        "{:<10} {:>11} {:>5} {:>8} {:>8} {:>12}",
        "op", "shape", "block", "8-bit", "4-bit", "4-bit/8-bit"
    );
    let code8 = QuantCode::dynamic_signed();
    let nf4 = quant::Code4::nf4();
    for (r, c) in [(4096i64, 4096i64), (16384, 4096)] {
        let n = (r * c) as f64;
        let x = Tensor::randn([r, c], (Kind::Float, Device::Cpu)) * 0.02;
        for block in [64i64, 256] {
            let q8 = quant::quantize(&x, BlockSize::new(block).unwrap(), &code8).unwrap();
            let q4 = quant::quantize4(&x, block as usize, &nf4).unwrap();
            for (op, kind) in [("deq-f32", Kind::Float), ("deq-bf16", Kind::BFloat16)] {
                let mut out = Tensor::empty([r, c], (kind, Device::Cpu));
                let t8 = median_secs(|| q8.dequantize_into(&mut out).unwrap());
                let t4 = median_secs(|| q4.dequantize_into(&mut out).unwrap());
                println!(
                    "{:<10} {:>11} {:>5} {:>8.2} {:>8.2} {:>11.2}x",
                    op,
                    format!("{r}x{c}"),
                    block,
                    n / t8 / 1e9,
                    n / t4 / 1e9,
                    t4 / t8
                );
            }
        }
    }
}

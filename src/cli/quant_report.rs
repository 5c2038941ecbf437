//! `octet quant-report`: what blockwise 8-bit does to a weight-like matrix.
use octet::quant::{self, fit_code, BlockSize, FitOptions, QuantCode};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Rows of the matrix (output features).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(i64).range(1..=1 << 24))]
    rows: i64,
    /// Columns of the matrix (input features).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(i64).range(1..=1 << 24))]
    cols: i64,
    /// Elements per quantization block.
    #[arg(long, default_value_t = 4096)]
    block_size: i64,
    /// Seed of the random matrix.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    #[arg(long, default_value = "auto", help = super::DEVICE_HELP)]
    device: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let device = super::parse_device(&a.device)?;
    let block = BlockSize::new(a.block_size)?;
    // The matrix, its outlier copy, the de-quantized copy and a difference, in f32, plus
    // the host copy the fitted code samples.
    let elems = (a.rows as u64) * (a.cols as u64);
    octet::memory::ensure_fits(
        &format!("a {}x{} matrix", a.rows, a.cols),
        elems.saturating_mul(4 * 6),
        Device::Cpu,
        "lower --rows or --cols",
    )?;
    tch::manual_seed(a.seed);
    // GPT-style weights: N(0, 0.02) with a few outlier input features, which is what makes
    // per-block scaling matter.
    let w = Tensor::randn([a.rows, a.cols], (Kind::Float, Device::Cpu)) * 0.02;
    let outliers = Tensor::randint(a.cols, [8], (Kind::Int64, Device::Cpu));
    let w = w
        .index_copy(1, &outliers, &(w.index_select(1, &outliers) * 12.0))
        .to_device(device);
    let f32_bytes = w.numel() * 4;
    println!(
        "weight-like matrix {}x{} (N(0,0.02), 8 columns x12), block size {}",
        a.rows,
        a.cols,
        block.get()
    );
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "code", "bytes", "vs f32", "rel-MSE", "max|err|", "quant ms"
    );
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "f32", f32_bytes, "1.00x", "-", "-", "-"
    );
    let x: Vec<f32> = Vec::<f32>::try_from(&w.flatten(0, -1).to_device(Device::Cpu))?;
    for (name, code) in [
        ("dynamic", QuantCode::dynamic_signed()),
        ("fitted", fit_code(&x, block, FitOptions::default())?),
    ] {
        let t = Instant::now();
        let qz = quant::quantize(&w, block, &code)?;
        if let Device::Cuda(n) = device {
            tch::Cuda::synchronize(n as i64);
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let back = qz.dequantize(Kind::Float)?;
        let err = (&back - &w).square().sum(Kind::Double).double_value(&[])
            / w.square().sum(Kind::Double).double_value(&[]);
        let max = (&back - &w).abs().max().double_value(&[]);
        println!(
            "{:<10} {:>12} {:>11.2}x {:>12.3e} {:>12.3e} {:>10.1}",
            name,
            qz.nbytes(),
            f32_bytes as f64 / qz.nbytes() as f64,
            err,
            max,
            ms
        );
    }
    Ok(())
}

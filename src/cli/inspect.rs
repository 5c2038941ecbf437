//! `octet inspect`: the module graph of a model folder.
use octet::manifest::Manifest;
use octet::source::ModelSource;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face, octet or GPT-J 8-bit model folder, a GGUF file, or a Hugging Face
    /// cache id `org/name[@revision]`.
    dir: PathBuf,
    /// Architecture name, or `auto`.
    #[arg(long, default_value = "auto")]
    arch: String,
    /// Also list the N quantized tensors with the largest relative error recorded in
    /// octet.toml (with their codes).
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "10")]
    errors: Option<usize>,
}

/// The text `inspect` prints for `dir`.
pub fn render(dir: &std::path::Path, arch: &str) -> anyhow::Result<String> {
    let source = ModelSource::open(dir, arch)?;
    let mut out = format!("architecture: {}\n", source.arch.name());
    if let Some(m) = Manifest::read(dir)? {
        let code = format!("{:?}", m.code).to_lowercase();
        out += &format!(
            "octet format: block size {}, {code} code, written by octet {}\n",
            m.block_size, m.octet_version
        );
        if let Some(f) = m.four_bit {
            out += &format!(
                "4-bit Linear weights: {} code, block size {}\n",
                f.code, f.block_size
            );
        }
    }
    out += "\n";
    out += &source.graph.render();
    Ok(out)
}

/// The `n` quantized tensors with the largest relative MSE in `dir`'s octet.toml, worst first.
pub fn render_errors(dir: &std::path::Path, n: usize) -> anyhow::Result<String> {
    let Some(m) = Manifest::read(dir)? else {
        anyhow::bail!(
            "{}: no {} (only converted octet folders record errors)",
            dir.display(),
            octet::manifest::MANIFEST_FILE
        );
    };
    let mut rows = m.tensors.clone();
    rows.sort_by(|a, b| b.rel_mse.total_cmp(&a.rel_mse));
    let mut out = format!(
        "worst {} of {} quantized tensors (relative MSE = sum (x - x^)^2 / sum x^2):\n",
        n.min(rows.len()),
        rows.len()
    );
    out += &format!(
        "{:<10} {:>12} {:>12}  {}\n",
        "code", "rel-MSE", "max|err|", "tensor"
    );
    for r in rows.iter().take(n) {
        let code = r
            .code
            .map_or_else(|| "-".to_string(), |c| format!("{c:?}").to_lowercase());
        out += &format!(
            "{:<10} {:>12.3e} {:>12.3e}  {}\n",
            code, r.rel_mse, r.max_abs_err, r.name
        );
    }
    Ok(out)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dir = octet::hub::resolve_model(&a.dir)?;
    print!("{}", render(&dir, &a.arch)?);
    if let Some(n) = a.errors {
        print!("\n{}", render_errors(&dir, n)?);
    }
    Ok(())
}

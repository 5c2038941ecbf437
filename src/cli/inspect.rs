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

pub fn run(a: Args) -> anyhow::Result<()> {
    print!("{}", render(&octet::hub::resolve_model(&a.dir)?, &a.arch)?);
    Ok(())
}

//! `octet inspect`: the module graph of a model folder.
use octet::io::open_checkpoint;
use octet::load::{read_config, resolve_arch};
use octet::manifest::Manifest;
use octet::nn::ModuleGraph;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face, octet or GPT-J 8-bit model folder.
    dir: PathBuf,
    /// Architecture name, or `auto`.
    #[arg(long, default_value = "auto")]
    arch: String,
}

/// The text `inspect` prints for `dir`.
pub fn render(dir: &std::path::Path, arch: &str) -> anyhow::Result<String> {
    let config = read_config(dir)?;
    let arch = resolve_arch(dir, arch, &config)?;
    let store = open_checkpoint(dir)?;
    let graph = ModuleGraph::from_store(store.as_ref(), arch.spec())?;
    let mut out = format!("architecture: {}\n", arch.name());
    if let Some(m) = Manifest::read(dir)? {
        let code = format!("{:?}", m.code).to_lowercase();
        out += &format!(
            "octet format: block size {}, {code} code, written by octet {}\n",
            m.block_size, m.octet_version
        );
    }
    out += "\n";
    out += &graph.render();
    Ok(out)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    print!("{}", render(&a.dir, &a.arch)?);
    Ok(())
}

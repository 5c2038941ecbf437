//! `octet archs`: the registered architectures.
use octet::nn::kinds;

pub fn run() -> anyhow::Result<()> {
    print!("{}", octet::arch::registry::table());
    println!("\nlayer kinds: {}", kinds::kind_names().join(", "));
    let dups = kinds::duplicate_kinds();
    if !dups.is_empty() {
        anyhow::bail!("layer kinds registered more than once: {}", dups.join(", "));
    }
    Ok(())
}

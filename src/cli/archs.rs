//! `octet archs`: the registered architectures.
use octet::nn::registry;

pub fn run() -> anyhow::Result<()> {
    print!("{}", octet::arch::registry::table());
    println!("\nlayer kinds: {}", registry::kind_names().join(", "));
    let dups = registry::duplicate_kinds();
    if !dups.is_empty() {
        anyhow::bail!("layer kinds registered more than once: {}", dups.join(", "));
    }
    Ok(())
}

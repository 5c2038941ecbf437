//! `octet archs`: the registered architectures.
use octet::nn::kinds;
use octet::registry::architectures;

pub fn run() -> anyhow::Result<()> {
    println!(
        "{:<10} {:<28} {:<10} {:<10} description",
        "name", "hf architectures", "block", "lora"
    );
    for a in architectures() {
        let s = a.spec();
        println!(
            "{:<10} {:<28} {:<10} {:<10} {}",
            a.name(),
            s.hf_architectures.join(","),
            s.block_size.get(),
            s.lora_targets.join(","),
            a.description()
        );
    }
    println!("\nlayer kinds: {}", kinds::kind_names().join(", "));
    let dups = kinds::duplicate_kinds();
    if !dups.is_empty() {
        anyhow::bail!("layer kinds registered more than once: {}", dups.join(", "));
    }
    Ok(())
}

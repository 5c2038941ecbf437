//! `octet train`: LoRA fine-tuning. Settings come from the flags, then `--config FILE`
//! (TOML, keys named as the flags), then the defaults; `--print-config` shows the result.
use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches};
use octet::dist::env::LaunchEnv;
use octet::dist::{Dist, DistOptions};
use octet::train::trainer::{train_on, StopReason, TrainOptions};
use std::path::PathBuf;

/// The flags as clap derives them.
#[derive(clap::Args, Debug)]
struct Flags {
    /// TOML file with any of these settings (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the settings as resolved (TOML, as --config reads it) and exit without training.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    opts: TrainOptions,
    #[command(flatten)]
    dist: DistFlags,
}

/// How the ranks of a data-parallel run meet (torchrun's variables say who is who).
#[derive(clap::Args, Debug)]
struct DistFlags {
    /// Data-parallel backend: auto (NCCL on GPUs, Gloo on the CPU), gloo or nccl.
    #[arg(long, default_value = "auto")]
    dist_backend: octet::dist::BackendChoice,
    /// Rendezvous: env (torchrun's MASTER_ADDR/MASTER_PORT) or file:PATH (a shared file).
    #[arg(long, default_value = "env")]
    dist_init: octet::dist::Init,
    /// Seconds a collective may wait for the other ranks before the run fails.
    #[arg(long, default_value_t = 300, value_parser = super::at_least(1))]
    dist_timeout: usize,
    /// Start N ranks of this run on this machine (a one-machine torchrun).
    #[arg(long, value_parser = super::at_least(1))]
    nproc_per_node: Option<usize>,
}

/// Flags, plus which settings were given on the command line (they win over the file).
#[derive(Debug)]
pub struct Args {
    flags: Flags,
    given: Vec<String>,
}

impl FromArgMatches for Args {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let given = m
            .ids()
            .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .map(|id| id.as_str().replace('_', "-"))
            .collect();
        let flags = Flags::from_arg_matches(m)?;
        Ok(Args { flags, given })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for Args {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        Flags::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Flags::augment_args_for_update(cmd)
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let Args { flags, given } = a;
    let mut opts = flags.opts.resolve(&given, flags.config.as_deref())?;
    if flags.print_config {
        opts.validate()?;
        print!("{}", opts.to_toml()?);
        return Ok(());
    }
    if let Some(n) = flags.dist.nproc_per_node {
        return super::launch::run(n);
    }
    // A cache id from the flag or the config file becomes its snapshot folder.
    opts.model = octet::hub::resolve_model(&opts.model)?;
    let dist = join_ranks(&flags.dist, &opts)?;
    opts.progress = dist.is_main();
    let s = train_on(&opts, &dist)?;
    if !dist.is_main() {
        return Ok(());
    }
    let how = match s.stop {
        StopReason::Finished => "done".to_string(),
        StopReason::Interrupted => "stopped (Ctrl-C)".to_string(),
        StopReason::StopAfter => format!(
            "stopped at --stop-after {}",
            opts.stop_after.unwrap_or_default()
        ),
    };
    eprintln!(
        "{how} after {} steps in total ({} this run): {} trainable parameters on {} modules, optimizer state {} bytes ({:.2} bytes/param)",
        s.steps,
        s.metrics.len(),
        s.trainable_params,
        s.targets.len(),
        s.optimizer_bytes,
        s.optimizer_bytes as f64 / s.trainable_params.max(1) as f64
    );
    if let Some(p) = s.peak_gpu_mib {
        eprintln!("peak GPU memory {p:.0} MiB");
    }
    if let Some(m) = s.metrics.last() {
        println!("final train loss {:.4}", m.loss);
    }
    if let Some(e) = s.eval_loss {
        println!("eval loss {e:.4} (perplexity {:.2})", e.exp());
    }
    println!("adapter written to {}", opts.out.display());
    Ok(())
}

/// This process's place in the run: alone, or a rank of the run torchrun's variables describe.
fn join_ranks(f: &DistFlags, opts: &TrainOptions) -> anyhow::Result<Dist> {
    let dopts = DistOptions {
        backend: f.dist_backend,
        init: f.dist_init.clone(),
        timeout: std::time::Duration::from_secs(f.dist_timeout as u64),
    };
    let Some(launch) = LaunchEnv::from_env()? else {
        return Ok(Dist::init(&dopts, None, tch::Device::Cpu)?);
    };
    let request: octet::device::DeviceRequest = opts.device.parse()?;
    let device = octet::device::resolve(request)?;
    let (rank, world) = (launch.rank, launch.world);
    let dist = Dist::init(&dopts, Some(launch), device)?;
    if world > 1 && dist.is_main() {
        eprintln!("data-parallel run of {world} ranks (this is rank {rank})");
    }
    Ok(dist)
}

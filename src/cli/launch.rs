//! `octet train --nproc-per-node N …`: a one-machine torchrun. Starts N copies of this
//! command with torchrun's variables (rank 0 hosts the store on a free local port), forwards
//! Ctrl-C to them, and stops them all when the first one fails.
use anyhow::{bail, Context};
use octet::dist::env::LaunchEnv;
use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const FLAG: &str = "--nproc-per-node";

/// How long the other ranks get to exit after a failure before they are killed.
const GRACE: Duration = Duration::from_secs(10);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The command line without `--nproc-per-node N` (or `=N`).
fn without_nproc(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_next = false;
    for a in args {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        let s = a.to_string_lossy();
        if s == FLAG {
            skip_next = true;
        } else if !s.starts_with(&format!("{FLAG}=")) {
            out.push(a);
        }
    }
    out
}

/// A port free on this machine right now (the store binds it a moment later).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free local port")?;
    Ok(l.local_addr()?.port())
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: `kill` on the pid of a child this process started and has not yet reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Starts `n` ranks of this very command and waits for them.
pub fn run(n: usize) -> anyhow::Result<()> {
    if n == 0 {
        bail!("{FLAG} must be at least 1");
    }
    if std::env::var_os("WORLD_SIZE").is_some() {
        bail!("{FLAG} starts its own ranks: leave it out when torchrun (or srun) starts octet");
    }
    let exe = std::env::current_exe().context("locating the octet binary")?;
    let args = without_nproc(std::env::args_os().skip(1));
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) => p.parse().context("MASTER_PORT")?,
        Err(_) => free_port()?,
    };
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    let mut children: Vec<Option<Child>> = Vec::with_capacity(n);
    for rank in 0..n {
        let env = LaunchEnv {
            rank,
            world: n,
            local_rank: rank,
            local_world: n,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            restart_count: 0,
            agent_store: false,
        };
        let spawned = Command::new(&exe).args(&args).envs(env.to_vars()).spawn();
        match spawned {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                children
                    .iter()
                    .flatten()
                    .for_each(|c| signal(c, libc::SIGTERM));
                return Err(e).with_context(|| format!("starting rank {rank}"));
            }
        }
    }
    eprintln!("started {n} ranks (store 127.0.0.1:{port})");
    supervise(children)
}

/// Waits for every rank; on the first failure the rest get SIGTERM, then SIGKILL after
/// [`GRACE`].
fn supervise(mut children: Vec<Option<Child>>) -> anyhow::Result<()> {
    let mut forwarded = false;
    let mut failure: Option<(usize, ExitStatus)> = None;
    let mut deadline: Option<Instant> = None;
    while children.iter().any(Option::is_some) {
        if INTERRUPTED.load(Ordering::SeqCst) && !forwarded {
            // Each rank saves on Ctrl-C at the same step (they agree on it every step).
            children
                .iter()
                .flatten()
                .for_each(|c| signal(c, libc::SIGINT));
            forwarded = true;
        }
        let mut failed_now = None;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            if let Some(status) = child.try_wait()? {
                *slot = None;
                if !status.success() && failed_now.is_none() {
                    failed_now = Some((rank, status));
                }
            }
        }
        if let (Some((rank, status)), None) = (failed_now, failure) {
            eprintln!("rank {rank} failed ({status}); stopping the other ranks");
            failure = Some((rank, status));
            deadline = Some(Instant::now() + GRACE);
            children
                .iter()
                .flatten()
                .for_each(|c| signal(c, libc::SIGTERM));
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failure {
        Some((rank, status)) => bail!("rank {rank} failed ({status})"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_the_launcher_flag_only() {
        let args = [
            "train",
            "--nproc-per-node",
            "2",
            "--steps",
            "3",
            "--nproc-per-node=4",
        ];
        let out = without_nproc(args.iter().map(OsString::from));
        assert_eq!(out, ["train", "--steps", "3"].map(OsString::from));
    }
}

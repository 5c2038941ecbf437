//! Data-parallel training on torch's c10d: Gloo for CPU tensors, NCCL for CUDA tensors.
//!
//! A small C++ shim (`shim.cpp`, compiled by build.rs against libtorch's own headers) makes
//! the process group; [`Dist`] is the safe handle the trainer holds. Ranks meet through the
//! variables torchrun sets ([`env::LaunchEnv`]) and a TCPStore, or through a FileStore
//! (`--dist-init file:PATH`). The store is prefixed per `TORCHELASTIC_RESTART_COUNT`, so a
//! restarted attempt never reads the keys an earlier one left behind.
//!
//! DDP's autograd-hook reducer is not used: block recompute calls `backward()` once per
//! block, which that reducer refuses. The trainer instead all-reduces the flattened adapter
//! gradients once per step ([`Dist::sum_all`]).
pub mod env;
#[cfg(octet_dist)]
mod group;

use crate::error::{OctetError, Result};
use env::LaunchEnv;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Which c10d backend carries the collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// NCCL when training on a GPU, Gloo on the CPU.
    Auto,
    /// Gloo (CPU tensors; CUDA tensors go through the host).
    Gloo,
    /// NCCL (CUDA tensors, one GPU per rank).
    Nccl,
}

impl FromStr for BackendChoice {
    type Err = OctetError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "gloo" => Ok(Self::Gloo),
            "nccl" => Ok(Self::Nccl),
            o => Err(OctetError::InvalidArgument(format!(
                "unknown --dist-backend {o:?}: expected auto, gloo or nccl"
            ))),
        }
    }
}

/// How the ranks find each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Init {
    /// torchrun's `MASTER_ADDR`/`MASTER_PORT` (a TCPStore; rank 0 or torchrun's agent hosts it).
    Env,
    /// A FileStore at this path, on a filesystem every rank sees; needs no port.
    File(PathBuf),
}

impl FromStr for Init {
    type Err = OctetError;
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once(':') {
            _ if s == "env" => Ok(Self::Env),
            Some(("file", p)) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
            _ => Err(OctetError::InvalidArgument(format!(
                "unknown --dist-init {s:?}: expected env or file:PATH"
            ))),
        }
    }
}

/// The distributed settings of a run (the `--dist-*` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistOptions {
    /// The backend.
    pub backend: BackendChoice,
    /// The rendezvous.
    pub init: Init,
    /// How long a collective (or joining the group) may wait before the run fails.
    pub timeout: Duration,
}

impl Default for DistOptions {
    fn default() -> Self {
        DistOptions {
            backend: BackendChoice::Auto,
            init: Init::Env,
            timeout: Duration::from_secs(300),
        }
    }
}

/// Whether this build has distributed training (libtorch's c10d and the gloo headers were
/// there when it was compiled).
pub const AVAILABLE: bool = cfg!(octet_dist);

/// Whether this build can use NCCL.
pub fn has_nccl() -> bool {
    #[cfg(octet_dist)]
    {
        group::has_nccl()
    }
    #[cfg(not(octet_dist))]
    {
        false
    }
}

/// The reduction of an all-reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise maximum.
    Max,
}

/// This process's place in a data-parallel run; with one rank every collective returns at
/// once without touching c10d.
pub struct Dist {
    rank: usize,
    world: usize,
    local_rank: usize,
    restart_count: usize,
    /// Where the collectives' tensors live: the CPU for Gloo, this rank's GPU for NCCL.
    comm_device: Device,
    #[cfg(octet_dist)]
    group: Option<group::Group>,
}

impl Dist {
    /// A run of one process.
    pub fn single() -> Self {
        Dist {
            rank: 0,
            world: 1,
            local_rank: 0,
            restart_count: 0,
            comm_device: Device::Cpu,
            #[cfg(octet_dist)]
            group: None,
        }
    }

    /// Joins the run that `launch` describes (from [`LaunchEnv::from_env`]; `None`: a plain
    /// run). `device` is the training device, which `auto` maps to a backend. With one rank
    /// nothing is set up unless a backend was named (a check of the set-up).
    pub fn init(opts: &DistOptions, launch: Option<LaunchEnv>, device: Device) -> Result<Self> {
        let Some(launch) = launch else {
            if let Init::File(p) = &opts.init {
                return Err(OctetError::Distributed(format!(
                    "--dist-init file:{} needs RANK and WORLD_SIZE in the environment",
                    p.display()
                )));
            }
            return Ok(Self::single());
        };
        let mut dist = Dist {
            rank: launch.rank,
            world: launch.world,
            local_rank: launch.local_rank,
            restart_count: launch.restart_count,
            ..Self::single()
        };
        if launch.world == 1 && opts.backend == BackendChoice::Auto {
            return Ok(dist);
        }
        let nccl = match opts.backend {
            BackendChoice::Auto => device.is_cuda(),
            BackendChoice::Gloo => false,
            BackendChoice::Nccl => true,
        };
        if nccl {
            check_nccl_usable(device, launch.local_rank)?;
            dist.comm_device = Device::Cuda(launch.local_rank);
        }
        dist.connect(opts, &launch, nccl)?;
        Ok(dist)
    }

    #[cfg(octet_dist)]
    fn connect(&mut self, opts: &DistOptions, launch: &LaunchEnv, nccl: bool) -> Result<()> {
        let file;
        let rendezvous = match &opts.init {
            Init::File(p) => {
                file = p.to_string_lossy().into_owned();
                group::Rendezvous::File(&file)
            }
            Init::Env => group::Rendezvous::Tcp {
                host: &launch.master_addr,
                port: launch.master_port,
                serve: launch.rank == 0 && !launch.agent_store,
            },
        };
        let prefix = format!("octet/attempt{}", launch.restart_count);
        let g = group::Group::new(
            nccl,
            &rendezvous,
            launch.rank,
            launch.world,
            &prefix,
            opts.timeout,
        )
        .map_err(|e| match e {
            OctetError::Distributed(m) => OctetError::Distributed(format!(
                "rank {} of {} could not join the group ({}): {m}",
                launch.rank,
                launch.world,
                match &opts.init {
                    Init::Env => format!("store {}:{}", launch.master_addr, launch.master_port),
                    Init::File(p) => format!("file store {}", p.display()),
                }
            )),
            other => other,
        })?;
        self.group = Some(g);
        Ok(())
    }

    #[cfg(not(octet_dist))]
    fn connect(&mut self, _: &DistOptions, _: &LaunchEnv, _: bool) -> Result<()> {
        Err(OctetError::Distributed(
            "this octet was built without distributed training (its libtorch lacked c10d's \
             headers, or the gloo headers were missing at build time: `make build` fetches \
             them)"
                .into(),
        ))
    }

    /// This process among all (0-based).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Processes in all.
    pub fn world(&self) -> usize {
        self.world
    }

    /// This process on its machine.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// How many times the launcher restarted the job before this attempt.
    pub fn restart_count(&self) -> usize {
        self.restart_count
    }

    /// Whether this is rank 0, the one that writes.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The training device of this rank: each rank of a distributed run on GPUs takes the GPU
    /// numbered by its local rank.
    pub fn training_device(&self, requested: Device) -> Device {
        match requested {
            Device::Cuda(_) if self.world > 1 => Device::Cuda(self.local_rank),
            other => other,
        }
    }

    #[cfg(octet_dist)]
    fn group(&self) -> Option<&group::Group> {
        self.group.as_ref()
    }

    /// Runs `f` on `t` as the backend needs it (contiguous, on the backend's device), then
    /// copies the result back when a copy was made.
    #[cfg(octet_dist)]
    fn on_comm_device(
        &self,
        t: &mut Tensor,
        f: impl FnOnce(&group::Group, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        let Some(g) = self.group() else {
            return Ok(());
        };
        tch::no_grad(|| {
            if t.device() == self.comm_device && t.is_contiguous() {
                return f(g, t);
            }
            let mut work = t.to_device(self.comm_device).contiguous();
            f(g, &mut work)?;
            t.f_copy_(&work)?;
            Ok(())
        })
    }

    /// All-reduces `t` in place across the ranks.
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        #[cfg(octet_dist)]
        {
            self.on_comm_device(t, |g, w| g.all_reduce(w, op == ReduceOp::Max))
        }
        #[cfg(not(octet_dist))]
        {
            let _ = (t, op);
            Ok(())
        }
    }

    /// Overwrites `t` on every rank with rank `root`'s.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        #[cfg(octet_dist)]
        {
            self.on_comm_device(t, |g, w| g.broadcast(w, root))
        }
        #[cfg(not(octet_dist))]
        {
            let _ = (t, root);
            Ok(())
        }
    }

    /// Waits until every rank has reached this point.
    pub fn barrier(&self) -> Result<()> {
        self.all_reduce_f64(&[0.0], ReduceOp::Sum).map(|_| ())
    }

    /// All-reduces a few numbers (in f64, so sums of counts stay exact).
    pub fn all_reduce_f64(&self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>> {
        if self.world == 1 && !self.has_group() {
            return Ok(values.to_vec());
        }
        let mut t = Tensor::f_from_slice(values)?.to_device(self.comm_device);
        self.all_reduce(&mut t, op)?;
        Ok(Vec::<f64>::try_from(t.to_device(Device::Cpu))?)
    }

    fn has_group(&self) -> bool {
        #[cfg(octet_dist)]
        {
            self.group.is_some()
        }
        #[cfg(not(octet_dist))]
        {
            false
        }
    }

    /// Replaces every tensor by its sum over the ranks, in one all-reduce of one flat f32
    /// buffer (c10d refuses a list of differently sized tensors).
    pub fn sum_all(&self, tensors: &[Tensor]) -> Result<()> {
        if !self.has_group() {
            return Ok(());
        }
        let mut flat = flatten(tensors)?;
        self.all_reduce(&mut flat, ReduceOp::Sum)?;
        unflatten_into(&flat, tensors)
    }

    /// Overwrites every tensor with rank `root`'s, in one broadcast of one flat f32 buffer.
    pub fn broadcast_all(&self, tensors: &[Tensor], root: usize) -> Result<()> {
        if !self.has_group() {
            return Ok(());
        }
        let mut flat = flatten(tensors)?;
        self.broadcast(&mut flat, root)?;
        unflatten_into(&flat, tensors)
    }
}

/// The tensors' values, one after the other, in one f32 vector.
fn flatten(tensors: &[Tensor]) -> Result<Tensor> {
    tch::no_grad(|| {
        let parts: Vec<Tensor> = tensors
            .iter()
            .map(|t| t.f_reshape([-1])?.f_to_kind(Kind::Float))
            .collect::<std::result::Result<_, _>>()?;
        if parts.is_empty() {
            return Ok(Tensor::zeros([0], (Kind::Float, Device::Cpu)));
        }
        Ok(Tensor::f_cat(&parts, 0)?)
    })
}

/// Copies consecutive pieces of `flat` back into `tensors` (in their own dtype).
fn unflatten_into(flat: &Tensor, tensors: &[Tensor]) -> Result<()> {
    tch::no_grad(|| {
        let mut at = 0;
        for t in tensors {
            let n = t.numel() as i64;
            let piece = flat.f_narrow(0, at, n)?.f_view(t.size().as_slice())?;
            t.shallow_clone().f_copy_(&piece)?;
            at += n;
        }
        Ok(())
    })
}

/// Why NCCL cannot run here, if it cannot: it needs a build with NCCL and a GPU per rank.
fn check_nccl_usable(device: Device, local_rank: usize) -> Result<()> {
    if !has_nccl() {
        return Err(OctetError::Distributed(
            "--dist-backend nccl: this octet was built without NCCL (its libtorch has no CUDA, \
             or no CUDA/NCCL headers were found); use --dist-backend gloo"
                .into(),
        ));
    }
    let gpus = tch::Cuda::device_count().max(0) as usize;
    if gpus == 0 {
        return Err(OctetError::Distributed(
            "--dist-backend nccl needs GPUs, and no CUDA device is usable here (see `octet \
             env`); on the CPU use --dist-backend gloo (or auto)"
                .into(),
        ));
    }
    if !device.is_cuda() {
        return Err(OctetError::Distributed(
            "--dist-backend nccl needs CUDA tensors: train with --device cuda (or auto)".into(),
        ));
    }
    if local_rank >= gpus {
        return Err(OctetError::Distributed(format!(
            "LOCAL_RANK {local_rank} has no GPU of its own: this machine has {gpus}; start at \
             most {gpus} ranks per machine (--nproc-per-node)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flags() {
        assert_eq!(
            "nccl".parse::<BackendChoice>().unwrap(),
            BackendChoice::Nccl
        );
        assert!("mpi".parse::<BackendChoice>().is_err());
        assert_eq!("env".parse::<Init>().unwrap(), Init::Env);
        assert_eq!(
            "file:/tmp/x".parse::<Init>().unwrap(),
            Init::File("/tmp/x".into())
        );
        assert!("file:".parse::<Init>().is_err());
        assert!("tcp://h:1".parse::<Init>().is_err());
    }

    #[test]
    fn one_rank_calls_nothing() {
        let d = Dist::single();
        let t = Tensor::from_slice(&[1.0f32, 2.0]);
        d.sum_all(&[t.shallow_clone()]).unwrap();
        d.barrier().unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0]);
        assert_eq!(d.all_reduce_f64(&[3.0], ReduceOp::Max).unwrap(), vec![3.0]);
    }

    #[test]
    fn flat_buffer_round_trips_mixed_shapes() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let b = Tensor::from_slice(&[5.0f32]);
        let flat = flatten(&[a.shallow_clone(), b.shallow_clone()]).unwrap();
        assert_eq!(flat.size(), vec![5]);
        let doubled = &flat * 2.0;
        unflatten_into(&doubled, &[a.shallow_clone(), b.shallow_clone()]).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(a.reshape([-1])).unwrap(),
            vec![2.0, 4.0, 6.0, 8.0]
        );
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![10.0]);
    }

    #[test]
    fn a_cuda_libtorch_gets_the_nccl_half() {
        // build.rs compiles and links shim_nccl.cpp whenever libtorch has CUDA.
        if AVAILABLE && option_env!("OCTET_LINKED_CUDA").is_some() {
            assert!(has_nccl());
        }
    }

    #[test]
    fn nccl_without_gpus_says_so() {
        if tch::Cuda::device_count() > 0 {
            return;
        }
        let e = check_nccl_usable(Device::Cpu, 0).unwrap_err().to_string();
        assert!(e.contains("NCCL") || e.contains("nccl"), "{e}");
        assert!(e.contains("GPU") || e.contains("without NCCL"), "{e}");
    }
}

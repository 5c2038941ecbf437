//! The launch environment torchrun (and `octet train --nproc-per-node`, Slurm scripts and
//! Kubernetes' PyTorchJob) gives every rank.
use crate::error::{OctetError, Result};

/// What torchrun's variables say about this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    /// `RANK`: this process among all.
    pub rank: usize,
    /// `WORLD_SIZE`: processes in all.
    pub world: usize,
    /// `LOCAL_RANK`: this process on its machine (its GPU).
    pub local_rank: usize,
    /// `LOCAL_WORLD_SIZE`: processes on this machine.
    pub local_world: usize,
    /// `MASTER_ADDR`: where the store runs.
    pub master_addr: String,
    /// `MASTER_PORT`: its port.
    pub master_port: u16,
    /// `TORCHELASTIC_RESTART_COUNT`: how many times the job was restarted (0 the first time).
    pub restart_count: usize,
    /// `TORCHELASTIC_USE_AGENT_STORE`: torchrun's agent already hosts the store.
    pub agent_store: bool,
}

/// The variables a launcher sets, in the order [`LaunchEnv::to_vars`] writes them.
pub const VARS: [&str; 8] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_USE_AGENT_STORE",
];

impl LaunchEnv {
    /// Reads the process environment; `None` when `WORLD_SIZE` is not set (a plain run).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `get`; `None` when `WORLD_SIZE` is absent.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(world) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |name: &str, text: Option<String>, default: Option<usize>| -> Result<usize> {
            match (text, default) {
                (Some(t), _) => t.trim().parse().map_err(|_| {
                    OctetError::Distributed(format!("{name}={t:?} is not a whole number"))
                }),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(OctetError::Distributed(format!(
                    "WORLD_SIZE is set but {name} is not (launch with torchrun or set both)"
                ))),
            }
        };
        let world = num("WORLD_SIZE", Some(world), None)?;
        let rank = num("RANK", get("RANK"), None)?;
        let local_rank = num("LOCAL_RANK", get("LOCAL_RANK"), Some(0))?;
        let local_world = num("LOCAL_WORLD_SIZE", get("LOCAL_WORLD_SIZE"), Some(1))?;
        let restart_count = num(
            "TORCHELASTIC_RESTART_COUNT",
            get("TORCHELASTIC_RESTART_COUNT"),
            Some(0),
        )?;
        if world == 0 || rank >= world {
            return Err(OctetError::Distributed(format!(
                "RANK={rank} does not fit WORLD_SIZE={world}"
            )));
        }
        let port = num("MASTER_PORT", get("MASTER_PORT"), Some(29500))?;
        let master_port = u16::try_from(port)
            .map_err(|_| OctetError::Distributed(format!("MASTER_PORT={port} is not a port")))?;
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        Ok(Some(LaunchEnv {
            rank,
            world,
            local_rank,
            local_world,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            restart_count,
            agent_store,
        }))
    }

    /// The variables that describe this process to a child, as torchrun would set them.
    pub fn to_vars(&self) -> Vec<(&'static str, String)> {
        let values = [
            self.rank.to_string(),
            self.world.to_string(),
            self.local_rank.to_string(),
            self.local_world.to_string(),
            self.master_addr.clone(),
            self.master_port.to_string(),
            self.restart_count.to_string(),
            if self.agent_store { "True" } else { "False" }.to_string(),
        ];
        VARS.into_iter().zip(values).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn reads_torchrun_variables_and_round_trips() {
        assert_eq!(LaunchEnv::from_lookup(lookup(&[])).unwrap(), None);
        let e = LaunchEnv::from_lookup(lookup(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((e.rank, e.world, e.local_rank, e.local_world), (3, 4, 1, 2));
        assert_eq!((e.master_addr.as_str(), e.master_port), ("node0", 29400));
        assert_eq!((e.restart_count, e.agent_store), (2, true));
        let vars = e.to_vars();
        let back =
            LaunchEnv::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
                .unwrap();
        assert_eq!(back, Some(e));
    }

    #[test]
    fn refuses_inconsistent_variables() {
        for (vars, needle) in [
            (vec![("WORLD_SIZE", "2")], "RANK is not"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "does not fit"),
            (
                vec![("WORLD_SIZE", "two"), ("RANK", "0")],
                "WORLD_SIZE=\"two\"",
            ),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")],
                "not a port",
            ),
        ] {
            let e = LaunchEnv::from_lookup(lookup(&vars))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}

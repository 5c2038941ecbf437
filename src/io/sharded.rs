//! Sharded checkpoints: an index JSON (`weight_map`: tensor name → shard file) over several
//! safetensors or torch .bin files.
use super::{open_file, TensorMeta, TensorStore};
use crate::error::{OctetError, Result};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Several shard files seen as one store.
pub struct ShardedStore {
    index: PathBuf,
    shards: Vec<Box<dyn TensorStore>>,
    owner: HashMap<String, usize>,
    order: Vec<String>,
}

impl ShardedStore {
    /// Opens the index at `index` and every shard it names (relative to its folder).
    pub fn open(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| OctetError::io(index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| OctetError::bad_file(index, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| OctetError::bad_file(index, "no \"weight_map\" object"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: BTreeMap<String, usize> = BTreeMap::new();
        for f in map.values() {
            let f = f.as_str().ok_or_else(|| {
                OctetError::bad_file(index, "weight_map values must be file names")
            })?;
            if f.contains('/') || f.contains("..") {
                return Err(OctetError::bad_file(
                    index,
                    format!("shard name {f} leaves the checkpoint folder"),
                ));
            }
            let n = files.len();
            files.entry(f.to_string()).or_insert(n);
        }
        let mut by_index: Vec<(&String, &usize)> = files.iter().collect();
        by_index.sort_by_key(|(_, i)| **i);
        let shards = by_index
            .iter()
            .map(|(f, _)| open_file(&dir.join(f)))
            .collect::<Result<Vec<_>>>()?;
        let mut owner = HashMap::new();
        let mut order = Vec::new();
        for (shard_i, shard) in shards.iter().enumerate() {
            for name in shard.names() {
                order.push(name.clone());
                owner.insert(name, shard_i);
            }
        }
        for (name, f) in map {
            let want = files[f.as_str().unwrap_or_default()];
            match owner.get(name) {
                Some(&i) if i == want => {}
                Some(_) => {
                    return Err(OctetError::bad_file(
                        index,
                        format!("tensor {name} is not in the shard the index names"),
                    ))
                }
                None => {
                    return Err(OctetError::bad_file(
                        index,
                        format!("tensor {name} is missing from shard {f}"),
                    ))
                }
            }
        }
        Ok(ShardedStore {
            index: index.to_path_buf(),
            shards,
            owner,
            order,
        })
    }
}

impl TensorStore for ShardedStore {
    fn path(&self) -> &Path {
        &self.index
    }
    fn names(&self) -> Vec<String> {
        self.order.clone()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.owner
            .get(name)
            .and_then(|&i| self.shards[i].meta(name))
    }
    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        match self.owner.get(name) {
            Some(&i) => self.shards[i].bytes(name),
            None => Err(OctetError::bad_file(
                &self.index,
                format!("no tensor named {name}"),
            )),
        }
    }
    fn release(&self, name: &str) {
        if let Some(&i) = self.owner.get(name) {
            self.shards[i].release(name)
        }
    }
}

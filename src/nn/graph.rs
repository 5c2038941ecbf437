//! octet's module graph: the named modules of a model (Hugging Face paths), each with a layer
//! kind and the tensors it holds. It describes a checkpoint without loading it, so conversion
//! and `inspect` work on models far bigger than memory.
use super::kinds;
pub use super::node::{Node, ParamInfo};
use super::spec::Spec;
use crate::error::{OctetError, Result};
use crate::io::{Dtype, TensorStore};
use crate::quant::double_quant as dq;
use crate::quant::{BlockSize, CODE_LEN};
use std::cmp::Ordering;
use std::fmt::Write;

/// The modules of a model, in natural path order (`h.2` before `h.10`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModuleGraph {
    /// The modules.
    pub nodes: Vec<Node>,
}

/// Orders paths segment by segment, numbers numerically.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let mut sa = a.split('.');
    let mut sb = b.split('.');
    loop {
        match (sa.next(), sb.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(i), Ok(j)) => i.cmp(&j),
                    _ => x.cmp(y),
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
        }
    }
}

fn param_rank(name: &str) -> usize {
    [
        "weight",
        "bias",
        "absmax",
        dq::STORED_Q,
        dq::STORED_SCALE,
        dq::STORED_OFFSET,
        "code",
    ]
    .iter()
    .position(|&n| n == name)
    .unwrap_or(7)
}

impl ModuleGraph {
    /// Describes the modules of a checkpoint, giving each the kind `spec` names for its path.
    /// Modules already in 8-bit form (a uint8 weight with `absmax` and `code`) get the
    /// registered 8-bit kind. Tensors the spec ignores are left out; a tensor that belongs to
    /// no known module is an error naming it.
    pub fn from_store(store: &dyn TensorStore, spec: &Spec) -> Result<Self> {
        let mut nodes: Vec<Node> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for name in store.names() {
            if spec.ignores(&name) {
                continue;
            }
            let meta = store.meta(&name).ok_or_else(|| {
                OctetError::bad_file(
                    store.path(),
                    format!("tensor {name} is listed but has no data"),
                )
            })?;
            let (path, pname) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
            let i = *index.entry(path.to_string()).or_insert_with(|| {
                nodes.push(Node {
                    path: path.to_string(),
                    kind: String::new(),
                    params: Vec::new(),
                });
                nodes.len() - 1
            });
            nodes[i].params.push(ParamInfo {
                name: pname.to_string(),
                dtype: meta.dtype,
                shape: meta.shape,
            });
        }
        for node in &mut nodes {
            let base = spec.module_kind(&node.path).ok_or_else(|| {
                OctetError::bad_file(
                    store.path(),
                    format!(
                        "tensor {} belongs to no module the {} architecture knows",
                        node.tensor_name(&node.params[0].name),
                        spec.name
                    ),
                )
            })?;
            let is_8bit = (node.param("absmax").is_some() || node.param(dq::STORED_Q).is_some())
                && node.param("code").is_some()
                && node.params.iter().any(|p| p.dtype == Dtype::U8);
            let is_4bit = is_8bit
                && node
                    .param("code")
                    .is_some_and(|c| c.shape == [crate::quant::CODE4_LEN]);
            node.kind = if is_4bit {
                if base != "Linear" {
                    return Err(OctetError::bad_file(
                        store.path(),
                        format!(
                            "module {} is 4-bit but only Linear modules can be",
                            node.path
                        ),
                    ));
                }
                super::q4::KIND.to_string()
            } else if is_8bit {
                kinds::replacement_for(base)
                    .ok_or_else(|| {
                        OctetError::bad_file(
                            store.path(),
                            format!("module {} is 8-bit but {base} has no 8-bit kind", node.path),
                        )
                    })?
                    .to
                    .to_string()
            } else {
                base.to_string()
            };
            node.params.sort_by(|a, b| {
                param_rank(&a.name)
                    .cmp(&param_rank(&b.name))
                    .then(a.name.cmp(&b.name))
            });
        }
        nodes.sort_by(|a, b| natural_cmp(&a.path, &b.path));
        let graph = ModuleGraph { nodes };
        graph.check_shapes(store.path())?;
        Ok(graph)
    }

    /// Checks each registered kind's tensors are present with consistent shapes.
    fn check_shapes(&self, origin: &std::path::Path) -> Result<()> {
        for node in &self.nodes {
            if let Some(kind) = kinds::layer_kind(&node.kind) {
                (kind.check)(node).map_err(|problem| {
                    OctetError::bad_file(origin, format!("module {}: {problem}", node.path))
                })?;
            }
        }
        Ok(())
    }

    /// The walker: replaces every module that `select` accepts and whose kind has a registered
    /// 8-bit replacement. Returns the replaced paths.
    pub fn quantize_where(
        &mut self,
        block: BlockSize,
        mut select: impl FnMut(&str) -> bool,
    ) -> Vec<String> {
        let mut replaced = Vec::new();
        for node in &mut self.nodes {
            let Some(rep) = kinds::replacement_for(&node.kind) else {
                continue;
            };
            if !select(&node.path) {
                continue;
            }
            let Some(p) = node
                .params
                .iter_mut()
                .find(|p| p.name == rep.quantized_param)
            else {
                continue;
            };
            p.dtype = Dtype::U8;
            let numel: usize = p.shape.iter().product();
            node.params.push(ParamInfo {
                name: "absmax".into(),
                dtype: Dtype::F32,
                shape: vec![block.blocks_for(numel)],
            });
            node.params.push(ParamInfo {
                name: "code".into(),
                dtype: Dtype::F32,
                shape: vec![CODE_LEN],
            });
            node.params.sort_by_key(|p| param_rank(&p.name));
            node.kind = rep.to.to_string();
            replaced.push(node.path.clone());
        }
        replaced
    }

    /// Plans the f32 `absmax` of the 8-bit modules at `paths` (those a conversion quantizes;
    /// a module already 8-bit in the source keeps the scales it has) as double-quantized
    /// scales instead (`absmax_q`, `absmax_scale`, `absmax_offset`; see
    /// [`crate::quant::double_quant`]).
    pub fn double_quantize_absmax(&mut self, paths: &[String]) {
        for node in &mut self.nodes {
            if !paths.contains(&node.path) {
                continue;
            }
            let Some(i) = node.params.iter().position(|p| p.name == "absmax") else {
                continue;
            };
            if kinds::quantized_param(&node.kind).is_none() && node.kind != super::q4::KIND {
                continue;
            }
            let blocks = node.params.remove(i).shape[0];
            node.params.extend([
                ParamInfo {
                    name: dq::STORED_Q.into(),
                    dtype: Dtype::U8,
                    shape: vec![blocks],
                },
                ParamInfo {
                    name: dq::STORED_SCALE.into(),
                    dtype: Dtype::F32,
                    shape: vec![blocks.div_ceil(dq::GROUP)],
                },
                ParamInfo {
                    name: dq::STORED_OFFSET.into(),
                    dtype: Dtype::F32,
                    shape: vec![1],
                },
            ]);
            node.params.sort_by_key(|p| param_rank(&p.name));
        }
    }

    /// The reverse of [`Self::double_quantize_absmax`]: double-quantized scales planned as one
    /// f32 `absmax` per block again.
    pub fn plain_absmax(&mut self) {
        for node in &mut self.nodes {
            let Some(blocks) = node.param(dq::STORED_Q).map(|p| p.shape[0]) else {
                continue;
            };
            node.params.retain(|p| {
                ![dq::STORED_Q, dq::STORED_SCALE, dq::STORED_OFFSET].contains(&p.name.as_str())
            });
            node.params.push(ParamInfo {
                name: "absmax".into(),
                dtype: Dtype::F32,
                shape: vec![blocks],
            });
            node.params.sort_by_key(|p| param_rank(&p.name));
        }
    }

    /// Every tensor as (full name, dtype, shape), in module order: what a writer plans.
    pub fn tensor_plan(&self) -> Vec<(String, Dtype, Vec<usize>)> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.params
                    .iter()
                    .map(move |p| (n.tensor_name(&p.name), p.dtype, p.shape.clone()))
            })
            .collect()
    }

    /// The module at `path`.
    pub fn node(&self, path: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.path == path)
    }

    /// Total bytes of all tensors.
    pub fn nbytes(&self) -> usize {
        self.nodes.iter().map(Node::nbytes).sum()
    }

    /// The text `octet inspect` prints: one line per tensor (path, kind, shape, dtype, bytes),
    /// then totals per kind and overall.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<44} {:<14} {:<16} {:<5} {:>14}",
            "tensor", "kind", "shape", "dtype", "bytes"
        );
        for node in &self.nodes {
            for p in &node.params {
                let shape = format!("{:?}", p.shape);
                let _ = writeln!(
                    out,
                    "{:<44} {:<14} {:<16} {:<5} {:>14}",
                    node.tensor_name(&p.name),
                    node.kind,
                    shape,
                    p.dtype.safetensors_name(),
                    p.nbytes()
                );
            }
        }
        let mut per_kind: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
        for node in &self.nodes {
            let e = per_kind.entry(&node.kind).or_default();
            e.0 += 1;
            e.1 += node.nbytes();
        }
        let _ = writeln!(out);
        for (kind, (n, bytes)) in per_kind {
            let _ = writeln!(out, "{kind:<14} {n:>5} modules {bytes:>14} bytes");
        }
        let tensors: usize = self.nodes.iter().map(|n| n.params.len()).sum();
        let _ = writeln!(
            out,
            "total: {} modules, {tensors} tensors, {} bytes",
            self.nodes.len(),
            self.nbytes()
        );
        out
    }
}

/// Checks that every module in `expected` (path, weight shape) exists with that weight shape,
/// and that the graph has no module outside it.
pub fn check_weight_shapes(graph: &ModuleGraph, expected: &[(String, Vec<usize>)]) -> Result<()> {
    for (path, shape) in expected {
        let node = graph.node(path).ok_or_else(|| {
            OctetError::InvalidArgument(format!("the checkpoint has no module {path}"))
        })?;
        let w = node
            .param("weight")
            .map(|p| super::q4::logical_weight_shape(&node.kind, &p.shape))
            .unwrap_or_default();
        if &w != shape {
            return Err(OctetError::ShapeMismatch {
                what: format!("{path}.weight (against the config)"),
                expected: format!("{shape:?}"),
                found: format!("{w:?}"),
            });
        }
    }
    if let Some(extra) = graph
        .nodes
        .iter()
        .find(|n| !expected.iter().any(|(p, _)| *p == n.path))
    {
        return Err(OctetError::InvalidArgument(format!(
            "module {} is not part of this architecture",
            extra.path
        )));
    }
    Ok(())
}

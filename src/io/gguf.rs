//! llama.cpp GGUF files (versions 2 and 3): header, metadata, tensor infos and memory-mapped
//! data, exposed as a [`TensorStore`] under Hugging Face names.
//!
//! Tensors of type F32, F16 and BF16 are served as stored; Q8_0, Q4_0 and Q4_1 are de-quantized
//! to f32 on read with ggml's formulas (bit-identical to `gguf.quants.dequantize`). For
//! `general.architecture = "llama"` the llama.cpp names map to `LlamaForCausalLM`'s and the
//! row permutation llama.cpp's converter applies to q/k projections is undone. The metadata
//! also yields the model's config.json ([`GgufFile::config`]) and its byte-level BPE tokenizer
//! ([`GgufFile::hf_tokenizer`]), so a GGUF file is a complete model source on its own.
use super::{Dtype, TensorMeta, TensorStore};
use crate::error::{OctetError, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// Whether `path` is a GGUF file (by its `.gguf` extension).
pub fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT32`.
    F32(f32),
    /// `FLOAT64`.
    F64(f64),
    /// `BOOL`.
    Bool(bool),
    /// `STRING` (invalid UTF-8 is replaced).
    Str(String),
    /// `ARRAY` of values of one type (possibly arrays themselves).
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A ggml tensor type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: f16 scale `d`, 32 × i8; `x = d·q`.
    Q8_0,
    /// Blocks of 32: f16 scale `d`, 32 × 4 bits; `x = d·(q − 8)`.
    Q4_0,
    /// Blocks of 32: f16 scale `d`, f16 minimum `m`, 32 × 4 bits; `x = d·q + m`.
    Q4_1,
}

impl GgmlType {
    fn from_id(id: u32) -> std::result::Result<Self, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            other => {
                const NAMES: [(u32, &str); 20] = [
                    (6, "Q5_0"),
                    (7, "Q5_1"),
                    (9, "Q8_1"),
                    (10, "Q2_K"),
                    (11, "Q3_K"),
                    (12, "Q4_K"),
                    (13, "Q5_K"),
                    (14, "Q6_K"),
                    (15, "Q8_K"),
                    (16, "IQ2_XXS"),
                    (17, "IQ2_XS"),
                    (18, "IQ3_XXS"),
                    (19, "IQ1_S"),
                    (20, "IQ4_NL"),
                    (21, "IQ3_S"),
                    (22, "IQ2_S"),
                    (23, "IQ4_XS"),
                    (24, "I8"),
                    (26, "I32"),
                    (28, "F64"),
                ];
                let name = NAMES
                    .iter()
                    .find(|(i, _)| *i == other)
                    .map_or("unknown", |(_, n)| n);
                return Err(format!("ggml type {other} ({name})"));
            }
        })
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
        }
    }

    /// The dtype octet serves the tensor as (quantized types are de-quantized to f32).
    pub fn served_dtype(self) -> Dtype {
        match self {
            GgmlType::F16 => Dtype::F16,
            GgmlType::BF16 => Dtype::BF16,
            _ => Dtype::F32,
        }
    }
}

/// One tensor as the file describes it.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    /// The name in the file (llama.cpp's, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, outermost first (the reverse of ggml's `ne`).
    pub shape: Vec<usize>,
    /// Storage type.
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Bytes of stored data.
    pub nbytes: usize,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A bounds-checked little-endian reader over the mapped header.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn bad(&self, what: impl std::fmt::Display) -> OctetError {
        OctetError::bad_file(
            self.path,
            format!("not a valid GGUF file: {what} (at byte {})", self.pos),
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.bad(format!("truncated ({n} more bytes expected)")))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items each at least `min_item` bytes long, checked against what is left so a
    /// corrupt length cannot make us allocate without bound.
    fn count(&mut self, min_item: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(self.bad(format!("{what} count {n} exceeds the file")));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.array::<1>()?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array()?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            4 => GgufValue::U32(self.u32()?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(self.bad(format!("boolean byte {b}"))),
            },
            8 => GgufValue::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(self.bad("arrays nested too deeply"));
                }
                let item = self.u32()?;
                let n = self.count(1, "array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.bad(format!("unknown metadata value type {other}"))),
        })
    }
}

/// A served tensor: its Hugging Face name, its index in the file and, for llama's q/k
/// projections, the head count whose row permutation is undone.
struct Served {
    name: String,
    index: usize,
    unpermute_heads: Option<usize>,
}

/// A GGUF file, memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    served: Vec<Served>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps `path` and parses its header, metadata and tensor infos; every tensor's type,
    /// extent and alignment is validated here.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| OctetError::io(path, e))?;
        // SAFETY: the map is read-only; octet never writes its inputs while reading them.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| OctetError::io(path, e))?;
        let mut r = Reader {
            buf: &mmap,
            pos: 0,
            path,
        };
        if r.take(4).ok() != Some(MAGIC.as_slice()) {
            return Err(OctetError::bad_file(
                path,
                "not a GGUF file (no GGUF magic)",
            ));
        }
        let version = r.u32()?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(OctetError::bad_file(
                    path,
                    "GGUF version 1 is not supported (re-convert with a current llama.cpp)",
                ))
            }
            v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
                return Err(OctetError::bad_file(
                    path,
                    "big-endian GGUF files are not supported",
                ))
            }
            v => {
                return Err(OctetError::bad_file(
                    path,
                    format!("unsupported GGUF version {v}"),
                ))
            }
        }
        // Each tensor info takes at least 8 + 4 + 4 + 8 bytes, each metadata entry 8 + 4.
        let n_tensors = r.count(24, "tensor")?;
        let n_kv = r.count(12, "metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(r.bad(format!("metadata key {key} appears twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| r.bad(format!("general.alignment {v:?} is not a power of two")))?,
        };
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > MAX_DIMS {
                return Err(r.bad(format!("tensor {name} has {n_dims} dimensions")));
            }
            let mut ne = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                ne.push(r.u64()?);
            }
            let ty = r.u32()?;
            let offset = r.u64()?;
            raw.push((name, ne, ty, offset));
        }
        let data_start = (r.pos as u64)
            .div_ceil(alignment)
            .checked_mul(alignment)
            .ok_or_else(|| r.bad(format!("general.alignment {alignment} is too large")))?;
        let file_len = mmap.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut seen = HashMap::new();
        for (name, ne, ty, offset) in raw {
            let bad = |p: String| OctetError::bad_file(path, format!("tensor {name}: {p}"));
            let ty = GgmlType::from_id(ty).map_err(|t| {
                bad(format!(
                    "{t} cannot be read (octet reads F32, F16, BF16, Q8_0, Q4_0 and Q4_1)"
                ))
            })?;
            let numel = ne
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n < (1 << 48))
                .ok_or_else(|| bad(format!("dimensions {ne:?} overflow")))?;
            let (be, bb) = (ty.block_elems() as u64, ty.block_bytes() as u64);
            if ne.first().is_some_and(|&d| d % be != 0) {
                return Err(bad(format!(
                    "rows of {} elements are not whole {ty:?} blocks of {be}",
                    ne[0]
                )));
            }
            let nbytes = numel / be * bb;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "data offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            let start = data_start.saturating_add(offset);
            if start.checked_add(nbytes).is_none_or(|e| e > file_len) {
                return Err(bad(format!(
                    "data ({nbytes} bytes at {start}) runs past the end of the file ({file_len} bytes)"
                )));
            }
            if seen.insert(name.clone(), tensors.len()).is_some() {
                return Err(bad("the name appears twice".into()));
            }
            tensors.push(GgufTensorInfo {
                shape: ne.iter().rev().map(|&d| d as usize).collect(),
                name,
                ty,
                offset: start as usize,
                nbytes: nbytes as usize,
            });
        }
        let mut g = GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            alignment,
            metadata,
            tensors,
            served: Vec::new(),
            by_name: HashMap::new(),
        };
        g.served = g.serve_names()?;
        g.by_name = g
            .served
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        if g.by_name.len() != g.served.len() {
            return Err(OctetError::bad_file(
                path,
                "two tensors map to the same Hugging Face name",
            ));
        }
        Ok(g)
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Every metadata entry.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(|v| v.as_str())
    }

    /// The tensors as stored, in file order, under their llama.cpp names.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    fn info(&self, raw_name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == raw_name)
    }

    fn data(&self, t: &GgufTensorInfo) -> &[u8] {
        &self.mmap[t.offset..t.offset + t.nbytes]
    }

    /// The tensor `raw_name` (a llama.cpp name) de-quantized to f32, as stored: GGUF's row
    /// order, no permutation undone.
    pub fn dequantize_raw(&self, raw_name: &str) -> Result<Vec<f32>> {
        let t = self.info(raw_name).ok_or_else(|| {
            OctetError::bad_file(&self.path, format!("no tensor named {raw_name}"))
        })?;
        let mut out = vec![0f32; t.numel()];
        dequantize(t.ty, self.data(t), &mut out)?;
        Ok(out)
    }

    fn meta_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.as_u64())
    }

    fn required_u64(&self, key: &str) -> Result<u64> {
        self.meta_u64(key).ok_or_else(|| {
            OctetError::bad_file(
                &self.path,
                format!("metadata {key} is missing or not an integer"),
            )
        })
    }

    /// Hugging Face names for every tensor, with the permutations to undo.
    fn serve_names(&self) -> Result<Vec<Served>> {
        let llama = self.architecture() == Some("llama");
        let heads = if llama {
            let h = self.required_u64("llama.attention.head_count")? as usize;
            let kv = self
                .meta_u64("llama.attention.head_count_kv")
                .map_or(h, |v| v as usize);
            Some((h, kv))
        } else {
            None
        };
        let mut out = Vec::with_capacity(self.tensors.len());
        for (index, t) in self.tensors.iter().enumerate() {
            let (name, unpermute_heads) = match heads {
                Some((h, kv)) => {
                    let name = llama_hf_name(&t.name).unwrap_or_else(|| t.name.clone());
                    let n = if t.name.contains(".attn_q.") {
                        Some(h)
                    } else if t.name.contains(".attn_k.") {
                        Some(kv)
                    } else {
                        None
                    };
                    if let Some(n) = n {
                        let rows = t.shape.first().copied().unwrap_or(0);
                        if rows == 0
                            || !n
                                .checked_mul(2)
                                .is_some_and(|m| m > 0 && rows.is_multiple_of(m))
                        {
                            return Err(OctetError::bad_file(
                                &self.path,
                                format!(
                                    "tensor {}: {rows} rows do not split into {n} heads of even size",
                                    t.name
                                ),
                            ));
                        }
                    }
                    (name, n)
                }
                None => (t.name.clone(), None),
            };
            out.push(Served {
                name,
                index,
                unpermute_heads,
            });
        }
        Ok(out)
    }

    fn served(&self, name: &str) -> Result<(&Served, &GgufTensorInfo)> {
        let s = self
            .by_name
            .get(name)
            .map(|&i| &self.served[i])
            .ok_or_else(|| OctetError::bad_file(&self.path, format!("no tensor named {name}")))?;
        Ok((s, &self.tensors[s.index]))
    }

    /// The Hugging Face config.json this file implies (llama only): sizes from the
    /// `llama.*` keys, tied embeddings when there is no `output.weight`, biases when the first
    /// block has them, token ids from the tokenizer keys.
    pub fn config(&self) -> Result<serde_json::Value> {
        let arch = self.architecture().unwrap_or("(none)");
        if arch != "llama" {
            return Err(OctetError::bad_file(
                &self.path,
                format!("GGUF architecture '{arch}' is not supported (octet reads llama GGUFs)"),
            ));
        }
        let bad = |p: String| OctetError::bad_file(&self.path, p);
        let key = |k: &str| format!("llama.{k}");
        let hidden = self.required_u64(&key("embedding_length"))?;
        let layers = self.required_u64(&key("block_count"))?;
        let heads = self.required_u64(&key("attention.head_count"))?;
        let kv = self
            .meta_u64(&key("attention.head_count_kv"))
            .unwrap_or(heads);
        let inter = self.required_u64(&key("feed_forward_length"))?;
        // A value JSON cannot hold (inf, NaN) must be refused here, naming the key: written
        // into the config it would become null.
        let positive = |k: &str, v: Option<f64>| match v {
            Some(x) if x.is_finite() && x > 0.0 => Ok(x),
            Some(x) => Err(bad(format!(
                "metadata {k} is {x}; it must be finite and positive"
            ))),
            None => Err(bad(format!("metadata {k} is not a number"))),
        };
        let eps_key = key("attention.layer_norm_rms_epsilon");
        let eps = match self.get(&eps_key) {
            Some(v) => positive(&eps_key, v.as_f64())?,
            None => return Err(bad(format!("metadata {eps_key} is missing"))),
        };
        let theta_key = key("rope.freq_base");
        let theta = match self.get(&theta_key) {
            Some(v) => positive(&theta_key, v.as_f64())?,
            None => 10000.0,
        };
        let context = self.meta_u64(&key("context_length")).unwrap_or(2048);
        if heads == 0 {
            return Err(bad("llama.attention.head_count is 0".into()));
        }
        let head_dim = self
            .meta_u64(&key("attention.key_length"))
            .unwrap_or(hidden / heads);
        if let Some(rd) = self.meta_u64(&key("rope.dimension_count")) {
            if rd != head_dim {
                return Err(bad(format!(
                    "partial rotary (llama.rope.dimension_count {rd} of head size {head_dim}) is not supported"
                )));
            }
        }
        if let Some(s) = self
            .get(&key("rope.scaling.type"))
            .and_then(|v| v.as_str())
            .filter(|s| *s != "none")
        {
            return Err(bad(format!("rope scaling '{s}' is not supported")));
        }
        if self.info("rope_freqs.weight").is_some() {
            return Err(bad(
                "rope_freqs.weight (Llama 3.1 rope scaling) is not supported".into(),
            ));
        }
        let embd_rows = self
            .info("token_embd.weight")
            .and_then(|t| t.shape.first().map(|&d| d as u64));
        let tokens = self
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len() as u64);
        // The embedding's rows are what the model needs (a vocabulary may be padded).
        let vocab = self
            .meta_u64(&key("vocab_size"))
            .or(embd_rows)
            .or(tokens)
            .ok_or_else(|| bad("cannot tell the vocabulary size".into()))?;
        let mut cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": context,
            "rms_norm_eps": eps,
            "rope_theta": theta,
            "rope_scaling": null,
            "attention_bias": self.info("blk.0.attn_q.bias").is_some(),
            "mlp_bias": self.info("blk.0.ffn_gate.bias").is_some(),
            "tie_word_embeddings": self.info("output.weight").is_none(),
            "torch_dtype": "float32",
        });
        for (ours, theirs) in [
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("pad_token_id", "padding_token_id"),
        ] {
            if let Some(id) = self.meta_u64(&format!("tokenizer.ggml.{theirs}")) {
                cfg[ours] = id.into();
            }
        }
        Ok(cfg)
    }

    fn tokens(&self) -> Result<Vec<&str>> {
        let arr = self
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .ok_or_else(|| {
                OctetError::bad_file(&self.path, "no tokenizer.ggml.tokens in the metadata")
            })?;
        arr.iter()
            .map(|v| {
                v.as_str().ok_or_else(|| {
                    OctetError::bad_file(&self.path, "tokenizer.ggml.tokens holds a non-string")
                })
            })
            .collect()
    }

    /// The tokenizer the metadata describes, as a `tokenizers` tokenizer: byte-level BPE
    /// (`tokenizer.ggml.model = "gpt2"`) from `tokens` and `merges`, pre-tokenized the way
    /// llama.cpp does for `tokenizer.ggml.pre`; control tokens (type 3) become special added
    /// tokens and user-defined ones (type 4) plain added tokens, matched whole in text. No
    /// BOS/EOS are added by the tokenizer itself.
    pub fn hf_tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        use tokenizers::models::bpe::BPE;
        use tokenizers::{decoders, processors, AddedToken};
        let bad = |p: String| OctetError::bad_file(&self.path, p);
        let model = self
            .get("tokenizer.ggml.model")
            .and_then(|v| v.as_str())
            .unwrap_or("(none)");
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer.ggml.model '{model}' is not supported (octet builds byte-level BPE, 'gpt2', tokenizers)"
            )));
        }
        let tokens = self.tokens()?;
        let mut vocab: HashMap<String, u32> = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry(t.to_string()).or_insert(i as u32);
        }
        let vocab: tokenizers::models::bpe::Vocab = vocab.into_iter().collect();
        let mut merges = Vec::new();
        if let Some(arr) = self.get("tokenizer.ggml.merges").and_then(|v| v.as_array()) {
            merges.reserve(arr.len());
            for (i, m) in arr.iter().enumerate() {
                let pair = m
                    .as_str()
                    .and_then(|s| s.split_once(' '))
                    .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains(' '))
                    .ok_or_else(|| bad(format!("tokenizer.ggml.merges[{i}] is not 'a b'")))?;
                merges.push((pair.0.to_string(), pair.1.to_string()));
            }
        }
        let pre = self
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let (pre_tokenizer, ignore_merges) = pre_tokenizer_for(pre).map_err(bad)?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| bad(format!("cannot build the BPE tokenizer: {e}")))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(pre_tokenizer))
            .with_decoder(Some(decoders::byte_level::ByteLevel::default()))
            .with_post_processor(Some(processors::byte_level::ByteLevel::new(
                false, false, true,
            )));
        let types: Vec<i64> = self
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|v| v.as_i64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let added = |ty: i64, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == ty)
                .map(|(t, _)| AddedToken::from(t.to_string(), special).normalized(false))
                .collect()
        };
        tok.add_special_tokens(&added(3, true));
        tok.add_tokens(&added(4, false));
        Ok(tok)
    }

    /// The end- and beginning-of-sequence ids the metadata names
    /// (`tokenizer.ggml.eos_token_id` / `bos_token_id`), each `None` when absent.
    pub fn special_token_ids(&self) -> (Option<u32>, Option<u32>) {
        let id = |key: &str| self.meta_u64(key).map(|v| v as u32);
        (
            id("tokenizer.ggml.eos_token_id"),
            id("tokenizer.ggml.bos_token_id"),
        )
    }

    /// Writes `config.json`, `tokenizer.json` and `tokenizer_config.json` into `dir`, so a
    /// model converted from this file is self-contained; returns the names written. A
    /// tokenizer octet cannot build (not byte-level BPE) is left out rather than failing the
    /// conversion of the weights.
    pub fn write_side_files(&self, dir: &Path) -> Result<Vec<String>> {
        let write = |name: &str, text: String| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| OctetError::io(&p, e))
        };
        let json = |v: &serde_json::Value| {
            serde_json::to_string_pretty(v).map_err(|e| OctetError::InvalidArgument(e.to_string()))
        };
        write("config.json", json(&self.config()?)?)?;
        if self.get("tokenizer.ggml.model").and_then(|v| v.as_str()) != Some("gpt2") {
            return Ok(vec!["config.json".into()]);
        }
        let tok = self.hf_tokenizer()?;
        let text = tok.to_string(true).map_err(|e| {
            OctetError::InvalidArgument(format!("cannot serialize the tokenizer: {e}"))
        })?;
        write("tokenizer.json", text)?;
        let tokens = self.tokens()?;
        let token = |key: &str| {
            self.meta_u64(&format!("tokenizer.ggml.{key}"))
                .and_then(|i| tokens.get(i as usize))
                .map(|t| serde_json::Value::String(t.to_string()))
                .unwrap_or(serde_json::Value::Null)
        };
        let mut tc = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token("bos_token_id"),
            "eos_token": token("eos_token_id"),
            "unk_token": token("unknown_token_id"),
            "pad_token": token("padding_token_id"),
            "add_bos_token": self.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false),
        });
        if let Some(t) = self.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            tc["chat_template"] = t.into();
        }
        write("tokenizer_config.json", json(&tc)?)?;
        Ok(vec![
            "config.json".into(),
            "tokenizer.json".into(),
            "tokenizer_config.json".into(),
        ])
    }

    /// Tells the kernel the pages of `name` are no longer needed.
    fn release_range(&self, t: &GgufTensorInfo) {
        let page = 4096;
        let start = t.offset / page * page;
        // SAFETY: DONTNEED on a private read-only file map only drops clean pages; later reads
        // fault them back in from the file.
        unsafe {
            let _ = self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start,
                t.offset + t.nbytes - start,
            );
        }
    }
}

/// `blk.N.attn_q.weight` → `model.layers.N.self_attn.q_proj.weight`, and so on.
fn llama_hf_name(raw: &str) -> Option<String> {
    match raw {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = raw.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    n.parse::<usize>().ok()?;
    let (part, param) = rest.split_once('.')?;
    if param != "weight" && param != "bias" {
        return None;
    }
    let module = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{n}.{module}.{param}"))
}

/// GPT-2's split, as tokenizers' ByteLevel applies it.
fn gpt2_pre() -> tokenizers::PreTokenizerWrapper {
    tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true).into()
}

/// A regex split (isolated pieces) followed by the byte-level mapping.
fn split_pre(regex: &str) -> std::result::Result<tokenizers::PreTokenizerWrapper, String> {
    use tokenizers::pre_tokenizers::{byte_level::ByteLevel, sequence::Sequence, split};
    let s = split::Split::new(
        split::SplitPattern::Regex(regex.into()),
        tokenizers::SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| format!("bad pre-tokenizer regex: {e}"))?;
    Ok(Sequence::new(vec![s.into(), ByteLevel::new(false, true, false).into()]).into())
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`, and whether whole words found in
/// the vocabulary skip the merges (llama.cpp's `ignore_merges`).
fn pre_tokenizer_for(
    pre: &str,
) -> std::result::Result<(tokenizers::PreTokenizerWrapper, bool), String> {
    use tokenizers::pre_tokenizers::{digits::Digits, sequence::Sequence};
    Ok(match pre {
        // Files without the key predate it; like transformers, read them as GPT-2.
        "default" | "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" => (gpt2_pre(), false),
        // Every digit on its own, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone"
        | "minerva-7b" => (
            Sequence::new(vec![Digits::new(true).into(), gpt2_pre()]).into(),
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => {
            (split_pre(LLAMA3_SPLIT)?, true)
        }
        "qwen2" | "deepseek-r1-qwen" => (split_pre(QWEN2_SPLIT)?, false),
        other => {
            return Err(format!(
                "tokenizer.ggml.pre '{other}' is not supported (octet knows gpt2, smollm/starcoder, llama-bpe, qwen2 and their aliases)"
            ))
        }
    })
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// De-quantizes one block of stored bytes into `out` (its elements).
fn dequantize_block(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => out[0] = f16_at(b, 0),
        GgmlType::BF16 => out[0] = half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = q as i8 as f32 * d;
            }
        }
        GgmlType::Q4_0 => {
            let d = f16_at(b, 0);
            for (j, &q) in b[2..18].iter().enumerate() {
                out[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            // Two roundings (multiply, then add), as ggml and gguf-py compute it.
            for (j, &q) in b[4..20].iter().enumerate() {
                out[j] = d * (q & 0x0F) as f32 + m;
                out[j + 16] = d * (q >> 4) as f32 + m;
            }
        }
    }
}

/// De-quantizes stored bytes of type `ty` into `out`, whose length must be the element count.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    if !out.len().is_multiple_of(be) || data.len() != out.len() / be * bb {
        return Err(OctetError::InvalidArgument(format!(
            "{} bytes of {ty:?} do not hold {} elements",
            data.len(),
            out.len()
        )));
    }
    // Chunks of many blocks keep rayon's overhead small.
    let per = 4096 / be.max(1) * be;
    out.par_chunks_mut(per)
        .zip(data.par_chunks(per / be * bb))
        .for_each(|(o, d)| {
            for (ob, db) in o.chunks_exact_mut(be).zip(d.chunks_exact(bb)) {
                dequantize_block(ty, db, ob);
            }
        });
    Ok(())
}

/// Undoes llama.cpp's q/k row permutation of a `[rows, …]` tensor's bytes: within each of `heads` heads, GGUF row `2i + j` is Hugging Face row
/// `j·(head_dim/2) + i` (the converter's `reshape(n_head, 2, hd/2, …).swapaxes(1, 2)`).
fn unpermute_rows(bytes: &[u8], rows: usize, heads: usize) -> Vec<u8> {
    let row_bytes = bytes.len() / rows;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0u8; bytes.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let dst = h * hd + j * half + i;
                let src = h * hd + 2 * i + j;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    out
}

impl TensorStore for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn names(&self) -> Vec<String> {
        self.served.iter().map(|s| s.name.clone()).collect()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        let (_, t) = self.served(name).ok()?;
        Some(TensorMeta {
            dtype: t.ty.served_dtype(),
            shape: t.shape.clone(),
        })
    }
    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let (s, t) = self.served(name)?;
        let data = self.data(t);
        let bytes: Cow<'_, [u8]> = match t.ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Cow::Borrowed(data),
            _ => {
                let mut vals = vec![0f32; t.numel()];
                dequantize(t.ty, data, &mut vals)?;
                Cow::Owned(vals.iter().flat_map(|v| v.to_le_bytes()).collect())
            }
        };
        Ok(match s.unpermute_heads {
            Some(heads) => Cow::Owned(unpermute_rows(&bytes, t.shape[0], heads)),
            None => bytes,
        })
    }
    fn release(&self, name: &str) {
        if let Ok((_, t)) = self.served(name) {
            self.release_range(t);
        }
    }
}

/// The config.json of a GGUF file (see [`GgufFile::config`]).
pub fn read_config(path: &Path) -> Result<serde_json::Value> {
    GgufFile::open(path)?.config()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama() {
        assert_eq!(
            llama_hf_name("blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            llama_hf_name("blk.0.attn_q.bias").as_deref(),
            Some("model.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(llama_hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(llama_hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn unpermute_inverts_the_converter() {
        // Rows 0..8 of two heads of size 4; the converter orders each head [0, 2, 1, 3].
        let heads = 2;
        let hf: Vec<u8> = (0..8u8).collect();
        let permuted: Vec<u8> = [0, 2, 1, 3, 4, 6, 5, 7].to_vec();
        assert_eq!(unpermute_rows(&permuted, 8, heads), hf);
    }

    #[test]
    fn block_formulas() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&half::f16::from_f32(-1.0).to_le_bytes());
        b[4] = 0x3A; // low nibble 10, high 3
        let mut out = [0f32; 32];
        dequantize_block(GgmlType::Q4_1, &b, &mut out);
        assert_eq!((out[0], out[16]), (4.0, 0.5));
        let mut b = vec![0u8; 18];
        b[0..2].copy_from_slice(&half::f16::from_f32(2.0).to_le_bytes());
        b[2] = 0xF0;
        dequantize_block(GgmlType::Q4_0, &b, &mut out);
        assert_eq!((out[0], out[16]), (-16.0, 14.0));
    }

    #[test]
    fn garbage_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"GGUF\x03\0\0\0\xff\xff\xff\xff\xff\xff\xff\x7f").unwrap();
        let e = GgufFile::open(&p).unwrap_err().to_string();
        assert!(e.contains("x.gguf") && e.contains("tensor count"), "{e}");
        std::fs::write(&p, b"GGML").unwrap();
        assert!(GgufFile::open(&p).is_err());
    }
}

//! llama.cpp GGUF files (versions 2 and 3): header, metadata, tensor infos and memory-mapped
//! data, exposed as a [`TensorStore`] under Hugging Face names.
//!
//! Tensors of type F32, F16 and BF16 are served as stored; Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
//! K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K are de-quantized to f32 on read, one tensor at
//! a time, with ggml's formulas (bit-identical to `gguf.quants.dequantize`; Q8_K, which gguf
//! does not de-quantize, to ggml's `x = d·q`). Other types (the IQ and ternary types, MXFP4,
//! integers) are refused when the file is opened, naming the tensor and the type. How an
//! architecture's llama.cpp names map to its Hugging Face ones, which row permutations to
//! undo, and the config.json its metadata implies are the architecture plugin's business: it
//! registers a [`GgufMapping`] for its `general.architecture` (archs/llama/gguf.rs). The
//! metadata also yields the tokenizer, byte-level BPE or SentencePiece
//! ([`GgufFile::hf_tokenizer`]), so a GGUF file is a complete model source on its own.
//!
//! [`GgufWriter`] writes GGUF files (version 3) that this reader and llama.cpp read, with
//! F32, F16, BF16 and Q8_0 tensors converted from f32 bit-identically to the gguf package.
//!
//! Submodules: `ggml` (tensor types, de-quantization and the conversions written), `kquants`
//! (the K-quant blocks), `write` (the writer),
//! `mapping` (the per-architecture hook), `tokenizer` (the tokenizer and side files the
//! metadata describes), `sentencepiece` (the SentencePiece vocabulary rebuilt as transformers
//! builds it).
mod ggml;
mod kquants;
mod mapping;
mod sentencepiece;
mod tokenizer;
mod vocab_export;
mod write;

use super::dtype::float_bytes_to_f32;
use super::{Dtype, TensorMeta, TensorStore};
use crate::error::{OctetError, Result};
pub use ggml::{bf16_bits, dequantize, f16_bits, ggml_type_name, quantize_f32, GgmlType};
pub use mapping::{
    block_gguf_name, block_hf_name, decoder_gguf_name, decoder_hf_name, exported_architectures,
    gather_rows, llama_block_module, llama_qk_heads, mapping_exporting, permute_rows,
    refuse_rope_changes, rope_scaling, settings_values, split_block_name, vocab_size, DecoderSizes,
    GgufMapping, GgufRegistration, NameTable, LLAMA_BLOCK,
};
use mapping::{mapping_for, mappings, unpermute_rows};
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
pub use tokenizer::TokenizerKind;
pub use vocab_export::tokenizer_metadata;
pub use write::{GgufTensorSpec, GgufWriter, IfExists, GGUF_VERSION};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// Whether `path` is a GGUF file: a file that starts with the GGUF magic bytes or is named
/// `.gguf` (in any case). The one test every reader uses; a `.gguf` file with other bytes is
/// then refused by [`GgufFile::open`] with the reason, rather than taken for another format.
pub fn is_gguf(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    let named = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    named || starts_with_magic(path)
}

fn starts_with_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|_| &head == MAGIC)
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

/// Reads the magic and the version; only little-endian versions 2 and 3 are read.
fn read_version(r: &mut Reader<'_>) -> Result<u32> {
    let path = r.path;
    if r.take(4).ok() != Some(MAGIC.as_slice()) {
        return Err(OctetError::bad_file(
            path,
            "not a GGUF file (no GGUF magic)",
        ));
    }
    let version = r.u32()?;
    let problem = match version {
        2 | 3 => return Ok(version),
        1 => "GGUF version 1 is not supported (re-convert with a current llama.cpp)".to_string(),
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            "big-endian GGUF files are not supported".to_string()
        }
        v => format!("unsupported GGUF version {v}"),
    };
    Err(OctetError::bad_file(path, problem))
}

/// Reads `n` metadata entries; a key may appear once.
fn read_metadata(r: &mut Reader<'_>, n: usize) -> Result<BTreeMap<String, GgufValue>> {
    let mut metadata = BTreeMap::new();
    for _ in 0..n {
        let key = r.string()?;
        let ty = r.u32()?;
        let v = r.value(ty, 0)?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(r.bad(format!("metadata key {key} appears twice")));
        }
    }
    Ok(metadata)
}

/// A tensor info as stored, before it is validated against the file.
struct TensorHeader {
    name: String,
    /// ggml order (fastest-varying first).
    ne: Vec<u64>,
    ty: u32,
    offset: u64,
}

fn read_tensor_header(r: &mut Reader<'_>) -> Result<TensorHeader> {
    let name = r.string()?;
    let n_dims = r.u32()?;
    if n_dims > MAX_DIMS {
        return Err(r.bad(format!("tensor {name} has {n_dims} dimensions")));
    }
    let ne = (0..n_dims).map(|_| r.u64()).collect::<Result<_>>()?;
    let ty = r.u32()?;
    let offset = r.u64()?;
    Ok(TensorHeader {
        name,
        ne,
        ty,
        offset,
    })
}

/// Where tensor data lives in the file, to place and validate each tensor info.
struct Layout<'a> {
    path: &'a Path,
    alignment: u64,
    data_start: u64,
    file_len: u64,
}

impl Layout<'_> {
    /// Validates a tensor's type, dimensions, alignment and extent.
    fn place(&self, h: TensorHeader) -> Result<GgufTensorInfo> {
        let TensorHeader {
            name,
            ne,
            ty,
            offset,
        } = h;
        let bad = |p: String| OctetError::bad_file(self.path, format!("tensor {name}: {p}"));
        let ty = GgmlType::from_id(ty).map_err(bad)?;
        let numel = ne
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n < (1 << 48))
            .ok_or_else(|| bad(format!("dimensions {ne:?} overflow")))?;
        let (be, bb) = (ty.block_elems() as u64, ty.block_bytes() as u64);
        // ggml blocks never span rows; a 0-D tensor is one row of one element.
        let row = ne.first().copied().unwrap_or(1);
        if row % be != 0 {
            return Err(bad(format!(
                "rows of {row} elements are not whole {ty:?} blocks of {be}"
            )));
        }
        let nbytes = numel / be * bb;
        let alignment = self.alignment;
        if offset % alignment != 0 {
            return Err(bad(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let start = self.data_start.saturating_add(offset);
        let file_len = self.file_len;
        if start.checked_add(nbytes).is_none_or(|e| e > file_len) {
            return Err(bad(format!(
                "data ({nbytes} bytes at {start}) runs past the end of the file ({file_len} bytes)"
            )));
        }
        Ok(GgufTensorInfo {
            shape: ne.iter().rev().map(|&d| d as usize).collect(),
            name,
            ty,
            offset: start as usize,
            nbytes: nbytes as usize,
        })
    }
}

/// A served tensor: its Hugging Face name, its index in the file, for llama's q/k
/// projections the head count whose row permutation is undone, and the constant the
/// converter added to its values (Gemma's norms), which reads subtract.
struct Served {
    name: String,
    index: usize,
    unpermute_heads: Option<usize>,
    offset: Option<f32>,
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
        let version = read_version(&mut r)?;
        // Each tensor info takes at least 8 + 4 + 4 + 8 bytes, each metadata entry 8 + 4.
        let n_tensors = r.count(24, "tensor")?;
        let n_kv = r.count(12, "metadata")?;
        let metadata = read_metadata(&mut r, n_kv)?;
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two())
                .ok_or_else(|| r.bad(format!("general.alignment {v:?} is not a power of two")))?,
        };
        let raw = (0..n_tensors)
            .map(|_| read_tensor_header(&mut r))
            .collect::<Result<Vec<_>>>()?;
        let data_start = (r.pos as u64)
            .div_ceil(alignment)
            .checked_mul(alignment)
            .ok_or_else(|| r.bad(format!("general.alignment {alignment} is too large")))?;
        let layout = Layout {
            path,
            alignment,
            data_start,
            file_len: mmap.len() as u64,
        };
        let mut tensors = Vec::with_capacity(raw.len());
        let mut seen = HashMap::new();
        for header in raw {
            let info = layout.place(header)?;
            if seen.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(OctetError::bad_file(
                    path,
                    format!("tensor {}: the name appears twice", info.name),
                ));
            }
            tensors.push(info);
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

    /// The tensor stored as `raw_name` (a llama.cpp name).
    pub fn tensor_info(&self, raw_name: &str) -> Option<&GgufTensorInfo> {
        self.info(raw_name)
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

    /// The integer metadata value under `key`.
    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(|v| v.as_u64())
    }

    /// The integer metadata value under `key`; an error names the file and the key.
    pub fn required_u64(&self, key: &str) -> Result<u64> {
        self.meta_u64(key).ok_or_else(|| {
            OctetError::bad_file(
                &self.path,
                format!("metadata {key} is missing or not an integer"),
            )
        })
    }

    /// The number under `key`, if present, refused unless finite and positive: a value JSON
    /// cannot hold (inf, NaN) would become null in a config.json.
    pub fn positive_f64(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
            Some(x) => Err(self.bad(format!(
                "metadata {key} is {x}; it must be finite and positive"
            ))),
            None => Err(self.bad(format!("metadata {key} is not a number"))),
        }
    }

    /// An error naming this file and `problem`.
    pub fn bad(&self, problem: impl Into<String>) -> OctetError {
        OctetError::bad_file(&self.path, problem.into())
    }

    /// Hugging Face names for every weight tensor, with the permutations and offsets to undo,
    /// from the mapping registered for the file's architecture (every tensor under its stored
    /// name without one).
    fn serve_names(&self) -> Result<Vec<Served>> {
        let mapping = self.architecture().and_then(mapping_for);
        let mut out = Vec::with_capacity(self.tensors.len());
        for (index, t) in self.tensors.iter().enumerate() {
            let served = match mapping {
                Some(m) if m.is_settings_tensor(&t.name) => continue,
                Some(m) => {
                    let heads = m.permuted_heads(self, &t.name)?;
                    if let Some(n) = heads {
                        self.check_head_rows(t, n)?;
                    }
                    Served {
                        name: m.tensor_name(&t.name).unwrap_or_else(|| t.name.clone()),
                        index,
                        unpermute_heads: heads,
                        offset: m.stored_offset(&t.name),
                    }
                }
                None => Served {
                    name: t.name.clone(),
                    index,
                    unpermute_heads: None,
                    offset: None,
                },
            };
            out.push(served);
        }
        Ok(out)
    }

    /// Refuses a permuted tensor whose rows do not split into `heads` heads of even size.
    fn check_head_rows(&self, t: &GgufTensorInfo, heads: usize) -> Result<()> {
        let rows = t.shape.first().copied().unwrap_or(0);
        let splits = heads
            .checked_mul(2)
            .is_some_and(|m| m > 0 && rows.is_multiple_of(m));
        if rows == 0 || !splits {
            return Err(self.bad(format!(
                "tensor {}: {rows} rows do not split into {heads} heads of even size",
                t.name
            )));
        }
        Ok(())
    }

    fn served(&self, name: &str) -> Result<(&Served, &GgufTensorInfo)> {
        let s = self
            .by_name
            .get(name)
            .map(|&i| &self.served[i])
            .ok_or_else(|| OctetError::bad_file(&self.path, format!("no tensor named {name}")))?;
        Ok((s, &self.tensors[s.index]))
    }

    /// The Hugging Face config.json this file implies, from the mapping registered for its
    /// `general.architecture`.
    pub fn config(&self) -> Result<serde_json::Value> {
        let arch = self.architecture().unwrap_or("(none)");
        match mapping_for(arch) {
            Some(m) => m.config(self),
            None => {
                let known: Vec<&str> = mappings().map(|m| m.gguf_name()).collect();
                Err(self.bad(format!(
                    "GGUF architecture '{arch}' is not supported (octet reads {} GGUFs)",
                    known.join(", ")
                )))
            }
        }
    }

    /// The stored data of `t` with the rows in served order, still quantized, when the
    /// permutation to undo (if any) moves whole rows of blocks; `None` for a permuted 1-D
    /// tensor (a bias), whose "rows" are single elements inside blocks.
    fn blocks_in_served_order(&self, s: &Served, t: &GgufTensorInfo) -> Option<Cow<'_, [u8]>> {
        let data = self.data(t);
        match s.unpermute_heads {
            None => Some(Cow::Borrowed(data)),
            Some(heads) if t.shape.len() > 1 => {
                Some(Cow::Owned(unpermute_rows(data, t.shape[0], heads)))
            }
            Some(_) => None,
        }
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

impl TensorStore for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn names(&self) -> Vec<String> {
        self.served.iter().map(|s| s.name.clone()).collect()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        let (s, t) = self.served(name).ok()?;
        Some(TensorMeta {
            // An offset is undone in f32, so such a tensor is served as f32 whatever its type.
            dtype: match s.offset {
                Some(_) => Dtype::F32,
                None => t.ty.served_dtype(),
            },
            shape: t.shape.clone(),
        })
    }
    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let (s, t) = self.served(name)?;
        let data = self.data(t);
        let rows = t.shape.first().copied().unwrap_or(1);
        if let Some(offset) = s.offset {
            // Stored shifted (Gemma's norms, small): served as f32 with the shift undone.
            let mut vals = vec![0f32; t.numel()];
            dequantize(t.ty, data, &mut vals)?;
            let bytes: Vec<u8> = vals
                .iter()
                .flat_map(|v| (v - offset).to_le_bytes())
                .collect();
            return Ok(Cow::Owned(match s.unpermute_heads {
                Some(heads) => unpermute_rows(&bytes, rows, heads),
                None => bytes,
            }));
        }
        match (t.ty.is_float(), s.unpermute_heads) {
            (true, None) => Ok(Cow::Borrowed(data)),
            (true, Some(heads)) => Ok(Cow::Owned(unpermute_rows(data, rows, heads))),
            // Quantized: the f32 buffer returned is the only full-size copy.
            (false, heads) => match self.blocks_in_served_order(s, t) {
                Some(blocks) => Ok(Cow::Owned(ggml::dequantize_to_le_bytes(
                    t.ty,
                    &blocks,
                    t.numel(),
                )?)),
                None => {
                    let values = ggml::dequantize_to_le_bytes(t.ty, data, t.numel())?;
                    Ok(Cow::Owned(unpermute_rows(
                        &values,
                        rows,
                        heads.unwrap_or(1),
                    )))
                }
            },
        }
    }
    /// De-quantizes straight into the returned vector: one f32 copy of the tensor, not two.
    fn f32_values(&self, name: &str) -> Result<Vec<f32>> {
        let (s, t) = self.served(name)?;
        let mut out = vec![0f32; t.numel()];
        match self
            .blocks_in_served_order(s, t)
            .filter(|_| !t.ty.is_float() && s.offset.is_none())
        {
            Some(blocks) => dequantize(t.ty, &blocks, &mut out)?,
            None => {
                let dtype = if s.offset.is_some() {
                    Dtype::F32
                } else {
                    t.ty.served_dtype()
                };
                float_bytes_to_f32(dtype, &self.bytes(name)?, &mut out)?
            }
        }
        Ok(out)
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
    fn gguf_is_told_by_its_magic_or_its_name_in_any_case() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        assert!(is_gguf(&write("M.GGUF", b"GGUF\x03\0\0\0")));
        assert!(is_gguf(&write("model.bin", b"GGUF\x03\0\0\0")));
        // Named .gguf but not one: still taken for GGUF, so its reader says what is wrong.
        assert!(is_gguf(&write("x.gguf", b"GGML")));
        assert!(!is_gguf(&write(
            "model.safetensors",
            b"\x08\0\0\0\0\0\0\0{}"
        )));
        assert!(!is_gguf(&write("short.bin", b"GG")));
        assert!(!is_gguf(dir.path()));
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

//! Reader for PyTorch `torch.save` zip checkpoints (Hugging Face `pytorch_model.bin`).
//!
//! A `torch.save` file is a zip archive holding `<archive>/data.pkl` (a pickle describing the
//! object graph), one `<archive>/data/<key>` entry per tensor storage, and small metadata
//! entries (`byteorder`, `version`, ...). The pickle is interpreted by a small, restricted
//! unpickler that *never executes anything*: it only knows the handful of globals a state dict
//! needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter[_with_state]` and the `torch.*Storage` type names) and
//! refuses every other global and every opcode it does not know. Storages are read straight
//! from a memory map: tensors that are row-major views of a stored (uncompressed) entry are
//! returned as zero-copy slices, even when several tensors share one storage.

use super::{Dtype, TensorMeta, TensorStore};
use crate::error::{OctetError, Result};
use memmap2::Mmap;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// A `torch.save` zip checkpoint opened for reading, its storages memory-mapped.
///
/// The pickle is parsed and every tensor's view (offset, shape, strides) is checked against its
/// storage entry in [`TorchBinFile::open`], so [`TensorStore::bytes`] cannot read out of bounds.
/// Values of the state dict that are not tensors (ints, strings, ...) are ignored; nested dicts
/// are flattened with `.`-joined names.
pub struct TorchBinFile {
    path: PathBuf,
    mmap: Mmap,
    names: Vec<String>,
    tensors: HashMap<String, TensorEntry>,
    storages: Vec<StorageEntry>,
}

/// One `data/<key>` zip entry.
struct StorageEntry {
    /// Index in the zip central directory (to decompress a non-stored entry).
    zip_index: usize,
    /// Offset of the entry's data in the file.
    data_start: usize,
    /// Uncompressed size in bytes.
    size: usize,
    /// Whether the entry is stored uncompressed (so it can be borrowed from the map).
    stored: bool,
}

/// A tensor: a strided view into one storage.
struct TensorEntry {
    meta: TensorMeta,
    storage: usize,
    /// Storage offset, in elements.
    offset: usize,
    /// Strides, in elements.
    stride: Vec<usize>,
}

/// A zip entry as listed by the central directory.
struct ZipEntry {
    index: usize,
    data_start: usize,
    compressed_size: usize,
    size: usize,
    stored: bool,
}

/// The largest inflated/compressed ratio deflate can produce (1032:1), rounded up.
const MAX_DEFLATE_RATIO: usize = 1100;

/// The largest `data.pkl` read (a state dict's pickle is kilobytes to a few megabytes).
const MAX_PICKLE_BYTES: usize = 256 << 20;

/// The most dimensions a tensor may have (far above any real checkpoint's).
const MAX_RANK: usize = 64;

/// How deep nested dicts are flattened; deeper ones are ignored (guards against cycles too).
const MAX_DICT_NESTING: usize = 64;

impl TorchBinFile {
    /// Opens and validates the checkpoint at `path`: maps the file, reads the zip directory,
    /// interprets `data.pkl` and checks that every tensor's storage entry exists and covers
    /// the tensor's offset and extent.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |msg: String| OctetError::bad_file(path, msg);
        let mmap = map_zip(path)?;
        let entries = list_zip_entries(&mmap).map_err(&bad)?;
        let pkl_name = find_data_pkl(&entries)
            .ok_or_else(|| bad("no data.pkl entry: not a torch.save checkpoint".into()))?;
        let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();
        check_byteorder(&mmap, &entries, &prefix).map_err(&bad)?;

        let pkl_entry = &entries[&pkl_name];
        if pkl_entry.size > MAX_PICKLE_BYTES {
            return Err(bad(format!(
                "{pkl_name} declares {} bytes, more than a state dict's pickle needs ({MAX_PICKLE_BYTES})",
                pkl_entry.size
            )));
        }
        let pkl = read_entry(&mmap, pkl_entry).map_err(|m| bad(format!("{pkl_name}: {m}")))?;
        let top = Unpickler::new(&pkl)
            .run()
            .map_err(|m| bad(format!("{pkl_name}: {m}")))?;
        // Flat state dicts spend at most the pickle's size on names; allow generous nesting.
        let name_budget = pkl.len().saturating_mul(16).saturating_add(1 << 20);
        let found =
            collect_tensors(&top, name_budget).map_err(|m| bad(format!("{pkl_name}: {m}")))?;
        drop(top);
        let index = TensorIndex::build(found, &entries, &prefix).map_err(&bad)?;
        Ok(TorchBinFile {
            path: path.to_path_buf(),
            mmap,
            names: index.names,
            tensors: index.tensors,
            storages: index.storages,
        })
    }

    /// The raw (uncompressed) bytes of storage `s`: borrowed for stored entries.
    fn storage_bytes(&self, s: &StorageEntry) -> Result<Cow<'_, [u8]>> {
        let entry = ZipEntry {
            index: s.zip_index,
            data_start: s.data_start,
            compressed_size: s.size,
            size: s.size,
            stored: s.stored,
        };
        if s.stored {
            return read_entry(&self.mmap, &entry).map_err(|m| OctetError::bad_file(&self.path, m));
        }
        // Not written by torch.save, but a re-zipped checkpoint may deflate its entries.
        let mut archive = zip::ZipArchive::new(Cursor::new(&self.mmap[..]))
            .map_err(|e| OctetError::bad_file(&self.path, format!("zip: {e}")))?;
        crate::memory::ensure_fits(
            &format!("inflating a storage of {}", self.path.display()),
            s.size as u64,
            tch::Device::Cpu,
            "",
        )?;
        let out = decompress(&mut archive, s.zip_index, s.size)
            .map_err(|m| OctetError::bad_file(&self.path, m))?;
        Ok(Cow::Owned(out))
    }
}

impl TensorStore for TorchBinFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.tensors.get(name).map(|t| t.meta.clone())
    }

    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let t = self.tensors.get(name).ok_or_else(|| {
            OctetError::InvalidArgument(format!(
                "{}: no tensor named {name:?}",
                self.path.display()
            ))
        })?;
        let nbytes = t.meta.nbytes();
        if nbytes == 0 {
            return Ok(Cow::Borrowed(&[]));
        }
        let es = t.meta.dtype.size();
        let raw = self.storage_bytes(&self.storages[t.storage])?;
        let overrun =
            || OctetError::bad_file(&self.path, format!("tensor {name:?} overruns its storage"));
        if is_row_major(&t.meta.shape, &t.stride) {
            let start = t.offset * es; // cannot overflow: checked by check_view
            return match raw {
                Cow::Borrowed(b) => b
                    .get(start..start + nbytes)
                    .map(Cow::Borrowed)
                    .ok_or_else(overrun),
                Cow::Owned(v) => v
                    .get(start..start + nbytes)
                    .map(|b| Cow::Owned(b.to_vec()))
                    .ok_or_else(overrun),
            };
        }
        gather_strided(&raw, es, t.offset, &t.meta.shape, &t.stride)
            .map(Cow::Owned)
            .ok_or_else(overrun)
    }
}

/// Lists the archive's entries by name, with each one's data offset in the file.
fn list_zip_entries(mmap: &[u8]) -> std::result::Result<HashMap<String, ZipEntry>, String> {
    let mut archive = zip::ZipArchive::new(Cursor::new(mmap))
        .map_err(|e| format!("not a readable zip archive: {e}"))?;
    let mut out = HashMap::with_capacity(archive.len());
    for index in 0..archive.len() {
        let f = archive
            .by_index_raw(index)
            .map_err(|e| format!("zip entry #{index}: {e}"))?;
        let name = f.name().to_string();
        let to_usize =
            |v: u64| usize::try_from(v).map_err(|_| format!("{name}: offset {v} too large"));
        let stored = f.compression() == zip::CompressionMethod::Stored;
        let entry = ZipEntry {
            index,
            data_start: to_usize(f.data_start())?,
            compressed_size: to_usize(f.compressed_size())?,
            size: to_usize(f.size())?,
            stored,
        };
        // Deflate cannot expand data more than about 1032:1; a larger declared size is a
        // lie, refused before anything is inflated.
        if !stored && entry.size / MAX_DEFLATE_RATIO > entry.compressed_size {
            return Err(format!(
                "{name}: declares {} bytes inflated from {} compressed, beyond what deflate can encode",
                entry.size, entry.compressed_size
            ));
        }
        if stored && entry.size != entry.compressed_size {
            return Err(format!(
                "{name}: stored entry with size {} != compressed size {}",
                entry.size, entry.compressed_size
            ));
        }
        let end = entry.data_start.checked_add(entry.compressed_size);
        if end.is_none_or(|end| end > mmap.len()) {
            return Err(format!(
                "{name}: entry data ({} bytes at offset {}) runs past the end of the file ({} bytes); is it truncated?",
                entry.compressed_size,
                entry.data_start,
                mmap.len()
            ));
        }
        out.insert(name, entry);
    }
    Ok(out)
}

/// The name of the `data.pkl` entry: `data.pkl` at the archive's top level, or inside the one
/// top-level folder torch.save writes (named after the file, `archive` for Hugging Face).
fn find_data_pkl(entries: &HashMap<String, ZipEntry>) -> Option<String> {
    let mut candidates: Vec<&String> = entries
        .keys()
        .filter(|n| {
            n.as_str() == "data.pkl" || (n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        })
        .collect();
    candidates.sort();
    candidates.first().map(|s| s.to_string())
}

/// An entry's bytes: borrowed from the map when stored, decompressed otherwise.
fn read_entry<'a>(mmap: &'a [u8], e: &ZipEntry) -> std::result::Result<Cow<'a, [u8]>, String> {
    if e.stored {
        let end = e
            .data_start
            .checked_add(e.size)
            .ok_or("entry size overflows")?;
        return mmap
            .get(e.data_start..end)
            .map(Cow::Borrowed)
            .ok_or_else(|| "entry runs past the end of the file".into());
    }
    let mut archive = zip::ZipArchive::new(Cursor::new(mmap)).map_err(|e| format!("zip: {e}"))?;
    decompress(&mut archive, e.index, e.size).map(Cow::Owned)
}

/// Decompresses entry `index`, which must inflate to exactly `size` bytes (checked, so a
/// corrupt entry cannot make us allocate without bound).
fn decompress(
    archive: &mut zip::ZipArchive<Cursor<&[u8]>>,
    index: usize,
    size: usize,
) -> std::result::Result<Vec<u8>, String> {
    let f = archive
        .by_index(index)
        .map_err(|e| format!("zip entry #{index}: {e}"))?;
    let name = f.name().to_string();
    if (size as u64) > f.size() {
        return Err(format!(
            "{name}: {size} bytes are needed but the entry declares {}",
            f.size()
        ));
    }
    let mut out = Vec::with_capacity(size);
    f.take(size as u64)
        .read_to_end(&mut out)
        .map_err(|e| format!("{name}: cannot decompress: {e}"))?;
    if out.len() != size {
        return Err(format!(
            "{name}: inflates to {} bytes, expected {size}",
            out.len()
        ));
    }
    Ok(out)
}

/// Checks that tensor `name`'s view lies inside its storage (declared element count and the
/// `storage_bytes` actually present).
fn check_view(name: &str, t: &TensorRef, storage_bytes: usize, entry_name: &str) -> PResult<()> {
    let dtype = t.storage.dtype;
    let es = dtype.size();
    let declared = t
        .storage
        .numel
        .checked_mul(es)
        .filter(|&b| b <= storage_bytes)
        .ok_or_else(|| {
            format!(
                "{entry_name} holds {storage_bytes} bytes, fewer than the {} {dtype:?} elements its pickle declares",
                t.storage.numel
            )
        })?;
    let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let numel = numel
        .filter(|n| n.checked_mul(es).is_some())
        .ok_or_else(|| format!("tensor {name:?}: shape {:?} is too large", t.shape))?;
    if numel > 0 {
        // One past the highest element the view touches.
        let end = t
            .shape
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |a, (&d, &s)| {
                (d - 1).checked_mul(s).and_then(|x| a.checked_add(x))
            })
            .and_then(|last| last.checked_add(1));
        if end.is_none_or(|end| end > t.storage.numel) {
            return Err(format!(
                "tensor {name:?} (offset {}, shape {:?}, stride {:?}) reaches past the end of {entry_name} \
                 ({} elements, {declared} bytes)",
                t.offset, t.shape, t.stride, t.storage.numel
            ));
        }
    }
    Ok(())
}

/// Whether `stride` is the row-major layout of `shape` (the stride of a size-1 dim is free).
fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// Copies a strided view (element size `es`, offsets in elements) into contiguous row-major
/// bytes; `None` if it would read outside `src` (never after `check_view`).
fn gather_strided(
    src: &[u8],
    es: usize,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
) -> Option<Vec<u8>> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * es);
    if numel == 0 {
        return Some(out);
    }
    let Some((&inner, outer_shape)) = shape.split_last() else {
        // 0-d tensor: one element.
        out.extend_from_slice(src.get(offset * es..(offset + 1) * es)?);
        return Some(out);
    };
    let inner_stride = stride[stride.len() - 1];
    let outer_stride = &stride[..stride.len() - 1];
    // Odometer over the outer dims; the innermost dim is copied as one run when it is dense.
    let mut idx = vec![0usize; outer_shape.len()];
    loop {
        let base = offset
            + idx
                .iter()
                .zip(outer_stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        if inner_stride == 1 {
            out.extend_from_slice(src.get(base * es..(base + inner) * es)?);
        } else {
            for j in 0..inner {
                let at = base + j * inner_stride;
                out.extend_from_slice(src.get(at * es..(at + 1) * es)?);
            }
        }
        // Advance the odometer; done when it wraps.
        let mut d = idx.len();
        loop {
            if d == 0 {
                return Some(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < outer_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Flattens the unpickled top-level dict into `(name, tensor)` pairs in insertion order.
/// `name_budget` bounds the total bytes of (prefix-joined) names, so that reusing one long
/// memoized key at every nesting level cannot blow up memory.
fn collect_tensors(top: &Value, name_budget: usize) -> PResult<Vec<(String, Rc<TensorRef>)>> {
    let Value::Dict(d) = top else {
        return Err(format!(
            "the pickled object is a {}, not a dict of tensors",
            top.kind()
        ));
    };
    let mut walk = Walk {
        out: Vec::new(),
        seen: HashSet::new(),
        name_budget,
    };
    walk.dict(d, "", 0)?;
    Ok(walk.out)
}

/// State of the depth-first flattening of nested dicts.
struct Walk {
    out: Vec<(String, Rc<TensorRef>)>,
    /// Dicts already visited (a dict reachable twice, or a cycle, is walked once).
    seen: HashSet<*const RefCell<Pairs>>,
    name_budget: usize,
}

impl Walk {
    fn dict(&mut self, d: &Rc<RefCell<Pairs>>, prefix: &str, depth: usize) -> PResult<()> {
        if depth > MAX_DICT_NESTING || !self.seen.insert(Rc::as_ptr(d)) {
            return Ok(());
        }
        for (k, v) in d.borrow().items.iter() {
            if !matches!(v, Value::Tensor(_) | Value::Dict(_)) {
                // Non-tensor state (ints, strings, lists, ...) is not a weight: ignore it.
                continue;
            }
            let key = match k {
                Value::Str(s) => s.to_string(),
                Value::Int(i) => i.to_string(),
                _ => continue,
            };
            let name = if prefix.is_empty() {
                key
            } else {
                format!("{prefix}.{key}")
            };
            self.name_budget = self
                .name_budget
                .checked_sub(name.len())
                .ok_or("tensor names are unreasonably long")?;
            match v {
                Value::Tensor(t) => self.out.push((name, t.clone())),
                Value::Dict(inner) => self.dict(inner, &name, depth + 1)?,
                _ => {}
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Restricted unpickler.

type PResult<T> = std::result::Result<T, String>;

/// A pickle value. Containers are reference-counted so memo gets (`BINGET`) share them, as in
/// Python: a dict memoized while empty and filled later must be seen filled.
#[derive(Clone)]
enum Value {
    None,
    Int(i64),
    Str(Rc<str>),
    /// A value we keep but never look into (bool, float, bytes, int beyond i64), by type name.
    Opaque(&'static str),
    Tuple(Rc<Seq>),
    List(Rc<RefCell<Seq>>),
    Dict(Rc<RefCell<Pairs>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Int(_) => "int",
            Value::Str(_) => "str",
            Value::Opaque(kind) => kind,
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

/// Items of a tuple or list. Its `Drop` is iterative so that a maliciously deep nesting (one
/// byte per level) cannot overflow the stack when it is freed.
#[derive(Default)]
struct Seq(Vec<Value>);

/// Items of a dict, in insertion order, with an index of string keys (Python's last-wins
/// semantics without a quadratic scan).
#[derive(Default)]
struct Pairs {
    items: Vec<(Value, Value)>,
    index: HashMap<Rc<str>, usize>,
}

impl Pairs {
    fn insert(&mut self, k: Value, v: Value) {
        if let Value::Str(s) = &k {
            if let Some(&i) = self.index.get(s) {
                self.items[i].1 = v;
                return;
            }
            self.index.insert(s.clone(), self.items.len());
        }
        self.items.push((k, v));
    }
}

impl Drop for Seq {
    fn drop(&mut self) {
        drop_iteratively(std::mem::take(&mut self.0));
    }
}

impl Drop for Pairs {
    fn drop(&mut self) {
        let items = std::mem::take(&mut self.items);
        drop_iteratively(items.into_iter().flat_map(|(k, v)| [k, v]).collect());
    }
}

/// Frees values with an explicit work list: children of uniquely owned containers are moved out
/// before the container itself is dropped, so each drop is shallow.
fn drop_iteratively(mut work: Vec<Value>) {
    while let Some(mut v) = work.pop() {
        match &mut v {
            Value::Tuple(rc) => {
                if let Some(s) = Rc::get_mut(rc) {
                    work.append(&mut s.0);
                }
            }
            Value::List(rc) => {
                if let Some(s) = Rc::get_mut(rc) {
                    work.append(&mut s.get_mut().0);
                }
            }
            Value::Dict(rc) => {
                if let Some(p) = Rc::get_mut(rc) {
                    let p = p.get_mut();
                    p.index.clear();
                    work.extend(
                        std::mem::take(&mut p.items)
                            .into_iter()
                            .flat_map(|(k, v)| [k, v]),
                    );
                }
            }
            _ => {}
        }
    }
}

/// The only globals the unpickler resolves.
#[derive(Clone, Copy, Debug)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    StorageType(Dtype),
}

/// A persistent-id reference to a storage: `('storage', <type>, key, location, numel)`.
struct StorageRef {
    dtype: Dtype,
    key: String,
    numel: usize,
}

/// A tensor rebuilt by `_rebuild_tensor_v2`: a strided view into a storage.
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

fn storage_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "FloatStorage" => Dtype::F32,
        "HalfStorage" => Dtype::F16,
        "BFloat16Storage" => Dtype::BF16,
        "DoubleStorage" => Dtype::F64,
        "ByteStorage" => Dtype::U8,
        "CharStorage" => Dtype::I8,
        "ShortStorage" => Dtype::I16,
        "IntStorage" => Dtype::I32,
        "LongStorage" => Dtype::I64,
        "BoolStorage" => Dtype::Bool,
        _ => return None,
    })
}

fn resolve_global(module: &str, name: &str, at: usize) -> PResult<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => return Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => return Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => return Ok(Global::RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => {
            return Ok(Global::RebuildParameterWithState)
        }
        ("torch", s) => {
            if let Some(dt) = storage_dtype(s) {
                return Ok(Global::StorageType(dt));
            }
            if s.ends_with("Storage") {
                return Err(format!(
                    "unsupported tensor storage type torch.{s} at byte {at}"
                ));
            }
        }
        _ => {}
    }
    Err(format!(
        "refusing pickle global {module}.{name} at byte {at}: only collections.OrderedDict, \
         torch._utils._rebuild_tensor_v2 / _rebuild_parameter and torch.*Storage are allowed"
    ))
}

/// A stack machine over pickle opcodes that builds [`Value`]s and calls nothing.
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    metastack: Vec<Vec<Value>>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: Vec::new(),
            metastack: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "pickle truncated: {n} bytes needed at byte {} of {}",
                    self.pos,
                    self.data.len()
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> PResult<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> PResult<u32> {
        Ok(u32::from_le_bytes(self.arr()?))
    }

    fn len_u64(&mut self) -> PResult<usize> {
        let n = u64::from_le_bytes(self.arr()?);
        usize::try_from(n).map_err(|_| format!("length {n} too large at byte {}", self.pos))
    }

    fn len_i32(&mut self, at: usize) -> PResult<usize> {
        let n = i32::from_le_bytes(self.arr()?);
        usize::try_from(n).map_err(|_| format!("negative length {n} at byte {at}"))
    }

    /// A newline-terminated line (GLOBAL's arguments).
    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("pickle truncated: unterminated line at byte {}", self.pos))?;
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| format!("invalid UTF-8 in line at byte {}", self.pos))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn utf8(&mut self, n: usize, at: usize) -> PResult<Value> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| format!("invalid UTF-8 string at byte {at}"))?;
        Ok(Value::Str(s.into()))
    }

    fn pop(&mut self, at: usize) -> PResult<Value> {
        self.stack
            .pop()
            .ok_or_else(|| format!("pickle stack underflow at byte {at}"))
    }

    fn top(&mut self, at: usize) -> PResult<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| format!("pickle stack underflow at byte {at}"))
    }

    /// Pops everything above the last MARK.
    fn pop_mark(&mut self, at: usize) -> PResult<Vec<Value>> {
        let below = self
            .metastack
            .pop()
            .ok_or_else(|| format!("no MARK before byte {at}"))?;
        Ok(std::mem::replace(&mut self.stack, below))
    }

    fn memo_get(&self, i: u32, at: usize) -> PResult<Value> {
        self.memo
            .get(&i)
            .cloned()
            .ok_or_else(|| format!("memo entry {i} read before it was written (byte {at})"))
    }

    fn memo_put(&mut self, i: u32, at: usize) -> PResult<()> {
        let v = self.top(at)?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn tuple(items: Vec<Value>) -> Value {
        Value::Tuple(Rc::new(Seq(items)))
    }

    /// Runs to STOP and returns the pickled object.
    fn run(mut self) -> PResult<Value> {
        loop {
            let at = self.pos;
            let op = self
                .u8()
                .map_err(|_| format!("pickle ends at byte {at} without a STOP opcode"))?;
            if op == b'.' {
                return self.pop(at); // STOP
            }
            self.step(op, at)?;
        }
    }

    /// Interprets one opcode other than STOP, dispatching by family.
    fn step(&mut self, op: u8, at: usize) -> PResult<()> {
        match op {
            0x80 | 0x95 | b'(' | b'0' | b'1' | b'2' => self.control(op, at),
            b'N' | 0x88 | 0x89 | b'J' | b'K' | b'M' | 0x8a | 0x8b | b'G' => self.number(op, at),
            b'X' | 0x8c | 0x8d | b'U' | b'T' | b'C' | b'B' | 0x8e => self.string(op, at),
            b')' | b']' | b'}' | b't' | 0x85..=0x87 | b'l' | b'd' | b'a' | b'e' | b's' | b'u' => {
                self.container(op, at)
            }
            b'q' | b'r' | 0x94 | b'h' | b'j' => self.memo_op(op, at),
            b'c' | 0x93 | b'R' | 0x81 | b'b' | b'Q' => self.object(op, at),
            other => Err(format!(
                "unknown or unsupported pickle opcode 0x{other:02x} at byte {at}"
            )),
        }
    }

    /// PROTO, FRAME, MARK, POP, POP_MARK and DUP.
    fn control(&mut self, op: u8, at: usize) -> PResult<()> {
        match op {
            0x80 => {
                let v = self.u8()?;
                if v > 5 {
                    return Err(format!("unsupported pickle protocol {v}"));
                }
            }
            // FRAME: framing is only a buffering hint.
            0x95 => {
                self.take(8)?;
            }
            b'(' => self.metastack.push(std::mem::take(&mut self.stack)),
            // POP (of a bare MARK too, as CPython does)
            b'0' => {
                if self.stack.pop().is_none() {
                    self.pop_mark(at)?;
                }
            }
            b'1' => {
                self.pop_mark(at)?;
            }
            _ => {
                let v = self.top(at)?.clone();
                self.stack.push(v);
            }
        }
        Ok(())
    }

    /// None, booleans, integers and floats (floats and booleans carry no weights: opaque).
    fn number(&mut self, op: u8, at: usize) -> PResult<()> {
        let v = match op {
            b'N' => Value::None,
            0x88 | 0x89 => Value::Opaque("bool"), // NEWTRUE / NEWFALSE
            b'J' => Value::Int(i32::from_le_bytes(self.arr()?).into()),
            b'K' => Value::Int(self.u8()?.into()),
            b'M' => Value::Int(u16::from_le_bytes(self.arr()?).into()),
            // LONG1 / LONG4: little-endian two's complement.
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    self.u8()? as usize
                } else {
                    self.len_i32(at)?
                };
                le_signed(self.take(n)?).map_or(Value::Opaque("int"), Value::Int)
            }
            // BINFLOAT: 8-byte big-endian double.
            _ => {
                self.take(8)?;
                Value::Opaque("float")
            }
        };
        self.stack.push(v);
        Ok(())
    }

    /// Unicode strings, protocol-1 byte strings and bytes objects.
    fn string(&mut self, op: u8, at: usize) -> PResult<()> {
        let v = match op {
            b'X' => {
                let n = self.u32()? as usize;
                self.utf8(n, at)?
            }
            0x8c => {
                let n = self.u8()? as usize;
                self.utf8(n, at)?
            }
            0x8d => {
                let n = self.len_u64()?;
                self.utf8(n, at)?
            }
            // SHORT_BINSTRING / BINSTRING
            b'U' | b'T' => {
                let n = if op == b'U' {
                    self.u8()? as usize
                } else {
                    self.len_i32(at)?
                };
                Value::Str(String::from_utf8_lossy(self.take(n)?).into())
            }
            // SHORT_BINBYTES / BINBYTES / BINBYTES8
            _ => {
                let n = match op {
                    b'C' => self.u8()? as usize,
                    b'B' => self.u32()? as usize,
                    _ => self.len_u64()?,
                };
                self.take(n)?;
                Value::Opaque("bytes")
            }
        };
        self.stack.push(v);
        Ok(())
    }

    /// Tuples, lists and dicts: building them and filling them.
    fn container(&mut self, op: u8, at: usize) -> PResult<()> {
        match op {
            b')' => self.stack.push(Self::tuple(Vec::new())),
            b']' => self.stack.push(Value::List(Rc::default())),
            b'}' => self.stack.push(Value::Dict(Rc::default())),
            b't' => {
                let items = self.pop_mark(at)?;
                self.stack.push(Self::tuple(items));
            }
            // TUPLE1..3
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err(format!("pickle stack underflow at byte {at}"));
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.stack.push(Self::tuple(items));
            }
            b'l' => {
                let items = self.pop_mark(at)?;
                self.stack
                    .push(Value::List(Rc::new(RefCell::new(Seq(items)))));
            }
            b'd' => {
                let items = self.pop_mark(at)?;
                let d = Value::Dict(Rc::default());
                set_items(&d, items, at)?;
                self.stack.push(d);
            }
            // APPEND / APPENDS
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![self.pop(at)?]
                } else {
                    self.pop_mark(at)?
                };
                match self.top(at)? {
                    Value::List(l) => l.borrow_mut().0.extend(items),
                    other => return Err(format!("APPEND to a {} at byte {at}", other.kind())),
                }
            }
            // SETITEM / SETITEMS
            _ => {
                let items = if op == b's' {
                    let v = self.pop(at)?;
                    let k = self.pop(at)?;
                    vec![k, v]
                } else {
                    self.pop_mark(at)?
                };
                let d = self.top(at)?.clone();
                set_items(&d, items, at)?;
            }
        }
        Ok(())
    }

    /// BINPUT, LONG_BINPUT, MEMOIZE, BINGET and LONG_BINGET.
    fn memo_op(&mut self, op: u8, at: usize) -> PResult<()> {
        match op {
            b'q' => {
                let i = self.u8()?;
                self.memo_put(i.into(), at)
            }
            b'r' => {
                let i = self.u32()?;
                self.memo_put(i, at)
            }
            0x94 => {
                let i = u32::try_from(self.memo.len()).map_err(|_| "memo too large".to_string())?;
                self.memo_put(i, at)
            }
            _ => {
                let i = if op == b'h' {
                    self.u8()?.into()
                } else {
                    self.u32()?
                };
                let v = self.memo_get(i, at)?;
                self.stack.push(v);
                Ok(())
            }
        }
    }

    /// GLOBAL, STACK_GLOBAL, REDUCE, NEWOBJ, BUILD and BINPERSID: object construction, for
    /// allowed globals only.
    fn object(&mut self, op: u8, at: usize) -> PResult<()> {
        let v = match op {
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                Value::Global(resolve_global(module, name, at)?)
            }
            0x93 => {
                let name = self.pop(at)?;
                let module = self.pop(at)?;
                let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                    return Err(format!(
                        "STACK_GLOBAL with non-string operands at byte {at}"
                    ));
                };
                Value::Global(resolve_global(module, name, at)?)
            }
            // REDUCE / NEWOBJ: callable(*args).
            b'R' | 0x81 => {
                let args = self.pop(at)?;
                let callable = self.pop(at)?;
                call(&callable, &args, at)?
            }
            // BUILD: the state (e.g. a state dict's `_metadata`) carries no weights.
            b'b' => {
                self.pop(at)?;
                self.top(at)?;
                return Ok(());
            }
            // BINPERSID
            _ => {
                let pid = self.pop(at)?;
                persistent_load(&pid, at)?
            }
        };
        self.stack.push(v);
        Ok(())
    }
}

/// Maps `path` read-only and checks it is a zip archive (telling the legacy format apart).
fn map_zip(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|e| OctetError::io(path, e))?;
    let len = file.metadata().map_err(|e| OctetError::io(path, e))?.len();
    if len == 0 {
        return Err(OctetError::bad_file(path, "empty file"));
    }
    // SAFETY: the map is read-only; like every mmap-based checkpoint reader we rely on the
    // file not being truncated or rewritten by another process while it is open.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| OctetError::io(path, e))?;
    if !mmap.starts_with(b"PK") {
        let hint = if mmap.starts_with(&[0x80]) {
            " (it looks like the legacy pre-1.6 torch.save format, which is not supported; \
             re-save it with a recent torch)"
        } else {
            ""
        };
        return Err(OctetError::bad_file(
            path,
            format!("not a zip archive{hint}"),
        ));
    }
    Ok(mmap)
}

/// Refuses a checkpoint whose `byteorder` entry says anything but little-endian.
fn check_byteorder(
    mmap: &[u8],
    entries: &HashMap<String, ZipEntry>,
    prefix: &str,
) -> std::result::Result<(), String> {
    let Some(e) = entries.get(&format!("{prefix}byteorder")) else {
        return Ok(());
    };
    if e.size > 16 {
        return Err(format!(
            "{prefix}byteorder declares {} bytes; it holds a word",
            e.size
        ));
    }
    let order = read_entry(mmap, e).map_err(|m| format!("{prefix}byteorder: {m}"))?;
    if order.as_ref() != b"little" {
        return Err(format!(
            "byte order {:?} is not supported (only little-endian checkpoints are)",
            String::from_utf8_lossy(&order)
        ));
    }
    Ok(())
}

/// The pickle's tensors resolved against the zip's storage entries.
struct TensorIndex {
    names: Vec<String>,
    tensors: HashMap<String, TensorEntry>,
    storages: Vec<StorageEntry>,
}

impl TensorIndex {
    /// Checks that every tensor's storage entry exists and covers its view, and that no
    /// name occurs twice.
    fn build(
        found: Vec<(String, Rc<TensorRef>)>,
        entries: &HashMap<String, ZipEntry>,
        prefix: &str,
    ) -> std::result::Result<Self, String> {
        let mut index = TensorIndex {
            names: Vec::with_capacity(found.len()),
            tensors: HashMap::with_capacity(found.len()),
            storages: Vec::new(),
        };
        let mut storage_ids: HashMap<String, usize> = HashMap::new();
        for (name, t) in found {
            let entry_name = format!("{prefix}data/{}", t.storage.key);
            let storage = match storage_ids.get(&entry_name) {
                Some(&id) => id,
                None => {
                    let e = entries.get(&entry_name).ok_or_else(|| {
                        format!("tensor {name:?}: its storage entry {entry_name} is missing")
                    })?;
                    index.storages.push(storage_entry(e, &t));
                    storage_ids.insert(entry_name.clone(), index.storages.len() - 1);
                    index.storages.len() - 1
                }
            };
            check_view(&name, &t, index.storages[storage].size, &entry_name)?;
            let entry = TensorEntry {
                meta: TensorMeta {
                    dtype: t.storage.dtype,
                    shape: t.shape.clone(),
                },
                storage,
                offset: t.offset,
                stride: t.stride.clone(),
            };
            if index.tensors.insert(name.clone(), entry).is_some() {
                return Err(format!("tensor name {name:?} occurs twice"));
            }
            index.names.push(name);
        }
        Ok(index)
    }
}

/// The storage behind `t`: only the bytes the pickle's storage needs are ever inflated,
/// whatever size the zip entry declares.
fn storage_entry(e: &ZipEntry, t: &TensorRef) -> StorageEntry {
    let needed = t.storage.numel.checked_mul(t.storage.dtype.size());
    let size = match needed {
        Some(n) if e.stored || n <= e.size => n.min(e.size),
        _ => e.size,
    };
    StorageEntry {
        zip_index: e.index,
        data_start: e.data_start,
        size,
        stored: e.stored,
    }
}

/// Little-endian two's-complement integer of at most 8 bytes.
fn le_signed(b: &[u8]) -> Option<i64> {
    let Some(&last) = b.last() else {
        return Some(0);
    };
    if b.len() > 8 {
        return None;
    }
    let mut buf = if last & 0x80 != 0 { [0xff; 8] } else { [0; 8] };
    buf[..b.len()].copy_from_slice(b);
    Some(i64::from_le_bytes(buf))
}

fn set_items(d: &Value, items: Vec<Value>, at: usize) -> PResult<()> {
    let Value::Dict(d) = d else {
        return Err(format!("SETITEM on a {} at byte {at}", d.kind()));
    };
    if !items.len().is_multiple_of(2) {
        return Err(format!("SETITEMS with an odd number of items at byte {at}"));
    }
    let mut d = d.borrow_mut();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        d.insert(k, v);
    }
    Ok(())
}

fn as_usize(v: &Value) -> Option<usize> {
    match v {
        Value::Int(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

/// A size or stride tuple (rank bounded, so a huge memoized tuple reused many times is cheap).
fn usize_tuple(v: &Value) -> Option<Vec<usize>> {
    match v {
        Value::Tuple(t) if t.0.len() <= MAX_RANK => t.0.iter().map(as_usize).collect(),
        _ => None,
    }
}

/// Applies an allowed global to its arguments.
fn call(callable: &Value, args: &Value, at: usize) -> PResult<Value> {
    let Value::Global(g) = callable else {
        return Err(format!("call of a {} at byte {at}", callable.kind()));
    };
    let Value::Tuple(args) = args else {
        return Err(format!(
            "{g:?} called with a {} instead of an argument tuple at byte {at}",
            args.kind()
        ));
    };
    let args = &args.0;
    match g {
        // OrderedDict's __reduce__ is (cls, (), state, None, items): the items follow as
        // SETITEMS, so only the no-argument call is needed (and it cannot amplify memory).
        Global::OrderedDict if args.is_empty() => Ok(Value::Dict(Rc::default())),
        Global::OrderedDict => Err(format!(
            "OrderedDict with {} arguments at byte {at}",
            args.len()
        )),
        Global::RebuildTensorV2 => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            if !(6..=7).contains(&args.len()) {
                return Err(format!(
                    "_rebuild_tensor_v2 with {} arguments at byte {at}",
                    args.len()
                ));
            }
            let Value::Storage(storage) = &args[0] else {
                return Err(format!(
                    "_rebuild_tensor_v2 of a {} instead of a storage at byte {at}",
                    args[0].kind()
                ));
            };
            let bad = |what: &str| format!("_rebuild_tensor_v2: invalid {what} at byte {at}");
            let offset = as_usize(&args[1]).ok_or_else(|| bad("storage offset"))?;
            let shape = usize_tuple(&args[2]).ok_or_else(|| bad("size"))?;
            let stride = usize_tuple(&args[3]).ok_or_else(|| bad("stride"))?;
            if shape.len() != stride.len() {
                return Err(bad("stride (its length differs from the size's)"));
            }
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: storage.clone(),
                offset,
                shape,
                stride,
            })))
        }
        Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            _ => Err(format!("{g:?} without a tensor at byte {at}")),
        },
        Global::StorageType(_) => Err(format!("storage type {g:?} called at byte {at}")),
    }
}

/// Resolves a `BINPERSID` id: `('storage', <torch.*Storage>, key, location, numel)`.
fn persistent_load(pid: &Value, at: usize) -> PResult<Value> {
    let items = match pid {
        Value::Tuple(t) => &t.0,
        other => return Err(format!("persistent id is a {} at byte {at}", other.kind())),
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(Global::StorageType(dtype)), key, _location, numel]
            if &**tag == "storage" =>
        {
            let key = match key {
                Value::Str(s) => s.to_string(),
                Value::Int(i) => i.to_string(),
                other => return Err(format!("storage key is a {} at byte {at}", other.kind())),
            };
            let numel =
                as_usize(numel).ok_or_else(|| format!("invalid storage size at byte {at}"))?;
            Ok(Value::Storage(Rc::new(StorageRef {
                dtype: *dtype,
                key,
                numel,
            })))
        }
        _ => Err(format!(
            "unsupported persistent id at byte {at} (expected a torch storage reference)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpickle(b: &[u8]) -> PResult<Value> {
        Unpickler::new(b).run()
    }

    #[test]
    fn deep_nesting_drops_without_overflow() {
        // EMPTY_TUPLE, then a million TUPLE1: a million-deep tuple from a 1 MB pickle.
        let mut p = vec![0x80, 2, b')'];
        p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        p.push(b'.');
        let v = unpickle(&p).unwrap();
        assert_eq!(v.kind(), "tuple");
        drop(v);
    }

    #[test]
    fn malformed_pickles_are_errors() {
        for p in [
            &b""[..],
            b"\x80\x02",
            b"\x80\x02h\x05.",
            b"\x80\x02t.",
            b"\x80\x02}K\x01s.",
            b"\x80\x02X\xff\xff\xff\xff",
            b"\x80\x02\x8d\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x80\x02K\x01K\x02R.",
            b"\x80\x02\xfe.",
        ] {
            assert!(unpickle(p).is_err(), "{p:?}");
        }
        let e = unpickle(b"\x80\x02}q\x00\xfe.").err().unwrap();
        assert!(e.contains("0xfe") && e.contains("byte 5"), "{e}");
        let e = unpickle(b"\x80\x02cbuiltins\neval\n.").err().unwrap();
        assert!(e.contains("builtins.eval"), "{e}");
        let e = unpickle(b"\x80\x02\x8c\x02os\x8c\x06system\x93.")
            .err()
            .unwrap();
        assert!(e.contains("os.system"), "{e}");
    }

    #[test]
    fn strided_gather() {
        // 2x3 row-major i16 matrix [[0,1,2],[3,4,5]] viewed transposed (3x2, strides 1,3).
        let src: Vec<u8> = (0i16..6).flat_map(|v| v.to_le_bytes()).collect();
        let out = gather_strided(&src, 2, 0, &[3, 2], &[1, 3]).unwrap();
        let vals: Vec<i16> = out
            .chunks(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(vals, [0, 3, 1, 4, 2, 5]);
        assert!(is_row_major(&[2, 1, 3], &[3, 99, 1]));
        assert!(!is_row_major(&[3, 2], &[1, 3]));
        assert_eq!(le_signed(&[0xff]), Some(-1));
        assert_eq!(le_signed(&[0x00, 0x01]), Some(256));
    }
}

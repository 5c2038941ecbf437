//! Writing GGUF files: version 3, little-endian, the layout [`super::GgufFile`] and llama.cpp
//! read. The header (metadata and every tensor's name, type, shape and offset) is fixed up
//! front from a plan; the tensors' bytes then follow one at a time, in plan order, each
//! padded to `general.alignment` (32 unless the metadata sets it), so a caller holds one
//! tensor at a time and never the whole model.
//!
//! The file is written to a hidden temporary sibling (`.NAME.tmp-PID`, the name output
//! folders use) under the output's lock and renamed into place only when complete: a failed
//! or abandoned write removes the temporary file and leaves any existing file untouched. An
//! existing destination is refused unless replacing was asked for, and even then only a GGUF
//! file is replaced, never a folder or a file of another kind. The temporary files of killed
//! writers are removed by the next writer of the same output.
//!
//! Written by hand rather than with a crate: the package lists available here hold no
//! crates.io index and no GGUF crate among the installed Rust packages; the GGUF crates known
//! to us either only read (the `gguf` and `gguf-rs` readers) or come inside a whole tensor
//! framework (candle-core's `gguf_file`), and the format is a few hundred lines next to the
//! reader that already defines it here.
use super::ggml::{quantize_f32, WRITTEN};
use super::{GgmlType, GgufValue, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};
use crate::error::{OctetError, Result};
use crate::outdir::{leftovers, target, OutputLock};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The GGUF version written.
pub const GGUF_VERSION: u32 = 3;
/// llama.cpp refuses tensor names of this many bytes or more (`GGML_MAX_NAME`).
const MAX_NAME_BYTES: usize = 64;
/// Values converted per piece by [`GgufWriter::write_f32`]: bounds the converted copy.
const CONVERT_CHUNK: usize = 1 << 20;

/// A tensor to be written: its name, storage type and shape (outermost first, as
/// [`super::GgufTensorInfo::shape`]).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorSpec {
    /// The name in the file (llama.cpp's, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Storage type.
    pub ty: GgmlType,
    /// Dimensions, outermost first; the last one (ggml's rows) must be whole blocks of `ty`.
    pub shape: Vec<usize>,
}

impl GgufTensorSpec {
    /// A tensor named `name` of type `ty` and `shape` (outermost first).
    pub fn new(name: impl Into<String>, ty: GgmlType, shape: &[usize]) -> Self {
        GgufTensorSpec {
            name: name.into(),
            ty,
            shape: shape.to_vec(),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of stored data.
    pub fn nbytes(&self) -> usize {
        self.numel() / self.ty.block_elems() * self.ty.block_bytes()
    }
}

/// Whether an existing destination may be replaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfExists {
    /// Refuse to write when the destination exists.
    Refuse,
    /// Replace an existing GGUF file (only once the new one is complete).
    Replace,
}

/// GGUF's metadata value type id of `v`.
fn type_id(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::Str(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Appends `v`'s encoding (without its type id). An array's items must share one type; an
/// empty array, whose item type nothing tells, is written as an array of UINT8.
fn put_value(buf: &mut Vec<u8>, key: &str, v: &GgufValue) -> Result<()> {
    match v {
        GgufValue::U8(x) => buf.push(*x),
        GgufValue::I8(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => buf.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => buf.push(u8::from(*x)),
        GgufValue::Str(s) => put_str(buf, s),
        GgufValue::Array(items) => {
            let item = items.first().map_or(0, type_id);
            if let Some(other) = items.iter().find(|i| type_id(i) != item) {
                return Err(OctetError::InvalidArgument(format!(
                    "GGUF metadata {key}: an array's items must share one type, but {:?} \
                     follows {:?}",
                    other, items[0]
                )));
            }
            buf.extend_from_slice(&item.to_le_bytes());
            buf.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(buf, key, i)?;
            }
        }
    }
    Ok(())
}

/// The data alignment `metadata` asks for: `general.alignment`, which llama.cpp reads only
/// as a UINT32, a power of two.
fn alignment_of(metadata: &[(String, GgufValue)]) -> Result<u64> {
    match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, GgufValue::U32(a))) if a.is_power_of_two() => Ok(u64::from(*a)),
        Some((_, v)) => Err(OctetError::InvalidArgument(format!(
            "GGUF metadata general.alignment {v:?} must be a UINT32 power of two"
        ))),
    }
}

/// Checks a tensor plan: unique names llama.cpp accepts, one to four dimensions, rows of
/// whole blocks.
fn check_spec(t: &GgufTensorSpec, seen: &mut std::collections::HashSet<String>) -> Result<()> {
    let bad = |p: String| OctetError::InvalidArgument(format!("GGUF tensor {}: {p}", t.name));
    if t.name.is_empty() || t.name.len() >= MAX_NAME_BYTES {
        return Err(bad(format!(
            "the name must have 1 to {} bytes",
            MAX_NAME_BYTES - 1
        )));
    }
    if t.shape.is_empty() || t.shape.len() > MAX_DIMS as usize {
        return Err(bad(format!(
            "{} dimensions (ggml has 1 to {MAX_DIMS})",
            t.shape.len()
        )));
    }
    let row = t.shape[t.shape.len() - 1];
    let be = t.ty.block_elems();
    if !row.is_multiple_of(be) {
        return Err(bad(format!(
            "rows of {row} elements are not whole {:?} blocks of {be}",
            t.ty
        )));
    }
    if !seen.insert(t.name.clone()) {
        return Err(bad("the name appears twice".into()));
    }
    Ok(())
}

/// The header: magic, version, counts, metadata and tensor infos, padded to `alignment`.
fn header(
    metadata: &[(String, GgufValue)],
    tensors: &[GgufTensorSpec],
    alignment: u64,
) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&GGUF_VERSION.to_le_bytes());
    buf.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    let mut keys = std::collections::HashSet::new();
    for (key, v) in metadata {
        if !keys.insert(key.as_str()) {
            return Err(OctetError::InvalidArgument(format!(
                "GGUF metadata {key} appears twice"
            )));
        }
        put_str(&mut buf, key);
        buf.extend_from_slice(&type_id(v).to_le_bytes());
        put_value(&mut buf, key, v)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut buf, &t.name);
        buf.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            buf.extend_from_slice(&(d as u64).to_le_bytes());
        }
        buf.extend_from_slice(&t.ty.id().to_le_bytes());
        buf.extend_from_slice(&offset.to_le_bytes());
        offset += (t.nbytes() as u64).next_multiple_of(alignment);
    }
    buf.resize((buf.len() as u64).next_multiple_of(alignment) as usize, 0);
    Ok(buf)
}

/// Refuses a destination that exists unless `if_exists` allows replacing it and it is a GGUF
/// file.
fn check_destination(shown: &Path, target: &Path, if_exists: IfExists) -> Result<()> {
    let Ok(meta) = std::fs::metadata(target) else {
        return Ok(());
    };
    let refuse = |why: &str| {
        Err(OctetError::InvalidArgument(format!(
            "{}: {why}; nothing was written",
            shown.display()
        )))
    };
    if !meta.is_file() {
        return refuse("exists and is not a file");
    }
    match if_exists {
        IfExists::Refuse => refuse("exists (pass --force to replace it)"),
        IfExists::Replace if !super::starts_with_magic(target) => refuse(
            "exists and is not a GGUF file, so it is not replaced: choose another name or \
             move it away",
        ),
        IfExists::Replace => Ok(()),
    }
}

/// Removes the temporary files of killed writers of `target` (`.NAME.tmp-PID` whose PID no
/// longer runs), saying so on stderr. Only a file that is empty or starts as a GGUF file is
/// removed: anything else so named is the user's. Called under the output's lock; a file
/// that cannot be removed is left for the next run.
fn clean_leftovers(target: &Path) {
    for l in leftovers::dead_leftovers(target) {
        let ours = !l.old
            && std::fs::symlink_metadata(&l.path)
                .is_ok_and(|m| m.is_file() && (m.len() == 0 || super::starts_with_magic(&l.path)));
        if ours && std::fs::remove_file(&l.path).is_ok() {
            eprintln!(
                "note: removed {}, left by an octet run (PID {}) that did not finish",
                l.path.display(),
                l.pid
            );
        }
    }
}

/// The largest |x| a Q8_0 block holds: its scale `max|x| / 127` is stored as f16, whose
/// largest finite value is 65504.
pub const Q8_0_MAX_ABS: f32 = 127.0 * 65504.0;

/// Refuses values that type `ty` would not store faithfully: non-finite values (a Q8_0
/// block's scale would be NaN or infinite), values past f16's range in F16, and Q8_0 blocks
/// whose largest magnitude exceeds [`Q8_0_MAX_ABS`] (their scale would overflow f16).
fn check_representable(ty: GgmlType, values: &[f32]) -> std::result::Result<(), String> {
    if let Some(i) = values.iter().position(|x| !x.is_finite()) {
        return Err(format!("element {i} is {}", values[i]));
    }
    let limit = match ty {
        GgmlType::F16 => f32::from(half::f16::MAX),
        GgmlType::Q8_0 => Q8_0_MAX_ABS,
        _ => return Ok(()),
    };
    match values.iter().position(|x| x.abs() > limit) {
        Some(i) => Err(format!(
            "element {i} is {}, beyond {limit:e}, the largest magnitude {ty:?} holds",
            values[i]
        )),
        None => Ok(()),
    }
}

/// A GGUF file being written: create it with its plan, write every planned tensor in order,
/// then [`GgufWriter::finish`]. Dropped unfinished, it removes its temporary file.
pub struct GgufWriter {
    target: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    alignment: u64,
    plan: Vec<GgufTensorSpec>,
    next: usize,
    _lock: OutputLock,
}

impl std::fmt::Debug for GgufWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWriter")
            .field("target", &self.target)
            .field("next", &self.next)
            .field("tensors", &self.plan.len())
            .finish()
    }
}

impl GgufWriter {
    /// Starts writing `path` with `metadata` (in order; keys unique) and the header of
    /// `tensors`. `path` must not be, or lie inside, any of `inputs`; an existing `path` is
    /// refused unless `if_exists` is [`IfExists::Replace`] and it is a GGUF file.
    pub fn create(
        path: &Path,
        metadata: &[(String, GgufValue)],
        tensors: &[GgufTensorSpec],
        if_exists: IfExists,
        inputs: &[&Path],
    ) -> Result<Self> {
        let alignment = alignment_of(metadata)?;
        let mut seen = std::collections::HashSet::new();
        for t in tensors {
            check_spec(t, &mut seen)?;
        }
        let head = header(metadata, tensors, alignment)?;
        let abs = target::resolve(path)?;
        target::check_apart(path, &abs, inputs)?;
        check_destination(path, &abs, if_exists)?;
        let parent = abs.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(|e| OctetError::io(parent, e))?;
        let lock = OutputLock::acquire(&abs)?;
        // Checked again under the lock: another writer may have finished meanwhile.
        check_destination(path, &abs, if_exists)?;
        clean_leftovers(&abs);
        let tmp = leftovers::tmp_path(&abs, std::process::id());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| OctetError::io(&tmp, e))?;
        let mut w = GgufWriter {
            target: abs,
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            alignment,
            plan: tensors.to_vec(),
            next: 0,
            _lock: lock,
        };
        w.put(&head)?;
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self.out.as_mut().expect("writer open until finish");
        out.write_all(bytes)
            .map_err(|e| OctetError::io(&self.target, e))
    }

    /// The next planned tensor, which must be `name`.
    fn expect(&self, name: &str) -> Result<&GgufTensorSpec> {
        let t = self.plan.get(self.next).ok_or_else(|| {
            OctetError::InvalidArgument(format!(
                "{}: tensor {name} was not planned (all {} are written)",
                self.target.display(),
                self.plan.len()
            ))
        })?;
        if t.name != name {
            return Err(OctetError::InvalidArgument(format!(
                "{}: tensor {} comes next, not {name}",
                self.target.display(),
                t.name
            )));
        }
        Ok(t)
    }

    /// Pads the tensor just written to the alignment and moves on.
    fn end_tensor(&mut self, nbytes: usize) -> Result<()> {
        let pad = (nbytes as u64).next_multiple_of(self.alignment) - nbytes as u64;
        self.put(&vec![0u8; pad as usize])?;
        self.next += 1;
        Ok(())
    }

    /// Writes the next planned tensor from its stored bytes (already of its type).
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let n = self.expect(name)?.nbytes();
        if bytes.len() != n {
            return Err(OctetError::InvalidArgument(format!(
                "{}: tensor {name} takes {n} bytes, got {}",
                self.target.display(),
                bytes.len()
            )));
        }
        self.put(bytes)?;
        self.end_tensor(n)
    }

    /// Writes the next planned tensor from f32 values, converted to its planned type (one of
    /// F32, F16, BF16 and Q8_0) as the gguf package converts them, a piece at a time.
    pub fn write_f32(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let t = self.expect(name)?;
        let (ty, numel, nbytes) = (t.ty, t.numel(), t.nbytes());
        if values.len() != numel {
            return Err(OctetError::InvalidArgument(format!(
                "{}: tensor {name} has {numel} elements, got {}",
                self.target.display(),
                values.len()
            )));
        }
        if !WRITTEN.contains(&ty) {
            // quantize_f32 says which types are written.
            quantize_f32(ty, &[], &mut [])?;
        }
        check_representable(ty, values).map_err(|why| {
            OctetError::InvalidArgument(format!(
                "{}: tensor {name} cannot be stored as {ty:?}: {why}; nothing was written",
                self.target.display()
            ))
        })?;
        let (be, bb) = (ty.block_elems(), ty.block_bytes());
        let mut buf = vec![0u8; CONVERT_CHUNK.min(numel) / be * bb];
        // Pieces of whole blocks: CONVERT_CHUNK is a multiple of every block size.
        for piece in values.chunks(CONVERT_CHUNK) {
            let out = &mut buf[..piece.len() / be * bb];
            quantize_f32(ty, piece, out)?;
            self.put(out)?;
        }
        self.end_tensor(nbytes)
    }

    /// Completes the file (every planned tensor must have been written), syncs it and renames
    /// it into place, replacing an existing GGUF file only now. Returns the path written.
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.next != self.plan.len() {
            return Err(OctetError::InvalidArgument(format!(
                "{}: {} of {} tensors written; nothing was written",
                self.target.display(),
                self.next,
                self.plan.len()
            )));
        }
        let out = self.out.take().expect("writer open until finish");
        let file = out
            .into_inner()
            .map_err(|e| OctetError::io(&self.target, e.into_error()))?;
        file.sync_all()
            .map_err(|e| OctetError::io(&self.target, e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.target).map_err(|e| OctetError::io(&self.target, e))?;
        if let Some(parent) = self.target.parent() {
            // Makes the rename itself durable; a failure here loses nothing already written.
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
        self.tmp = PathBuf::new();
        Ok(self.target.clone())
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            drop(self.out.take());
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_llama_cpp_would_refuse_are_refused() {
        let mut seen = std::collections::HashSet::new();
        let long = "x".repeat(64);
        for (spec, why) in [
            (
                GgufTensorSpec::new(&long, GgmlType::F32, &[2]),
                "1 to 63 bytes",
            ),
            (GgufTensorSpec::new("a", GgmlType::F32, &[]), "0 dimensions"),
            (
                GgufTensorSpec::new("a", GgmlType::F32, &[1, 1, 1, 1, 1]),
                "5 dimensions",
            ),
            (
                GgufTensorSpec::new("a", GgmlType::Q8_0, &[2, 48]),
                "not whole Q8_0 blocks of 32",
            ),
        ] {
            let e = check_spec(&spec, &mut seen).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        let ok = GgufTensorSpec::new("a", GgmlType::Q8_0, &[3, 64]);
        check_spec(&ok, &mut seen).unwrap();
        assert_eq!(ok.nbytes(), 3 * 2 * 34);
        let e = check_spec(&ok, &mut seen).unwrap_err().to_string();
        assert!(e.contains("appears twice"), "{e}");
    }

    #[test]
    fn values_a_type_cannot_hold_are_refused() {
        assert!(check_representable(GgmlType::Q8_0, &[1.0, -8.3e6]).is_ok());
        let e = check_representable(GgmlType::Q8_0, &[1.0, 8.4e6]).unwrap_err();
        assert!(e.contains("element 1") && e.contains("Q8_0"), "{e}");
        assert!(check_representable(GgmlType::F16, &[7e4]).is_err());
        assert!(check_representable(GgmlType::F32, &[7e4]).is_ok());
        for ty in [GgmlType::F32, GgmlType::BF16, GgmlType::Q8_0] {
            let e = check_representable(ty, &[0.0, f32::NAN]).unwrap_err();
            assert!(e.contains("element 1 is NaN"), "{e}");
        }
    }

    #[test]
    fn alignment_must_be_a_u32_power_of_two() {
        let meta = |v| vec![("general.alignment".to_string(), v)];
        assert_eq!(alignment_of(&[]).unwrap(), 32);
        assert_eq!(alignment_of(&meta(GgufValue::U32(64))).unwrap(), 64);
        assert!(alignment_of(&meta(GgufValue::U32(48))).is_err());
        assert!(alignment_of(&meta(GgufValue::U32(0))).is_err());
        assert!(alignment_of(&meta(GgufValue::U64(64))).is_err());
    }

    #[test]
    fn mixed_arrays_and_repeated_keys_are_refused() {
        let mixed = GgufValue::Array(vec![GgufValue::U8(1), GgufValue::I8(1)]);
        let e = header(&[("k".into(), mixed)], &[], 32).unwrap_err();
        assert!(e.to_string().contains("share one type"), "{e}");
        let twice = [
            ("k".to_string(), GgufValue::U8(1)),
            ("k".to_string(), GgufValue::U8(2)),
        ];
        assert!(header(&twice, &[], 32).is_err());
    }
}

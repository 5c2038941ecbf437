//! Memory-mapped safetensors files (read), and a streaming writer that emits the header first
//! and then each tensor's bytes in order, so a converted model never sits whole in memory.
use super::{Dtype, TensorMeta, TensorStore};
use crate::error::{OctetError, Result};
use memmap2::Mmap;
use safetensors::SafeTensors;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

fn dtype_from_st(d: safetensors::Dtype) -> Option<Dtype> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => Dtype::F32,
        S::F16 => Dtype::F16,
        S::BF16 => Dtype::BF16,
        S::F64 => Dtype::F64,
        S::U8 => Dtype::U8,
        S::I8 => Dtype::I8,
        S::I16 => Dtype::I16,
        S::I32 => Dtype::I32,
        S::I64 => Dtype::I64,
        S::BOOL => Dtype::Bool,
        _ => return None,
    })
}

struct Entry {
    meta: TensorMeta,
    start: usize,
    end: usize,
}

/// A safetensors file, memory-mapped; tensor bytes are borrowed from the map.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    order: Vec<String>,
    entries: HashMap<String, Entry>,
}

impl SafetensorsFile {
    /// Maps `path` and validates its header against the file length.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| OctetError::io(path, e))?;
        // SAFETY: the map is read-only; octet never writes its inputs while reading them.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| OctetError::io(path, e))?;
        let (n, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            OctetError::bad_file(path, format!("not a valid safetensors file: {e}"))
        })?;
        let data_start = 8 + n;
        let mut entries = HashMap::new();
        let infos = metadata.tensors();
        for (name, info) in &infos {
            let dtype = dtype_from_st(info.dtype).ok_or_else(|| {
                OctetError::bad_file(
                    path,
                    format!("tensor {name} has unsupported dtype {:?}", info.dtype),
                )
            })?;
            let (s, e) = info.data_offsets;
            // The header is checked for consistency, not against the file: a truncated file
            // must be refused here, not fault when the tensor is read.
            let (start, end) = match (data_start.checked_add(s), data_start.checked_add(e)) {
                (Some(a), Some(b)) if a <= b && b <= mmap.len() => (a, b),
                _ => {
                    return Err(OctetError::bad_file(
                        path,
                        format!(
                            "tensor {name}: bytes {s}..{e} of the data lie outside the file \
                             ({} bytes of data); is it truncated?",
                            mmap.len().saturating_sub(data_start)
                        ),
                    ))
                }
            };
            let numel = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if numel.and_then(|n| n.checked_mul(dtype.size())) != Some(end - start) {
                return Err(OctetError::bad_file(
                    path,
                    format!(
                        "tensor {name}: shape {:?} of {dtype:?} does not match its {} bytes",
                        info.shape,
                        end - start
                    ),
                ));
            }
            entries.insert(
                name.clone(),
                Entry {
                    meta: TensorMeta {
                        dtype,
                        shape: info.shape.clone(),
                    },
                    start,
                    end,
                },
            );
        }
        let order = metadata.offset_keys();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            order,
            entries,
        })
    }

    /// Tells the kernel the pages of `name` are no longer needed, so streaming a model larger
    /// than memory does not grow the resident set.
    pub fn release(&self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            let page = 4096;
            let start = e.start / page * page;
            // SAFETY: DONTNEED on a private read-only file map only drops clean pages; later
            // reads fault them back in from the file.
            unsafe {
                let _ = self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    e.end - start,
                );
            }
        }
    }
}

impl TensorStore for SafetensorsFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn names(&self) -> Vec<String> {
        self.order.clone()
    }
    fn meta(&self, name: &str) -> Option<TensorMeta> {
        self.entries.get(name).map(|e| e.meta.clone())
    }
    fn bytes(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| OctetError::bad_file(&self.path, format!("no tensor named {name}")))?;
        Ok(Cow::Borrowed(&self.mmap[e.start..e.end]))
    }
    fn release(&self, name: &str) {
        SafetensorsFile::release(self, name)
    }
}

/// Writes one safetensors file: the header is fixed up front from the planned tensors, then
/// [`SafetensorsWriter::write`] must be called once per tensor, in plan order.
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    plan: Vec<(String, usize)>,
    next: usize,
}

impl SafetensorsWriter {
    /// Creates `path` with a header for `tensors` (name, dtype, shape) and string metadata.
    pub fn create(
        path: &Path,
        tensors: &[(String, Dtype, Vec<usize>)],
        metadata: &[(String, String)],
    ) -> Result<Self> {
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            let m: serde_json::Map<String, serde_json::Value> = metadata
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            header.insert("__metadata__".into(), serde_json::Value::Object(m));
        }
        let mut offset = 0usize;
        let mut plan = Vec::with_capacity(tensors.len());
        for (name, dtype, shape) in tensors {
            let n = shape.iter().product::<usize>() * dtype.size();
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, offset + n]}),
            );
            plan.push((name.clone(), n));
            offset += n;
        }
        let mut text = serde_json::to_string(&header)
            .map_err(|e| OctetError::InvalidArgument(e.to_string()))?;
        // Pad so the data starts 8-byte aligned, as the reference writer does.
        while (text.len() + 8) % 8 != 0 {
            text.push(' ');
        }
        let file = File::create(path).map_err(|e| OctetError::io(path, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(|e| OctetError::io(path, e))?;
        out.write_all(text.as_bytes())
            .map_err(|e| OctetError::io(path, e))?;
        Ok(SafetensorsWriter {
            path: path.to_path_buf(),
            out,
            plan,
            next: 0,
        })
    }

    /// Writes the next planned tensor's bytes.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let (want, n) = self.plan.get(self.next).ok_or_else(|| {
            OctetError::InvalidArgument(format!("{}: unplanned tensor {name}", self.path.display()))
        })?;
        if want != name || *n != bytes.len() {
            return Err(OctetError::InvalidArgument(format!(
                "{}: expected {want} ({n} bytes), got {name} ({} bytes)",
                self.path.display(),
                bytes.len()
            )));
        }
        self.out
            .write_all(bytes)
            .map_err(|e| OctetError::io(&self.path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Flushes and syncs; every planned tensor must have been written.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.plan.len() {
            return Err(OctetError::InvalidArgument(format!(
                "{}: {} of {} tensors written",
                self.path.display(),
                self.next,
                self.plan.len()
            )));
        }
        self.out
            .flush()
            .map_err(|e| OctetError::io(&self.path, e))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| OctetError::io(&self.path, e))
    }
}

/// Writes whole in-memory tensors to `path` via a temporary name and a rename.
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, tch::Tensor)],
    metadata: &[(String, String)],
) -> Result<()> {
    let plan: Vec<(String, Dtype, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                Dtype::from_kind(t.kind())?,
                t.size().iter().map(|&d| d as usize).collect(),
            ))
        })
        .collect::<Result<_>>()?;
    let tmp = path.with_extension("safetensors.tmp");
    let mut w = SafetensorsWriter::create(&tmp, &plan, metadata)?;
    for (name, t) in tensors {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let n = t.numel() * Dtype::from_kind(t.kind())?.size();
        let mut buf = vec![0u8; n];
        t.f_copy_data_u8(&mut buf, t.numel())?;
        w.write(name, &buf)?;
    }
    w.finish()?;
    std::fs::rename(&tmp, path).map_err(|e| OctetError::io(path, e))
}

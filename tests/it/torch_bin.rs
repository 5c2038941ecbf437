//! Integration tests of the `torch.save` reader against fixtures written by real torch
//! (scripts/gen_torch_bin_fixtures.py, run on demand) and hand-made malformed files.
use crate::common::err_text;
use octet::io::torch_bin::TorchBinFile;
use octet::io::{Dtype, TensorStore};
use octet::OctetError;
use std::borrow::Cow;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The fixture folder, generated once per test run if any file is missing.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("fixtures/generated/torch_bin");
        let needed = [
            "state.bin",
            "state.safetensors",
            "names.json",
            "state_deflated.bin",
            "evil.bin",
        ];
        if needed.iter().any(|f| !dir.join(f).exists()) {
            let python = root.join(".venv/bin/python");
            let status = std::process::Command::new(&python)
                .arg(root.join("scripts/gen_torch_bin_fixtures.py"))
                .arg(&dir)
                .status()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot run {} (create the project venv with torch): {e}",
                        python.display()
                    )
                });
            assert!(
                status.success(),
                "gen_torch_bin_fixtures.py failed: {status}"
            );
        }
        dir
    })
}

fn dtype_of(st: safetensors::Dtype) -> Dtype {
    let all = [
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F64,
        Dtype::U8,
        Dtype::I8,
        Dtype::I16,
        Dtype::I32,
        Dtype::I64,
        Dtype::Bool,
    ];
    let name = format!("{st:?}");
    *all.iter()
        .find(|d| d.safetensors_name() == name)
        .unwrap_or_else(|| panic!("unexpected dtype {name}"))
}

fn expected_names() -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join("names.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Asserts that `file` holds exactly the tensors of state.safetensors, in names.json's order.
fn assert_matches_safetensors(file: &str) {
    let store = TorchBinFile::open(&fixtures().join(file)).unwrap();
    let st_bytes = std::fs::read(fixtures().join("state.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    assert_eq!(store.names(), expected_names());
    assert_eq!(store.names().len(), st.len());
    for name in store.names() {
        let view = st.tensor(&name).unwrap();
        let meta = store.meta(&name).unwrap();
        assert_eq!(meta.dtype, dtype_of(view.dtype()), "{name}");
        assert_eq!(meta.shape, view.shape(), "{name}");
        let bytes = store.bytes(&name).unwrap();
        assert_eq!(bytes.len(), meta.nbytes(), "{name}");
        assert_eq!(&bytes[..], view.data(), "{name}");
    }
}

#[test]
fn every_tensor_matches_the_safetensors_copy() {
    assert_matches_safetensors("state.bin");
}

#[test]
fn deflated_archive_reads_the_same() {
    assert_matches_safetensors("state_deflated.bin");
    let store = TorchBinFile::open(&fixtures().join("state_deflated.bin")).unwrap();
    assert!(matches!(store.bytes("f32").unwrap(), Cow::Owned(_)));
}

#[test]
fn views_of_stored_entries_are_zero_copy() {
    let store = TorchBinFile::open(&fixtures().join("state.bin")).unwrap();
    let (Cow::Borrowed(a), Cow::Borrowed(b)) = (
        store.bytes("shared.a").unwrap(),
        store.bytes("shared.b").unwrap(),
    ) else {
        panic!("storage-sharing views must be borrowed from the map");
    };
    // shared.a = base[4:10], shared.b = base[12:24]: 8 f32 apart in the same storage.
    assert_eq!(b.as_ptr() as usize - a.as_ptr() as usize, 8 * 4);
    for name in [
        "f32",
        "transformer.h.0.attn.q_proj.weight",
        "scalar",
        "param",
    ] {
        assert!(
            matches!(store.bytes(name).unwrap(), Cow::Borrowed(_)),
            "{name}"
        );
    }
    for name in ["transposed", "expanded"] {
        assert!(
            matches!(store.bytes(name).unwrap(), Cow::Owned(_)),
            "{name}"
        );
    }
    let meta = store.meta("transformer.h.0.attn.q_proj.weight").unwrap();
    assert_eq!((meta.dtype, meta.shape), (Dtype::U8, vec![8, 16]));
    assert_eq!(store.meta("scalar").unwrap().shape, Vec::<usize>::new());
}

#[test]
fn non_tensor_entries_are_ignored() {
    let store = TorchBinFile::open(&fixtures().join("state.bin")).unwrap();
    let names = store.names();
    assert!(names.contains(&"extra.weight".to_string()));
    for absent in ["step", "extra", "extra.count", "_metadata"] {
        assert!(!names.contains(&absent.to_string()), "{absent}");
        assert!(store.meta(absent).is_none());
        assert!(store.bytes(absent).is_err());
    }
}

#[test]
fn pickle_calling_os_system_is_refused() {
    let path = fixtures().join("evil.bin");
    let err = TorchBinFile::open(&path)
        .err()
        .expect("evil.bin must be refused");
    let msg = err.to_string();
    assert!(matches!(err, OctetError::BadFile { .. }), "{msg}");
    assert!(msg.contains("system") && msg.contains("evil.bin"), "{msg}");
}

#[test]
fn truncated_files_are_errors() {
    let full = std::fs::read(fixtures().join("state.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cuts: Vec<usize> = (0..16).map(|i| full.len() * i / 16).collect();
    cuts.extend([
        full.len() / 2,
        full.len() - 1,
        full.len() - 22,
        full.len() - 100,
    ]);
    for cut in cuts {
        let path = dir.path().join(format!("cut{cut}.bin"));
        std::fs::write(&path, &full[..cut]).unwrap();
        assert!(
            TorchBinFile::open(&path).is_err(),
            "cut at {cut} of {}",
            full.len()
        );
    }
}

// ---- hand-made archives ----

/// Writes a stored zip with `entries`.
fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        z.start_file(*name, opts).unwrap();
        z.write_all(data).unwrap();
    }
    z.finish().unwrap();
}

/// Opens a one-entry checkpoint `{"w": <tensor>}` with the given pickle and storage bytes.
fn open_with(
    pickle: &[u8],
    storage: Option<&[u8]>,
) -> octet::Result<(TorchBinFile, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.bin");
    let mut entries: Vec<(&str, &[u8])> = vec![
        ("archive/data.pkl", pickle),
        ("archive/byteorder", b"little"),
    ];
    if let Some(s) = storage {
        entries.push(("archive/data/0", s));
    }
    entries.push(("archive/version", b"3\n"));
    write_zip(&path, &entries);
    TorchBinFile::open(&path).map(|f| (f, dir))
}

fn small_int(v: u8) -> [u8; 2] {
    [b'K', v]
}

/// The pickle torch.save writes for `{"w": t}` with `t` a float32 view
/// (storage of `numel` elements, `offset`, `shape`, `stride`).
fn tensor_pickle(numel: u8, offset: u8, shape: &[u8], stride: &[u8]) -> Vec<u8> {
    let mut p = b"\x80\x02}\x8c\x01wctorch._utils\n_rebuild_tensor_v2\n((\x8c\x07storagectorch\nFloatStorage\n\x8c\x010\x8c\x03cpu"
        .to_vec();
    p.extend(small_int(numel));
    p.extend(b"tQ");
    p.extend(small_int(offset));
    for dims in [shape, stride] {
        p.push(b'(');
        for &d in dims {
            p.extend(small_int(d));
        }
        p.push(b't');
    }
    p.extend(b"\x89}tRs.");
    p
}

fn f32_bytes(vals: &[f32]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn views_are_checked_against_their_storage() {
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    // In range: offset 1, three elements → borrowed [2, 3, 4].
    let (f, _dir) = open_with(&tensor_pickle(4, 1, &[3], &[1]), Some(&data)).unwrap();
    assert_eq!(f.names(), ["w"]);
    let b = f.bytes("w").unwrap();
    assert!(matches!(b, Cow::Borrowed(_)));
    assert_eq!(&b[..], &f32_bytes(&[2.0, 3.0, 4.0])[..]);
    // A 2x2 view with a row stride of 2 fits exactly.
    assert!(open_with(&tensor_pickle(4, 0, &[2, 2], &[2, 1]), Some(&data)).is_ok());
    // Column-major 2x2 view: gathered.
    let (f, _dir) = open_with(&tensor_pickle(4, 0, &[2, 2], &[1, 2]), Some(&data)).unwrap();
    assert_eq!(
        &f.bytes("w").unwrap()[..],
        &f32_bytes(&[1.0, 3.0, 2.0, 4.0])[..]
    );

    let refused = [
        (tensor_pickle(4, 2, &[3], &[1]), Some(&data[..])), // offset + extent past the end
        (tensor_pickle(4, 0, &[2, 2], &[3, 1]), Some(&data[..])), // strides reach past the end
        (tensor_pickle(4, 0, &[4], &[1]), Some(&data[..8])), // entry shorter than declared
        (tensor_pickle(4, 0, &[2], &[1]), None),            // storage entry missing
        (tensor_pickle(4, 0, &[2], &[1, 1]), Some(&data[..])), // stride rank != shape rank
    ];
    for (i, (p, s)) in refused.iter().enumerate() {
        let err = open_with(p, *s)
            .err()
            .unwrap_or_else(|| panic!("case {i} must be refused"));
        assert!(matches!(err, OctetError::BadFile { .. }), "case {i}: {err}");
    }
    let err = err_text(open_with(&tensor_pickle(4, 0, &[2], &[1]), None));
    assert!(
        err.contains("archive/data/0") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn unknown_opcode_is_an_error() {
    let err = err_text(open_with(b"\x80\x02}q\x00\xfe.", None));
    assert!(err.contains("0xfe") && err.contains("byte 5"), "{err}");
    // Bad memo index, stack underflow, non-dict top level.
    for p in [&b"\x80\x02h\x07."[..], b"\x80\x02s.", b"\x80\x02K\x01."] {
        assert!(open_with(p, None).is_err(), "{p:?}");
    }
}

#[test]
fn truncated_pickles_are_errors() {
    let mut z =
        zip::ZipArchive::new(std::fs::File::open(fixtures().join("state.bin")).unwrap()).unwrap();
    let name = z
        .file_names()
        .find(|n| n.ends_with("/data.pkl"))
        .unwrap()
        .to_string();
    let mut pickle = Vec::new();
    z.by_name(&name).unwrap().read_to_end(&mut pickle).unwrap();
    for cut in (0..pickle.len()).step_by(7) {
        assert!(open_with(&pickle[..cut], None).is_err(), "cut at {cut}");
    }
}

/// A checkpoint over 4 GiB needs zip64 records (as GPT-J's does). Slow (writes ~4.4 GB through
/// torch): run with `cargo test --release --test torch_bin -- --ignored`.
#[test]
#[ignore]
fn zip64_checkpoint_over_4_gib() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    let script = "import sys, torch\n\
                  big = torch.zeros(4_400_000_000, dtype=torch.uint8)\n\
                  big[-1] = 7\n\
                  torch.save({'big': big, 'small': torch.arange(10, dtype=torch.float32)}, sys.argv[1])\n";
    let status = std::process::Command::new(root.join(".venv/bin/python"))
        .args(["-c", script])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    let store = TorchBinFile::open(&path).unwrap();
    assert_eq!(store.names(), ["big", "small"]);
    let big = store.bytes("big").unwrap();
    assert!(matches!(big, Cow::Borrowed(_)));
    assert_eq!(
        (big.len(), big[big.len() - 1], big[0]),
        (4_400_000_000, 7, 0)
    );
    let small = store.bytes("small").unwrap();
    let want: Vec<u8> = (0..10).flat_map(|i| (i as f32).to_le_bytes()).collect();
    assert_eq!(&small[..], &want[..]);
}

/// Every entry of state.bin, in order.
fn state_entries() -> Vec<(String, Vec<u8>)> {
    let mut z =
        zip::ZipArchive::new(std::fs::File::open(fixtures().join("state.bin")).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut data = Vec::new();
            f.read_to_end(&mut data).unwrap();
            (f.name().to_string(), data)
        })
        .collect()
}

#[test]
fn corrupted_pickle_bytes_never_panic() {
    let entries = state_entries();
    let pkl = entries
        .iter()
        .position(|(n, _)| n.ends_with("/data.pkl"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mutated.bin");
    let (mut ok, mut err) = (0, 0);
    for pos in (0..entries[pkl].1.len()).step_by(3) {
        for byte in [0x00, 0xff, 0x80, 0x4b, entries[pkl].1[pos] ^ 0x5a] {
            let mut mutated = entries.clone();
            mutated[pkl].1[pos] = byte;
            let refs: Vec<(&str, &[u8])> =
                mutated.iter().map(|(n, d)| (n.as_str(), &d[..])).collect();
            write_zip(&path, &refs);
            match TorchBinFile::open(&path) {
                Ok(store) => {
                    ok += 1;
                    for name in store.names() {
                        let meta = store.meta(&name).unwrap();
                        assert_eq!(store.bytes(&name).unwrap().len(), meta.nbytes(), "{name}");
                    }
                }
                Err(_) => err += 1,
            }
        }
    }
    assert!(ok > 0 && err > 0, "ok {ok}, err {err}");
}

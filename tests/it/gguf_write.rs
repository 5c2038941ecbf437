//! The GGUF writer: its f32 → Q8_0 / F16 / BF16 conversions byte for byte against the gguf
//! package (scripts/gen_gguf_write_vectors.py), files it writes read back equal by gguf's
//! GGUFReader (scripts/gguf_read_json.py) and by octet's own reader, and failed or refused
//! writes that leave nothing behind and no existing file changed.
use crate::common;

use octet::io::gguf::{
    quantize_f32, GgmlType, GgufFile, GgufTensorSpec, GgufValue, GgufWriter, IfExists,
};
use serde_json::Value;
use std::path::Path;

fn u8s(t: &tch::Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn conversions_are_byte_identical_to_gguf_quantize() {
    let v = common::load_safetensors(&common::fixture("gguf_write_vectors/vectors.safetensors"));
    let inputs = &v["inputs"];
    let (rows, width) = (inputs.size()[0] as usize, inputs.size()[1] as usize);
    let values = Vec::<f32>::try_from(inputs.flatten(0, -1)).unwrap();
    for (key, ty) in [
        ("q8_0", GgmlType::Q8_0),
        ("f16", GgmlType::F16),
        ("bf16", GgmlType::BF16),
    ] {
        let want = u8s(&v[key]);
        let mut ours = vec![0u8; want.len()];
        quantize_f32(ty, &values, &mut ours).unwrap();
        let per_row = want.len() / rows;
        for r in 0..rows {
            let (o, w) = (
                &ours[r * per_row..][..per_row],
                &want[r * per_row..][..per_row],
            );
            assert_eq!(
                o,
                w,
                "{key} row {r} (inputs {:?}…)",
                &values[r * width..][..4]
            );
        }
    }
}

/// Metadata of every GGUF value type, arrays of strings, numbers and booleans included, and
/// a non-default alignment.
fn every_value_type() -> Vec<(String, GgufValue)> {
    use GgufValue::*;
    let strs = |v: &[&str]| Array(v.iter().map(|s| Str(s.to_string())).collect());
    [
        ("general.architecture", Str("octet-write-test".into())),
        ("general.alignment", U32(64)),
        ("test.u8", U8(250)),
        ("test.i8", I8(-7)),
        ("test.u16", U16(65000)),
        ("test.i16", I16(-32000)),
        ("test.u32", U32(4_000_000_000)),
        ("test.i32", I32(-2_000_000_000)),
        ("test.u64", U64(u64::MAX - 1)),
        ("test.i64", I64(i64::MIN + 1)),
        ("test.f32", F32(0.1)),
        ("test.f64", F64(-1e300)),
        ("test.true", Bool(true)),
        ("test.false", Bool(false)),
        ("test.str", Str("ünïcode ✓ {{ chat }}\n".into())),
        ("test.empty_str", Str(String::new())),
        ("test.strs", strs(&["<s>", "", "Ġthe", "▁x y"])),
        ("test.i32s", Array(vec![I32(-1), I32(0), I32(7)])),
        ("test.f32s", Array(vec![F32(1.5), F32(-0.25), F32(3e-8)])),
        ("test.bools", Array(vec![Bool(true), Bool(false)])),
        ("test.u64s", Array(vec![U64(0), U64(u64::MAX)])),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Deterministic values of varied magnitude (a small LCG: no global RNG involved).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            u * if i % 17 == 0 { 40.0 } else { 2.0 }
        })
        .collect()
}

fn tensors() -> Vec<GgufTensorSpec> {
    vec![
        GgufTensorSpec::new("token_embd.weight", GgmlType::Q8_0, &[3, 64]),
        GgufTensorSpec::new("blk.0.attn_q.weight", GgmlType::F16, &[4, 6]),
        GgufTensorSpec::new("blk.0.ffn_up.weight", GgmlType::BF16, &[2, 3, 5]),
        GgufTensorSpec::new("output_norm.weight", GgmlType::F32, &[7]),
        GgufTensorSpec::new("blk.0.attn_k.weight", GgmlType::Q8_0, &[1, 2, 2, 32]),
    ]
}

/// Writes the round-trip file; returns each tensor's f32 inputs and stored bytes.
fn write_round_trip(path: &Path) -> Vec<(Vec<f32>, Vec<u8>)> {
    let specs = tensors();
    let mut w =
        GgufWriter::create(path, &every_value_type(), &specs, IfExists::Refuse, &[]).unwrap();
    let mut out = Vec::new();
    for (i, t) in specs.iter().enumerate() {
        let v = values(t.numel(), i as u64);
        let mut stored = vec![0u8; t.nbytes()];
        quantize_f32(t.ty, &v, &mut stored).unwrap();
        w.write_f32(&t.name, &v).unwrap();
        out.push((v, stored));
    }
    assert_eq!(w.finish().unwrap(), path.canonicalize().unwrap());
    out
}

/// A metadata value as gguf's reader prints it, converted for comparison.
fn json_of(v: &GgufValue) -> Value {
    match v {
        GgufValue::F32(x) => serde_json::json!(f64::from(*x)),
        GgufValue::F64(x) => serde_json::json!(x),
        GgufValue::Str(s) => serde_json::json!(s),
        GgufValue::Bool(b) => serde_json::json!(b),
        GgufValue::Array(a) => Value::Array(a.iter().map(json_of).collect()),
        other => match other.as_i64() {
            Some(i) => serde_json::json!(i),
            None => serde_json::json!(other.as_u64().unwrap()),
        },
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn round_trip_through_gguf_reader_and_octet_reader() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rt.gguf");
    let written = write_round_trip(&path);
    let specs = tensors();
    let meta = every_value_type();

    // gguf's reader.
    let out = common::run_script("gguf_read_json.py", &[path.as_os_str()]);
    let got: Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(got["alignment"], 64);
    let got_meta = got["metadata"].as_object().unwrap();
    assert_eq!(got_meta.len(), meta.len(), "{got_meta:?}");
    for (k, v) in &meta {
        assert_eq!(got_meta[k]["value"], json_of(v), "metadata {k}");
    }
    assert_eq!(got_meta["test.u16"]["types"], serde_json::json!(["UINT16"]));
    assert_eq!(
        got_meta["test.strs"]["types"],
        serde_json::json!(["ARRAY", "STRING"])
    );
    let got_tensors = got["tensors"].as_array().unwrap();
    assert_eq!(got_tensors.len(), specs.len());
    for ((t, g), (_, stored)) in specs.iter().zip(got_tensors).zip(&written) {
        assert_eq!(g["name"], t.name.as_str());
        assert_eq!(g["type"], format!("{:?}", t.ty).as_str(), "{}", t.name);
        assert_eq!(g["shape"], serde_json::json!(t.shape), "{}", t.name);
        assert_eq!(
            g["offset"].as_u64().unwrap() % 64,
            0,
            "{} alignment",
            t.name
        );
        assert_eq!(g["bytes"], hex(stored).as_str(), "{} bytes", t.name);
    }

    // octet's reader: the same metadata, tensors and values, and gguf's de-quantization.
    let g = GgufFile::open(&path).unwrap();
    assert_eq!((g.version(), g.alignment()), (3, 64));
    let want: std::collections::BTreeMap<_, _> = meta.into_iter().collect();
    assert_eq!(g.metadata(), &want);
    let infos = g.tensor_infos();
    assert_eq!(infos.len(), specs.len());
    for ((t, info), (g_json, (inputs, _))) in specs
        .iter()
        .zip(infos)
        .zip(got_tensors.iter().zip(&written))
    {
        assert_eq!(
            (&info.name, &info.shape, info.ty),
            (&t.name, &t.shape, t.ty)
        );
        assert_eq!(info.offset % 64, 0);
        let ours: Vec<u32> = g
            .dequantize_raw(&t.name)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        let theirs: Vec<u32> = g_json["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(ours, theirs, "{} de-quantized", t.name);
        if t.ty == GgmlType::F32 {
            let exact: Vec<u32> = inputs.iter().map(|x| x.to_bits()).collect();
            assert_eq!(ours, exact);
        }
    }
    // The last tensor is padded too, as gguf's writer pads it.
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len % 64, 0);
    let last = infos.last().unwrap();
    assert_eq!(
        len as usize,
        (last.offset + last.nbytes).next_multiple_of(64)
    );
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn small() -> Vec<GgufTensorSpec> {
    vec![
        GgufTensorSpec::new("a", GgmlType::F32, &[4]),
        GgufTensorSpec::new("b", GgmlType::Q8_0, &[32]),
    ]
}

#[test]
fn failed_or_refused_writes_leave_nothing_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let meta = vec![(
        "general.architecture".to_string(),
        GgufValue::Str("x".into()),
    )];
    let create = |how| GgufWriter::create(&out, &meta, &small(), how, &[]);

    // A write abandoned half-way, or given the wrong tensor, leaves no file at all.
    let mut w = create(IfExists::Refuse).unwrap();
    w.write_f32("a", &[1.0; 4]).unwrap();
    let e = w.write_f32("c", &[0.0; 32]).unwrap_err().to_string();
    assert!(e.contains("tensor b comes next"), "{e}");
    let e = w.write_tensor("b", &[0u8; 33]).unwrap_err().to_string();
    assert!(e.contains("takes 34 bytes"), "{e}");
    drop(w);
    assert_eq!(listing(dir.path()), Vec::<String>::new());
    let mut w = create(IfExists::Refuse).unwrap();
    w.write_f32("a", &[1.0; 4]).unwrap();
    let e = w.finish().unwrap_err().to_string();
    assert!(e.contains("1 of 2 tensors written"), "{e}");
    assert_eq!(listing(dir.path()), Vec::<String>::new());

    // A complete write, which removes a killed writer's temporary file (not the user's).
    let dead = u32::MAX - 1; // above any PID the kernel hands out
    let killed = dir.path().join(format!(".m.gguf.tmp-{dead}"));
    std::fs::write(&killed, b"GGUF\x03\0\0\0 half-written").unwrap();
    let users = dir.path().join(format!(".m.gguf.tmp-{}", dead - 1));
    std::fs::write(&users, "not octet's").unwrap();
    let mut w = create(IfExists::Refuse).unwrap();
    w.write_f32("a", &[1.0; 4]).unwrap();
    w.write_f32("b", &[2.0; 32]).unwrap();
    w.finish().unwrap();
    assert!(!killed.exists());
    assert_eq!(std::fs::read_to_string(&users).unwrap(), "not octet's");
    std::fs::remove_file(&users).unwrap();
    assert_eq!(listing(dir.path()), vec!["m.gguf".to_string()]);
    let first = std::fs::read(&out).unwrap();

    // An existing file is refused without Replace, and kept while a replacement fails.
    let e = create(IfExists::Refuse).unwrap_err().to_string();
    assert!(e.contains("m.gguf: exists") && e.contains("--force"), "{e}");
    let mut w = create(IfExists::Replace).unwrap();
    w.write_f32("a", &[3.0; 4]).unwrap();
    drop(w);
    assert_eq!(std::fs::read(&out).unwrap(), first);
    assert_eq!(listing(dir.path()), vec!["m.gguf".to_string()]);
    let mut w = create(IfExists::Replace).unwrap();
    w.write_f32("a", &[3.0; 4]).unwrap();
    w.write_f32("b", &[4.0; 32]).unwrap();
    w.finish().unwrap();
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.dequantize_raw("a").unwrap(), vec![3.0; 4]);
    assert_eq!(listing(dir.path()), vec!["m.gguf".to_string()]);

    // Replace never replaces what is not a GGUF file, nor a folder, nor an input.
    let notes = dir.path().join("notes.gguf");
    std::fs::write(&notes, "my notes").unwrap();
    let e = GgufWriter::create(&notes, &meta, &small(), IfExists::Replace, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a GGUF file"), "{e}");
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my notes");
    let sub = dir.path().join("sub.gguf");
    std::fs::create_dir(&sub).unwrap();
    let e = GgufWriter::create(&sub, &meta, &small(), IfExists::Replace, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a file"), "{e}");
    let e = GgufWriter::create(&out, &meta, &small(), IfExists::Replace, &[&out])
        .unwrap_err()
        .to_string();
    assert!(e.contains("is the input"), "{e}");
    assert_eq!(
        listing(dir.path()),
        vec!["m.gguf", "notes.gguf", "sub.gguf"]
    );

    // A second writer of the same output is refused while the first holds it.
    let other = dir.path().join("n.gguf");
    let w = GgufWriter::create(&other, &meta, &small(), IfExists::Refuse, &[]).unwrap();
    let e = GgufWriter::create(&other, &meta, &small(), IfExists::Refuse, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("another octet process"), "{e}");
    drop(w);
    assert!(!other.exists());
}

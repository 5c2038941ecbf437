//! GGUF tensor types (scripts/gen_ggml_vectors.py writes the vectors with the `gguf` package):
//! every block type de-quantized bit for bit as gguf does, K-quant tensors through the normal
//! GgufFile store, and the refusal of unread types, short rows and truncated data by name.
use crate::common;

use octet::io::gguf::{dequantize, ggml_type_name, GgmlType, GgufFile};
use octet::io::{Dtype, TensorStore};
use std::path::{Path, PathBuf};
use tch::Tensor;

fn vectors(rel: &str) -> PathBuf {
    common::fixture(&format!("ggml_vectors/{rel}"))
}

fn u8s(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(t.flatten(0, -1)).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

/// Asserts two f32 slices hold the same bits (so -0.0 and 0.0 differ), naming the first
/// difference.
fn assert_same_bits(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    if let Some(i) = (0..ours.len()).find(|&i| ours[i].to_bits() != theirs[i].to_bits()) {
        panic!(
            "{what}: element {i} is {:e} ({:#010x}), gguf gives {:e} ({:#010x})",
            ours[i],
            ours[i].to_bits(),
            theirs[i],
            theirs[i].to_bits()
        );
    }
}

/// The quantized types the vectors cover: all of octet's but the three float types.
fn quantized_types() -> Vec<GgmlType> {
    GgmlType::READ
        .into_iter()
        .filter(|t| !t.is_float())
        .collect()
}

#[test]
fn every_block_type_is_bit_identical_to_gguf_py() {
    let v = common::load_safetensors(&vectors("vectors.safetensors"));
    let types = quantized_types();
    assert_eq!(types.len(), 11);
    for ty in types {
        let name = format!("{ty:?}");
        let blocks = &v[&format!("{name}.blocks")];
        let want = f32s(&v[&format!("{name}.values")]);
        let (n, bb) = (blocks.size()[0] as usize, blocks.size()[1] as usize);
        assert_eq!(bb, ty.block_bytes(), "{name}");
        // Seven edge blocks and 24 random ones.
        assert!(n >= 30, "{name}: {n} blocks");
        let data = u8s(blocks);
        let mut ours = vec![f32::NAN; n * ty.block_elems()];
        dequantize(ty, &data, &mut ours).unwrap();
        assert_same_bits(&ours, &want, &name);
        // The block-by-block path agrees with the whole-buffer one.
        for b in 0..n {
            let mut one = vec![0f32; ty.block_elems()];
            dequantize(ty, &data[b * bb..(b + 1) * bb], &mut one).unwrap();
            assert_same_bits(&one, &ours[b * one.len()..(b + 1) * one.len()], &name);
        }
        // The vectors are not degenerate: signs and magnitudes vary.
        assert!(want.iter().any(|&x| x < 0.0) && want.iter().any(|&x| x > 1.0));
    }
}

#[test]
fn kquant_tensors_read_through_the_store_equal_gguf_reader() {
    let g = GgufFile::open(&vectors("kquants.gguf")).unwrap();
    let want = common::load_safetensors(&vectors("kquants_reference.safetensors"));
    let names = g.names();
    assert_eq!(names.len(), quantized_types().len());
    for ty in quantized_types() {
        let name = format!("{ty:?}").to_lowercase();
        assert_eq!(g.tensor_info(&name).unwrap().ty, ty);
        let meta = g.meta(&name).unwrap();
        let theirs = &want[&name];
        assert_eq!(meta.dtype, Dtype::F32, "{name}");
        let shape: Vec<usize> = theirs.size().iter().map(|&d| d as usize).collect();
        assert_eq!(meta.shape, shape, "{name}");
        assert_eq!(shape, [3, 512], "{name}");
        let bytes = g.bytes(&name).unwrap();
        let ours: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_same_bits(&ours, &f32s(theirs), &name);
        assert_same_bits(&g.f32_values(&name).unwrap(), &ours, &name);
        assert_same_bits(&g.dequantize_raw(&name).unwrap(), &ours, &name);
        g.release(&name);
    }
}

/// A minimal GGUF v3 file with no metadata and the given tensors (name, ggml `ne`, type id,
/// data bytes), data 32-byte aligned; `data_len` cuts or pads the data section.
fn write_gguf(path: &Path, tensors: &[(&str, &[u64], u32, usize)], data_len: usize) {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend(0u64.to_le_bytes());
    let mut offset = 0u64;
    for (name, ne, ty, nbytes) in tensors {
        b.extend((name.len() as u64).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend((ne.len() as u32).to_le_bytes());
        for d in *ne {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend(offset.to_le_bytes());
        offset += (*nbytes as u64).div_ceil(32) * 32;
    }
    b.resize(b.len().div_ceil(32) * 32, 0);
    b.extend((0..data_len).map(|i| (i * 7 % 251) as u8));
    std::fs::write(path, b).unwrap();
}

#[test]
fn unread_types_are_refused_naming_file_tensor_and_type() {
    let e = common::err_text(GgufFile::open(&vectors("bad_iq2_xxs.gguf")));
    common::assert_mentions(&e, &["bad_iq2_xxs.gguf", "token_embd.weight", "IQ2_XXS"]);

    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("t.gguf");
    let mut refused = Vec::new();
    for id in (0..=41).chain([99]) {
        if GgmlType::from_id(id).is_ok() {
            continue;
        }
        write_gguf(&p, &[("blk.0.w", &[256, 2], id, 4096)], 4096);
        let e = common::err_text(GgufFile::open(&p));
        let name = ggml_type_name(id).unwrap_or("unknown");
        common::assert_mentions(
            &e,
            &[
                "t.gguf",
                "tensor blk.0.w",
                &format!("type {id} ({name})"),
                "Q4_K",
            ],
        );
        refused.push(name);
    }
    for iq in [
        "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
        "TQ1_0", "TQ2_0", "MXFP4", "Q8_1", "unknown",
    ] {
        assert!(refused.contains(&iq), "{iq} not refused: {refused:?}");
    }
}

#[test]
fn kquant_rows_must_be_whole_blocks() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("rows.gguf");
    for ty in quantized_types()
        .into_iter()
        .filter(|t| t.block_elems() == 256)
    {
        // 128-element rows: a whole number of 32-blocks but not of K blocks.
        write_gguf(&p, &[("blk.1.ffn_up", &[128, 4], ty.id(), 1024)], 1024);
        let e = common::err_text(GgufFile::open(&p));
        common::assert_mentions(
            &e,
            &[
                "rows.gguf",
                "blk.1.ffn_up",
                &format!("rows of 128 elements are not whole {ty:?} blocks of 256"),
            ],
        );
        // A scalar is a row of one element.
        write_gguf(&p, &[("scalar", &[], ty.id(), 512)], 512);
        common::assert_mentions(
            &common::err_text(GgufFile::open(&p)),
            &["scalar", "rows of 1"],
        );
    }
}

#[test]
fn truncated_kquant_tensors_are_refused_naming_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("short.gguf");
    for ty in quantized_types()
        .into_iter()
        .filter(|t| t.block_elems() == 256)
    {
        let need = 4 * ty.block_bytes();
        // The info says 4 blocks; the data holds 3 and a half.
        write_gguf(
            &p,
            &[("blk.0.attn_v.weight", &[256, 4], ty.id(), need)],
            need - ty.block_bytes() / 2,
        );
        let e = common::err_text(GgufFile::open(&p));
        common::assert_mentions(
            &e,
            &[
                "short.gguf",
                "blk.0.attn_v.weight",
                &format!("data ({need} bytes at"),
                "past the end",
            ],
        );
        // Exactly enough reads.
        write_gguf(
            &p,
            &[("blk.0.attn_v.weight", &[256, 4], ty.id(), need)],
            need,
        );
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.f32_values("blk.0.attn_v.weight").unwrap().len(), 1024);
    }

    // gguf's own file cut short: the tensors still in the file are fine, the cut one is named.
    let bytes = std::fs::read(vectors("kquants.gguf")).unwrap();
    let g = GgufFile::open(&vectors("kquants.gguf")).unwrap();
    let q4k = g.tensor_info("q4_k").unwrap().clone();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..q4k.offset + q4k.nbytes - 1]).unwrap();
    let e = common::err_text(GgufFile::open(&cut));
    common::assert_mentions(&e, &["cut.gguf", "tensor q4_k", "past the end"]);

    // The CLI says the same and writes nothing.
    let out = tmp.path().join("out");
    let (ok, _, stderr) = common::convert(&cut, &out, &[]);
    assert!(!ok, "{stderr}");
    common::assert_mentions(&stderr, &["cut.gguf", "q4_k", "past the end"]);
    assert!(!out.exists());
}

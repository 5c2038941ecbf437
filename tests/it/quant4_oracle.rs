//! 4-bit NF4 / FP4 against bitsandbytes' own vectors (scripts/gen_quant4_vectors.py), the
//! generic (GPU) de-quantizer against the CPU kernels, and round trips through every code and
//! block size.
use crate::common;

use octet::quant::{
    self, block4, fit_code4, quantize4, Code4, FitOptions, Quantized4, BLOCK4_SIZES,
};
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

fn vectors() -> BTreeMap<String, Tensor> {
    common::load_safetensors(&common::fixture("quant4/vectors.safetensors"))
}

fn case_names(all: &BTreeMap<String, Tensor>) -> Vec<String> {
    all.keys()
        .filter_map(|k| k.strip_suffix(".x").map(str::to_string))
        .collect()
}

fn code_of(qt: &str) -> Code4 {
    match qt {
        "nf4" => Code4::nf4(),
        _ => Code4::fp4(),
    }
}

fn bits(t: &Tensor) -> Vec<u32> {
    let f = t.to_kind(Kind::Float).flatten(0, -1);
    Vec::<f32>::try_from(&f)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    Vec::<u8>::try_from(&t.flatten(0, -1)).unwrap()
}

#[test]
fn codes_equal_bitsandbytes() {
    let all = vectors();
    for qt in ["nf4", "fp4"] {
        assert_eq!(
            bits(&all[&format!("code.{qt}")]),
            bits(&code_of(qt).to_tensor()),
            "{qt}"
        );
    }
}

#[test]
fn quantize4_matches_bitsandbytes_codes_and_absmax() {
    let all = vectors();
    let names = case_names(&all);
    assert!(names.len() >= 14, "{names:?}");
    for n in &names {
        let x = &all[&format!("{n}.x")];
        let block = all[&format!("{n}.block")].int64_value(&[0]) as usize;
        for qt in ["nf4", "fp4"] {
            let k = format!("{n}.{qt}");
            let q = quantize4(x, block, &code_of(qt)).unwrap();
            assert_eq!(
                bytes(&q.packed),
                bytes(&all[&format!("{k}.q")]),
                "{k} codes"
            );
            assert_eq!(
                bits(&q.absmax),
                bits(&all[&format!("{k}.absmax")]),
                "{k} absmax"
            );
        }
    }
}

#[test]
fn dequantize4_is_bit_identical_on_bitsandbytes_own_parts() {
    let all = vectors();
    for n in case_names(&all) {
        let x = &all[&format!("{n}.x")];
        let block = all[&format!("{n}.block")].int64_value(&[0]) as usize;
        for qt in ["nf4", "fp4"] {
            let k = format!("{n}.{qt}");
            let q = Quantized4::from_parts(
                all[&format!("{k}.q")].shallow_clone(),
                all[&format!("{k}.absmax")].shallow_clone(),
                code_of(qt),
                block,
                x.size(),
            )
            .unwrap();
            for (tag, kind) in [
                ("f32", Kind::Float),
                ("bf16", Kind::BFloat16),
                ("f16", Kind::Half),
            ] {
                let want = &all[&format!("{k}.deq_{tag}")];
                let cpu = q.dequantize(kind).unwrap();
                assert_eq!(cpu.kind(), want.kind(), "{k} {tag}");
                assert_eq!(cpu.size(), want.size(), "{k} {tag}");
                assert_eq!(bits(&cpu), bits(want), "{k} {tag} (CPU kernel)");
                let generic = quant::with_generic_ops(|| q.dequantize(kind)).unwrap();
                assert_eq!(bits(&generic), bits(want), "{k} {tag} (generic ops)");
            }
        }
    }
}

/// A weight-like tensor of `n` elements (normal, a few large values).
fn weight_like(n: i64) -> Tensor {
    let _guard = common::global_rng();
    tch::manual_seed(4);
    let x = Tensor::randn([n], (Kind::Float, tch::Device::Cpu)) * 0.02;
    let _ = x.narrow(0, 0, n.min(5)).g_mul_scalar_(9.0);
    x
}

#[test]
fn round_trips_through_every_code_and_block_size() {
    let x = weight_like(9_001);
    let flat = Vec::<f32>::try_from(&x).unwrap();
    for &block in &BLOCK4_SIZES {
        let fitted = fit_code4(&flat, block, FitOptions::default()).unwrap();
        for code in [Code4::nf4(), Code4::fp4(), fitted] {
            let q = quantize4(&x, block, &code).unwrap();
            let d = q.dequantize(Kind::Float).unwrap();
            // Every value lands within half the widest code gap of its block's scale.
            let gap = {
                let mut v = code.values().to_vec();
                v.sort_by(f32::total_cmp);
                v.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max)
            };
            let am = Vec::<f32>::try_from(&q.absmax).unwrap();
            let (xs, ds) = (flat.clone(), Vec::<f32>::try_from(&d).unwrap());
            for (i, (a, b)) in xs.iter().zip(&ds).enumerate() {
                let tol = am[i / block] * gap / 2.0 * 1.0001 + 1e-12;
                assert!(
                    (a - b).abs() <= tol,
                    "block {block} element {i}: {a} vs {b}"
                );
            }
            // Stored and reloaded parts give the same values.
            let again = Quantized4::from_parts(
                q.packed.copy(),
                q.absmax.copy(),
                Code4::from_tensor(&code.to_tensor()).unwrap(),
                block,
                q.shape.clone(),
            )
            .unwrap();
            assert_eq!(bits(&again.dequantize(Kind::Float).unwrap()), bits(&d));
            // Re-quantizing the de-quantized tensor changes nothing (the codes are fixed points).
            let q2 = quantize4(&d, block, &code).unwrap();
            assert_eq!(
                bits(&q2.dequantize(Kind::Float).unwrap()),
                bits(&d),
                "block {block}"
            );
        }
    }
}

#[test]
fn unsupported_block_sizes_are_refused_by_name() {
    let x = weight_like(256);
    for b in [16i64, 96, 8192] {
        let e = block4(b).unwrap_err().to_string();
        assert!(
            e.contains("not supported") && e.contains(&b.to_string()),
            "{e}"
        );
        assert!(quantize4(&x, b as usize, &Code4::nf4()).is_err());
    }
}

#[test]
fn double_quantized_absmax_matches_bitsandbytes_compress_statistics() {
    use octet::quant::double_quant::DoubleQuantized;
    let all = vectors();
    let mut checked = 0;
    for n in case_names(&all) {
        let x = &all[&format!("{n}.x")];
        let block = all[&format!("{n}.block")].int64_value(&[0]) as usize;
        for qt in ["nf4", "fp4"] {
            let k = format!("{n}.{qt}");
            let Some(qabsmax) = all.get(&format!("{k}.dq.qabsmax")) else {
                continue;
            };
            let absmax = Vec::<f32>::try_from(&all[&format!("{k}.absmax")]).unwrap();
            let dq = DoubleQuantized::quantize(&absmax);
            assert_eq!(dq.q, bytes(qabsmax), "{k} absmax codes");
            assert_eq!(
                dq.group_absmax
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                bits(&all[&format!("{k}.dq.absmax2")]),
                "{k} group absmax"
            );
            assert_eq!(
                dq.offset.to_bits(),
                bits(&all[&format!("{k}.dq.offset")])[0],
                "{k}"
            );
            // bitsandbytes de-quantizes the scales, adds the offset, then the 4-bit codes.
            let scales = Tensor::from_slice(&dq.dequantize());
            let q = Quantized4::from_parts(
                all[&format!("{k}.q")].shallow_clone(),
                scales,
                code_of(qt),
                block,
                x.size(),
            )
            .unwrap();
            assert_eq!(
                bits(&q.dequantize(Kind::Float).unwrap()),
                bits(&all[&format!("{k}.dq.deq_f32")]),
                "{k} de-quantized through double-quantized scales"
            );
            checked += 1;
        }
    }
    assert!(checked >= 8, "{checked}");
}

#[test]
fn a_corrupted_double_quant_table_is_refused() {
    use octet::quant::double_quant::DoubleQuantized;
    let all = vectors();
    let k = "normal_b64.nf4";
    let q = &all[&format!("{k}.dq.qabsmax")];
    let groups = &all[&format!("{k}.dq.absmax2")];
    let offset = &all[&format!("{k}.dq.offset")];
    let short_groups = groups.narrow(0, 0, groups.size()[0] - 1);
    let e = common::err_text(DoubleQuantized::from_tensors(k, q, &short_groups, offset));
    assert!(e.contains(k), "{e}");
    // Scales that de-quantize fine but are one short for the 4-bit codes.
    let dq = DoubleQuantized::from_tensors(
        k,
        &q.narrow(0, 0, q.size()[0] - 1),
        &groups.narrow(0, 0, 1),
        offset,
    );
    if let Ok(dq) = dq {
        let e = common::err_text(Quantized4::from_parts(
            all[&format!("{k}.q")].shallow_clone(),
            Tensor::from_slice(&dq.dequantize()),
            Code4::nf4(),
            64,
            all["normal_b64.x"].size(),
        ));
        assert!(e.contains("absmax"), "{e}");
    }
}

//! The quantization core against bitsandbytes' own vectors (scripts/gen_quant_vectors.py).
use crate::common;

use octet::quant::{self, fit_code, BlockSize, FitOptions, QuantCode, StreamingQuantizer};
use octet::OctetError;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

struct Case {
    name: String,
    x: Tensor,
    q: Tensor,
    absmax: Tensor,
    code: Tensor,
    deq: Tensor,
    block: BlockSize,
}

fn cases() -> (BTreeMap<String, Tensor>, Vec<Case>) {
    let all = common::load_safetensors(&common::fixture("quant_vectors.safetensors"));
    let names: Vec<String> = all
        .keys()
        .filter_map(|k| k.strip_suffix(".x").map(str::to_string))
        .collect();
    let cases = names
        .into_iter()
        .map(|n| {
            let get = |s: &str| all[&format!("{n}.{s}")].shallow_clone();
            let block = BlockSize::new(get("block").int64_value(&[0])).unwrap();
            Case {
                name: n.clone(),
                x: get("x"),
                q: get("q"),
                absmax: get("absmax"),
                code: get("code"),
                deq: get("deq"),
                block,
            }
        })
        .collect();
    (all, cases)
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
    let (a, b) = (f32s(a), f32s(b));
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn rmse(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).square().mean(Kind::Double).sqrt().double_value(&[])
}

#[test]
fn dynamic_codes_equal_bitsandbytes() {
    let (all, cases) = cases();
    assert!(bits_equal(
        &QuantCode::dynamic_signed().to_tensor(),
        &all["code_signed"]
    ));
    assert!(bits_equal(
        &QuantCode::dynamic_unsigned().to_tensor(),
        &all["code_unsigned"]
    ));
    for c in &cases {
        assert!(
            bits_equal(&QuantCode::dynamic_signed().to_tensor(), &c.code),
            "{}",
            c.name
        );
    }
}

#[test]
fn dequantizing_bitsandbytes_state_is_bit_identical() {
    let (_, cases) = cases();
    assert!(
        cases.len() >= 14,
        "expected every block size and case kind, found {}",
        cases.len()
    );
    for c in &cases {
        let code = QuantCode::from_tensor(&c.code).unwrap();
        let ours = quant::dequantize(&c.q, &c.absmax, &code, c.block, Kind::Float).unwrap();
        assert!(bits_equal(&ours, &c.deq), "{}", c.name);
        for kind in [Kind::BFloat16, Kind::Half] {
            let low = quant::dequantize(&c.q, &c.absmax, &code, c.block, kind).unwrap();
            assert_eq!(low.kind(), kind);
            assert!(
                bits_equal(&low, &c.deq.to_kind(kind)),
                "{} {kind:?}",
                c.name
            );
        }
    }
}

#[test]
fn quantize_picks_the_exact_nearest_code_and_differs_from_bitsandbytes_only_near_midpoints() {
    let (_, cases) = cases();
    let code = QuantCode::dynamic_signed();
    let cv = code.values();
    let lut_bin = 2.0 / 65535.0;
    let (mut differing, mut total) = (0usize, 0usize);
    for c in &cases {
        let ours = quant::quantize(&c.x, c.block, &code).unwrap();
        assert!(bits_equal(&ours.absmax, &c.absmax), "{}: absmax", c.name);
        let x = f32s(&c.x);
        let am = f32s(&ours.absmax);
        let q_ours = Vec::<u8>::try_from(&ours.q.flatten(0, -1)).unwrap();
        let q_bnb = Vec::<u8>::try_from(&c.q.flatten(0, -1)).unwrap();
        for (i, &xi) in x.iter().enumerate() {
            let a = am[i / c.block.get()];
            let v = if a == 0.0 { 0.0 } else { xi / a };
            assert_eq!(
                q_ours[i],
                code.nearest_exhaustive(v),
                "{}[{i}]: not the nearest code",
                c.name
            );
            if q_ours[i] != q_bnb[i] {
                differing += 1;
                let near_midpoint = cv
                    .windows(2)
                    .any(|w| ((w[0] as f64 + w[1] as f64) / 2.0 - v as f64).abs() <= lut_bin);
                assert!(
                    near_midpoint,
                    "{}[{i}]: v={v} differs from bitsandbytes away from a midpoint",
                    c.name
                );
            }
        }
        total += x.len();
        let err_ours = rmse(&ours.dequantize(Kind::Float).unwrap(), &c.x);
        let err_bnb = rmse(&c.deq, &c.x);
        assert!(
            err_ours <= err_bnb,
            "{}: rmse {err_ours} > bitsandbytes {err_bnb}",
            c.name
        );
    }
    eprintln!(
        "q differs from bitsandbytes' CPU q on {differing} of {total} values ({:.3}%)",
        100.0 * differing as f64 / total as f64
    );
}

#[test]
fn torch_ops_path_equals_cpu_kernels() {
    let (_, cases) = cases();
    let code = QuantCode::dynamic_signed();
    for c in &cases {
        let fast = quant::quantize(&c.x, c.block, &code).unwrap();
        let ops = quant::blockwise::quantize_with_torch_ops(&c.x, c.block, &code).unwrap();
        assert!(bits_equal(&fast.absmax, &ops.absmax), "{}", c.name);
        assert_eq!(
            Vec::<u8>::try_from(&fast.q.flatten(0, -1)).unwrap(),
            Vec::<u8>::try_from(&ops.q.flatten(0, -1)).unwrap(),
            "{}",
            c.name
        );
    }
}

#[test]
fn streaming_quantization_equals_one_shot() {
    let (_, cases) = cases();
    let code = QuantCode::dynamic_signed();
    for c in cases.iter().filter(|c| c.block.get() <= 1024) {
        let one_shot = quant::quantize(&c.x, c.block, &code).unwrap();
        let x = f32s(&c.x);
        let sq = StreamingQuantizer::new(&code, c.block);
        // 3 blocks and change per chunk: rounded down to whole blocks, so many chunks.
        let out = sq
            .quantize(x.len(), 3 * c.block.get() + 17, true, |start, buf| {
                buf.copy_from_slice(&x[start..start + buf.len()]);
                Ok(())
            })
            .unwrap();
        assert_eq!(
            out.q,
            Vec::<u8>::try_from(&one_shot.q.flatten(0, -1)).unwrap(),
            "{}",
            c.name
        );
        assert_eq!(out.absmax, f32s(&one_shot.absmax), "{}", c.name);
        let err = out.error.unwrap();
        let deq = one_shot.dequantize(Kind::Float).unwrap();
        let want = (&deq - &c.x).square().sum(Kind::Double).double_value(&[])
            / c.x.square().sum(Kind::Double).double_value(&[]);
        assert!(
            (err.rel_mse() - want).abs() <= 1e-6 * want,
            "{}: {} vs {want}",
            c.name,
            err.rel_mse()
        );
    }
}

#[test]
fn fitted_code_beats_dynamic_code_on_weight_like_data() {
    let (_, cases) = cases();
    let dynamic = QuantCode::dynamic_signed();
    let mut checked = 0;
    for c in cases.iter().filter(|c| c.name.starts_with("weight_")) {
        let x = f32s(&c.x);
        let fitted = fit_code(&x, c.block, FitOptions::default()).unwrap();
        assert!(
            fitted.values().contains(&-1.0)
                && fitted.values().contains(&0.0)
                && fitted.values().contains(&1.0)
        );
        let e_dyn = rmse(
            &quant::quantize(&c.x, c.block, &dynamic)
                .unwrap()
                .dequantize(Kind::Float)
                .unwrap(),
            &c.x,
        );
        let e_fit = rmse(
            &quant::quantize(&c.x, c.block, &fitted)
                .unwrap()
                .dequantize(Kind::Float)
                .unwrap(),
            &c.x,
        );
        eprintln!(
            "{}: rmse dynamic {e_dyn:.3e}, fitted {e_fit:.3e} ({:.1}% lower)",
            c.name,
            100.0 * (1.0 - e_fit / e_dyn)
        );
        assert!(
            e_fit < e_dyn,
            "{}: fitted {e_fit} >= dynamic {e_dyn}",
            c.name
        );
        checked += 1;
    }
    assert!(checked >= 3);
}

#[test]
fn bad_inputs_get_typed_errors() {
    let code = QuantCode::dynamic_signed();
    let b = BlockSize::new(64).unwrap();
    let ints = Tensor::arange(100, (Kind::Int64, tch::Device::Cpu));
    assert!(matches!(
        quant::quantize(&ints, b, &code),
        Err(OctetError::UnsupportedDtype { .. })
    ));
    let t = Tensor::randn([64, 32], (Kind::Float, tch::Device::Cpu)).transpose(0, 1);
    assert!(matches!(
        quant::quantize(&t, b, &code),
        Err(OctetError::NotContiguous { .. })
    ));
    for n in [0, 32, 100, 8192, -64] {
        assert!(
            matches!(BlockSize::new(n), Err(OctetError::InvalidBlockSize(_))),
            "{n}"
        );
    }
    let x = Tensor::randn([1000], (Kind::Float, tch::Device::Cpu));
    let qz = quant::quantize(&x, b, &code).unwrap();
    let short = qz.absmax.narrow(0, 0, 10);
    assert!(matches!(
        quant::dequantize(&qz.q, &short, &code, b, Kind::Float),
        Err(OctetError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        QuantCode::from_tensor(&Tensor::zeros([255], (Kind::Float, tch::Device::Cpu))),
        Err(OctetError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        quant::dequantize(&x, &qz.absmax, &code, b, Kind::Float),
        Err(OctetError::UnsupportedDtype { .. })
    ));
    assert!(matches!(
        quant::dequantize(&qz.q, &qz.absmax, &code, b, Kind::Int),
        Err(OctetError::UnsupportedDtype { .. })
    ));
}

#[test]
fn embedding_rows_dequantize_like_the_full_table() {
    let x = Tensor::randn([37, 50], (Kind::Float, tch::Device::Cpu));
    let qz = quant::quantize(
        &x,
        BlockSize::new(64).unwrap(),
        &QuantCode::dynamic_signed(),
    )
    .unwrap();
    let full = qz.dequantize(Kind::Float).unwrap();
    let ids = Tensor::from_slice(&[3i64, 0, 36, 3, 17, 5]).reshape([2, 3]);
    let rows = qz.dequantize_rows(&ids, Kind::Float).unwrap();
    assert_eq!(rows.size(), [2, 3, 50]);
    assert!(bits_equal(
        &rows,
        &full
            .index_select(0, &ids.flatten(0, -1))
            .reshape([2, 3, 50])
    ));
    let bad = Tensor::from_slice(&[37i64]);
    assert!(qz.dequantize_rows(&bad, Kind::Float).is_err());
}

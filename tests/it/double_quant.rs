//! Double-quantized absmax against bitsandbytes 0.50's `compress_statistics=True`
//! (scripts/gen_double_quant_vectors.py).
use crate::common;

use octet::quant::double_quant::{quantize_blockwise_bnb, DoubleQuantized, GROUP};
use octet::quant::QuantCode;
use tch::{Kind, Tensor};

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn cases() -> Vec<(String, [Tensor; 5])> {
    let all = common::load_safetensors(&common::fixture("quant8/double_quant_vectors.safetensors"));
    let names: Vec<String> = all
        .keys()
        .filter_map(|k| k.strip_suffix(".group_absmax").map(str::to_string))
        .collect();
    assert!(names.len() >= 8, "{names:?}");
    names
        .into_iter()
        .map(|n| {
            let get = |s: &str| all[&format!("{n}.{s}")].shallow_clone();
            let parts = [
                get("absmax"),
                get("q"),
                get("group_absmax"),
                get("offset"),
                get("deq"),
            ];
            (n, parts)
        })
        .collect()
}

#[test]
fn quantized_scales_equal_bitsandbytes_bit_for_bit() {
    for (name, [absmax, q, scales, offset, _]) in cases() {
        let ours = DoubleQuantized::quantize(&f32s(&absmax));
        assert_eq!(
            ours.q,
            Vec::<u8>::try_from(&q).unwrap(),
            "{name}: q differs"
        );
        assert_eq!(
            bits(&ours.group_absmax),
            bits(&f32s(&scales)),
            "{name}: group absmax"
        );
        assert_eq!(
            ours.offset.to_bits(),
            f32s(&offset)[0].to_bits(),
            "{name}: offset"
        );
    }
}

#[test]
fn dequantizing_bitsandbytes_tables_is_bit_identical() {
    for (name, [_, q, scales, offset, deq]) in cases() {
        let dq = DoubleQuantized::from_tensors(&name, &q, &scales, &offset).unwrap();
        assert_eq!(bits(&dq.dequantize()), bits(&f32s(&deq)), "{name}");
        assert_eq!(dq.len(), q.numel());
        assert_eq!(dq.nbytes(), q.numel() + 4 * dq.group_absmax.len() + 4);
    }
}

#[test]
fn the_bitsandbytes_rounding_is_within_a_grid_step_of_the_nearest_code() {
    // An independent check of the rounding rule on values bitsandbytes never saw.
    let code = QuantCode::dynamic_signed();
    let x: Vec<f32> = (0..5000)
        .map(|i| ((i as f32) * 0.7123).sin() * (1.0 + (i % 7) as f32))
        .collect();
    let (q, absmax) = quantize_blockwise_bnb(&x, GROUP, &code);
    for (i, (&v, &qi)) in x.iter().zip(&q).enumerate() {
        let n = v * (1.0 / absmax[i / GROUP]);
        let exact = code.nearest_exhaustive(n);
        if exact != qi {
            let (a, b) = (code.values()[qi as usize], code.values()[exact as usize]);
            let mid = (a + b) / 2.0;
            assert!(
                (n - mid).abs() <= 2.0 / 65535.0,
                "element {i}: {n} -> {qi}, nearest {exact}"
            );
        }
    }
}

#[test]
fn a_corrupted_table_is_refused_with_its_name() {
    let (name, [_, q, scales, offset, _]) = cases().remove(0);
    let short = scales.narrow(0, 0, scales.size()[0] - 1);
    let err = DoubleQuantized::from_tensors("h.0.attn.q_proj.absmax", &q, &short, &offset)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("h.0.attn.q_proj.absmax") && err.contains("group"),
        "{name}: {err}"
    );
    let two = Tensor::from_slice(&[0f32, 1.0]);
    assert!(DoubleQuantized::from_tensors("x", &q, &scales, &two).is_err());
    assert!(DoubleQuantized::from_tensors("x", &scales, &scales, &offset).is_err());
}

#![no_main]
#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (_dir, p) = common::as_file("pytorch_model.bin", data);
    if let Ok(f) = octet::io::torch_bin::TorchBinFile::open(&p) {
        common::read_all(&f);
    }
});

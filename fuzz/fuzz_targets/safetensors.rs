#![no_main]
#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (_dir, p) = common::as_file("x.safetensors", data);
    if let Ok(f) = octet::io::safetensors::SafetensorsFile::open(&p) {
        common::read_all(&f);
    }
});

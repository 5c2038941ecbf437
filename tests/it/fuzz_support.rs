//! The machinery of the mutation fuzzer: seeded mutations of valid files, and a run loop that
//! catches panics and watches peak memory.
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// How a file is mutated: as bytes, as text (JSON/TOML), or as a safetensors file whose JSON
/// header is mutated as text with its length prefix kept right (to reach past the parser).
#[derive(Clone, Copy, Debug)]
pub enum Style {
    Binary,
    Text,
    Safetensors,
}

/// What a target runs on its work folder.
pub type RunFn = Box<dyn Fn(&Path) -> octet::Result<()>>;

/// A panic hook, as `std::panic::take_hook` returns it.
type Hook = Box<dyn Fn(&panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

/// One reader or loader under test: a work folder holding valid files, the one mutated, and
/// what to run on the folder.
pub struct Target {
    pub name: &'static str,
    pub dir: PathBuf,
    pub file: &'static str,
    pub style: Style,
    /// Relative share of the cases (expensive loaders get fewer).
    pub weight: usize,
    pub run: RunFn,
    seed: Vec<u8>,
}

impl Target {
    pub fn new(
        name: &'static str,
        dir: PathBuf,
        file: &'static str,
        style: Style,
        weight: usize,
        run: impl Fn(&Path) -> octet::Result<()> + 'static,
    ) -> Self {
        let seed = std::fs::read(dir.join(file)).expect("seed file");
        Target {
            name,
            dir,
            file,
            style,
            weight,
            run: Box::new(run),
            seed,
        }
    }
}

const HUGE_U64: [u64; 8] = [
    u64::MAX,
    1 << 63,
    (1 << 63) - 1,
    1 << 32,
    u32::MAX as u64,
    1 << 31,
    1 << 40,
    0,
];
const NUMBERS: [&str; 14] = [
    "1e999",
    "-1e999",
    "-1",
    "NaN",
    "Infinity",
    "18446744073709551616",
    "18446744073709551615",
    "9223372036854775807",
    "4294967296",
    "2147483648",
    "100000000",
    "0",
    "-0.0",
    "1.5",
];
const DTYPES: [&str; 8] = ["F32", "I32", "U8", "BOOL", "F64", "I64", "F8_E4M3", "XX"];
const NON_FINITE_F32: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];

/// Applies 1–4 random mutations to `data`.
pub fn mutate(rng: &mut fastrand::Rng, data: &[u8], style: Style) -> Vec<u8> {
    let mut d = data.to_vec();
    for _ in 0..rng.usize(1..=4) {
        match style {
            Style::Binary => binary_mutation(rng, &mut d),
            Style::Text => {
                if rng.bool() {
                    text_mutation(rng, &mut d)
                } else {
                    binary_mutation(rng, &mut d)
                }
            }
            Style::Safetensors => {
                if rng.u8(0..3) == 0 {
                    binary_mutation(rng, &mut d)
                } else {
                    header_mutation(rng, &mut d)
                }
            }
        }
    }
    d
}

fn binary_mutation(rng: &mut fastrand::Rng, d: &mut Vec<u8>) {
    if d.is_empty() {
        d.push(rng.u8(..));
        return;
    }
    let at = rng.usize(..d.len());
    match rng.u8(0..9) {
        0 => d[at] ^= 1 << rng.u8(0..8),
        1 => d[at] = [0, 0xff, 0x7f, 0x80][rng.usize(0..4)],
        2 => {
            let v = HUGE_U64[rng.usize(..HUGE_U64.len())].to_le_bytes();
            let n = if rng.bool() { 8 } else { 4 };
            overwrite(d, at, &v[..n]);
        }
        3 => {
            let v = NON_FINITE_F32[rng.usize(..3)].to_le_bytes();
            // Aligned to 4 bytes from the end half of the time: lands inside f32 data.
            let at = if rng.bool() { at & !3 } else { at };
            overwrite(d, at, &v);
        }
        4 => d.truncate(at),
        5 => {
            let end = (at + rng.usize(1..=64)).min(d.len());
            let chunk = d[at..end].to_vec();
            let to = rng.usize(..=d.len());
            d.splice(to..to, chunk);
        }
        6 => {
            let end = (at + rng.usize(1..=64)).min(d.len());
            d.drain(at..end);
        }
        7 => {
            d.splice(at..at, [0xff, 0xfe, 0xc0]);
        }
        _ => {
            // bf16/f16 infinity patterns.
            let v: [u8; 2] = if rng.bool() {
                [0x80, 0x7f]
            } else {
                [0x00, 0x7c]
            };
            overwrite(d, at & !1, &v);
        }
    }
}

fn overwrite(d: &mut [u8], at: usize, v: &[u8]) {
    let n = v.len().min(d.len() - at.min(d.len()));
    d[at..at + n].copy_from_slice(&v[..n]);
}

/// Replaces a number, a dtype name or a span of the text, or inserts non-UTF-8 bytes.
fn text_mutation(rng: &mut fastrand::Rng, d: &mut Vec<u8>) {
    if d.is_empty() {
        return;
    }
    let at = rng.usize(..d.len());
    match rng.u8(0..4) {
        0 => {
            // The number at or after `at`.
            if let Some(start) = (at..d.len()).find(|&i| d[i].is_ascii_digit()) {
                let end = (start..d.len())
                    .find(|&i| !(d[i].is_ascii_digit() || b".eE+-".contains(&d[i])))
                    .unwrap_or(d.len());
                let n = NUMBERS[rng.usize(..NUMBERS.len())].as_bytes();
                d.splice(start..end, n.iter().copied());
            }
        }
        1 => {
            let found: Vec<usize> = DTYPES
                .iter()
                .filter_map(|t| {
                    let needle = format!("\"{t}\"");
                    d.windows(needle.len()).position(|w| w == needle.as_bytes())
                })
                .collect();
            if let Some(&pos) = found.get(rng.usize(..found.len().max(1))) {
                let end = pos + 1 + d[pos + 1..].iter().position(|&b| b == b'"').unwrap_or(0);
                let t = DTYPES[rng.usize(..DTYPES.len())].as_bytes();
                d.splice(pos + 1..end, t.iter().copied());
            }
        }
        2 => {
            d.splice(at..at, [0xff, 0xc3, 0x28]);
        }
        _ => {
            let end = (at + rng.usize(1..=16)).min(d.len());
            d.drain(at..end);
        }
    }
}

fn header_mutation(rng: &mut fastrand::Rng, d: &mut Vec<u8>) {
    let n = d
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize);
    match n {
        Some(n) if n > 0 && n.checked_add(8).is_some_and(|end| end <= d.len()) => {
            let mut header = d[8..8 + n].to_vec();
            text_mutation(rng, &mut header);
            let rest = d[8 + n..].to_vec();
            d.clear();
            d.extend_from_slice(&(header.len() as u64).to_le_bytes());
            d.extend_from_slice(&header);
            d.extend_from_slice(&rest);
        }
        _ => binary_mutation(rng, d),
    }
}

/// Peak resident memory of this process (VmHWM), in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A panic caught while running one case.
pub struct Finding {
    pub target: &'static str,
    pub case: usize,
    pub message: String,
    pub input: PathBuf,
}

/// What a run did.
pub struct Report {
    pub cases: usize,
    pub errors: usize,
    pub per_target: Vec<(&'static str, usize)>,
    pub findings: Vec<Finding>,
    pub seconds: f64,
    pub rss_growth_kib: u64,
}

/// Runs `cases` mutated inputs spread over `targets` by weight, from `seed`. Panics are
/// caught (the panic hook is silenced for the run and restored after) and the input that
/// caused each is kept under `keep`.
pub fn run(targets: &[Target], cases: usize, seed: u64, keep: &Path) -> Report {
    let mut rng = fastrand::Rng::with_seed(seed);
    let total_weight: usize = targets.iter().map(|t| t.weight).sum();
    let mut per_target: Vec<(&'static str, usize)> = targets.iter().map(|t| (t.name, 0)).collect();
    let mut findings = Vec::new();
    let mut errors = 0;
    let trace = std::env::var_os("OCTET_FUZZ_TRACE").is_some();
    let rss_before = peak_rss_kib();
    let started = std::time::Instant::now();
    let last_message = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    // Restores the previous hook however the run ends (a failing write must still report).
    struct RestoreHook(Option<Hook>);
    impl Drop for RestoreHook {
        fn drop(&mut self) {
            // The hook cannot be changed while unwinding; the run has failed then anyway.
            if std::thread::panicking() {
                return;
            }
            if let Some(h) = self.0.take() {
                panic::set_hook(h);
            }
        }
    }
    let restore = RestoreHook(Some(panic::take_hook()));
    {
        let last = last_message.clone();
        panic::set_hook(Box::new(move |info| {
            let loc = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            if trace {
                eprintln!(
                    "fuzz-trace: panic: {msg}{loc}\n{}",
                    std::backtrace::Backtrace::force_capture()
                );
            }
            *last.lock().unwrap_or_else(|e| e.into_inner()) = format!("{msg}{loc}");
        }));
    }
    for case in 0..cases {
        let mut pick = rng.usize(..total_weight);
        let ti = targets
            .iter()
            .position(|t| {
                if pick < t.weight {
                    true
                } else {
                    pick -= t.weight;
                    false
                }
            })
            .unwrap_or(0);
        let t = &targets[ti];
        per_target[ti].1 += 1;
        let input = mutate(&mut rng, &t.seed, t.style);
        let path = t.dir.join(t.file);
        std::fs::write(&path, &input).expect("write the mutated file");
        if trace {
            // For aborts no unwinding can catch: the last line names the input.
            eprintln!("fuzz-trace: case {case} {} ({} bytes)", t.name, input.len());
            let _ = std::fs::create_dir_all(keep);
            let _ = std::fs::rename(keep.join("last-input"), keep.join("previous-input"));
            let _ = std::fs::write(keep.join("last-input"), &input);
        }
        match panic::catch_unwind(AssertUnwindSafe(|| (t.run)(&t.dir))) {
            Ok(Ok(())) => {}
            Ok(Err(_)) => errors += 1,
            Err(_) => {
                let kept = keep.join(format!("{}-{case}", t.name.replace([' ', '/'], "_")));
                let _ = std::fs::create_dir_all(keep);
                let _ = std::fs::write(&kept, &input);
                findings.push(Finding {
                    target: t.name,
                    case,
                    message: last_message
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                    input: kept,
                });
            }
        }
    }
    drop(restore);
    for t in targets {
        std::fs::write(t.dir.join(t.file), &t.seed).expect("restore the seed file");
    }
    Report {
        cases,
        errors,
        per_target,
        findings,
        seconds: started.elapsed().as_secs_f64(),
        rss_growth_kib: peak_rss_kib().saturating_sub(rss_before),
    }
}

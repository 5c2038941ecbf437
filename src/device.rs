//! Devices: parsing `--device`, choosing one for `auto`, and what the CUDA runtime can tell
//! about a GPU (name, memory, compute capability) beyond what libtorch exposes.
//!
//! libtorch reports whether CUDA is usable and how many devices there are. Everything else is
//! asked of the CUDA driver (`libcuda.so.1`) and runtime (`libcudart`) through `dlopen` at run
//! time, so the binary starts and reports sensibly on a machine without a driver or a GPU:
//! every query returns `None` (or says why) instead of failing.
use crate::error::{OctetError, Result};
use libloading::Library;
use std::ffi::{c_char, c_int, c_uint, CStr};
use std::sync::OnceLock;
use tch::Device;

/// What the user asked for with `--device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// cuda:0 when CUDA is available, else the CPU.
    Auto,
    /// A concrete device.
    Exact(Device),
}

impl std::str::FromStr for DeviceRequest {
    type Err = OctetError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Exact(Device::Cpu)),
            "cuda" => Ok(DeviceRequest::Exact(Device::Cuda(0))),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceRequest::Exact(Device::Cuda(n))),
                _ => Err(OctetError::InvalidArgument(format!(
                    "unknown device '{other}': expected auto, cpu, cuda or cuda:N \
                     (`octet env` lists the devices this machine has)"
                ))),
            },
        }
    }
}

/// A device's name as the flags spell it (`cpu`, `cuda:0`).
pub fn name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Resolves a request to a device that exists here, or explains why it cannot.
pub fn resolve(request: DeviceRequest) -> Result<Device> {
    match request {
        DeviceRequest::Auto => Ok(if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }),
        DeviceRequest::Exact(Device::Cuda(n)) => {
            if !tch::Cuda::is_available() {
                return Err(OctetError::InvalidArgument(format!(
                    "--device cuda:{n}: CUDA is not available here ({}); run `octet env` for \
                     details, or use --device cpu",
                    cuda_unavailable_reason()
                )));
            }
            let count = tch::Cuda::device_count().max(0) as usize;
            if n >= count {
                return Err(OctetError::InvalidArgument(format!(
                    "--device cuda:{n}: this machine has {count} CUDA device{} (cuda:0{}); \
                     run `octet env` to list them",
                    if count == 1 { "" } else { "s" },
                    if count > 1 {
                        format!("..cuda:{}", count - 1)
                    } else {
                        String::new()
                    }
                )));
            }
            Ok(Device::Cuda(n))
        }
        DeviceRequest::Exact(d) => Ok(d),
    }
}

/// Parses and resolves a `--device` value; `auto` prints its choice on stderr.
pub fn from_flag(s: &str) -> Result<Device> {
    let request: DeviceRequest = s.parse()?;
    let device = resolve(request)?;
    if request == DeviceRequest::Auto {
        eprintln!("device: {} (auto)", name(device));
    }
    Ok(device)
}

/// Help text of a `--device` flag.
pub const FLAG_HELP: &str =
    "auto, cpu, cuda or cuda:N; auto picks cuda:0 when a GPU is usable, else the CPU";

/// Parses a `--dtype` value: `f32`, `bf16` or `f16` (or their long names).
pub fn parse_dtype(s: &str) -> Result<tch::Kind> {
    match s {
        "f32" | "float32" => Ok(tch::Kind::Float),
        "bf16" | "bfloat16" => Ok(tch::Kind::BFloat16),
        "f16" | "float16" => Ok(tch::Kind::Half),
        o => Err(OctetError::InvalidArgument(format!(
            "unknown dtype '{o}': expected f32, bf16 or f16"
        ))),
    }
}

/// Whether this binary was linked against libtorch's CUDA libraries.
pub fn cuda_linked() -> bool {
    option_env!("OCTET_LINKED_CUDA").is_some() || loaded_library("libtorch_cuda.so").is_some()
}

/// The path of a loaded shared library whose file name starts with `prefix`, from
/// `/proc/self/maps` (Linux).
pub fn loaded_library(prefix: &str) -> Option<std::path::PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(std::path::Path::new)
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(prefix))
        })
        .map(|p| p.to_path_buf())
}

/// Why CUDA is not available, in a few words (meaningful only when it is not).
pub fn cuda_unavailable_reason() -> String {
    if !cuda_linked() {
        return "this octet was built against a CPU-only libtorch".into();
    }
    let Some(driver) = Driver::get() else {
        return "no NVIDIA driver (libcuda.so.1 cannot be loaded)".into();
    };
    match driver.device_count() {
        Ok(0) => "the NVIDIA driver sees no device".into(),
        Ok(n) => format!("the driver sees {n} device(s) but libtorch cannot use them"),
        Err(e) => format!("the NVIDIA driver reports: {e}"),
    }
}

/// One GPU as the driver describes it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GpuInfo {
    /// Index (`cuda:N`).
    pub index: usize,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Total memory in bytes.
    pub total_bytes: u64,
    /// Free memory in bytes (through the runtime; `None` if it cannot be told).
    pub free_bytes: Option<u64>,
    /// Compute capability (major, minor).
    pub capability: (i32, i32),
}

/// Every GPU the driver reports (empty without a driver).
pub fn gpus() -> Vec<GpuInfo> {
    let Some(driver) = Driver::get() else {
        return Vec::new();
    };
    let n = driver.device_count().unwrap_or(0);
    (0..n)
        .filter_map(|i| {
            let (name, total, capability) = driver.describe(i)?;
            Some(GpuInfo {
                index: i,
                name,
                total_bytes: total,
                free_bytes: mem_info(i).map(|(free, _)| free),
                capability,
            })
        })
        .collect()
}

/// CUDA driver version as (major, minor), when a driver is present.
pub fn driver_version() -> Option<(i32, i32)> {
    Driver::get()?.version()
}

/// CUDA runtime (libcudart) version as (major, minor), when it can be loaded.
pub fn runtime_version() -> Option<(i32, i32)> {
    let rt = Runtime::get()?;
    let mut v: c_int = 0;
    // SAFETY: cudaRuntimeGetVersion writes one int through a valid pointer; it needs no device.
    let err = unsafe { (rt.runtime_get_version)(&mut v) };
    (err == 0 && v > 0).then_some(split_version(v))
}

/// cuDNN version as (major, minor, patch), when libcudnn is loaded or loadable.
pub fn cudnn_version() -> Option<(u64, u64, u64)> {
    let lib = open_first(&["libcudnn.so.9", "libcudnn.so.8", "libcudnn.so"])?;
    // SAFETY: cudnnGetVersion takes no arguments and returns a size_t; the symbol has that
    // type in every cuDNN release.
    let v = unsafe {
        let f = lib
            .get::<unsafe extern "C" fn() -> usize>(b"cudnnGetVersion\0")
            .ok()?;
        f()
    } as u64;
    // cuDNN 9 encodes major·10000 + minor·100 + patch; 8 used major·1000 + minor·100 + patch.
    Some(if v >= 90000 {
        (v / 10000, (v % 10000) / 100, v % 100)
    } else {
        (v / 1000, (v % 1000) / 100, v % 100)
    })
}

/// (free, total) bytes of GPU `index`, from `cudaMemGetInfo`; `None` without a usable GPU.
pub fn mem_info(index: usize) -> Option<(u64, u64)> {
    // Without a driver the runtime would fail anyway; asking it first keeps a CPU-only run from
    // initialising CUDA at all.
    Driver::get()?;
    let rt = Runtime::get()?;
    let (mut free, mut total) = (0usize, 0usize);
    let mut previous: c_int = 0;
    // SAFETY: these runtime calls take plain ints and valid out-pointers; the current device
    // is restored afterwards so libtorch's own device guard is not disturbed.
    unsafe {
        if (rt.get_device)(&mut previous) != 0 {
            return None;
        }
        if (rt.set_device)(index as c_int) != 0 {
            return None;
        }
        let err = (rt.mem_get_info)(&mut free, &mut total);
        (rt.set_device)(previous);
        (err == 0).then_some((free as u64, total as u64))
    }
}

/// Bytes in use on GPU `index` (total − free): the CUDA context plus everything libtorch's
/// caching allocator holds. The allocator keeps freed blocks reserved, so sampled after a
/// training step this is the step's high-water mark.
pub fn used_bytes(index: usize) -> Option<u64> {
    mem_info(index).map(|(free, total)| total.saturating_sub(free))
}

fn split_version(v: c_int) -> (i32, i32) {
    (v / 1000, (v % 1000) / 10)
}

fn open_first(names: &[&str]) -> Option<Library> {
    names.iter().find_map(|n| {
        // SAFETY: loading a vendor library runs its initialisers; the NVIDIA libraries named
        // here have none that depend on the caller's state.
        unsafe { Library::new(n) }.ok()
    })
}

type CuResult = c_int;

/// The few CUDA driver entry points used here.
struct Driver {
    _lib: Library,
    device_count: unsafe extern "C" fn(*mut c_int) -> CuResult,
    device_get: unsafe extern "C" fn(*mut c_int, c_int) -> CuResult,
    device_name: unsafe extern "C" fn(*mut c_char, c_int, c_int) -> CuResult,
    device_total_mem: unsafe extern "C" fn(*mut usize, c_int) -> CuResult,
    device_attribute: unsafe extern "C" fn(*mut c_int, c_int, c_int) -> CuResult,
    driver_version: unsafe extern "C" fn(*mut c_int) -> CuResult,
}

/// `CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR` / `_MINOR`.
const ATTR_CC_MAJOR: c_int = 75;
const ATTR_CC_MINOR: c_int = 76;

impl Driver {
    /// The driver, loaded and initialised once; `None` when absent or `cuInit` fails.
    fn get() -> Option<&'static Driver> {
        static DRIVER: OnceLock<Option<Driver>> = OnceLock::new();
        DRIVER.get_or_init(Driver::load).as_ref()
    }

    fn load() -> Option<Driver> {
        let lib = open_first(&["libcuda.so.1", "libcuda.so"])?;
        // SAFETY: each symbol is looked up with the signature of the CUDA driver API
        // (cuda.h: CUresult is an int enum, CUdevice an int, sizes are size_t); the function
        // pointers are kept only as long as `lib`, which this struct owns.
        unsafe {
            let init = *lib
                .get::<unsafe extern "C" fn(c_uint) -> CuResult>(b"cuInit\0")
                .ok()?;
            if init(0) != 0 {
                return None;
            }
            let d = Driver {
                device_count: *lib.get(b"cuDeviceGetCount\0").ok()?,
                device_get: *lib.get(b"cuDeviceGet\0").ok()?,
                device_name: *lib.get(b"cuDeviceGetName\0").ok()?,
                device_total_mem: *lib.get(b"cuDeviceTotalMem_v2\0").ok()?,
                device_attribute: *lib.get(b"cuDeviceGetAttribute\0").ok()?,
                driver_version: *lib.get(b"cuDriverGetVersion\0").ok()?,
                _lib: lib,
            };
            Some(d)
        }
    }

    fn device_count(&self) -> std::result::Result<usize, String> {
        let mut n: c_int = 0;
        // SAFETY: one int written through a valid pointer.
        let err = unsafe { (self.device_count)(&mut n) };
        if err == 0 {
            Ok(n.max(0) as usize)
        } else {
            Err(format!("cuDeviceGetCount error {err}"))
        }
    }

    fn version(&self) -> Option<(i32, i32)> {
        let mut v: c_int = 0;
        // SAFETY: one int written through a valid pointer.
        let err = unsafe { (self.driver_version)(&mut v) };
        (err == 0 && v > 0).then_some(split_version(v))
    }

    /// (name, total bytes, compute capability) of device `index`.
    fn describe(&self, index: usize) -> Option<(String, u64, (i32, i32))> {
        let mut dev: c_int = 0;
        let mut name = [0 as c_char; 256];
        let mut total = 0usize;
        let (mut major, mut minor) = (0 as c_int, 0 as c_int);
        // SAFETY: out-pointers are valid for the sizes passed (256 bytes for the name, which
        // the driver NUL-terminates within that length); `dev` comes from cuDeviceGet.
        unsafe {
            if (self.device_get)(&mut dev, index as c_int) != 0
                || (self.device_name)(name.as_mut_ptr(), name.len() as c_int, dev) != 0
                || (self.device_total_mem)(&mut total, dev) != 0
                || (self.device_attribute)(&mut major, ATTR_CC_MAJOR, dev) != 0
                || (self.device_attribute)(&mut minor, ATTR_CC_MINOR, dev) != 0
            {
                return None;
            }
            let name = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
            Some((name, total as u64, (major, minor)))
        }
    }
}

/// The few CUDA runtime entry points used here.
struct Runtime {
    _lib: Library,
    runtime_get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    mem_get_info: unsafe extern "C" fn(*mut usize, *mut usize) -> c_int,
    get_device: unsafe extern "C" fn(*mut c_int) -> c_int,
    set_device: unsafe extern "C" fn(c_int) -> c_int,
}

impl Runtime {
    fn get() -> Option<&'static Runtime> {
        static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
        RUNTIME.get_or_init(Runtime::load).as_ref()
    }

    fn load() -> Option<Runtime> {
        // libtorch_cuda already loaded the runtime it was built with; asking by soname finds
        // that copy first.
        let lib = open_first(&["libcudart.so.13", "libcudart.so.12", "libcudart.so"])?;
        // SAFETY: symbols looked up with the CUDA runtime API's signatures (cudaError_t is an
        // int enum); the pointers live as long as `lib`, owned by the struct.
        unsafe {
            Some(Runtime {
                runtime_get_version: *lib.get(b"cudaRuntimeGetVersion\0").ok()?,
                mem_get_info: *lib.get(b"cudaMemGetInfo\0").ok()?,
                get_device: *lib.get(b"cudaGetDevice\0").ok()?,
                set_device: *lib.get(b"cudaSetDevice\0").ok()?,
                _lib: lib,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_spelling_and_refuses_others() {
        let p = |s: &str| s.parse::<DeviceRequest>();
        assert_eq!(p("auto").unwrap(), DeviceRequest::Auto);
        assert_eq!(p("cpu").unwrap(), DeviceRequest::Exact(Device::Cpu));
        assert_eq!(p("cuda").unwrap(), DeviceRequest::Exact(Device::Cuda(0)));
        assert_eq!(p("cuda:3").unwrap(), DeviceRequest::Exact(Device::Cuda(3)));
        for bad in ["tpu", "cuda:", "cuda:-1", "cuda:x", ""] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains("octet env"), "{bad}: {e}");
        }
    }

    #[test]
    fn names_round_trip() {
        for d in [Device::Cpu, Device::Cuda(0), Device::Cuda(2)] {
            assert_eq!(
                name(d).parse::<DeviceRequest>().unwrap(),
                DeviceRequest::Exact(d)
            );
        }
    }

    #[test]
    fn queries_never_fail_hard() {
        // Whatever this machine has, the queries answer without panicking, and agree with
        // libtorch on whether there is a GPU.
        let gpus = gpus();
        if tch::Cuda::is_available() {
            assert_eq!(gpus.len() as i64, tch::Cuda::device_count());
            assert!(mem_info(0).is_some());
        } else {
            assert!(!cuda_unavailable_reason().is_empty());
            assert!(resolve(DeviceRequest::Exact(Device::Cuda(0))).is_err());
            assert_eq!(resolve(DeviceRequest::Auto).unwrap(), Device::Cpu);
        }
        let _ = (runtime_version(), driver_version(), cudnn_version());
    }
}

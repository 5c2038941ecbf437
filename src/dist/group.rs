//! The safe face of the C++ shim (`shim.cpp`): one c10d process group and its collectives.
use crate::error::{OctetError, Result};
use std::ffi::{c_char, c_int, c_longlong, c_void, CStr, CString};
use std::time::Duration;
use tch::Tensor;

/// The shim's process group (opaque).
#[repr(C)]
struct OctetGroup {
    _private: [u8; 0],
}

extern "C" {
    fn octet_dist_has_nccl() -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn octet_dist_new(
        backend: c_int,
        file: *const c_char,
        host: *const c_char,
        port: c_int,
        serve_store: c_int,
        rank: c_int,
        world: c_int,
        prefix: *const c_char,
        timeout_ms: c_longlong,
        err: *mut c_char,
        err_len: usize,
    ) -> *mut OctetGroup;
    fn octet_dist_free(g: *mut OctetGroup);
    fn octet_dist_all_reduce(
        g: *mut OctetGroup,
        t: *mut c_void,
        op: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn octet_dist_broadcast(
        g: *mut OctetGroup,
        t: *mut c_void,
        root: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

const ERR_LEN: usize = 4096;

/// Whether this build can make NCCL groups (libtorch with CUDA, and its headers, at build time).
pub fn has_nccl() -> bool {
    // SAFETY: a constant query without arguments.
    unsafe { octet_dist_has_nccl() == 1 }
}

/// Where the ranks meet.
pub enum Rendezvous<'a> {
    /// A TCPStore at `host:port`, served by this process when `serve`.
    Tcp {
        /// Host of the store.
        host: &'a str,
        /// Its port.
        port: u16,
        /// Whether this process hosts it.
        serve: bool,
    },
    /// A FileStore at this path (a shared filesystem; no port).
    File(&'a str),
}

/// A live process group.
pub struct Group {
    ptr: *mut OctetGroup,
}

fn c_string(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| OctetError::Distributed(format!("{what} contains a NUL byte")))
}

/// The message the shim wrote into `buf`.
fn message(buf: &[c_char]) -> String {
    // SAFETY: the shim always NUL-terminates within the buffer, which starts zeroed.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

impl Group {
    /// Joins (or, for rank 0 of a TCP rendezvous, hosts) the group. `nccl` picks NCCL over
    /// Gloo; `prefix` keeps this attempt's store keys apart from an earlier attempt's.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        nccl: bool,
        rendezvous: &Rendezvous,
        rank: usize,
        world: usize,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let (file, host, port, serve) = match rendezvous {
            Rendezvous::Tcp { host, port, serve } => ("", *host, *port, *serve),
            Rendezvous::File(path) => (*path, "", 0, false),
        };
        let (file, host) = (
            c_string("the store path", file)?,
            c_string("the host", host)?,
        );
        let prefix = c_string("the store prefix", prefix)?;
        let mut err = vec![0 as c_char; ERR_LEN];
        let timeout_ms = timeout.as_millis().min(i64::MAX as u128) as c_longlong;
        // SAFETY: every pointer is a live NUL-terminated string or the error buffer of
        // ERR_LEN bytes; the shim copies what it keeps.
        let ptr = unsafe {
            octet_dist_new(
                c_int::from(nccl),
                file.as_ptr(),
                host.as_ptr(),
                c_int::from(port),
                c_int::from(serve),
                rank as c_int,
                world as c_int,
                prefix.as_ptr(),
                timeout_ms,
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        if ptr.is_null() {
            return Err(OctetError::Distributed(message(&err)));
        }
        Ok(Group { ptr })
    }

    fn check(&self, what: &str, rc: c_int, err: &[c_char]) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        Err(OctetError::Distributed(format!(
            "{what} failed (another rank has probably stopped): {}",
            message(err)
        )))
    }

    /// In-place all-reduce of a dense contiguous tensor: sum, or max when `max`.
    pub fn all_reduce(&self, t: &mut Tensor, max: bool) -> Result<()> {
        let mut err = vec![0 as c_char; ERR_LEN];
        // SAFETY: `self.ptr` is live until drop. A tch tensor's pointer is libtorch's
        // `torch::Tensor*` (torch-sys's `typedef torch::Tensor *tensor`), which is what the
        // shim takes; it only borrows it for the call (the collective completes first).
        let rc = unsafe {
            octet_dist_all_reduce(
                self.ptr,
                t.as_mut_ptr().cast::<c_void>(),
                c_int::from(max),
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        self.check("all-reduce", rc, &err)
    }

    /// In-place broadcast of a dense contiguous tensor from rank `root`.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        let mut err = vec![0 as c_char; ERR_LEN];
        // SAFETY: as in `all_reduce`.
        let rc = unsafe {
            octet_dist_broadcast(
                self.ptr,
                t.as_mut_ptr().cast::<c_void>(),
                root as c_int,
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        self.check("broadcast", rc, &err)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `octet_dist_new` and is freed once, here.
        unsafe { octet_dist_free(self.ptr) }
    }
}

//! oneDNN, loaded at run time: the matrix-multiply library PyTorch uses on x86 CPUs, which picks
//! its kernels by CPU feature when it runs (AVX2, AVX-512, AVX512-BF16, AMX tiles). The library
//! is opened with `dlopen` on its soname (`libdnnl.so.2`, oneDNN 2.x's C API, Debian's
//! `libdnnl2`), so a build never needs it and a machine without it keeps the engine's own
//! kernels; [`crate::onednn`] is the safe layer that decides and says which one runs.
//!
//! What is here: the dozen C functions used, declared by hand; a weight reordered once into the
//! layout oneDNN's matmul prefers for it ([`Weight`]); and the product `x @ W` (f32 `x`, f32 or
//! bf16 `W`, f32 out), with primitives cached per shape. Every call uses a user-provided
//! scratchpad, so primitives may run from several threads at once. oneDNN's OpenMP threads are
//! set per call to the caller's thread count.
//!
//! What it must never do: return a result computed by anything but the primitive it created
//! (no silent fallback here: errors go up), or outlive the library (it is never unloaded).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

type Status = c_int;
type Handle = *mut c_void;

// Values from oneDNN 2.x's `dnnl_types.h`.
const SUCCESS: Status = 0;
const ENGINE_CPU: c_int = 1;
const STREAM_DEFAULT_FLAGS: c_uint = 1;
const DT_BF16: c_int = 2;
const DT_F32: c_int = 3;
const TAG_ANY: c_int = 1;
const TAG_AB: c_int = 3;
const TAG_BA: c_int = 22;
const QUERY_IMPL_INFO_STR: c_int = 8;
const QUERY_SRC_MD: c_int = 129;
const QUERY_WEIGHTS_MD: c_int = 131;
const QUERY_DST_MD: c_int = 133;
const QUERY_SCRATCHPAD_MD: c_int = 136;
const ARG_SRC: c_int = 1;
const ARG_DST: c_int = 17;
const ARG_WEIGHTS: c_int = 33;
const ARG_SCRATCHPAD: c_int = 80;
const SCRATCHPAD_MODE_USER: c_int = 1;
const MAX_NDIMS: usize = 12;
/// The soname of oneDNN 2.x, whose C API this module declares.
pub const SONAME: &str = "libdnnl.so.2";

/// `dnnl_memory_desc_t`, a plain struct in oneDNN 2.x (696 bytes in 2.6): the library writes it,
/// we only pass pointers, so a larger buffer is safe. Copies of a descriptor the library owns
/// are never made (its size is not ours to assume); the owning primitive descriptor is kept.
#[repr(C, align(8))]
struct MemoryDesc([u8; 1024]);

/// `dnnl_matmul_desc_t` / reorder descriptors (2,800 bytes in 2.6), written by the library.
#[repr(C, align(8))]
struct OpDesc([u8; 4096]);

#[repr(C)]
struct ExecArg {
    arg: c_int,
    memory: Handle,
}

#[repr(C)]
struct Version {
    major: c_int,
    minor: c_int,
    patch: c_int,
    hash: *const c_char,
    cpu_runtime: c_uint,
    gpu_runtime: c_uint,
}

type Dims = [i64; MAX_NDIMS];

/// The C functions used, resolved once.
struct Api {
    effective_cpu_isa: unsafe extern "C" fn() -> c_int,
    engine_create: unsafe extern "C" fn(*mut Handle, c_int, usize) -> Status,
    stream_create: unsafe extern "C" fn(*mut Handle, Handle, c_uint) -> Status,
    stream_wait: unsafe extern "C" fn(Handle) -> Status,
    stream_destroy: unsafe extern "C" fn(Handle) -> Status,
    md_init_by_tag:
        unsafe extern "C" fn(*mut MemoryDesc, c_int, *const i64, c_int, c_int) -> Status,
    md_get_size: unsafe extern "C" fn(*const MemoryDesc) -> usize,
    matmul_desc_init: unsafe extern "C" fn(
        *mut OpDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
        *const MemoryDesc,
    ) -> Status,
    attr_create: unsafe extern "C" fn(*mut Handle) -> Status,
    attr_destroy: unsafe extern "C" fn(Handle) -> Status,
    attr_set_scratchpad_mode: unsafe extern "C" fn(Handle, c_int) -> Status,
    pd_create: unsafe extern "C" fn(*mut Handle, *const OpDesc, Handle, Handle, Handle) -> Status,
    reorder_pd_create: unsafe extern "C" fn(
        *mut Handle,
        *const MemoryDesc,
        Handle,
        *const MemoryDesc,
        Handle,
        Handle,
    ) -> Status,
    pd_query: unsafe extern "C" fn(Handle, c_int, c_int, *mut c_void) -> Status,
    pd_query_md: unsafe extern "C" fn(Handle, c_int, c_int) -> *const MemoryDesc,
    pd_destroy: unsafe extern "C" fn(Handle) -> Status,
    primitive_create: unsafe extern "C" fn(*mut Handle, Handle) -> Status,
    primitive_execute: unsafe extern "C" fn(Handle, Handle, c_int, *const ExecArg) -> Status,
    primitive_destroy: unsafe extern "C" fn(Handle) -> Status,
    memory_create: unsafe extern "C" fn(*mut Handle, *const MemoryDesc, Handle, Handle) -> Status,
    memory_destroy: unsafe extern "C" fn(Handle) -> Status,
}

/// The opened library: its functions, one CPU engine, and the primitive cache.
pub struct Dnnl {
    api: Api,
    engine: Handle,
    /// `omp_set_num_threads` of the OpenMP runtime oneDNN was built with, when it has one.
    omp_set_num_threads: Option<unsafe extern "C" fn(c_int)>,
    version: (i32, i32, i32),
    cache: Mutex<HashMap<Key, Arc<Primitive>>>,
    /// Kept open for the life of the process: every pointer above points into it.
    _lib: libloading::Library,
    _omp: Option<libloading::Library>,
}

// SAFETY: the engine handle is a oneDNN CPU engine, which the library allows to be used from
// any thread; the cache is behind a mutex; the function pointers are plain code addresses.
unsafe impl Send for Dnnl {}
// SAFETY: as above; nothing in `Dnnl` is mutated without the mutex.
unsafe impl Sync for Dnnl {}

impl std::fmt::Debug for Dnnl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dnnl")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// oneDNN opened once per process: `Err` says why it could not be (no library, wrong version).
pub fn open() -> &'static Result<Dnnl, String> {
    static LIB: OnceLock<Result<Dnnl, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let path = std::env::var("DNNL_LIBRARY").unwrap_or_else(|_| SONAME.to_string());
        Dnnl::load(&path)
    })
}

macro_rules! sym {
    ($lib:expr, $name:literal) => {{
        // SAFETY: the symbol is a function of oneDNN 2.x's C API and the type it is read as is
        // its declaration in `dnnl.h` (checked against 2.6); `_lib` keeps it mapped.
        let f = unsafe { $lib.get(concat!($name, "\0").as_bytes()) }
            .map_err(|e| format!("oneDNN: no symbol {} ({e})", $name))?;
        *f
    }};
}

fn check(status: Status, what: &str) -> Result<(), String> {
    if status == SUCCESS {
        Ok(())
    } else {
        Err(format!("oneDNN {what} failed (status {status})"))
    }
}

impl Dnnl {
    fn load(path: &str) -> Result<Self, String> {
        // libgomp reads its wait policy once, when it is loaded (here, as oneDNN's dependency):
        // threads that spin after each parallel region would take the cores the engine's own
        // threads need between oneDNN calls. A policy the user set is kept. This runs once
        // (under `open`'s OnceLock); the services reach it from `Engine::load` in `main`, before
        // their async runtime starts threads that might read the environment meanwhile.
        if std::env::var_os("OMP_WAIT_POLICY").is_none() {
            std::env::set_var("OMP_WAIT_POLICY", "passive");
        }
        // SAFETY: loading a shared library runs its initialisers; oneDNN's and its OpenMP
        // runtime's only set up their own state.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("cannot open {path}: {e}"))?;
        // The version first: oneDNN 3.x removed functions used below (its descriptors are
        // opaque handles), and says so better than a missing symbol would.
        let version_fn: unsafe extern "C" fn() -> *const Version = sym!(lib, "dnnl_version");
        // SAFETY: `dnnl_version` returns a pointer to a static struct of the library.
        let v = unsafe { &*version_fn() };
        let version = (v.major, v.minor, v.patch);
        if v.major != 2 {
            return Err(format!(
                "{path} is oneDNN {}.{}.{}; this build speaks oneDNN 2.x's C API \
                 (Debian/Ubuntu: libdnnl2)",
                v.major, v.minor, v.patch
            ));
        }
        let api = Api {
            effective_cpu_isa: sym!(lib, "dnnl_get_effective_cpu_isa"),
            engine_create: sym!(lib, "dnnl_engine_create"),
            stream_create: sym!(lib, "dnnl_stream_create"),
            stream_wait: sym!(lib, "dnnl_stream_wait"),
            stream_destroy: sym!(lib, "dnnl_stream_destroy"),
            md_init_by_tag: sym!(lib, "dnnl_memory_desc_init_by_tag"),
            md_get_size: sym!(lib, "dnnl_memory_desc_get_size"),
            matmul_desc_init: sym!(lib, "dnnl_matmul_desc_init"),
            attr_create: sym!(lib, "dnnl_primitive_attr_create"),
            attr_destroy: sym!(lib, "dnnl_primitive_attr_destroy"),
            attr_set_scratchpad_mode: sym!(lib, "dnnl_primitive_attr_set_scratchpad_mode"),
            pd_create: sym!(lib, "dnnl_primitive_desc_create"),
            reorder_pd_create: sym!(lib, "dnnl_reorder_primitive_desc_create"),
            pd_query: sym!(lib, "dnnl_primitive_desc_query"),
            pd_query_md: sym!(lib, "dnnl_primitive_desc_query_md"),
            pd_destroy: sym!(lib, "dnnl_primitive_desc_destroy"),
            primitive_create: sym!(lib, "dnnl_primitive_create"),
            primitive_execute: sym!(lib, "dnnl_primitive_execute"),
            primitive_destroy: sym!(lib, "dnnl_primitive_destroy"),
            memory_create: sym!(lib, "dnnl_memory_create"),
            memory_destroy: sym!(lib, "dnnl_memory_destroy"),
        };
        // OpenMP runtime (DNNL_RUNTIME_OMP = 2): its thread count is per calling thread.
        let omp = if v.cpu_runtime == 2 {
            // SAFETY: libgomp is already loaded as oneDNN's dependency; this only takes a
            // reference to it.
            unsafe { libloading::Library::new("libgomp.so.1") }.ok()
        } else {
            None
        };
        let omp_set_num_threads = match &omp {
            // SAFETY: `omp_set_num_threads(int)` is OpenMP's standard API; `_omp` keeps it mapped.
            Some(l) => unsafe { l.get::<unsafe extern "C" fn(c_int)>(b"omp_set_num_threads\0") }
                .ok()
                .map(|f| *f),
            None => None,
        };
        let mut engine: Handle = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; index 0 is the (only) CPU engine.
        check(
            unsafe { (api.engine_create)(&mut engine, ENGINE_CPU, 0) },
            "engine creation",
        )?;
        Ok(Self {
            api,
            engine,
            omp_set_num_threads,
            version,
            cache: Mutex::new(HashMap::new()),
            _lib: lib,
            _omp: omp,
        })
    }

    /// `(major, minor, patch)`.
    pub fn version(&self) -> (i32, i32, i32) {
        self.version
    }

    /// The most capable instruction set oneDNN dispatches to on this CPU, in oneDNN's words.
    pub fn isa(&self) -> &'static str {
        // SAFETY: no arguments; returns an enum value.
        match unsafe { (self.api.effective_cpu_isa)() } {
            0x1 => "sse41",
            0x3 => "avx",
            0x7 => "avx2",
            0x407 => "avx2_vnni",
            0xf => "avx512_mic",
            0x1f => "avx512_mic_4ops",
            0x27 => "avx512_core",
            0x67 => "avx512_core_vnni",
            0xe7 => "avx512_core_bf16",
            0x3e7 => "avx512_core_amx",
            _ => "unknown",
        }
    }

    fn md(&self, dims: [usize; 2], dt: Dt, tag: c_int) -> Result<MemoryDesc, String> {
        let mut d: Dims = [0; MAX_NDIMS];
        for (slot, &v) in d.iter_mut().zip(dims.iter()) {
            *slot = i64::try_from(v).map_err(|_| format!("oneDNN: dimension {v} too large"))?;
        }
        let mut md = MemoryDesc([0; 1024]);
        // SAFETY: `md` is a writable buffer larger than `dnnl_memory_desc_t`; `d` holds
        // MAX_NDIMS dimensions of which the first 2 are read.
        check(
            unsafe { (self.api.md_init_by_tag)(&mut md, 2, d.as_ptr(), dt.code(), tag) },
            "memory descriptor",
        )?;
        Ok(md)
    }

    /// A primitive of `pd`, outside the cache (used once, e.g. a weight's reorder).
    fn bare_primitive(&self, pd: Pd) -> Result<Primitive, String> {
        let mut prim: Handle = std::ptr::null_mut();
        // SAFETY: `pd` is a live primitive descriptor.
        check(
            unsafe { (self.api.primitive_create)(&mut prim, pd.pd) },
            "primitive",
        )?;
        Ok(Primitive { prim, pd })
    }

    /// A primitive descriptor of `src [m, k] (ab) @ weights [k, n] -> dst [m, n] f32 (ab)`,
    /// the weights described by `weights` (`format_tag::any` to let oneDNN choose). The
    /// destination must be dense: with a row stride, oneDNN 2.6 leaves its brgemm kernels for
    /// slower ones (a reference loop for a blocked bf16 weight).
    fn matmul_pd(
        &'static self,
        m: usize,
        weights: &MemoryDesc,
        k: usize,
        n: usize,
        dt: Dt,
    ) -> Result<Pd, String> {
        let src = self.md([m, k], dt, TAG_AB)?;
        let dst = self.md([m, n], Dt::F32, TAG_AB)?;
        let mut op = OpDesc([0; 4096]);
        // SAFETY: valid descriptors; no bias (null); `op` is larger than `dnnl_matmul_desc_t`.
        check(
            unsafe { (self.api.matmul_desc_init)(&mut op, &src, weights, std::ptr::null(), &dst) },
            "matmul descriptor",
        )?;
        self.with_user_scratchpad(|attr| {
            let mut pd: Handle = std::ptr::null_mut();
            // SAFETY: `op` is an initialised op descriptor, `attr` live, no hint.
            let s = unsafe {
                (self.api.pd_create)(&mut pd, &op, attr, self.engine, std::ptr::null_mut())
            };
            check(s, &format!("matmul [{m}, {k}] x [{k}, {n}] {dt:?}"))?;
            Ok(Pd { pd, dnnl: self })
        })
    }

    fn reorder_pd(&'static self, from: &MemoryDesc, to: *const MemoryDesc) -> Result<Pd, String> {
        self.with_user_scratchpad(|attr| {
            let mut pd: Handle = std::ptr::null_mut();
            // SAFETY: valid descriptors on this CPU engine; `attr` live.
            let s = unsafe {
                (self.api.reorder_pd_create)(&mut pd, from, self.engine, to, self.engine, attr)
            };
            check(s, "reorder")?;
            Ok(Pd { pd, dnnl: self })
        })
    }

    fn with_user_scratchpad<T>(
        &self,
        f: impl FnOnce(Handle) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut attr: Handle = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check(unsafe { (self.api.attr_create)(&mut attr) }, "attributes")?;
        // SAFETY: `attr` was just created.
        let r = check(
            unsafe { (self.api.attr_set_scratchpad_mode)(attr, SCRATCHPAD_MODE_USER) },
            "scratchpad mode",
        )
        .and_then(|()| f(attr));
        // SAFETY: created above, not used after (descriptors copy what they need).
        unsafe { (self.api.attr_destroy)(attr) };
        r
    }

    /// The cached primitive for `key`, made by `make` on first use.
    fn primitive(
        &self,
        key: Key,
        make: impl FnOnce() -> Result<Pd, String>,
    ) -> Result<Arc<Primitive>, String> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| "oneDNN cache poisoned".to_string())?;
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let pd = make()?;
        let mut prim: Handle = std::ptr::null_mut();
        // SAFETY: `pd` is a live primitive descriptor.
        check(
            unsafe { (self.api.primitive_create)(&mut prim, pd.pd) },
            "primitive",
        )?;
        let p = Arc::new(Primitive { prim, pd });
        // Bounded: shapes with many distinct row counts (prefills) must not grow it forever.
        if cache.len() >= 1024 {
            cache.clear();
        }
        cache.insert(key, p.clone());
        Ok(p)
    }

    /// Runs `p` with `args` (argument id, descriptor, data pointer) plus its scratchpad, on the
    /// caller's thread with `threads` OpenMP threads, and waits for it.
    ///
    /// # Safety
    /// Each pointer must be valid for the size its descriptor says, the destination writable
    /// and not aliased by the others, for the whole call.
    unsafe fn execute(
        &self,
        p: &Primitive,
        args: &[(c_int, *const MemoryDesc, *mut c_void)],
        threads: usize,
    ) -> Result<(), String> {
        let scratch_md = (self.api.pd_query_md)(p.pd.pd, QUERY_SCRATCHPAD_MD, 0);
        let scratch_len = if scratch_md.is_null() {
            0
        } else {
            (self.api.md_get_size)(scratch_md)
        };
        // u64s: 8-byte aligned, which oneDNN's scratchpad users need at least. Left
        // uninitialised (only oneDNN writes and reads it; Rust never does), so that a
        // megabytes-large scratchpad costs no memset per call.
        let mut scratch: Vec<u64> = Vec::with_capacity(scratch_len.div_ceil(8));
        let mut all: Vec<(c_int, *const MemoryDesc, *mut c_void)> = args.to_vec();
        if scratch_len > 0 {
            all.push((ARG_SCRATCHPAD, scratch_md, scratch.as_mut_ptr().cast()));
        }
        let mut mems: Vec<ExecArg> = Vec::with_capacity(all.len());
        let mut result = Ok(());
        for &(arg, md, ptr) in &all {
            let mut mem: Handle = std::ptr::null_mut();
            let s = (self.api.memory_create)(&mut mem, md, self.engine, ptr);
            if s != SUCCESS {
                result = check(s, "memory");
                break;
            }
            mems.push(ExecArg { arg, memory: mem });
        }
        if result.is_ok() {
            if let Some(set) = self.omp_set_num_threads {
                set(c_int::try_from(threads.max(1)).unwrap_or(1));
            }
            let mut stream: Handle = std::ptr::null_mut();
            result = check(
                (self.api.stream_create)(&mut stream, self.engine, STREAM_DEFAULT_FLAGS),
                "stream",
            );
            if result.is_ok() {
                let n = c_int::try_from(mems.len()).unwrap_or(0);
                result = check(
                    (self.api.primitive_execute)(p.prim, stream, n, mems.as_ptr()),
                    "execute",
                )
                .and_then(|()| check((self.api.stream_wait)(stream), "stream wait"));
                (self.api.stream_destroy)(stream);
            }
        }
        for m in mems {
            (self.api.memory_destroy)(m.memory);
        }
        drop(scratch);
        result
    }
}

/// Element type of a weight (activations are f32, converted for a bf16 weight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dt {
    F32,
    Bf16,
}

impl Dt {
    fn code(self) -> c_int {
        match self {
            Dt::F32 => DT_F32,
            Dt::Bf16 => DT_BF16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    /// `[m, k] @ [k, n]` with a weight in the layout oneDNN chose for `(k, n, dt)`.
    Matmul {
        m: usize,
        k: usize,
        n: usize,
        dt: Dt,
    },
}

/// An owned primitive descriptor.
struct Pd {
    pd: Handle,
    dnnl: &'static Dnnl,
}

impl Pd {
    fn md(&self, what: c_int) -> Result<*const MemoryDesc, String> {
        // SAFETY: `pd` is live; the returned pointer lives as long as it.
        let md = unsafe { (self.dnnl.api.pd_query_md)(self.pd, what, 0) };
        if md.is_null() {
            Err(format!("oneDNN: primitive has no descriptor {what}"))
        } else {
            Ok(md)
        }
    }

    fn impl_name(&self) -> String {
        let mut s: *const c_char = std::ptr::null();
        // SAFETY: the implementation string query writes a `const char*` owned by the pd.
        let ok = unsafe {
            (self.dnnl.api.pd_query)(
                self.pd,
                QUERY_IMPL_INFO_STR,
                0,
                (&mut s as *mut *const c_char).cast(),
            )
        };
        if ok != SUCCESS || s.is_null() {
            return "unknown".into();
        }
        // SAFETY: a NUL-terminated string owned by the pd, copied before the pd goes.
        unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: created by `pd_create`/`reorder_pd_create`, dropped once.
        unsafe { (self.dnnl.api.pd_destroy)(self.pd) };
    }
}

struct Primitive {
    prim: Handle,
    pd: Pd,
}

// SAFETY: oneDNN primitives are immutable after creation and may be executed from any thread
// (the scratchpad is the caller's, see `execute`).
unsafe impl Send for Primitive {}
// SAFETY: as above.
unsafe impl Sync for Primitive {}
// SAFETY: a primitive descriptor is read-only after creation.
unsafe impl Send for Pd {}
// SAFETY: as above.
unsafe impl Sync for Pd {}

impl Drop for Primitive {
    fn drop(&mut self) {
        // SAFETY: created once by `primitive_create`, dropped once.
        unsafe { (self.pd.dnnl.api.primitive_destroy)(self.prim) };
    }
}

/// `x` rounded to bf16 as little-endian pairs, on the rayon pool when large (the conversion is
/// memory-bound: a few threads saturate it).
fn to_bf16_pairs(x: &[f32], out: &mut [u32]) {
    use rayon::prelude::*;
    // Even-sized chunks, so that each chunk's pairs are whole.
    const CHUNK: usize = 1 << 16;
    if x.len() <= CHUNK {
        super::bf16_gemm::pairs_from_f32(x, out);
    } else {
        x.par_chunks(CHUNK)
            .zip(out.par_chunks_mut(CHUNK / 2))
            .for_each(|(s, d)| super::bf16_gemm::pairs_from_f32(s, d));
    }
}

/// A bytes buffer aligned for oneDNN's blocked weights (64 bytes: one cache line).
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(bytes: usize) -> Result<Self, String> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(64), 64)
            .map_err(|e| format!("oneDNN weight of {bytes} bytes: {e}"))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(format!("out of memory for a {bytes}-byte oneDNN weight"));
        }
        Ok(Self { ptr, layout })
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

// SAFETY: an owned heap buffer, written only while packing (before it is shared).
unsafe impl Send for Aligned {}
// SAFETY: read-only once packed.
unsafe impl Sync for Aligned {}

/// A frozen weight `B` `[k, n]` in the layout oneDNN's matmul chose for it, f32 or bf16.
///
/// Threads: a product of many rows is cut into row blocks, one per thread of the rayon pool,
/// each a single-threaded oneDNN call, so the engine's own parallel work and oneDNN's share one
/// set of threads instead of two pools competing for the cores. A product of few rows (a decode
/// step) runs as one call on oneDNN's OpenMP threads, which then split the columns.
pub struct Weight {
    k: usize,
    n: usize,
    dt: Dt,
    /// The matmul descriptor whose weights layout this is: owns the layout's descriptor.
    layout: Pd,
    data: Aligned,
    bytes: usize,
}

impl std::fmt::Debug for Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weight")
            .field("k", &self.k)
            .field("n", &self.n)
            .field("dt", &self.dt)
            .finish_non_exhaustive()
    }
}

/// Rows of the matmul the weight layout is chosen for (the layouts oneDNN 2.6 picks do not
/// depend on it; every product then runs with the layout fixed).
const LAYOUT_ROWS: usize = 128;

/// Products of at least this many rows per thread are cut into row blocks on the rayon pool.
const ROWS_PER_THREAD: usize = 64;

/// A raw pointer shared by the row blocks of one product, each using a disjoint region.
#[derive(Clone, Copy)]
struct SharedPtr(*mut c_void);
// SAFETY: only used for regions that the blocks of one call read, or write disjointly.
unsafe impl Send for SharedPtr {}
// SAFETY: as above.
unsafe impl Sync for SharedPtr {}

impl SharedPtr {
    /// The pointer (a method, so that closures capture the whole `Send + Sync` wrapper).
    fn get(self) -> *mut c_void {
        self.0
    }
}

impl Weight {
    /// Reorders `B` into oneDNN's preferred layout. `src` is f32, `B` given as `[k, n]`
    /// row-major, or as `[n, k]` row-major (`B = W^T` for a weight `W` stored `[out, in]`) when
    /// `n_by_k`.
    pub fn pack(
        dnnl: &'static Dnnl,
        src: &[f32],
        k: usize,
        n: usize,
        n_by_k: bool,
        dt: Dt,
    ) -> Result<Self, String> {
        if Some(src.len()) != k.checked_mul(n) {
            return Err(format!(
                "oneDNN weight: {} values for [{k}, {n}]",
                src.len()
            ));
        }
        let any = dnnl.md([k, n], dt, TAG_ANY)?;
        let layout = dnnl.matmul_pd(LAYOUT_ROWS, &any, k, n, dt)?;
        let wmd = layout.md(QUERY_WEIGHTS_MD)?;
        // SAFETY: `wmd` is the live pd's weights descriptor.
        let bytes = unsafe { (dnnl.api.md_get_size)(wmd) };
        let data = Aligned::new(bytes)?;
        let user = dnnl.md([k, n], Dt::F32, if n_by_k { TAG_BA } else { TAG_AB })?;
        let p = dnnl.bare_primitive(dnnl.reorder_pd(&user, wmd)?)?;
        // SAFETY: `src` holds k*n f32 as `user` describes (length checked above); `data` holds
        // `bytes`, the size of `wmd`, and is written only here.
        unsafe {
            dnnl.execute(
                &p,
                &[
                    (ARG_SRC, &user, src.as_ptr() as *mut c_void),
                    (ARG_DST, wmd, data.ptr.cast()),
                ],
                rayon::current_num_threads(),
            )?;
        }
        Ok(Self {
            k,
            n,
            dt,
            layout,
            data,
            bytes,
        })
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn dt(&self) -> Dt {
        self.dt
    }

    /// The library the weight belongs to.
    pub fn library(&self) -> &'static Dnnl {
        self.layout.dnnl
    }

    /// Bytes of the packed weight.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The weight back in f32 as `[n, k]` row-major (`B^T`): exact for f32 and bf16 alike.
    pub fn to_f32_n_by_k(&self) -> Result<Vec<f32>, String> {
        let dnnl = self.layout.dnnl;
        let wmd = self.layout.md(QUERY_WEIGHTS_MD)?;
        // `[k, n]` dims laid out `ba`: row-major `[n, k]`.
        let plain = dnnl.md([self.k, self.n], Dt::F32, TAG_BA)?;
        // SAFETY: `wmd` points into `self.layout`, alive here.
        let p = dnnl.bare_primitive(dnnl.reorder_pd(unsafe { &*wmd }, &plain)?)?;
        let mut out = vec![0f32; self.k * self.n];
        // SAFETY: the weight holds `bytes` in `wmd`'s layout and is only read; `out` holds
        // k*n f32 as `plain` says.
        unsafe {
            dnnl.execute(
                &p,
                &[
                    (ARG_SRC, wmd, self.data.ptr.cast()),
                    (ARG_DST, &plain, out.as_mut_ptr().cast()),
                ],
                rayon::current_num_threads(),
            )?;
        }
        Ok(out)
    }

    /// The implementation oneDNN runs for `m` rows times this weight (e.g. `brg:avx512_core_bf16`).
    pub fn implementation(&self, m: usize) -> Result<String, String> {
        let dnnl = self.layout.dnnl;
        let wmd = self.layout.md(QUERY_WEIGHTS_MD)?;
        // SAFETY: `wmd` points into `self.layout`, alive for this call.
        let pd = dnnl.matmul_pd(m, unsafe { &*wmd }, self.k, self.n, self.dt)?;
        Ok(pd.impl_name())
    }

    /// `x @ B`: `x` `[m, k]` row-major f32 -> `[m, n]` row-major f32. For a bf16 weight, `x` is
    /// rounded to bf16 (to nearest even) and products accumulate in f32.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>, String> {
        use rayon::prelude::*;
        if Some(x.len()) != m.checked_mul(self.k) {
            return Err(format!(
                "oneDNN matmul: {} values are not [{m}, {}]",
                x.len(),
                self.k
            ));
        }
        let len = m * self.n;
        if len == 0 {
            return Ok(Vec::new());
        }
        if self.k == 0 {
            return Ok(vec![0.0; len]);
        }
        let dnnl = self.layout.dnnl;
        let (k, n, dt) = (self.k, self.n, self.dt);
        // bf16 weight: x rounded to bf16 (to nearest even) as row-major [m, k] bf16, written as
        // little-endian pairs (`u32` = two consecutive values; one spare half when m*k is odd).
        let mut converted: Vec<u32> = Vec::new();
        let (src, elem) = match dt {
            Dt::F32 => (SharedPtr(x.as_ptr() as *mut c_void), 4),
            Dt::Bf16 => {
                converted = vec![0u32; x.len().div_ceil(2)];
                to_bf16_pairs(x, &mut converted);
                (SharedPtr(converted.as_mut_ptr().cast()), 2)
            }
        };
        let mut out: Vec<f32> = Vec::with_capacity(len);
        let dst = SharedPtr(out.as_mut_ptr().cast());
        let threads = rayon::current_num_threads().max(1);
        // Rows r0..r0+rows, on `omp` OpenMP threads.
        let run = |r0: usize, rows: usize, omp: usize| -> Result<(), String> {
            let wmd = self.layout.md(QUERY_WEIGHTS_MD)?;
            // SAFETY: `wmd` points into `self.layout`, alive for this call.
            let prim = dnnl.primitive(Key::Matmul { m: rows, k, n, dt }, || {
                dnnl.matmul_pd(rows, unsafe { &*wmd }, k, n, dt)
            })?;
            let src_md = prim.pd.md(QUERY_SRC_MD)?;
            let dst_md = prim.pd.md(QUERY_DST_MD)?;
            // SAFETY: the source is rows r0.. of [m, k] in the primitive's source type (x
            // itself, or its bf16 copy: `elem` bytes a value), read only; the weight is `bytes`
            // in `wmd`'s layout; the destination is rows r0..r0+rows of the [m, n] f32 output,
            // inside its capacity and disjoint from every other block's.
            unsafe {
                dnnl.execute(
                    &prim,
                    &[
                        (
                            ARG_SRC,
                            src_md,
                            src.get().cast::<u8>().add(r0 * k * elem).cast(),
                        ),
                        (ARG_WEIGHTS, wmd, self.data.ptr.cast()),
                        (ARG_DST, dst_md, dst.get().cast::<f32>().add(r0 * n).cast()),
                    ],
                    omp,
                )
            }
        };
        if threads > 1 && m >= threads * ROWS_PER_THREAD {
            let block = m.div_ceil(threads);
            (0..threads)
                .into_par_iter()
                .map(|t| (t * block, block.min(m.saturating_sub(t * block))))
                .filter(|&(_, rows)| rows > 0)
                .try_for_each(|(r0, rows)| run(r0, rows, 1))?;
        } else {
            run(0, m, threads)?;
        }
        // SAFETY: the blocks tile the rows 0..m, and each call wrote all n columns of its rows.
        unsafe { out.set_len(len) };
        drop(converted);
        Ok(out)
    }
}

//! The CPU matmul backend: oneDNN when the library can be opened, the engine's own kernels
//! otherwise, decided once per process and said in logs, `/metrics` and the bench JSON.
//!
//! oneDNN (`libdnnl.so.2`, installed by `scripts/fetch-assets` on Debian) is what PyTorch runs
//! its CPU matmuls on: it dispatches at run time to AVX2, AVX-512, AVX512-BF16 or AMX tiles, so
//! one build is fast on every x86 CPU these machines have. The frozen weights are reordered
//! once, when the model is loaded, into the layout oneDNN's matmul chose for them
//! ([`DnnlMatrix`]); products are `x @ W` (forward) and `g @ W^T` (the input gradient the
//! learner needs), f32 activations in and out, weights in f32 or bf16 (bf16 rounds the
//! activations to bf16 on the way in and accumulates in f32, the arithmetic of
//! [`crate::bf16`]).
//!
//! `MATMUL_BACKEND` chooses: `auto` (default: oneDNN when it opens, else the native kernels),
//! `onednn` (oneDNN or an error: for tests that must not test the fallback by accident),
//! `native` (never oneDNN: the fallback, forced). `DNNL_LIBRARY` names another library file.
//!
//! What it must never do: change what a product computes when it changes who computes it (the
//! same oracles bound both backends), or pick a backend silently ([`status`] always says).

use std::sync::{Arc, OnceLock};

use candle_core::{Result, Tensor};

use crate::kernels::dnnl::{self, Dt, Weight};

pub use crate::kernels::dnnl::Dnnl;

/// Who runs the CPU matmuls of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// oneDNN, through [`DnnlMatrix`].
    OneDnn,
    /// candle's gemm (f32) and our AVX512-BF16 kernel (bf16).
    Native,
}

/// The decision, with the words that explain it.
#[derive(Debug, Clone)]
pub struct Status {
    pub backend: Backend,
    /// e.g. `onednn 2.6.3 (isa avx512_core_bf16)` or `native (cannot open libdnnl.so.2: ...)`.
    pub description: String,
    /// oneDNN's instruction set (`avx512_core_amx`, `avx512_core_bf16`, ...); `None` when native.
    pub isa: Option<&'static str>,
    /// Set when `MATMUL_BACKEND=onednn` asked for oneDNN and it could not be opened.
    pub error: Option<String>,
}

/// The environment variable that chooses the backend.
pub const ENV: &str = "MATMUL_BACKEND";

/// The backend of this process, decided on first use.
pub fn status() -> &'static Status {
    static STATUS: OnceLock<Status> = OnceLock::new();
    STATUS.get_or_init(|| {
        let wanted = std::env::var(ENV).unwrap_or_default();
        let native = |why: String| Status {
            backend: Backend::Native,
            description: format!("native ({why})"),
            isa: None,
            error: None,
        };
        match wanted.trim() {
            "native" => native(format!("{ENV}=native")),
            w @ ("" | "auto" | "onednn") => match dnnl::open() {
                Ok(lib) => {
                    let (a, b, c) = lib.version();
                    Status {
                        backend: Backend::OneDnn,
                        description: format!("onednn {a}.{b}.{c} (isa {})", lib.isa()),
                        isa: Some(lib.isa()),
                        error: None,
                    }
                }
                Err(e) if w == "onednn" => Status {
                    error: Some(format!(
                        "{ENV}=onednn but oneDNN cannot be used: {e}; install it \
                         (scripts/fetch-assets, or apt-get install libdnnl2) or unset {ENV}"
                    )),
                    ..native(e.clone())
                },
                Err(e) => native(e.clone()),
            },
            other => Status {
                error: Some(format!(
                    "{ENV}={other} is not a backend; use auto, onednn or native"
                )),
                ..native(format!("{ENV}={other} refused"))
            },
        }
    })
}

/// oneDNN when this process uses it; `Err` when `MATMUL_BACKEND` is invalid or demands a
/// oneDNN that cannot be opened; `Ok(None)` for the native kernels.
pub fn library() -> std::result::Result<Option<&'static Dnnl>, String> {
    let s = status();
    if let Some(e) = &s.error {
        return Err(e.clone());
    }
    match (s.backend, dnnl::open()) {
        (Backend::OneDnn, Ok(lib)) => Ok(Some(lib)),
        _ => Ok(None),
    }
}

/// The implementation oneDNN runs bf16 matmuls with on this CPU (e.g. `brg:avx512_core_bf16`),
/// or `None` when it has only its reference loop for them (CPUs without AVX-512, where the
/// engine keeps bf16 models on the f32 path) or oneDNN is not used.
pub fn bf16_kernel() -> Option<&'static str> {
    static KERNEL: OnceLock<Option<String>> = OnceLock::new();
    KERNEL
        .get_or_init(|| {
            let lib = library().ok().flatten()?;
            let w = Weight::pack(lib, &[0.0; 64 * 64], 64, 64, false, Dt::Bf16).ok()?;
            let name = w.implementation(128).ok()?;
            (!name.starts_with("ref")).then_some(name)
        })
        .as_deref()
}

fn err(e: String) -> candle_core::Error {
    candle_core::Error::Msg(e)
}

/// A frozen weight `W` used as `x @ W` (`W` `[k, n]`) with the backward `g @ W^T`, reordered for
/// oneDNN in f32 or bf16. The backward's layout is made from the forward's on first use.
#[derive(Debug)]
pub struct DnnlMatrix {
    fwd: Weight,
    bwd: OnceLock<Arc<Weight>>,
}

impl DnnlMatrix {
    /// From a weight as stored, `[out, in]` (any float dtype, on the CPU): multiplies as
    /// `x @ weight^T` (`k = in`, `n = out`). `bf16` rounds it to bf16 (to nearest even).
    pub fn from_out_in(lib: &'static Dnnl, weight: &Tensor, bf16: bool) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        if !weight.device().is_cpu() {
            candle_core::bail!("oneDNN weights live on the CPU");
        }
        let v = weight
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let dt = if bf16 { Dt::Bf16 } else { Dt::F32 };
        let fwd = Weight::pack(lib, &v, k, n, true, dt).map_err(err)?;
        Ok(Self {
            fwd,
            bwd: OnceLock::new(),
        })
    }

    pub fn k(&self) -> usize {
        self.fwd.k()
    }

    pub fn n(&self) -> usize {
        self.fwd.n()
    }

    pub fn is_bf16(&self) -> bool {
        self.fwd.dt() == Dt::Bf16
    }

    /// What oneDNN runs for `m` rows (e.g. `brg:avx512_core_bf16`).
    pub fn implementation(&self, m: usize) -> Result<String> {
        self.fwd.implementation(m).map_err(err)
    }

    /// Bytes held (both layouts when the backward one exists).
    pub fn bytes(&self) -> usize {
        self.fwd.bytes() + self.bwd.get().map_or(0, |w| w.bytes())
    }

    /// `x @ W`: `[.., k]` -> `[.., n]`, in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::bf16::cpu_product(x, self.k(), self.n(), |xs, m| {
            self.fwd.matmul(xs, m).map_err(err)
        })
    }

    /// `g @ W^T`: `[.., n]` -> `[.., k]`, in g's dtype.
    pub fn backward(&self, g: &Tensor) -> Result<Tensor> {
        let bwd = match self.bwd.get() {
            Some(w) => w.clone(),
            None => {
                // W^T's layout from the forward's values (exact: the same bf16 or f32 numbers).
                let w = self.fwd.to_f32_n_by_k().map_err(err)?;
                let lib = self.fwd.library();
                let packed = Arc::new(
                    Weight::pack(lib, &w, self.n(), self.k(), false, self.fwd.dt()).map_err(err)?,
                );
                self.bwd.get_or_init(|| packed).clone()
            }
        };
        crate::bf16::cpu_product(g, self.n(), self.k(), |gs, m| {
            bwd.matmul(gs, m).map_err(err)
        })
    }
}

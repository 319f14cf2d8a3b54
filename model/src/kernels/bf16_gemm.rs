//! The `unsafe` code of the bf16 path: the CPU feature probes and the AVX512-BF16 GEMM
//! `C[m, n] (f32) = A[m, k] (bf16) x B[k, n] (bf16)`, f32 accumulation, used by
//! [`crate::bf16`] (which owns the safe packing of B and everything around it).
//!
//! Layouts (`kp = ceil(k / 2)` bf16 pairs per row or column; a pair holds element `2q` in its
//! low half and `2q + 1` in its high half, 0 past `k`):
//! - A: tiles of [`MR`] rows, tile `t` at `t * kp * MR`, `[kp][MR]` u32: entry `(q, i)` is pair
//!   `q` of row `t * MR + i` (0 past `m`). [`pack_a`] builds it from f32 rows; a micro-tile then
//!   reads A in order, 48 bytes per pair step, instead of 12 rows far apart.
//! - B: panels of [`NR`] columns, panel `p` at `p * kp * NR`, `[kp][NR]` u32; entry `(q, j)` holds
//!   (`b[2q][p*NR+j]`, `b[2q+1][p*NR+j]`), 0 past `n` (built by the safe code in [`crate::bf16`]).
//!
//! `vdpbf16ps` adds to each f32 lane `j` the two products of the bf16 pair in lane `j` of both
//! operands, so broadcasting A's pair `q` of row `i` against panel row `q` accumulates
//! `a[i][2q] b[2q][j] + a[i][2q+1] b[2q+1][j]` into column `j`: one instruction, 32 multiply-adds.
//! A micro-tile keeps [`MR`] x [`NR`] f32 accumulators (24 zmm registers) over a block of
//! [`KC`] pairs, then stores them (first block) or adds them to C (later blocks).

/// Columns per B panel (two zmm registers of 16 f32).
pub const NR: usize = 32;
/// Rows per micro-tile.
pub const MR: usize = 12;
/// Rows per task.
const MB: usize = 8 * MR;
/// Pairs of k per block: a panel's slice (`KC * NR * 4` = 16 KiB) stays in L1 while the task's
/// row tiles pass over it, and the task's A slice (`MB * KC * 4` = 48 KiB) in L2.
const KC: usize = 128;

/// Whether this CPU runs the AVX512-BF16 kernel (`vdpbf16ps`).
pub fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What the CPU and the OS say about AMX-BF16: `Ok(())` when its tiles could be used, else why
/// not. It only asks; it does not request the tile state (an AMX kernel would, with
/// `ARCH_REQ_XCOMP_PERM`, before its first use). No AMX kernel is built yet.
pub fn amx_bf16() -> Result<(), String> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        use std::arch::x86_64::__cpuid_count;
        // CPUID leaf 7 exists when the maximum leaf (leaf 0's EAX) is at least 7.
        if __cpuid_count(0, 0).eax < 7 {
            return Err("the CPU has no AMX-BF16 (no CPUID leaf 7)".into());
        }
        // CPUID.(EAX=7,ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
        let edx = __cpuid_count(7, 0).edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return Err("the CPU has no AMX-BF16 (CPUID.7.0:EDX bits 22/24 clear)".into());
        }
        // Linux hands out the 8 KiB tile state (XTILEDATA, feature 18) only on request; whether
        // it can is in the mask ARCH_GET_XCOMP_SUPP reports.
        const ARCH_GET_XCOMP_SUPP: libc::c_long = 0x1021;
        const XFEATURE_XTILEDATA: u32 = 18;
        let mut supported: u64 = 0;
        // SAFETY: ARCH_GET_XCOMP_SUPP writes one u64 through the pointer, which points at a
        // live local u64; nothing else is touched.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_GET_XCOMP_SUPP,
                &mut supported as *mut u64,
            )
        };
        if rc != 0 || supported & (1 << XFEATURE_XTILEDATA) == 0 {
            return Err(format!(
                "Linux does not offer the AMX tile state (arch_prctl ARCH_GET_XCOMP_SUPP: {})",
                if rc != 0 {
                    std::io::Error::last_os_error().to_string()
                } else {
                    format!("mask {supported:#x}")
                }
            ));
        }
        Ok(())
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        Err("AMX is only probed on x86_64 Linux".into())
    }
}

/// Converts f32 values to bf16 pairs (round to nearest even), `dst.len() == ceil(src.len()/2)`.
pub fn pairs_from_f32(src: &[f32], dst: &mut [u32]) {
    assert_eq!(dst.len(), src.len().div_ceil(2), "pairs_from_f32: lengths");
    let done = {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512_bf16() {
                let whole = src.len() / 32 * 32;
                // SAFETY: the feature is present (checked above); the function reads
                // `src[..whole]` and writes `dst[..whole / 2]`, both in bounds by construction.
                unsafe { x86::pairs_from_f32(&src[..whole], &mut dst[..whole / 2]) };
                whole
            } else {
                0
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            0
        }
    };
    for (q, d) in dst.iter_mut().enumerate().skip(done / 2) {
        let lo = half::bf16::from_f32(src[2 * q]).to_bits() as u32;
        let hi = src
            .get(2 * q + 1)
            .map_or(0, |&x| half::bf16::from_f32(x).to_bits() as u32);
        *d = lo | (hi << 16);
    }
}

/// `x * y`, panicking with `what` on overflow: a wrapped size would let the length checks of
/// [`pack_a`] and [`gemm`] pass on short buffers.
fn size(x: usize, y: usize, what: &str) -> usize {
    x.checked_mul(y)
        .unwrap_or_else(|| panic!("bf16 gemm: {what} overflows"))
}

/// A packed in tiles (module doc) from `m` f32 rows of `k` values (`x` `[m, k]` row-major),
/// rounded to bf16 (nearest even). Every entry is written, padding included.
pub fn pack_a(x: &[f32], m: usize, k: usize) -> Vec<u32> {
    use rayon::prelude::*;
    assert_eq!(x.len(), size(m, k, "m x k"), "pack_a: x is not [m, k]");
    let kp = k.div_ceil(2);
    let tile = size(kp, MR, "kp x MR");
    let len = size(m.div_ceil(MR), tile, "A");
    let mut a: Vec<u32> = Vec::with_capacity(len);
    if tile > 0 {
        a.spare_capacity_mut()[..len]
            .par_chunks_mut(tile)
            .enumerate()
            .for_each(|(t, dst)| {
                // The tile's rows as pairs, [MR][kp], then interleaved into [kp][MR].
                let mut rows = vec![0u32; tile];
                for (i, row) in rows.chunks_exact_mut(kp).enumerate() {
                    let r = t * MR + i;
                    if r < m {
                        pairs_from_f32(&x[r * k..(r + 1) * k], row);
                    }
                }
                for (q, d) in dst.chunks_exact_mut(MR).enumerate() {
                    for (i, d) in d.iter_mut().enumerate() {
                        d.write(rows[i * kp + q]);
                    }
                }
            });
    }
    // SAFETY: the tiles above are `len / tile` disjoint chunks covering `..len` (`len` is a
    // multiple of `tile`), and each writes every one of its entries; `len` is within the
    // capacity reserved above. With `tile == 0`, `len == 0`.
    unsafe { a.set_len(len) };
    a
}

/// `C[m, n] = A x B` with the layouts of the module doc (A from [`pack_a`]), on the rayon pool,
/// returned row-major. Panics when the slices do not have the sizes `m`, `kp`, `n` imply, or
/// when the CPU lacks AVX512-BF16 (callers check [`avx512_bf16`] first and use the f32 path
/// otherwise).
pub fn gemm(a: &[u32], m: usize, kp: usize, b: &[u32], n: usize) -> Vec<f32> {
    let panels = n.div_ceil(NR);
    let a_len = size(m.div_ceil(MR), size(kp, MR, "kp x MR"), "A");
    assert_eq!(a.len(), a_len, "gemm: A is not packed for m and kp");
    let b_len = size(size(panels, kp, "panels x kp"), NR, "B");
    assert_eq!(b.len(), b_len, "gemm: B is not packed for n");
    let c_len = size(m, n, "m x n");
    assert!(avx512_bf16(), "gemm: the CPU has no AVX512-BF16");
    if kp == 0 {
        return vec![0.0; c_len];
    }
    let mut c: Vec<f32> = Vec::with_capacity(c_len);
    if m == 0 || n == 0 {
        return c;
    }
    // Tasks: (row block, group of panels), each writing a disjoint rectangle of C.
    let row_blocks = m.div_ceil(MB);
    let threads = rayon::current_num_threads().max(1);
    let group = panels
        .div_ceil((8 * threads).div_ceil(row_blocks).max(1))
        .clamp(1, 4);
    let groups = panels.div_ceil(group);
    // C is written before it is read: the first k block of every tile stores (below).
    let out = OutPtr(c.spare_capacity_mut().as_mut_ptr().cast::<f32>());
    let task = |t: usize| {
        let (rb, g) = (t / groups, t % groups);
        let rows = rb * MB..((rb + 1) * MB).min(m);
        for k0 in (0..kp).step_by(KC) {
            let kc = KC.min(kp - k0);
            for p in g * group..((g + 1) * group).min(panels) {
                let cols = (n - p * NR).min(NR);
                // Pairs k0..k0+kc of panel p.
                let slice = &b[(p * kp + k0) * NR..(p * kp + k0 + kc) * NR];
                let mut r = rows.start;
                while r < rows.end {
                    let h = (rows.end - r).min(MR);
                    // SAFETY: rows r..r+h <= m and columns p*NR..p*NR+cols <= n lie inside C's
                    // reserved capacity (m * n), and no other task touches them: tasks
                    // partition C into (row block, panel group) rectangles. The first k block
                    // (k0 == 0) stores them, later ones read them back, in this task, in order.
                    // r is a multiple of MR (MB is), so A's tile r / MR, pairs k0..k0+kc (< kp),
                    // lies inside A (length checked above); the panel slice is a checked
                    // subslice. The CPU feature was checked above.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        let tile = x86::Tile {
                            a: a.as_ptr().add(r * kp + k0 * MR),
                            b: slice.as_ptr(),
                            kc,
                            c: out.at(r * n + p * NR),
                            ldc: n,
                            cols,
                            accumulate: k0 > 0,
                        };
                        tile.run(h);
                    }
                    r += h;
                }
            }
        }
    };
    use rayon::prelude::*;
    (0..row_blocks * groups).into_par_iter().for_each(task);
    // SAFETY: the tasks wrote every element of C's first m * n (module doc, SAFETY above).
    unsafe { c.set_len(c_len) };
    c
}

/// The machine's bf16 multiply-add peak in GFLOP/s: every rayon thread runs `vdpbf16ps` on 12
/// independent register accumulators (no memory traffic) for about `seconds`. What the GEMM's
/// fraction of peak is measured against. Needs [`avx512_bf16`].
pub fn peak_gflops(seconds: f64) -> f64 {
    assert!(avx512_bf16(), "peak_gflops: the CPU has no AVX512-BF16");
    let threads = rayon::current_num_threads().max(1);
    // Calibrate the iteration count on one thread, then run all threads at once.
    #[cfg(target_arch = "x86_64")]
    let dot_loop = |iters: usize| {
        // SAFETY: the CPU feature was checked above; the loop touches registers only.
        unsafe { x86::dot_loop(iters) }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let dot_loop = |_: usize| -> f32 { unreachable!("AVX512-BF16 is x86_64 only") };
    let calib = 1 << 20;
    let t = std::time::Instant::now();
    std::hint::black_box(dot_loop(calib));
    let per_iter = t.elapsed().as_secs_f64() / calib as f64;
    let iters = ((seconds / per_iter.max(1e-12)) as usize).max(calib);
    let t = std::time::Instant::now();
    // One loop per pool thread, all at once.
    let sink: f32 = rayon::broadcast(|_| dot_loop(iters)).into_iter().sum();
    std::hint::black_box(sink);
    let elapsed = t.elapsed().as_secs_f64();
    // Per iteration: 12 instructions x 16 lanes x 2 pairs x 2 FLOP.
    (threads * iters * 12 * 16 * 4) as f64 / elapsed / 1e9
}

/// C's base pointer, shared by the tasks of [`gemm`] (each writes its own rectangle).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the pointer is only dereferenced inside `gemm`'s tasks, which write disjoint parts of
// a buffer that `gemm` borrows mutably for their whole lifetime.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `offset` must be inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller keeps `offset` inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// # Safety
    /// AVX512F and AVX512-BF16 present; `src.len()` a multiple of 32; `dst.len() == src.len()/2`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn pairs_from_f32(src: &[f32], dst: &mut [u32]) {
        debug_assert!(src.len().is_multiple_of(32) && dst.len() * 2 == src.len());
        for (s, d) in src.chunks_exact(32).zip(dst.chunks_exact_mut(16)) {
            // SAFETY: `s` has 32 readable f32 and `d` 16 writable u32 (64 bytes); unaligned
            // loads and stores are used.
            unsafe {
                let lo = _mm512_loadu_ps(s.as_ptr());
                let hi = _mm512_loadu_ps(s.as_ptr().add(16));
                // bf16 lanes 0..15 come from `lo`, 16..31 from `hi`: the values in order.
                let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(d.as_mut_ptr().cast(), packed);
            }
        }
    }

    /// `iters` rounds of 12 independent `vdpbf16ps` on registers; returns a lane of the sum so
    /// that nothing is optimised away.
    ///
    /// # Safety
    /// AVX512F and AVX512-BF16 present.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dot_loop(iters: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 12];
        // SAFETY: register-only bit reinterpretation of 512-bit vectors.
        let (a, b): (__m512bh, __m512bh) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3f80_3f80)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3c00_3c00)),
            )
        };
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        let mut sum = _mm512_setzero_ps();
        for x in acc {
            sum = _mm512_add_ps(sum, x);
        }
        _mm512_reduce_add_ps(sum)
    }

    /// One micro-tile: rows `0..h` (h <= MR) of an A tile at `a` (`[kc][MR]` u32) times `kc`
    /// rows of a panel at `b` (`[kc][NR]` u32) into columns `0..cols` (cols <= NR) of C at `c`
    /// (row stride `ldc`), added to C's values when `accumulate`, else stored.
    pub struct Tile {
        pub a: *const u32,
        pub b: *const u32,
        pub kc: usize,
        pub c: *mut f32,
        pub ldc: usize,
        pub cols: usize,
        pub accumulate: bool,
    }

    impl Tile {
        /// Runs the tile on `h` rows.
        ///
        /// # Safety
        /// AVX512F and AVX512-BF16 present; `a` readable at `q * MR + i` for `i < h`, `q < kc`;
        /// `b` readable for `kc * NR` u32; `c` readable and writable at `i * ldc + j` for
        /// `i < h`, `j < cols`.
        #[target_feature(enable = "avx512f,avx512bf16")]
        pub unsafe fn run(&self, h: usize) {
            assert!((1..=MR).contains(&h), "tile: {h} rows");
            // SAFETY (all arms): forwarded from the caller with R == h.
            unsafe {
                match h {
                    12 => self.run_r::<12>(),
                    11 => self.run_r::<11>(),
                    10 => self.run_r::<10>(),
                    9 => self.run_r::<9>(),
                    8 => self.run_r::<8>(),
                    7 => self.run_r::<7>(),
                    6 => self.run_r::<6>(),
                    5 => self.run_r::<5>(),
                    4 => self.run_r::<4>(),
                    3 => self.run_r::<3>(),
                    2 => self.run_r::<2>(),
                    1 => self.run_r::<1>(),
                    _ => unreachable!(),
                }
            }
        }

        /// # Safety
        /// As [`Tile::run`] with `h == R`.
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn run_r<const R: usize>(&self) {
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for q in 0..self.kc {
                // SAFETY: q < kc, so the panel row q (NR u32) and A's pair q of rows < R are
                // in the ranges the caller guarantees; all loads are unaligned.
                unsafe {
                    let row = self.b.add(q * NR);
                    let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(row.cast()));
                    let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(row.add(16).cast()));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let pair = *self.a.add(q * MR + i);
                        let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                        acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                        acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
                    }
                }
            }
            let mask = |from: usize| -> __mmask16 {
                let k = self.cols.saturating_sub(from).min(16);
                ((1u32 << k) - 1) as __mmask16
            };
            let (m0, m1) = (mask(0), mask(16));
            for (i, acc) in acc.iter().enumerate() {
                // SAFETY: row i < R == h and the masks enable only columns < cols: masked-off
                // lanes are never accessed (loads and stores), so the second half's address may
                // lie past C when cols <= 16; it is formed with wrapping_add, not add.
                unsafe {
                    let p0 = self.c.wrapping_add(i * self.ldc);
                    let p1 = self.c.wrapping_add(i * self.ldc + 16);
                    let (mut v0, mut v1) = (acc[0], acc[1]);
                    if self.accumulate {
                        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, p0));
                        v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, p1));
                    }
                    _mm512_mask_storeu_ps(p0, m0, v0);
                    _mm512_mask_storeu_ps(p1, m1, v1);
                }
            }
        }
    }
}

//! Row kernels over f32 slices, run once per logit or attention score: the maximum, the
//! exponentials and their sum behind every softmax and log-softmax of the engine (attention
//! probabilities, the vocabulary log-softmax of scoring and training, the sampler's
//! distribution). candle's CPU softmax calls the scalar `expf` per element and makes a pass and a
//! tensor per step; here one pass does the scaling, the mask and the exponentials, with an
//! exp written to vectorize (Cody-Waite range reduction and Cephes' degree-6 polynomial: within
//! 2 ulp of the correctly rounded value, see the tests) and sums that add blocks of f32 lanes
//! into f64.
//!
//! Every function is compiled twice, for the baseline target and for AVX-512F, and the copy is
//! picked at run time. The `unsafe` here: the call into the AVX-512F copy after the CPU was
//! checked to have it, and the vector loads of the attention dot product.

/// f32 lanes the loops are written over (one zmm register).
const LANES: usize = 16;
/// Elements summed in f32 lanes before the block's sum is added in f64.
const BLOCK: usize = 16 * LANES;

/// `e^x` in f32 for any x: 0 below -88 (and for -inf), +inf never (x is capped at 88), NaN
/// stays NaN. Branch-free so that loops over it vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that k * LN2_HI is exact for |k| <= 128 (LN2_HI has 11 significant bits).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    // f32::clamp lets a NaN through (f32::max/min would not).
    let x = x.clamp(-88.0, 88.0);
    let k = (x * LOG2E + ROUND) - ROUND; // in [-127, 127]
    let r = x - k * LN2_HI - k * LN2_LO; // |r| <= ln2 / 2 (+ rounding)
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * r * r + r + 1.0;
    // 2^k from its exponent bits; k = -127 gives the bits of +0.0, so e^-88 and e^-inf are 0.
    // `as` saturates (and maps NaN to 0, whose result p is NaN anyway).
    let two_k = f32::from_bits(((k as i32 + 127) as u32) << 23);
    p * two_k
}

#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let mut m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    for a in acc {
        m = m.max(a);
    }
    m
}

#[inline(always)]
fn sum_exp_body(x: &[f32], scale: f32, shift: f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(BLOCK) {
        let mut acc = [0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let rest: f32 = chunks
            .remainder()
            .iter()
            .map(|&v| exp(v * scale - shift))
            .sum();
        for c in chunks {
            for l in 0..LANES {
                acc[l] += exp(c[l] * scale - shift);
            }
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>() + rest as f64;
    }
    total
}

#[inline(always)]
fn exp_in_place_body(x: &mut [f32], scale: f32, shift: f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks_mut(BLOCK) {
        let mut acc = [0f32; LANES];
        let mut chunks = block.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for l in 0..LANES {
                c[l] = exp(c[l] * scale - shift);
                acc[l] += c[l];
            }
        }
        let mut rest = 0f32;
        for v in chunks.into_remainder() {
            *v = exp(*v * scale - shift);
            rest += *v;
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>() + rest as f64;
    }
    total
}

#[inline(always)]
fn scale_add_max_body(x: &mut [f32], scale: f32, mask: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    let mut mask_chunks = mask.chunks_exact(LANES);
    for (c, mc) in (&mut chunks).zip(&mut mask_chunks) {
        for l in 0..LANES {
            c[l] = c[l] * scale + mc[l];
            acc[l] = acc[l].max(c[l]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for (v, &mv) in chunks
        .into_remainder()
        .iter_mut()
        .zip(mask_chunks.remainder())
    {
        *v = *v * scale + mv;
        m = m.max(*v);
    }
    for a in acc {
        m = m.max(a);
    }
    m
}

#[inline(always)]
fn mul_body(x: &mut [f32], factor: f32) {
    for v in x.iter_mut() {
        *v *= factor;
    }
}

/// `sum(a * b)` in [`LANES`] f32 partial sums, added up in f64.
#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().map(|&v| v as f64).sum::<f64>() + rest as f64
}

#[inline(always)]
fn softmax_backward_body(dp: &mut [f32], p: &[f32], scale: f32) {
    let dot = dot_body(dp, p) as f32;
    for (d, &pi) in dp.iter_mut().zip(p) {
        *d = (*d - dot) * pi * scale;
    }
}

#[inline(always)]
fn rms_norm_backward_body(g: &[f32], x: &[f32], w: &[f32], eps: f32, dx: &mut [f32]) {
    let n = x.len() as f64;
    let r = 1.0 / (dot_body(x, x) / n + eps as f64).sqrt();
    // mean(g w x), with dx holding g w meanwhile.
    for ((d, &gi), &wi) in dx.iter_mut().zip(g).zip(w) {
        *d = gi * wi;
    }
    let dot = dot_body(dx, x) / n;
    let (r, r3dot) = (r as f32, (r * r * r * dot) as f32);
    for (d, &xi) in dx.iter_mut().zip(x) {
        *d = *d * r - xi * r3dot;
    }
}

#[inline(always)]
fn silu_mul_backward_body(
    dy: &[f32],
    gate: &[f32],
    up: &[f32],
    dgate: &mut [f32],
    dup: &mut [f32],
) {
    for i in 0..dy
        .len()
        .min(gate.len())
        .min(up.len())
        .min(dgate.len())
        .min(dup.len())
    {
        let (d, g, u) = (dy[i], gate[i], up[i]);
        let s = 1.0 / (1.0 + exp(-g));
        dup[i] = d * g * s;
        dgate[i] = d * u * s * (1.0 + g * (1.0 - s));
    }
}

/// `a * b + c`: fused in the AVX-512F copy (which has FMA), a multiply and an add in the
/// baseline copy (where `mul_add` would be a libm call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `q . k` over `HD` values in [`LANES`] partial sums, then a halving tree (the baseline copy;
/// the AVX-512F copy uses [`avx512::dot`]).
#[inline(always)]
fn dot<const HD: usize>(q: &[f32; HD], k: &[f32; HD]) -> f32 {
    let mut acc = [0f32; LANES];
    for c in 0..HD / LANES {
        for l in 0..LANES {
            acc[l] += q[c * LANES + l] * k[c * LANES + l];
        }
    }
    let mut half = LANES / 2;
    while half > 0 {
        for l in 0..half {
            acc[l] += acc[l + half];
        }
        half /= 2;
    }
    acc[0]
}

#[inline(always)]
fn attention_body<const HD: usize, const FMA: bool>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    (t, row0, scale): (usize, usize, f32),
    out: &mut [f32],
    dot: impl Fn(&[f32; HD], &[f32; HD]) -> f32,
) {
    let s = k.len() / HD;
    let mut p = vec![0f32; s];
    for (r, (qr, o)) in q.chunks_exact(HD).zip(out.chunks_exact_mut(HD)).enumerate() {
        let m = (row0 + r) % t;
        let mask_row = &mask[m * s..(m + 1) * s];
        // The keys this row attends to: c0..=c1.
        let (Some(c0), Some(c1)) = (
            mask_row.iter().position(|x| *x != f32::NEG_INFINITY),
            mask_row.iter().rposition(|x| *x != f32::NEG_INFINITY),
        ) else {
            // Every key excluded: softmax of an empty set, NaN (as the composed ops give).
            o.fill(f32::NAN);
            continue;
        };
        let Ok(qr) = <&[f32; HD]>::try_from(qr) else {
            unreachable!("rows of HD values")
        };
        let keys = &k[c0 * HD..(c1 + 1) * HD];
        for (pj, kj) in p[c0..=c1].iter_mut().zip(keys.chunks_exact(HD)) {
            let Ok(kj) = <&[f32; HD]>::try_from(kj) else {
                unreachable!("rows of HD values")
            };
            *pj = dot(qr, kj);
        }
        softmax(&mut p[c0..=c1], scale, &mask_row[c0..=c1]);
        let mut acc = [0f32; HD];
        for (&pj, vj) in p[c0..=c1]
            .iter()
            .zip(v[c0 * HD..(c1 + 1) * HD].chunks_exact(HD))
        {
            for d in 0..HD {
                acc[d] = madd::<FMA>(pj, vj[d], acc[d]);
            }
        }
        o.copy_from_slice(&acc);
    }
}

/// The AVX-512F copies: the same bodies compiled with the feature enabled.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    #[target_feature(enable = "avx512f")]
    pub fn max(x: &[f32]) -> f32 {
        super::max_body(x)
    }

    #[target_feature(enable = "avx512f")]
    pub fn sum_exp(x: &[f32], scale: f32, shift: f32) -> f64 {
        super::sum_exp_body(x, scale, shift)
    }

    #[target_feature(enable = "avx512f")]
    pub fn exp_in_place(x: &mut [f32], scale: f32, shift: f32) -> f64 {
        super::exp_in_place_body(x, scale, shift)
    }

    #[target_feature(enable = "avx512f")]
    pub fn scale_add_max(x: &mut [f32], scale: f32, mask: &[f32]) -> f32 {
        super::scale_add_max_body(x, scale, mask)
    }

    #[target_feature(enable = "avx512f")]
    pub fn mul(x: &mut [f32], factor: f32) {
        super::mul_body(x, factor)
    }

    #[target_feature(enable = "avx512f")]
    pub fn softmax_backward(dp: &mut [f32], p: &[f32], scale: f32) {
        super::softmax_backward_body(dp, p, scale)
    }

    #[target_feature(enable = "avx512f")]
    pub fn rms_norm_backward(g: &[f32], x: &[f32], w: &[f32], eps: f32, dx: &mut [f32]) {
        super::rms_norm_backward_body(g, x, w, eps, dx)
    }

    #[target_feature(enable = "avx512f")]
    pub fn silu_mul_backward(
        dy: &[f32],
        gate: &[f32],
        up: &[f32],
        dgate: &mut [f32],
        dup: &mut [f32],
    ) {
        super::silu_mul_backward_body(dy, gate, up, dgate, dup)
    }

    #[target_feature(enable = "avx512f")]
    pub fn attention<const HD: usize>(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: &[f32],
        t_row0_scale: (usize, usize, f32),
        out: &mut [f32],
    ) {
        super::attention_body::<HD, true>(q, k, v, mask, t_row0_scale, out, |q, k| dot::<HD>(q, k))
    }

    /// `q . k` in zmm registers: `HD / 16` multiply-adds and one reduction. (Written with
    /// intrinsics: left to itself, the compiler vectorizes the loop over keys instead, with
    /// gathers, at a third of the speed.)
    #[target_feature(enable = "avx512f")]
    pub fn dot<const HD: usize>(q: &[f32; HD], k: &[f32; HD]) -> f32 {
        use std::arch::x86_64::{
            _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_reduce_add_ps, _mm512_setzero_ps,
        };
        const { assert!(HD.is_multiple_of(16)) };
        let mut acc = _mm512_setzero_ps();
        for c in 0..HD / 16 {
            // SAFETY: c * 16 + 16 <= HD, so the 16 values read from each array are inside it;
            // unaligned loads have no alignment requirement.
            let (qv, kv) = unsafe {
                (
                    _mm512_loadu_ps(q.as_ptr().add(c * 16)),
                    _mm512_loadu_ps(k.as_ptr().add(c * 16)),
                )
            };
            acc = _mm512_fmadd_ps(qv, kv, acc);
        }
        _mm512_reduce_add_ps(acc)
    }
}

/// Calls the AVX-512F copy of a body when the CPU has the feature, the baseline one otherwise.
macro_rules! dispatch {
    ($name:ident, $body:ident ( $($arg:expr),* )) => {{
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the function only enables AVX-512F, which the CPU was just checked to
            // have; its body is safe code.
            return unsafe { avx512::$name($($arg),*) };
        }
        $body($($arg),*)
    }};
}

/// The largest element (-inf for an empty slice; NaNs are skipped).
pub fn max(x: &[f32]) -> f32 {
    dispatch!(max, max_body(x))
}

/// `sum(exp(x * scale - shift))`, accumulated in f64 per block.
pub fn sum_exp(x: &[f32], scale: f32, shift: f32) -> f64 {
    dispatch!(sum_exp, sum_exp_body(x, scale, shift))
}

/// `x = exp(x * scale - shift)` element-wise; returns the sum of the results.
pub fn exp_in_place(x: &mut [f32], scale: f32, shift: f32) -> f64 {
    dispatch!(exp_in_place, exp_in_place_body(x, scale, shift))
}

/// `x = x * scale + mask` element-wise; returns the largest result. `mask` has x's length.
fn scale_add_max(x: &mut [f32], scale: f32, mask: &[f32]) -> f32 {
    dispatch!(scale_add_max, scale_add_max_body(x, scale, mask))
}

/// `x *= factor` element-wise.
pub fn mul(x: &mut [f32], factor: f32) {
    dispatch!(mul, mul_body(x, factor))
}

/// The softmax backward of one row: `dp = (dp - sum(dp * p)) * p * scale`, for the
/// probabilities `p` and their upstream gradient `dp` (same length).
pub fn softmax_backward(dp: &mut [f32], p: &[f32], scale: f32) {
    assert_eq!(dp.len(), p.len(), "softmax_backward: row lengths differ");
    dispatch!(softmax_backward, softmax_backward_body(dp, p, scale))
}

/// The RMSNorm backward of one row `x` (weight `w`, upstream gradient `g`, all one length):
/// `dx = r g w - x r^3 mean(g w x)` with `r = 1 / sqrt(mean(x^2) + eps)`.
pub fn rms_norm_backward(g: &[f32], x: &[f32], w: &[f32], eps: f32, dx: &mut [f32]) {
    let n = x.len();
    assert!(
        g.len() == n && w.len() == n && dx.len() == n,
        "rms_norm_backward: lengths differ"
    );
    dispatch!(rms_norm_backward, rms_norm_backward_body(g, x, w, eps, dx))
}

/// The backward of `y = silu(gate) * up` element-wise for the upstream gradient `dy`:
/// `dup = dy silu(gate)`, `dgate = dy up s (1 + gate (1 - s))` with `s = sigmoid(gate)`.
pub fn silu_mul_backward(dy: &[f32], gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    let n = dy.len();
    assert!(
        gate.len() == n && up.len() == n && dgate.len() == n && dup.len() == n,
        "silu_mul_backward: lengths differ"
    );
    dispatch!(
        silu_mul_backward,
        silu_mul_backward_body(dy, gate, up, dgate, dup)
    )
}

/// Attention of one key/value head for query rows that share it, one row at a time (the
/// decode step, where a row is a new token): row `r` of `out` (`[rows, hd]`) is
/// `softmax(scale * q[r] . k^T + mask[(row0 + r) % t]) @ v`, for q `[rows, hd]` (rows `row0..`
/// of the head group's `[rep * t]`), k and v `[s, hd]`, an additive mask `[t, s]` (-inf
/// excludes a key; keys outside the first and last attended one are skipped). Returns false
/// (nothing written) for a head size other than 64 or 128 or inconsistent lengths; the caller
/// then takes the composed path.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    (t, hd, row0): (usize, usize, usize),
    scale: f32,
    out: &mut [f32],
) -> bool {
    let s = k.len() / hd.max(1);
    let consistent = hd > 0
        && t > 0
        && q.len().is_multiple_of(hd)
        && k.len() == s * hd
        && v.len() == k.len()
        && mask.len() == t * s
        && out.len() == q.len();
    if !consistent || q.is_empty() {
        return consistent && q.is_empty();
    }
    macro_rules! run {
        ($hd:literal) => {{
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the function only enables AVX-512F, which the CPU was just checked
                // to have; its body is safe code.
                unsafe { avx512::attention::<$hd>(q, k, v, mask, (t, row0, scale), out) };
                return true;
            }
            attention_body::<$hd, false>(q, k, v, mask, (t, row0, scale), out, dot::<$hd>);
            true
        }};
    }
    match hd {
        64 => run!(64),
        128 => run!(128),
        _ => false,
    }
}

/// `log(sum(exp(x * scale)))` for `scale > 0`, stable (the maximum is taken out first).
pub fn log_sum_exp(x: &[f32], scale: f32) -> f64 {
    let m = max(x) * scale;
    m as f64 + sum_exp(x, scale, m).ln()
}

/// `x = softmax(x * scale + mask)` in place; `mask` (additive, -inf for excluded entries) has
/// x's length, or is empty for none. A row with every entry excluded becomes NaN.
pub fn softmax(x: &mut [f32], scale: f32, mask: &[f32]) {
    let (scale, m) = if mask.is_empty() {
        (scale, max(x) * scale)
    } else {
        assert_eq!(mask.len(), x.len(), "softmax: mask and row lengths differ");
        (1.0, scale_add_max(x, scale, mask))
    };
    let total = exp_in_place(x, scale, m);
    mul(x, (1.0 / total) as f32);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32 of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_over_the_normal_range() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp(x), want));
            x += 0.001_37;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
    }

    /// Rows of lengths around the lane and block sizes, with a NaN-free pseudo-random fill.
    fn rows() -> Vec<Vec<f32>> {
        [0usize, 1, 7, 15, 16, 17, 255, 256, 257, 1000, 49_152]
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 40.0)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn reductions_match_f64() {
        for row in rows() {
            let want_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&row), want_max);
            for scale in [1.0f32, 1.0 / 0.7] {
                let m = want_max * scale;
                let want: f64 = row
                    .iter()
                    .map(|&v| (v as f64 * scale as f64 - m as f64).exp())
                    .sum();
                let got = sum_exp(&row, scale, m);
                assert!(
                    (got - want).abs() <= 1e-6 * want.max(1e-30),
                    "{got} vs {want}"
                );
                let mut e = row.clone();
                assert!((exp_in_place(&mut e, scale, m) - got).abs() <= 1e-9 * got.max(1.0));
                if !row.is_empty() {
                    let lse = log_sum_exp(&row, scale);
                    assert!((lse - (m as f64 + want.ln())).abs() < 1e-5, "{lse}");
                }
            }
        }
    }

    #[test]
    fn softmax_with_and_without_mask_matches_f64() {
        for row in rows().into_iter().filter(|r| !r.is_empty()) {
            let n = row.len();
            // Exclude every third entry but the first.
            let mask: Vec<f32> = (0..n)
                .map(|i| if i % 3 == 2 { f32::NEG_INFINITY } else { 0.0 })
                .collect();
            for mask in [vec![], mask] {
                let scale = 0.125f32;
                let shifted: Vec<f64> = row
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| v as f64 * scale as f64 + mask.get(i).map_or(0.0, |&m| m as f64))
                    .collect();
                let m = shifted.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = shifted.iter().map(|v| (v - m).exp()).sum();
                let mut got = row.clone();
                softmax(&mut got, scale, &mask);
                for (i, (&g, s)) in got.iter().zip(&shifted).enumerate() {
                    let want = ((s - m).exp() / z) as f32;
                    assert!(
                        (g - want).abs() <= 1e-6 * want.max(1e-6),
                        "row {n} entry {i}: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn nan_propagates_through_softmax() {
        let mut row = vec![0.0f32, f32::NAN, 1.0];
        softmax(&mut row, 1.0, &[]);
        assert!(row.iter().all(|v| v.is_nan()));
    }
}

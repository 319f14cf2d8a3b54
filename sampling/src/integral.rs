//! JSON integers as JSON Schema (and so OpenAPI 3.1) defines them: any number with a zero
//! fractional part, so `2710` and `2710.0` are the same token id. serde reads only the first
//! into a `u32`; these readers take both, for `#[serde(deserialize_with = ...)]` on the
//! integer fields of requests, and refuse a fraction, a negative number or one out of range.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

/// An unsigned integer read from a JSON integer or an integral float, at most `max`.
struct Unsigned {
    max: u64,
    what: &'static str,
}

impl Visitor<'_> for Unsigned {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an integer in 0..={} ({})", self.max, self.what)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        if v <= self.max {
            Ok(v)
        } else {
            Err(E::invalid_value(de::Unexpected::Unsigned(v), &self))
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        match u64::try_from(v) {
            Ok(u) => self.visit_u64(u),
            Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        // Exactly representable up to 2^53; beyond, a float names no one integer.
        if v.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(&v) && v as u64 <= self.max
        {
            Ok(v as u64)
        } else {
            Err(E::invalid_value(de::Unexpected::Float(v), &self))
        }
    }
}

/// A `u32` (`#[serde(deserialize_with = "sampling::integral::u32")]`).
pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = d.deserialize_any(Unsigned {
        max: u64::from(u32::MAX),
        what: "u32",
    })?;
    Ok(v as u32)
}

/// A `u64`.
pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(Unsigned {
        max: u64::MAX,
        what: "u64",
    })
}

/// An optional `u32` (`null` or absent: `None`, with `#[serde(default)]`).
pub fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Ok(Option::<U32>::deserialize(d)?.map(|v| v.0))
}

/// An optional `u64`.
pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(Option::<U64>::deserialize(d)?.map(|v| v.0))
}

/// A list of `u32` (token ids).
pub fn u32s<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    d.deserialize_seq(List(std::marker::PhantomData::<U32>))
        .map(|v| v.into_iter().map(|x| x.0).collect())
}

/// An optional list of `u32`.
pub fn opt_u32s<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u32>>, D::Error> {
    Ok(Option::<U32s>::deserialize(d)?.map(|v| v.0))
}

/// Lists of lists of `u32` (several token-id prompts).
pub fn u32s_lists<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u32>>, D::Error> {
    d.deserialize_seq(List(std::marker::PhantomData::<U32s>))
        .map(|v| v.into_iter().map(|x| x.0).collect())
}

/// A `u32` read by [`u32`], for use inside other types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct U32(pub u32);

impl<'de> Deserialize<'de> for U32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u32(d).map(U32)
    }
}

/// A `u64` read by [`u64`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct U64(pub u64);

impl<'de> Deserialize<'de> for U64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u64(d).map(U64)
    }
}

/// A list of `u32` read by [`u32s`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct U32s(pub Vec<u32>);

impl<'de> Deserialize<'de> for U32s {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u32s(d).map(U32s)
    }
}

struct List<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for List<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a list")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        // Bounded by what arrives, not by a size the client states.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(x) = seq.next_element()? {
            out.push(x);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Ids {
        #[serde(deserialize_with = "u32s")]
        ids: Vec<u32>,
        #[serde(default, deserialize_with = "opt_u64")]
        seed: Option<u64>,
    }

    #[test]
    fn integral_floats_are_integers() {
        let v: Ids = serde_json::from_str(r#"{"ids": [1, 2710.0, 0], "seed": 7.0}"#).unwrap();
        assert_eq!((v.ids, v.seed), (vec![1, 2710, 0], Some(7)));
        let v: Ids = serde_json::from_str(r#"{"ids": [], "seed": null}"#).unwrap();
        assert_eq!((v.ids.len(), v.seed), (0, None));
        let v: Ids =
            serde_json::from_str(r#"{"ids": [4294967295], "seed": 18446744073709551615}"#).unwrap();
        assert_eq!((v.ids, v.seed), (vec![u32::MAX], Some(u64::MAX)));
        for bad in [
            r#"{"ids": [1.5]}"#,
            r#"{"ids": [-1]}"#,
            r#"{"ids": [4294967296]}"#,
            r#"{"ids": [1e300]}"#,
            r#"{"ids": ["3"]}"#,
            r#"{"ids": 3}"#,
        ] {
            let e = serde_json::from_str::<Ids>(bad).unwrap_err().to_string();
            assert!(
                e.contains("an integer in 0..=4294967295") || e.contains("a list"),
                "{bad}: {e}"
            );
        }
    }
}

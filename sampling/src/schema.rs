//! Each knob's rule in an OpenAPI document (feature `openapi`): the same bounds the knob's
//! constructor checks, from the same constants, so that a document can never promise a value
//! the server refuses or refuse one it takes. Also the schemas of the integers [`crate::integral`]
//! reads, for `#[schema(value_type = ...)]` on fields it reads: a token id ([`TokenId`]) and a
//! seed ([`Seed`]), with their whole ranges stated.

use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use crate::{MaxTokens, ScoreTemperature, Temperature, TopP};
use crate::{GREEDY_BELOW, MAX_TEMPERATURE, MAX_TOKENS_LIMIT};

fn described(kind: Type, rule: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(kind)
        .description(Some(format!("A value {rule}.")))
}

impl PartialSchema for Temperature {
    fn schema() -> RefOr<Schema> {
        described(Type::Number, Self::RULE)
            .minimum(Some(0.0))
            .maximum(Some(MAX_TEMPERATURE))
            .into()
    }
}
impl ToSchema for Temperature {}

impl PartialSchema for ScoreTemperature {
    fn schema() -> RefOr<Schema> {
        described(Type::Number, Self::RULE)
            .minimum(Some(GREEDY_BELOW))
            .maximum(Some(MAX_TEMPERATURE))
            .into()
    }
}
impl ToSchema for ScoreTemperature {}

impl PartialSchema for TopP {
    fn schema() -> RefOr<Schema> {
        described(Type::Number, Self::RULE)
            .exclusive_minimum(Some(0.0))
            .maximum(Some(1.0))
            .into()
    }
}
impl ToSchema for TopP {}

impl PartialSchema for MaxTokens {
    fn schema() -> RefOr<Schema> {
        described(Type::Integer, Self::RULE)
            .minimum(Some(1))
            .maximum(Some(MAX_TOKENS_LIMIT as usize))
            .into()
    }
}
impl ToSchema for MaxTokens {}

fn integer(max: u64, format: &str, what: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(utoipa::openapi::SchemaFormat::Custom(format.into())))
        .minimum(Some(0u64))
        .maximum(Some(max))
        .description(Some(what.to_string()))
        .into()
}

/// The schema of a token id: an integer in `0..=4294967295` (a server also holds it to its
/// vocabulary). Schema only: the field is a `u32` read by [`crate::integral`].
#[derive(Debug)]
pub struct TokenId;

impl PartialSchema for TokenId {
    fn schema() -> RefOr<Schema> {
        integer(
            u64::from(u32::MAX),
            "uint32",
            "A token id (the server also holds it to its vocabulary).",
        )
    }
}
impl ToSchema for TokenId {}

/// The schema of a sampling seed: any integer in `0..=18446744073709551615`. Schema only: the
/// field is a `u64` read by [`crate::integral`].
#[derive(Debug)]
pub struct Seed;

impl PartialSchema for Seed {
    fn schema() -> RefOr<Schema> {
        integer(
            u64::MAX,
            "uint64",
            "A seed: the same seed, the same tokens.",
        )
    }
}
impl ToSchema for Seed {}

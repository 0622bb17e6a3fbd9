//! protojson support: per-field JSON codecs and the `message!` macro that gives every wire message its
//! `Serialize`/`Deserialize` implementation.
//!
//! The rules follow Go's `protojson` (the library Querator uses), so a Querator client sees the same JSON:
//!
//! * output uses the field's `json_name`; zero values (empty string, `0`, `false`, empty list, empty map,
//!   absent message) are omitted;
//! * input accepts the `json_name` and every alias the message lists (the proto field name), rejects
//!   unknown and duplicated fields with an error that names the field, and treats `null` as the default;
//! * `bytes` are standard base64 on output; input accepts standard or URL-safe, padded or not;
//! * `int32` is a JSON number on output; input takes a number or a string holding an integer; `int64` is a
//!   string on output (protojson's rule) and takes either on input; `double` is a number (`"NaN"` and
//!   `"Infinity"` as strings); a proto3 `optional` field is written whenever it is set, zero included;
//! * a message must be a JSON object (an array is refused, unlike serde's derived structs).
//!
//! This module is private: the macro and codecs are implementation details of the message modules.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, Visitor};
use serde::ser::{Serialize, Serializer};

/// How one field kind is written to and read from JSON.
pub(crate) trait Codec {
    /// The Rust type of the field.
    type Value: Default;
    /// True when the value is the proto3 default and must be left out of the output.
    fn is_default(v: &Self::Value) -> bool;
    /// Writes a non-default value.
    fn ser<S: Serializer>(v: &Self::Value, s: S) -> Result<S::Ok, S::Error>;
    /// Reads a value that is not `null` (null is handled by [`Field`]).
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Self::Value, D::Error>;
}

/// `string` fields.
pub(crate) struct Str;

impl Codec for Str {
    type Value = String;
    fn is_default(v: &String) -> bool {
        v.is_empty()
    }
    fn ser<S: Serializer>(v: &String, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        <String as de::Deserialize>::deserialize(d)
    }
}

/// `bool` fields.
pub(crate) struct Bool;

impl Codec for Bool {
    type Value = bool;
    fn is_default(v: &bool) -> bool {
        !*v
    }
    fn ser<S: Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(*v)
    }
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        <bool as de::Deserialize>::deserialize(d)
    }
}

/// `int32` fields: a number on output; a number or a decimal string on input.
pub(crate) struct I32;

impl Codec for I32 {
    type Value = i32;
    fn is_default(v: &i32) -> bool {
        *v == 0
    }
    fn ser<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(*v)
    }
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        d.deserialize_any(I32Visitor)
    }
}

struct I32Visitor;

impl I32Visitor {
    fn from_i128<E: de::Error>(v: i128) -> Result<i32, E> {
        i32::try_from(v).map_err(|_| E::custom(format_args!("int32 value {v} is out of range")))
    }

    fn from_f64<E: de::Error>(v: f64) -> Result<i32, E> {
        if v.fract() != 0.0 || !v.is_finite() {
            return Err(E::custom(format_args!("int32 value {v} is not an integer")));
        }
        if v < f64::from(i32::MIN) || v > f64::from(i32::MAX) {
            return Err(E::custom(format_args!("int32 value {v} is out of range")));
        }
        // In range and integral, so the cast is exact.
        Ok(v as i32)
    }
}

impl<'de> Visitor<'de> for I32Visitor {
    type Value = i32;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a 32-bit integer (number or string)")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i32, E> {
        Self::from_i128(i128::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i32, E> {
        Self::from_i128(i128::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<i32, E> {
        Self::from_f64(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<i32, E> {
        if v.trim() != v || v.is_empty() {
            return Err(E::custom(format_args!("invalid int32 string '{v}'")));
        }
        if let Ok(n) = v.parse::<i64>() {
            return Self::from_i128(i128::from(n));
        }
        match v.parse::<f64>() {
            Ok(f) => Self::from_f64(f),
            Err(_) => Err(E::custom(format_args!("invalid int32 string '{v}'"))),
        }
    }
}

/// proto3 `optional int32` fields (`Option<i32>`, explicit presence): written whenever set, zero included, so
/// "absent" and "0" stay different (Lessor's browse filter uses this: absent means any priority).
pub(crate) struct OptI32;

impl Codec for OptI32 {
    type Value = Option<i32>;
    fn is_default(v: &Option<i32>) -> bool {
        v.is_none()
    }
    fn ser<S: Serializer>(v: &Option<i32>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_i32(*n),
            None => s.serialize_none(),
        }
    }
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
        d.deserialize_any(I32Visitor).map(Some)
    }
}

/// `int64` fields: a decimal string on output (protojson's rule, since JavaScript numbers lose precision past
/// 2^53); a number or a decimal string on input.
pub(crate) struct I64;

impl Codec for I64 {
    type Value = i64;
    fn is_default(v: &i64) -> bool {
        *v == 0
    }
    fn ser<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        d.deserialize_any(I64Visitor)
    }
}

struct I64Visitor;

impl I64Visitor {
    fn from_f64<E: de::Error>(v: f64) -> Result<i64, E> {
        // 2^63 is exact in f64; anything at or above it (or below -2^63) does not fit.
        const LIMIT: f64 = 9_223_372_036_854_775_808.0;
        if v.fract() != 0.0 || !v.is_finite() {
            return Err(E::custom(format_args!("int64 value {v} is not an integer")));
        }
        if !(-LIMIT..LIMIT).contains(&v) {
            return Err(E::custom(format_args!("int64 value {v} is out of range")));
        }
        Ok(v as i64)
    }
}

impl<'de> Visitor<'de> for I64Visitor {
    type Value = i64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a 64-bit integer (number or string)")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
        Ok(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
        i64::try_from(v).map_err(|_| E::custom(format_args!("int64 value {v} is out of range")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
        Self::from_f64(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<i64, E> {
        if v.trim() != v || v.is_empty() {
            return Err(E::custom(format_args!("invalid int64 string '{v}'")));
        }
        if let Ok(n) = v.parse::<i64>() {
            return Ok(n);
        }
        match v.parse::<f64>() {
            Ok(f) => Self::from_f64(f),
            Err(_) => Err(E::custom(format_args!("invalid int64 string '{v}'"))),
        }
    }
}

/// `double` fields: a JSON number on output (`"NaN"`, `"Infinity"`, `"-Infinity"` as strings, as protojson
/// writes them); a number or such a string on input.
pub(crate) struct F64;

impl Codec for F64 {
    type Value = f64;
    fn is_default(v: &f64) -> bool {
        // Negative zero is not the default bit pattern; protojson writes it.
        v.to_bits() == 0
    }
    fn ser<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_nan() {
            s.serialize_str("NaN")
        } else if v.is_infinite() {
            s.serialize_str(if *v > 0.0 { "Infinity" } else { "-Infinity" })
        } else {
            s.serialize_f64(*v)
        }
    }
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        d.deserialize_any(F64Visitor)
    }
}

struct F64Visitor;

impl<'de> Visitor<'de> for F64Visitor {
    type Value = f64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number (or a string holding one)")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<f64, E> {
        Ok(v as f64)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<f64, E> {
        Ok(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<f64, E> {
        match v {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            _ if v.trim() != v || v.is_empty() => Err(E::custom(format_args!("invalid double string '{v}'"))),
            _ => v
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| E::custom(format_args!("invalid double string '{v}'"))),
        }
    }
}

/// `bytes` fields: standard padded base64 out; standard or URL-safe, padded or not, in.
pub(crate) struct Bytes;

const B64_LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const B64_STD_IN: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, B64_LENIENT);
const B64_URL_IN: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, B64_LENIENT);

/// Decodes protojson `bytes`: standard or URL-safe alphabet, with or without padding.
pub(crate) fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
    match B64_STD_IN.decode(s) {
        Ok(v) => Ok(v),
        Err(std_err) => B64_URL_IN.decode(s).map_err(|_| std_err.to_string()),
    }
}

/// Encodes protojson `bytes`: standard alphabet with padding.
pub(crate) fn encode_base64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

impl Codec for Bytes {
    type Value = Vec<u8>;
    fn is_default(v: &Vec<u8>) -> bool {
        v.is_empty()
    }
    fn ser<S: Serializer>(v: &Vec<u8>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode_base64(v))
    }
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <String as de::Deserialize>::deserialize(d)?;
        decode_base64(&s).map_err(|e| de::Error::custom(format_args!("invalid base64 in bytes field: {e}")))
    }
}

/// Singular message fields (`Option<M>`); absent means not set.
pub(crate) struct Msg<M>(PhantomData<M>);

impl<M: Serialize + DeserializeOwned> Codec for Msg<M> {
    type Value = Option<M>;
    fn is_default(v: &Option<M>) -> bool {
        v.is_none()
    }
    fn ser<S: Serializer>(v: &Option<M>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(m) => m.serialize(s),
            None => s.serialize_none(),
        }
    }
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<M>, D::Error> {
        M::deserialize(d).map(Some)
    }
}

/// Repeated fields of messages or strings (`Vec<T>`). A `null` element is an error, as in protojson.
pub(crate) struct Rep<T>(PhantomData<T>);

impl<T: Serialize + DeserializeOwned> Codec for Rep<T> {
    type Value = Vec<T>;
    fn is_default(v: &Vec<T>) -> bool {
        v.is_empty()
    }
    fn ser<S: Serializer>(v: &Vec<T>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v)
    }
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        <Vec<T> as de::Deserialize>::deserialize(d)
    }
}

/// `map<string, string>` fields; written with sorted keys so output is deterministic.
pub(crate) struct StrMap;

impl Codec for StrMap {
    type Value = HashMap<String, String>;
    fn is_default(v: &HashMap<String, String>) -> bool {
        v.is_empty()
    }
    fn ser<S: Serializer>(v: &HashMap<String, String>, s: S) -> Result<S::Ok, S::Error> {
        let sorted: BTreeMap<&String, &String> = v.iter().collect();
        sorted.serialize(s)
    }
    fn de<'de, D: Deserializer<'de>>(d: D) -> Result<HashMap<String, String>, D::Error> {
        <HashMap<String, String> as de::Deserialize>::deserialize(d)
    }
}

/// Serialises one field through its codec.
pub(crate) struct SerField<'a, C: Codec>(pub(crate) &'a C::Value);

impl<C: Codec> Serialize for SerField<'_, C> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        C::ser(self.0, s)
    }
}

/// Deserialises one field through its codec, mapping JSON `null` to the default value.
pub(crate) struct Field<C>(PhantomData<C>);

impl<C> Field<C> {
    pub(crate) fn new() -> Self {
        Field(PhantomData)
    }
}

impl<'de, C: Codec> DeserializeSeed<'de> for Field<C> {
    type Value = C::Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<C::Value, D::Error> {
        d.deserialize_option(NullOr::<C>(PhantomData))
    }
}

struct NullOr<C>(PhantomData<C>);

impl<'de, C: Codec> Visitor<'de> for NullOr<C> {
    type Value = C::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field value or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<C::Value, E> {
        Ok(C::Value::default())
    }

    fn visit_unit<E: de::Error>(self) -> Result<C::Value, E> {
        Ok(C::Value::default())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<C::Value, D::Error> {
        C::de(d)
    }
}

/// Declares a wire message: the struct itself (its attributes, including the prost derive, are passed
/// through unchanged) plus protojson `Serialize`/`Deserialize` implementations.
///
/// Each field carries `#[json(Codec, "json_name", "alias"...)]` before its `#[prost(...)]` attribute.
macro_rules! message {
    (
        $(#[$smeta:meta])*
        pub struct $name:ident {
            $(
                $(#[doc = $fdoc:literal])*
                #[json($codec:ty, $json:literal $(, $alias:literal)* $(,)?)]
                #[prost($($prost:tt)*)]
                pub $field:ident : $fty:ty,
            )*
        }
    ) => {
        $(#[$smeta])*
        pub struct $name {
            $(
                $(#[doc = $fdoc])*
                #[prost($($prost)*)]
                pub $field: $fty,
            )*
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error> {
                use ::serde::ser::SerializeMap as _;
                #[allow(unused_mut)]
                let mut len = 0usize;
                $(
                    if !<$codec as $crate::json::Codec>::is_default(&self.$field) {
                        len += 1;
                    }
                )*
                #[allow(unused_mut)]
                let mut map = s.serialize_map(Some(len))?;
                $(
                    if !<$codec as $crate::json::Codec>::is_default(&self.$field) {
                        map.serialize_entry($json, &$crate::json::SerField::<$codec>(&self.$field))?;
                    }
                )*
                map.end()
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> ::std::result::Result<Self, D::Error> {
                struct V;
                impl<'de> ::serde::de::Visitor<'de> for V {
                    type Value = $name;

                    fn expecting(&self, f: &mut ::std::fmt::Formatter) -> ::std::fmt::Result {
                        f.write_str(concat!("a JSON object for ", stringify!($name)))
                    }

                    fn visit_map<A: ::serde::de::MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> ::std::result::Result<$name, A::Error> {
                        use ::serde::de::Error as _;
                        #[allow(unused_mut)]
                        let mut out = <$name as ::std::default::Default>::default();
                        let mut seen: ::std::vec::Vec<&'static str> = ::std::vec::Vec::new();
                        while let Some(key) = map.next_key::<::std::string::String>()? {
                            match &*key {
                                $(
                                    $json $(| $alias)* => {
                                        if seen.contains(&$json) {
                                            return Err(A::Error::custom(format_args!(
                                                "duplicate field '{}'", key
                                            )));
                                        }
                                        seen.push($json);
                                        out.$field = map.next_value_seed(
                                            $crate::json::Field::<$codec>::new()
                                        )?;
                                    }
                                )*
                                other => {
                                    return Err(A::Error::custom(format_args!(
                                        "unknown field '{}'", other
                                    )));
                                }
                            }
                        }
                        Ok(out)
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
}

pub(crate) use message;

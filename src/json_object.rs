//! Request objects that are JSON objects only.
//!
//! serde's derived `Deserialize` for a struct also reads a JSON array of its fields in
//! declaration order: `["hello"]` parses as `{"text": "hello"}`, and an untagged enum of
//! structs picks a variant the same way. The OpenAPI document says "object", and no client
//! means an array there, so every request struct is read through [`Object`] (the body) or
//! [`object`] / [`optional_object`] (a nested field), which refuse anything but an object.

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// `T` read from a JSON object, and from nothing else.
#[derive(Debug, Clone, PartialEq)]
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_map(ObjectVisitor(PhantomData))
            .map(Object)
    }
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map))
    }
}

/// For `#[serde(deserialize_with = "object")]` on a field whose type is a struct.
pub fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Object::deserialize(d).map(|Object(value)| value)
}

/// [`object`] for an optional field (`null` reads as `None`); pair it with `#[serde(default)]`.
pub fn optional_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Option::<Object<T>>::deserialize(d).map(|value| value.map(|Object(value)| value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        a: u32,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        text: String,
        #[serde(default, deserialize_with = "optional_object")]
        inner: Option<Inner>,
    }

    fn read(json: &str) -> Result<Outer, serde_json::Error> {
        serde_json::from_str::<Object<Outer>>(json).map(|Object(o)| o)
    }

    #[test]
    fn objects_read_as_before() {
        let o = read(r#"{"text": "x", "inner": {"a": 3}}"#).unwrap();
        assert_eq!(
            o,
            Outer {
                text: "x".into(),
                inner: Some(Inner { a: 3 })
            }
        );
        assert_eq!(read(r#"{"text": "x"}"#).unwrap().inner, None);
        assert_eq!(read(r#"{"text": "x", "inner": null}"#).unwrap().inner, None);
        // The struct's own checks still run inside the object.
        let err = read(r#"{"text": "x", "other": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `other`"), "{err}");
    }

    #[test]
    fn arrays_and_other_values_are_refused() {
        // A derived struct alone would take these as its fields in order.
        assert!(serde_json::from_str::<Outer>(r#"["x"]"#).is_ok());
        for body in [r#"["x"]"#, r#""x""#, "3", r#"{"text": "x", "inner": [3]}"#] {
            let err = read(body).unwrap_err().to_string();
            assert!(err.contains("expected a JSON object"), "{body}: {err}");
        }
    }
}

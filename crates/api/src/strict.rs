//! How request bodies are read: JSON objects only, and integers however JSON writes them.
//!
//! serde's derive reads a struct from a map *or* from a sequence of its fields in order,
//! so `["u1", "pw", "auditor"]` would make a user. [`object_only!`] gives a type a
//! `Deserialize` that asks the format for a map, which a JSON array is not. The derive is
//! kept (as `#[serde(remote = "Self")]`, an inherent `deserialize`), so field names in
//! errors and `deny_unknown_fields` behave as before.

use serde::de::{self, Deserializer, Visitor};

/// A deserializer that reads structs as maps only.
pub struct MapOnly<D>(pub D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for MapOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct enum identifier
        ignored_any
    }
}

/// Implements `Serialize` and an objects-only `Deserialize` for types deriving both with
/// `#[serde(remote = "Self")]`.
#[macro_export]
macro_rules! object_only {
    ($($t:ty),* $(,)?) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                <$t>::serialize(self, s)
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <$t>::deserialize($crate::strict::MapOnly(d))
            }
        }
    )*};
}

/// Reads an integer written as `3` or `3.0` (JSON Schema's `integer` allows both).
pub fn int<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let v = d.deserialize_any(Integral)?;
    T::try_from(v).map_err(|_| de::Error::custom(format!("integer {v} out of range")))
}

/// [`int`] for optional fields (`null` or absent is `None`).
pub fn opt_int<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Opt<T>(std::marker::PhantomData<T>);
    impl<'de, T: TryFrom<u64>> Visitor<'de> for Opt<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a non-negative integer or null")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            int(d).map(Some)
        }
    }
    d.deserialize_option(Opt(std::marker::PhantomData))
}

struct Integral;

impl Visitor<'_> for Integral {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a non-negative integer")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        // Every integral f64 in [0, 2^64) converts exactly.
        if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
            Ok(v as u64)
        } else {
            Err(E::invalid_value(de::Unexpected::Float(v), &self))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(remote = "Self", deny_unknown_fields)]
    struct Pair {
        name: String,
        #[serde(deserialize_with = "super::int")]
        n: u32,
        #[serde(default, deserialize_with = "super::opt_int")]
        m: Option<u16>,
    }
    crate::object_only!(Pair);

    fn read(s: &str) -> Result<Pair, String> {
        serde_json::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn objects_are_read_and_arrays_refused() {
        let p = read(r#"{"name":"a","n":3}"#).unwrap();
        assert_eq!((p.name.as_str(), p.n, p.m), ("a", 3, None));
        let e = read(r#"["a",3]"#).unwrap_err();
        assert!(e.contains("invalid type: sequence"), "{e}");
        let e = read(r#"{"name":"a","n":3,"x":1}"#).unwrap_err();
        assert!(e.contains("unknown field `x`"), "{e}");
        assert!(read("null").is_err());
        assert_eq!(
            serde_json::to_string(&Pair {
                name: "a".into(),
                n: 1,
                m: Some(2)
            })
            .unwrap(),
            r#"{"name":"a","n":1,"m":2}"#
        );
    }

    #[test]
    fn integers_may_be_written_as_integral_numbers() {
        assert_eq!(read(r#"{"name":"a","n":3.0,"m":7.0}"#).unwrap().m, Some(7));
        assert_eq!(read(r#"{"name":"a","n":3,"m":null}"#).unwrap().m, None);
        for bad in ["3.5", "-1", "4294967296", "\"3\"", "1e300"] {
            let e = read(&format!(r#"{{"name":"a","n":{bad}}}"#));
            assert!(e.is_err(), "{bad}");
        }
    }
}

//! A serde `Deserializer` over the YAML tree of [`super::yaml`], for the typed sweep options.
//!
//! The typed options (`name`, `max_jobs`, `retries`, ...) are read from the tree the file was
//! already parsed into, rather than by parsing the text a second time: a second parser keeps every
//! event of the document in memory, about 150 bytes for each list element of `parameters`, which
//! the options never look at. Blocks deserialized as `IgnoredAny` are skipped without a walk.
//!
//! Values resolve as `serde_yaml` resolves them (YAML 1.2 core schema for plain scalars, quoted
//! scalars are strings), and errors read the same: `path: message` at the line and column of the
//! offending key or value (``retries: invalid type: integer `-1`, expected u32``).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, Unexpected, Visitor};

use super::value::{self, Resolved};
use super::yaml::{Kind, Node, Pos, Style};

/// A deserialization error, with the position and path of the node it is about.
#[derive(Debug)]
pub(crate) struct DeError {
    message: String,
    pos: Option<Pos>,
    /// Where in the document, like `zip[0][1]`; `None` at the top level.
    path: Option<String>,
}

impl DeError {
    /// Where the error is, when known.
    pub(crate) fn pos(&self) -> Option<Pos> {
        self.pos
    }

    /// Fills in the place of an error raised by a visitor, which knows neither.
    fn at(mut self, node: &Node, path: Path<'_>) -> Self {
        if self.pos.is_none() {
            self.pos = Some(node.pos);
            if !matches!(path, Path::Root) {
                self.path = Some(path.to_string());
            }
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{path}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self {
            message: msg.to_string(),
            pos: None,
            path: None,
        }
    }
}

/// Where a node sits in the document, printed like `serde_yaml` prints it.
#[derive(Debug, Clone, Copy)]
enum Path<'a> {
    Root,
    Seq(&'a Path<'a>, usize),
    Map(&'a Path<'a>, &'a str),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Root => f.write_str("."),
            Self::Seq(parent, index) => write!(f, "{parent}[{index}]"),
            Self::Map(Self::Root, key) => f.write_str(key),
            Self::Map(parent, key) => write!(f, "{parent}.{key}"),
        }
    }
}

/// Deserializes `T` from a node of the tree.
pub(crate) fn from_node<'de, T: de::Deserialize<'de>>(node: &'de Node) -> Result<T, DeError> {
    T::deserialize(NodeDe {
        node,
        path: Path::Root,
    })
}

struct NodeDe<'de, 'p> {
    node: &'de Node,
    path: Path<'p>,
}

/// What a plain scalar is, as a serde value.
enum Plain<'t> {
    Null,
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Str(&'t str),
}

fn plain(text: &str) -> Plain<'_> {
    match value::resolve_plain(text) {
        Resolved::Null => Plain::Null,
        Resolved::Bool(b) => Plain::Bool(b),
        Resolved::Int => match parse_int(text) {
            Some(Ok(u)) => Plain::Unsigned(u),
            Some(Err(i)) => Plain::Signed(i),
            None => text.parse().map_or(Plain::Str(text), Plain::Float),
        },
        Resolved::Float => parse_float(text).map_or(Plain::Str(text), Plain::Float),
        Resolved::Str => Plain::Str(text),
    }
}

/// A core-schema int as `u64` (`Ok`) or, when negative, `i64` (`Err`); `None` out of range.
fn parse_int(text: &str) -> Option<Result<u64, i64>> {
    let (neg, body) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let magnitude = if let Some(hex) = body.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()?
    } else if let Some(oct) = body.strip_prefix("0o") {
        u64::from_str_radix(oct, 8).ok()?
    } else {
        body.parse().ok()?
    };
    if neg && magnitude != 0 {
        let i = 0i64.checked_sub_unsigned(magnitude)?;
        Some(Err(i))
    } else {
        Some(Ok(magnitude))
    }
}

fn parse_float(text: &str) -> Option<f64> {
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let neg = text.starts_with('-');
    let v = match body {
        ".inf" | ".Inf" | ".INF" => f64::INFINITY,
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => body.parse().ok()?,
    };
    Some(if neg { -v } else { v })
}

impl<'de, 'p> NodeDe<'de, 'p> {
    /// The scalar's text and style; tagged nodes are never scalars here.
    fn scalar(&self) -> Option<(&'de str, Style)> {
        self.node.as_scalar()
    }

    fn unexpected(&self) -> Unexpected<'de> {
        match (&self.node.kind, self.node.as_scalar()) {
            (_, Some((text, Style::Plain))) => match plain(text) {
                Plain::Null => Unexpected::Unit,
                Plain::Bool(b) => Unexpected::Bool(b),
                Plain::Unsigned(u) => Unexpected::Unsigned(u),
                Plain::Signed(i) => Unexpected::Signed(i),
                Plain::Float(f) => Unexpected::Float(f),
                Plain::Str(s) => Unexpected::Str(s),
            },
            (_, Some((text, Style::Quoted))) => Unexpected::Str(text),
            (Kind::Map(_), None) => Unexpected::Map,
            (Kind::Seq(_), None) => Unexpected::Seq,
            (Kind::Scalar { .. }, None) => Unexpected::Other("a tagged scalar"),
        }
    }

    fn invalid_type(&self, exp: &dyn de::Expected) -> DeError {
        de::Error::invalid_type(self.unexpected(), exp)
    }

    fn fail(&self, err: DeError) -> DeError {
        err.at(self.node, self.path)
    }

    fn visit_unsigned<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match self.scalar() {
            Some((text, Style::Plain)) => match plain(text) {
                Plain::Unsigned(u) => visitor.visit_u64(u),
                _ => Err(self.invalid_type(&visitor)),
            },
            _ => Err(self.invalid_type(&visitor)),
        };
        r.map_err(|e| self.fail(e))
    }

    fn visit_signed<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match self.scalar() {
            Some((text, Style::Plain)) => match plain(text) {
                Plain::Unsigned(u) => visitor.visit_u64(u),
                Plain::Signed(i) => visitor.visit_i64(i),
                _ => Err(self.invalid_type(&visitor)),
            },
            _ => Err(self.invalid_type(&visitor)),
        };
        r.map_err(|e| self.fail(e))
    }
}

impl<'de> Deserializer<'de> for NodeDe<'de, '_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match (&self.node.kind, self.scalar()) {
            (_, Some((text, Style::Plain))) => match plain(text) {
                Plain::Null => visitor.visit_unit(),
                Plain::Bool(b) => visitor.visit_bool(b),
                Plain::Unsigned(u) => visitor.visit_u64(u),
                Plain::Signed(i) => visitor.visit_i64(i),
                Plain::Float(f) => visitor.visit_f64(f),
                Plain::Str(s) => visitor.visit_borrowed_str(s),
            },
            (_, Some((text, Style::Quoted))) => visitor.visit_borrowed_str(text),
            (Kind::Map(entries), _) => visitor.visit_map(MapAccess {
                entries,
                next: 0,
                path: self.path,
            }),
            (Kind::Seq(items), _) => visitor.visit_seq(SeqAccess {
                items,
                next: 0,
                path: self.path,
            }),
            (Kind::Scalar { .. }, None) => Err(self.invalid_type(&visitor)),
        };
        r.map_err(|e| self.fail(e))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.scalar() {
            Some((text, Style::Plain)) if value::resolve_plain(text) == Resolved::Null => {
                visitor.visit_none().map_err(|e| self.fail(e))
            }
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.visit_unsigned(visitor)
    }

    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.visit_unsigned(visitor)
    }

    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.visit_unsigned(visitor)
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.visit_unsigned(visitor)
    }

    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.visit_signed(visitor)
    }

    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.visit_signed(visitor)
    }

    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.visit_signed(visitor)
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.visit_signed(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match self.scalar() {
            Some((text, _)) => visitor.visit_borrowed_str(text),
            None => Err(self.invalid_type(&visitor)),
        };
        r.map_err(|e| self.fail(e))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match (&self.node.kind, self.scalar()) {
            (Kind::Seq(items), _) => visitor.visit_seq(SeqAccess {
                items,
                next: 0,
                path: self.path,
            }),
            // `zip:` with nothing after it is an empty list, as in serde_yaml.
            (_, Some(("", Style::Plain))) => visitor.visit_seq(SeqAccess {
                items: &[],
                next: 0,
                path: self.path,
            }),
            _ => Err(self.invalid_type(&visitor)),
        };
        r.map_err(|e| self.fail(e))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match (&self.node.kind, self.scalar()) {
            (Kind::Map(entries), None) => visitor.visit_map(MapAccess {
                entries,
                next: 0,
                path: self.path,
            }),
            (_, Some(("", Style::Plain))) => visitor.visit_map(MapAccess {
                entries: &[],
                next: 0,
                path: self.path,
            }),
            _ => Err(self.invalid_type(&visitor)),
        };
        r.map_err(|e| self.fail(e))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        // Only unit variants, written as a scalar (`arg_style: space`).
        let r = match self.scalar() {
            Some((text, _)) => visitor.visit_enum(text.into_deserializer()),
            None => Err(de::Error::invalid_type(
                self.unexpected(),
                &"the name of a variant",
            )),
        };
        r.map_err(|e| self.fail(e))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // Read from the tree elsewhere: nothing to walk here.
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool f32 f64 char bytes byte_buf unit unit_struct newtype_struct tuple_struct
        i128 u128
    }
}

struct SeqAccess<'de, 'p> {
    items: &'de [Node],
    next: usize,
    path: Path<'p>,
}

impl<'de> de::SeqAccess<'de> for SeqAccess<'de, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.get(self.next) else {
            return Ok(None);
        };
        let path = Path::Seq(&self.path, self.next);
        self.next += 1;
        seed.deserialize(NodeDe { node, path }).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len() - self.next)
    }
}

struct MapAccess<'de, 'p> {
    entries: &'de [(Node, Node)],
    next: usize,
    path: Path<'p>,
}

impl<'de> de::MapAccess<'de> for MapAccess<'de, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, _)) = self.entries.get(self.next) else {
            return Ok(None);
        };
        seed.deserialize(NodeDe {
            node: key,
            path: self.path,
        })
        .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let (key, value) = &self.entries[self.next];
        self.next += 1;
        // Keys are scalars: the YAML reader refuses anything else.
        let name = key.as_scalar().map_or("?", |(t, _)| t);
        seed.deserialize(NodeDe {
            node: value,
            path: Path::Map(&self.path, name),
        })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len() - self.next)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde::de::IgnoredAny;

    use super::*;
    use crate::sweep::yaml;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Opts {
        name: Option<String>,
        n: Option<u32>,
        i: Option<i64>,
        #[serde(default)]
        zip: Vec<Vec<String>>,
        style: Option<Style2>,
        skip: Option<IgnoredAny>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Style2 {
        Equals,
        Space,
    }

    fn de(text: &str) -> Result<Opts, String> {
        let root = yaml::parse(text).unwrap().unwrap();
        from_node::<Opts>(&root).map_err(|e| {
            let pos = e.pos().unwrap();
            format!("{}:{}: {e}", pos.line, pos.col)
        })
    }

    #[test]
    fn reads_typed_options_like_serde_yaml() {
        let o =
            de("name: 123\nn: 0x10\ni: -5\nzip: [[a, b]]\nstyle: space\nskip: {x: [1, {y: 2}]}\n")
                .unwrap();
        assert_eq!(o.name.as_deref(), Some("123"));
        assert_eq!(o.n, Some(16));
        assert_eq!(o.i, Some(-5));
        assert_eq!(o.zip, [["a", "b"]]);
        assert_eq!(o.style, Some(Style2::Space));
        let o = de("name: ~\nn:\nzip:\n").unwrap();
        assert_eq!((o.name, o.n, o.zip.len()), (None, None, 0));
        assert_eq!(de("name: 'x y'\n").unwrap().name.as_deref(), Some("x y"));
    }

    #[test]
    fn errors_have_the_path_and_position() {
        let cases = [
            (
                "n: -1\n",
                "1:4: n: invalid type: integer `-1`, expected u32",
            ),
            (
                "n: 5000000000\n",
                "1:4: n: invalid value: integer `5000000000`, expected u32",
            ),
            (
                "n: '5'\n",
                "1:4: n: invalid type: string \"5\", expected u32",
            ),
            (
                "n: 1.5\n",
                "1:4: n: invalid type: floating point `1.5`, expected u32",
            ),
            ("n: [1]\n", "1:4: n: invalid type: sequence, expected u32"),
            (
                "n: true\n",
                "1:4: n: invalid type: boolean `true`, expected u32",
            ),
            (
                "name: [a]\n",
                "1:7: name: invalid type: sequence, expected a string",
            ),
            (
                "name: {a: 1}\n",
                "1:7: name: invalid type: map, expected a string",
            ),
            (
                "zip: [[a, [b]]]\n",
                "1:11: zip[0][1]: invalid type: sequence, expected a string",
            ),
            (
                "zip: a\n",
                "1:6: zip: invalid type: string \"a\", expected a sequence",
            ),
            (
                "n: 1\nnope: 2\n",
                "2:1: unknown field `nope`, expected one of `name`, `n`, `i`, `zip`, `style`, `skip`",
            ),
            (
                "style: colon\n",
                "1:8: style: unknown variant `colon`, expected `equals` or `space`",
            ),
            (
                "style: [a]\n",
                "1:8: style: invalid type: sequence, expected the name of a variant",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(de(text).unwrap_err(), want, "{text}");
        }
    }
}

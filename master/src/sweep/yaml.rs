//! An event-level YAML reader that keeps what the sweep language needs.
//!
//! `serde_yaml::Value` loses three things gridq relies on: tags (`!!python/tuple`), the source
//! text of scalars (`1e-5` must stay `1e-5`) and duplicate keys (it keeps the last one silently).
//! This module builds a small tree from `saphyr-parser` events that keeps all three, together
//! with the line and column of every node, and rejects what gridq never accepts: duplicate keys,
//! non-scalar keys, several documents, and every tag but `!!python/tuple`. Nothing is ever
//! constructed from a tag, so `!!python/object` cannot execute anything.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span};

/// A 1-based line and column in the source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl Pos {
    fn from_span(span: &Span) -> Self {
        Self {
            line: u32::try_from(span.start.line()).unwrap_or(u32::MAX),
            col: u32::try_from(span.start.col() + 1).unwrap_or(u32::MAX),
        }
    }
}

/// How a scalar was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    /// Unquoted: subject to core-schema resolution (`1` is an int, `true` a bool).
    Plain,
    /// Single- or double-quoted, or a block scalar: always a string.
    Quoted,
}

/// The one tag gridq understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tag {
    PythonTuple,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// The text is boxed to its exact length: the parser's strings carry spare capacity (over
    /// 100 bytes for a one-digit number), and a long list keeps one per element.
    Scalar {
        text: Box<str>,
        style: Style,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

/// One YAML node with its position.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    pub(crate) tag: Option<Tag>,
    pub(crate) pos: Pos,
}

impl Node {
    /// The scalar text, when this node is an untagged scalar.
    pub(crate) fn as_scalar(&self) -> Option<(&str, Style)> {
        match &self.kind {
            Kind::Scalar { text, style } if self.tag.is_none() => Some((&**text, *style)),
            _ => None,
        }
    }

    pub(crate) fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.kind {
            Kind::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// A short description of what this node is, for "expected X, found Y" messages.
    pub(crate) fn describe(&self) -> &'static str {
        match (&self.kind, self.tag) {
            (_, Some(Tag::PythonTuple)) => "a !!python/tuple interval",
            (Kind::Scalar { .. }, None) => "a scalar",
            (Kind::Seq(_), None) => "a list",
            (Kind::Map(_), None) => "a mapping",
        }
    }
}

/// A problem found while reading the YAML itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct YamlError {
    pub(crate) pos: Pos,
    pub(crate) message: String,
}

/// Nesting deeper than this is refused (it also bounds recursion on hostile input).
const MAX_DEPTH: usize = 64;
/// Nodes produced by alias expansion are capped, so a "billion laughs" file cannot exhaust memory.
const MAX_ALIAS_NODES: usize = 100_000;

/// Parses `text` as a single YAML document. `Ok(None)` means the document is empty.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, YamlError> {
    let mut reader = Reader {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
        alias_nodes: 0,
    };
    reader.document()
}

struct Reader<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    anchors: HashMap<usize, Node>,
    alias_nodes: usize,
}

impl<'a> Reader<'a> {
    fn next(&mut self) -> Result<(Event<'a>, Span), YamlError> {
        match self.parser.next_event() {
            Some(Ok(ev)) => Ok(ev),
            Some(Err(e)) => Err(scan_error(&e)),
            None => Err(YamlError {
                pos: Pos::default(),
                message: "unexpected end of input".into(),
            }),
        }
    }

    fn document(&mut self) -> Result<Option<Node>, YamlError> {
        let mut root = None;
        let mut documents = 0;
        loop {
            let (event, span) = self.next()?;
            match event {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::StreamEnd => return Ok(root),
                Event::DocumentStart(_) => {
                    documents += 1;
                    if documents > 1 {
                        return Err(YamlError {
                            pos: Pos::from_span(&span),
                            message: "expected a single YAML document, found a second one (`---`)"
                                .into(),
                        });
                    }
                }
                other => {
                    let node = self.node(other, span, 0)?;
                    let empty = matches!(&node.kind, Kind::Scalar { text, style: Style::Plain } if is_null(text))
                        && node.tag.is_none();
                    root = if empty { None } else { Some(node) };
                }
            }
        }
    }

    fn node(&mut self, event: Event<'a>, span: Span, depth: usize) -> Result<Node, YamlError> {
        let pos = Pos::from_span(&span);
        if depth > MAX_DEPTH {
            return Err(YamlError {
                pos,
                message: format!("nesting is deeper than {MAX_DEPTH} levels"),
            });
        }
        match event {
            Event::Scalar(text, style, anchor, tag) => {
                let node = Node {
                    kind: Kind::Scalar {
                        text: text.into_owned().into_boxed_str(),
                        style: match style {
                            ScalarStyle::Plain => Style::Plain,
                            _ => Style::Quoted,
                        },
                    },
                    tag: check_tag(tag.as_deref(), pos)?,
                    pos,
                };
                Ok(self.anchor(anchor, node))
            }
            Event::SequenceStart(anchor, tag) => {
                let tag = check_tag(tag.as_deref(), pos)?;
                let mut items = Vec::new();
                loop {
                    let (ev, sp) = self.next()?;
                    if matches!(ev, Event::SequenceEnd) {
                        break;
                    }
                    items.push(self.node(ev, sp, depth + 1)?);
                }
                // Growth by doubling would otherwise leave a long list up to half empty.
                items.shrink_to_fit();
                let node = Node {
                    kind: Kind::Seq(items),
                    tag,
                    pos,
                };
                Ok(self.anchor(anchor, node))
            }
            Event::MappingStart(anchor, tag) => {
                let tag = check_tag(tag.as_deref(), pos)?;
                let mut entries: Vec<(Node, Node)> = Vec::new();
                loop {
                    let (ev, sp) = self.next()?;
                    if matches!(ev, Event::MappingEnd) {
                        break;
                    }
                    let key = self.node(ev, sp, depth + 1)?;
                    let Some((key_text, _)) = key.as_scalar() else {
                        return Err(YamlError {
                            pos: key.pos,
                            message: format!(
                                "mapping keys must be plain scalars, found {}",
                                key.describe()
                            ),
                        });
                    };
                    if let Some((first, _)) = entries
                        .iter()
                        .find(|(k, _)| k.as_scalar().is_some_and(|(t, _)| t == key_text))
                    {
                        return Err(YamlError {
                            pos: key.pos,
                            message: format!(
                                "duplicate key `{key_text}` (first defined at line {}, column {})",
                                first.pos.line, first.pos.col
                            ),
                        });
                    }
                    let (ev, sp) = self.next()?;
                    let value = self.node(ev, sp, depth + 1)?;
                    entries.push((key, value));
                }
                entries.shrink_to_fit();
                if tag == Some(Tag::PythonTuple) {
                    return Err(YamlError {
                        pos,
                        message: "!!python/tuple must tag a list like [start, end, step]".into(),
                    });
                }
                let node = Node {
                    kind: Kind::Map(entries),
                    tag,
                    pos,
                };
                Ok(self.anchor(anchor, node))
            }
            Event::Alias(id) => {
                let Some(target) = self.anchors.get(&id) else {
                    return Err(YamlError {
                        pos,
                        message: "alias refers to an unknown anchor".into(),
                    });
                };
                self.alias_nodes += count_nodes(target);
                if self.alias_nodes > MAX_ALIAS_NODES {
                    return Err(YamlError {
                        pos,
                        message: format!("aliases expand to more than {MAX_ALIAS_NODES} nodes"),
                    });
                }
                Ok(target.clone())
            }
            Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart(_)
            | Event::DocumentEnd
            | Event::SequenceEnd
            | Event::MappingEnd
            | Event::Nothing => Err(YamlError {
                pos,
                message: "unexpected YAML structure".into(),
            }),
        }
    }

    fn anchor(&mut self, anchor: usize, node: Node) -> Node {
        // saphyr numbers anchors from 1; 0 means "no anchor".
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        node
    }
}

fn count_nodes(node: &Node) -> usize {
    match &node.kind {
        Kind::Scalar { .. } => 1,
        Kind::Seq(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        Kind::Map(entries) => {
            1 + entries
                .iter()
                .map(|(k, v)| count_nodes(k) + count_nodes(v))
                .sum::<usize>()
        }
    }
}

fn check_tag(tag: Option<&saphyr_parser::Tag>, pos: Pos) -> Result<Option<Tag>, YamlError> {
    let Some(tag) = tag else { return Ok(None) };
    if tag.handle == "tag:yaml.org,2002:" && tag.suffix == "python/tuple" {
        return Ok(Some(Tag::PythonTuple));
    }
    let shown = if tag.handle == "tag:yaml.org,2002:" {
        format!("!!{}", tag.suffix)
    } else {
        tag.to_string()
    };
    Err(YamlError {
        pos,
        message: format!(
            "unsupported tag `{shown}`: the only tag gridq accepts is `!!python/tuple` (tags are never executed)"
        ),
    })
}

fn scan_error(e: &ScanError) -> YamlError {
    let m = e.marker();
    YamlError {
        pos: Pos {
            line: u32::try_from(m.line()).unwrap_or(u32::MAX),
            col: u32::try_from(m.col() + 1).unwrap_or(u32::MAX),
        },
        message: format!("YAML syntax error: {}", e.info()),
    }
}

/// Core-schema null: `~`, `null`, `Null`, `NULL` or nothing at all.
pub(crate) fn is_null(plain: &str) -> bool {
    matches!(plain, "" | "~" | "null" | "Null" | "NULL")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> YamlError {
        parse(text).unwrap_err()
    }

    #[test]
    fn keeps_tags_text_and_positions() {
        let root = parse("a: !!python/tuple [5, 20, 5]\nb: 1e-5\nc: '0.10'\n")
            .unwrap()
            .unwrap();
        let map = root.as_map().unwrap();
        assert_eq!(map[0].1.tag, Some(Tag::PythonTuple));
        assert_eq!(map[0].1.pos, Pos { line: 1, col: 4 });
        assert_eq!(map[1].1.as_scalar(), Some(("1e-5", Style::Plain)));
        assert_eq!(map[2].1.as_scalar(), Some(("0.10", Style::Quoted)));
        assert_eq!(map[2].0.pos, Pos { line: 3, col: 1 });
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = err("lr: 1\nepochs: 2\nlr: 3\n");
        assert_eq!(e.pos, Pos { line: 3, col: 1 });
        assert_eq!(
            e.message,
            "duplicate key `lr` (first defined at line 1, column 1)"
        );
    }

    #[test]
    fn other_tags_are_errors() {
        let e = err("a: !!python/object:os.system [echo hi]\n");
        assert!(
            e.message
                .starts_with("unsupported tag `!!python/object:os.system`"),
            "{e:?}"
        );
        assert_eq!(e.pos.line, 1);
        let e = err("a: !!str 5\n");
        assert!(e.message.starts_with("unsupported tag `!!str`"), "{e:?}");
        let e = err("a: !custom 5\n");
        assert!(e.message.starts_with("unsupported tag `!custom`"), "{e:?}");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = err("a: [1, 2\nb: 3\n");
        assert!(e.message.starts_with("YAML syntax error"), "{e:?}");
        assert!(e.pos.line >= 1);
    }

    #[test]
    fn empty_and_multi_documents() {
        assert!(parse("").unwrap().is_none());
        assert!(parse("# only a comment\n").unwrap().is_none());
        assert!(parse("---\n...\n").unwrap().is_none());
        let e = err("a: 1\n---\nb: 2\n");
        assert_eq!(e.pos.line, 2);
    }

    #[test]
    fn aliases_expand_with_a_budget() {
        let root = parse("base: &b [1, 2]\ncopy: *b\n").unwrap().unwrap();
        let map = root.as_map().unwrap();
        assert!(matches!(&map[1].1.kind, Kind::Seq(items) if items.len() == 2));
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        assert!(err(&bomb).message.contains("aliases expand to more than"));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = format!("a: {}{}\n", "[".repeat(200), "]".repeat(200));
        assert!(err(&deep).message.contains("nesting is deeper"));
    }
}

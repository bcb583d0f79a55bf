//! A YAML document as a tree whose every node knows its line and column.
//!
//! Built from `saphyr-parser`'s event stream rather than through serde so that
//! validation can go on after the first problem and report all of them, see duplicate
//! keys (which a map type would silently merge) and read scalars as the text the user
//! wrote (`52:54:00:10:00:01` stays a MAC, not a YAML 1.1 base-60 number).

use std::{borrow::Cow, collections::HashMap};

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// A 1-based line and column in one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn of(span: Span) -> Self {
        // saphyr's lines are 1-based, its columns 0-based.
        Self { line: span.start.line(), column: span.start.col() + 1 }
    }
}

#[derive(Clone, Debug)]
pub enum Value {
    /// A scalar as written (quotes removed); `plain` when it had no quotes.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    /// Entries in document order, duplicates kept.
    Map(Vec<(Node, Node)>),
}

#[derive(Clone, Debug)]
pub struct Node {
    pub value: Value,
    pub pos: Pos,
}

impl Node {
    /// Whether this is YAML's null: an empty value, `~` or `null`.
    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar { text, plain: true } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// What kind of value this is, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            _ if self.is_null() => "nothing",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The text of a scalar that is not null.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } if !self.is_null() => Some(text),
            _ => None,
        }
    }
}

/// A syntax error at a place.
#[derive(Debug)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses one file of one YAML document; an empty file (or only comments) is `None`.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder { anchors: HashMap::new(), stack: Vec::new(), docs: Vec::new() };
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| SyntaxError {
            pos: Pos { line: e.marker().line(), column: e.marker().col() + 1 },
            message: format!("YAML syntax error: {}", e.info()),
        })?;
        builder.event(event, span)?;
    }
    let mut docs = builder.docs.into_iter();
    let first = docs.next();
    if let Some(second) = docs.next() {
        return Err(SyntaxError {
            pos: second.pos,
            message: "a rule file holds one YAML document; split it into files".into(),
        });
    }
    Ok(first)
}

enum Open {
    Seq { items: Vec<Node>, pos: Pos, anchor: usize },
    Map { entries: Vec<(Node, Node)>, key: Option<Node>, pos: Pos, anchor: usize },
}

struct Builder {
    anchors: HashMap<usize, Node>,
    stack: Vec<Open>,
    docs: Vec<Node>,
}

impl Builder {
    fn event(&mut self, event: Event<'_>, span: Span) -> Result<(), SyntaxError> {
        let pos = Pos::of(span);
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let node = Node {
                    value: Value::Scalar { text: Cow::into_owned(text), plain: style == ScalarStyle::Plain },
                    pos,
                };
                self.remember(anchor, &node);
                self.push(node);
            }
            Event::Alias(anchor) => {
                let Some(node) = self.anchors.get(&anchor) else {
                    return Err(SyntaxError { pos, message: "alias to an unknown anchor".into() });
                };
                let node = Node { value: node.value.clone(), pos };
                self.push(node);
            }
            Event::SequenceStart(anchor, _tag) => self.stack.push(Open::Seq { items: Vec::new(), pos, anchor }),
            Event::MappingStart(anchor, _tag) => {
                self.stack.push(Open::Map { entries: Vec::new(), key: None, pos, anchor });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Open::Seq { items, pos, anchor }) => (Node { value: Value::Seq(items), pos }, anchor),
                    Some(Open::Map { entries, pos, anchor, .. }) => (Node { value: Value::Map(entries), pos }, anchor),
                    None => return Err(SyntaxError { pos, message: "unbalanced YAML collection end".into() }),
                };
                self.remember(anchor, &node);
                self.push(node);
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart(_) | Event::DocumentEnd => {}
        }
        Ok(())
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
    }

    fn push(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Open::Seq { items, .. }) => items.push(node),
            Some(Open::Map { entries, key, .. }) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let doc = parse("a:\n  b: [1, \"x\"]\n").unwrap().unwrap();
        let Value::Map(entries) = &doc.value else { panic!("not a map") };
        assert_eq!(entries[0].0.pos, Pos { line: 1, column: 1 });
        let Value::Map(inner) = &entries[0].1.value else { panic!("not a map") };
        assert_eq!(inner[0].0.pos, Pos { line: 2, column: 3 });
        let Value::Seq(items) = &inner[0].1.value else { panic!("not a seq") };
        assert_eq!(items[0].pos, Pos { line: 2, column: 7 });
        assert_eq!(items[1].pos, Pos { line: 2, column: 10 });
        assert_eq!(items[1].as_str(), Some("x"));
    }

    #[test]
    fn empty_file_is_none() {
        assert!(parse("# nothing\n").unwrap().is_none());
    }

    #[test]
    fn duplicate_keys_are_kept() {
        let doc = parse("a: 1\na: 2\n").unwrap().unwrap();
        let Value::Map(entries) = &doc.value else { panic!("not a map") };
        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn syntax_error_has_position() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.pos.line >= 1, "{err:?}");
    }

    #[test]
    fn aliases_resolve() {
        let doc = parse("a: &x [1]\nb: *x\n").unwrap().unwrap();
        let Value::Map(entries) = &doc.value else { panic!("not a map") };
        assert!(matches!(&entries[1].1.value, Value::Seq(v) if v.len() == 1));
    }
}

//! A YAML document as a tree whose every node knows its line and column.
//!
//! Built from `saphyr-parser`'s event stream rather than through serde so that
//! validation can go on after the first problem and report all of them, see duplicate
//! keys (which a map type would silently merge) and read scalars as the text the user
//! wrote (`52:54:00:10:00:01` stays a MAC, not a YAML 1.1 base-60 number).
//!
//! # Limits
//!
//! An alias (`*name`) stands for a copy of what its anchor (`&name`) holds, and an
//! anchor may hold aliases: nine anchors of nine aliases each (the "billion laughs", 414
//! bytes) stand for 9^9 nodes. The tree is built with every alias copied, so what one file
//! may make the parser build is bounded, and each bound is checked *before* the node or
//! copy that would pass it is made: memory never grows past it. A file past a bound is
//! refused with an error at the place where the bound was reached:
//!
//! | bound, per file | limit | real need |
//! | --- | --- | --- |
//! | [`MAX_NESTING`]: lists and mappings nested, an alias counting as what it copies | 64 | 6 |
//! | [`MAX_NODES`]: YAML nodes built, copies for anchors and aliases included | 2,000,000 | 570,712 |
//! | [`MAX_ALIAS_NODES`]: nodes copied by aliases | 1,000,000 | 0 |
//! | [`MAX_SCALAR_BYTES`]: bytes of scalar text built, copies included | 64 MiB | 2.97 MB |
//! | [`MAX_LOOKAHEAD`]: characters the parser reads past the last event it yielded | 256 Ki | 353 |
//!
//! The real need is the biggest of the examples (`rules/examples`: nesting 6, lookahead
//! 353 characters, most of them a comment) and of the benchmarks' generated rule sets
//! (`benches/src/rulegen.rs`): 10,000 policies and 100,000 endpoints, one file of 5.2 MB,
//! 570,712 nodes and 2.97 MB of scalar text, lookahead 91, that loads in 0.3 s (release)
//! with a peak of 140 MB. None uses an alias; 1,000,000 copied nodes would let each of
//! those 10,000 policies name a shared allow list of 100 nodes. The file itself is bounded
//! before it is read ([`crate::MAX_FILE_BYTES`], 16 MiB), and a 16 MiB file written like
//! the generated one holds about 1.8 million nodes.
//!
//! The lookahead: `saphyr-parser` reads a flow collection (`[...]`, `{...}`) that stands
//! where a mapping key could (alone in the file, as JSON is, or as a list item) whole
//! before it yields any event, keeping every token: some 200 bytes per character (340 MB
//! for a 2 MB `[1,1,...]`, about 3 GB for 16 MiB). It reads the text here through a fence
//! that many characters past the last event. It also stops at 256 nested brackets itself; block collections
//! (`- - - x`) it does not bound, so nesting is checked here, which also keeps the tree's
//! recursive clone and drop far from the end of a thread's stack.
//!
//! Measured peaks of what a refused file allocates while it is parsed: the billion laughs
//! 65 MiB (0.2 s), 2,000,001 nodes 157 MiB, a 100 kB scalar copied by nested aliases
//! 63 MiB, a 16 MiB flow list 56 MiB (`rules/tests/limits.rs`).

use std::{borrow::Cow, cell::Cell, collections::HashMap, rc::Rc};

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span};

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

/// Most lists and mappings nested in one rule file; an alias counts as what it copies.
pub const MAX_NESTING: usize = 64;
/// Most YAML nodes (scalars, lists, mappings) built for one rule file, counting the
/// copies made for anchors and aliases.
pub const MAX_NODES: usize = 2_000_000;
/// Most YAML nodes the aliases of one rule file may copy.
pub const MAX_ALIAS_NODES: usize = 1_000_000;
/// Most bytes of scalar text built for one rule file, counting the copies made for
/// anchors and aliases.
pub const MAX_SCALAR_BYTES: usize = 64 << 20;
/// Most characters the YAML parser may read past the end of the last event it yielded.
pub const MAX_LOOKAHEAD: usize = 256 << 10;

/// The bounds of one parse: the `MAX_*` constants, smaller in tests.
#[derive(Clone, Copy, Debug)]
struct Limits {
    nesting: usize,
    nodes: usize,
    alias_nodes: usize,
    scalar_bytes: usize,
    lookahead: usize,
}

impl Limits {
    const RULE_FILE: Self = Self {
        nesting: MAX_NESTING,
        nodes: MAX_NODES,
        alias_nodes: MAX_ALIAS_NODES,
        scalar_bytes: MAX_SCALAR_BYTES,
        lookahead: MAX_LOOKAHEAD,
    };
}

/// A syntax error at a place.
#[derive(Debug)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Parses one file of one YAML document; an empty file (or only comments) is `None`.
/// A document past one of the bounds of the module doc is a [`SyntaxError`] at the place
/// where the bound was reached.
pub fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    parse_within(text, Limits::RULE_FILE)
}

fn parse_within(text: &str, limits: Limits) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder {
        limits,
        anchors: HashMap::new(),
        stack: Vec::new(),
        docs: Vec::new(),
        nodes: 0,
        scalar_bytes: 0,
        alias_nodes: 0,
    };
    // The parser reads the text through a fence `limits.lookahead` characters past the end
    // of the last event; reaching it ends the text for the parser and the parse.
    let fence = Rc::new(Cell::new(limits.lookahead));
    let reached = Rc::new(Cell::new(false));
    let chars = {
        let (fence, reached) = (Rc::clone(&fence), Rc::clone(&reached));
        let mut read = 0;
        text.chars().take_while(move |_| {
            read += 1;
            let within = read <= fence.get();
            reached.set(!within);
            within
        })
    };
    let mut last = Pos { line: 1, column: 1 };
    for event in Parser::new_from_iter(chars) {
        if reached.get() {
            return Err(too_far_ahead(last, limits));
        }
        let (event, span) = event.map_err(|e| syntax_error(&e, limits))?;
        fence.set(span.end.index() + limits.lookahead);
        last = Pos::of(Span::new(span.end, span.end));
        builder.event(event, span)?;
    }
    if reached.get() {
        return Err(too_far_ahead(last, limits));
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

fn syntax_error(e: &ScanError, limits: Limits) -> SyntaxError {
    let pos = Pos { line: e.marker().line(), column: e.marker().col() + 1 };
    // `saphyr-parser` counts flow collections in a byte, and its scanner runs ahead of
    // the events: 256 nested `[` or `{` are refused before the 65th reaches the builder.
    if e.info() == "recursion limit exceeded" {
        let message = format!(
            "lists and mappings nest more than {} deep, the limit for a rule file (here 256 brackets deep)",
            limits.nesting
        );
        return SyntaxError { pos, message };
    }
    SyntaxError { pos, message: format!("YAML syntax error: {}", e.info()) }
}

fn too_far_ahead(pos: Pos, limits: Limits) -> SyntaxError {
    SyntaxError {
        pos,
        message: format!(
            "the YAML parser reads more than {} characters past here before it can yield anything, the limit \
             for a rule file: a scalar, or a flow collection ([...] or {{...}}) where a key could stand (a list \
             item, the whole file in JSON), that long; write long lists in block style (`- item` lines) or split \
             the file",
            thousands(limits.lookahead)
        ),
    }
}

/// How big a finished node is: what copying it costs, and how deep it nests.
#[derive(Clone, Copy, Debug)]
struct Size {
    /// The node and everything in it.
    nodes: usize,
    /// Bytes of scalar text in it.
    scalar_bytes: usize,
    /// Lists and mappings nested in it, itself included: 0 for a scalar.
    nesting: usize,
}

impl Size {
    const SCALAR: Self = Self { nodes: 1, scalar_bytes: 0, nesting: 0 };
    const EMPTY_COLLECTION: Self = Self { nodes: 1, scalar_bytes: 0, nesting: 1 };

    /// A child added to this collection.
    fn add(&mut self, child: Size) {
        self.nodes += child.nodes;
        self.scalar_bytes += child.scalar_bytes;
        self.nesting = self.nesting.max(child.nesting + 1);
    }
}

enum Open {
    Seq { items: Vec<Node>, pos: Pos, anchor: usize, size: Size },
    Map { entries: Vec<(Node, Node)>, key: Option<Node>, pos: Pos, anchor: usize, size: Size },
}

/// What a node is built for: written in the file, or a copy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    Written,
    /// The copy an anchor keeps for its aliases.
    AnchorCopy,
    AliasCopy,
}

struct Builder {
    limits: Limits,
    /// Anchor id to a copy of the anchored node, and its size.
    anchors: HashMap<usize, (Node, Size)>,
    stack: Vec<Open>,
    docs: Vec<Node>,
    /// What has been built so far, copies included.
    nodes: usize,
    scalar_bytes: usize,
    /// Of `nodes`, those copied by aliases.
    alias_nodes: usize,
}

impl Builder {
    fn event(&mut self, event: Event<'_>, span: Span) -> Result<(), SyntaxError> {
        let pos = Pos::of(span);
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                let size = Size { scalar_bytes: text.len(), ..Size::SCALAR };
                self.charge(size, pos, Build::Written)?;
                let node = Node {
                    value: Value::Scalar { text: Cow::into_owned(text), plain: style == ScalarStyle::Plain },
                    pos,
                };
                self.remember(anchor, &node, size)?;
                self.push(node, size);
            }
            Event::Alias(anchor) => {
                let Some(&(_, size)) = self.anchors.get(&anchor) else {
                    return Err(SyntaxError { pos, message: "alias to an unknown anchor".into() });
                };
                if self.stack.len() + size.nesting > self.limits.nesting {
                    return Err(SyntaxError {
                        pos,
                        message: format!(
                            "this alias nests lists and mappings more than {} deep (what it copies counts here), \
                             the limit for a rule file",
                            self.limits.nesting
                        ),
                    });
                }
                // Checked before the copy is made.
                self.charge(size, pos, Build::AliasCopy)?;
                let node = Node { value: self.anchors[&anchor].0.value.clone(), pos };
                self.push(node, size);
            }
            Event::SequenceStart(anchor, _tag) => {
                self.open(pos)?;
                self.stack.push(Open::Seq { items: Vec::new(), pos, anchor, size: Size::EMPTY_COLLECTION });
            }
            Event::MappingStart(anchor, _tag) => {
                self.open(pos)?;
                self.stack.push(Open::Map {
                    entries: Vec::new(),
                    key: None,
                    pos,
                    anchor,
                    size: Size::EMPTY_COLLECTION,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor, size) = match self.stack.pop() {
                    Some(Open::Seq { items, pos, anchor, size }) => {
                        (Node { value: Value::Seq(items), pos }, anchor, size)
                    }
                    Some(Open::Map { entries, pos, anchor, size, .. }) => {
                        (Node { value: Value::Map(entries), pos }, anchor, size)
                    }
                    None => return Err(SyntaxError { pos, message: "unbalanced YAML collection end".into() }),
                };
                self.remember(anchor, &node, size)?;
                self.push(node, size);
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart(_) | Event::DocumentEnd => {}
        }
        Ok(())
    }

    /// Checks a list or mapping starting here against the bounds.
    fn open(&mut self, pos: Pos) -> Result<(), SyntaxError> {
        if self.stack.len() >= self.limits.nesting {
            return Err(SyntaxError {
                pos,
                message: format!(
                    "lists and mappings nest more than {} deep here, the limit for a rule file",
                    self.limits.nesting
                ),
            });
        }
        self.charge(Size::EMPTY_COLLECTION, pos, Build::Written)
    }

    /// Counts what is about to be built, or refuses it when it would pass a bound.
    fn charge(&mut self, size: Size, pos: Pos, build: Build) -> Result<(), SyntaxError> {
        let limits = self.limits;
        let copies = match build {
            Build::Written => "",
            Build::AnchorCopy | Build::AliasCopy => " (copies made for anchors and aliases count)",
        };
        let error = |message: String| Err(SyntaxError { pos, message });
        if build == Build::AliasCopy && self.alias_nodes + size.nodes > limits.alias_nodes {
            return error(format!(
                "with this alias, the aliases of this file copy more than {} YAML nodes, the limit for a rule file \
                 (an alias of an anchor that holds aliases multiplies what they copy)",
                thousands(limits.alias_nodes)
            ));
        }
        if self.nodes + size.nodes > limits.nodes {
            return error(format!(
                "this file grows past {} YAML nodes here{copies}, the limit for a rule file",
                thousands(limits.nodes)
            ));
        }
        if self.scalar_bytes + size.scalar_bytes > limits.scalar_bytes {
            return error(format!(
                "the scalars of this file grow past {} of text here{copies}, the limit for a rule file",
                byte_size(limits.scalar_bytes)
            ));
        }
        self.nodes += size.nodes;
        self.scalar_bytes += size.scalar_bytes;
        if build == Build::AliasCopy {
            self.alias_nodes += size.nodes;
        }
        Ok(())
    }

    /// Keeps a copy of an anchored node for its aliases.
    fn remember(&mut self, anchor: usize, node: &Node, size: Size) -> Result<(), SyntaxError> {
        if anchor != 0 {
            self.charge(size, node.pos, Build::AnchorCopy)?;
            self.anchors.insert(anchor, (node.clone(), size));
        }
        Ok(())
    }

    fn push(&mut self, node: Node, size: Size) {
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Open::Seq { items, size: total, .. }) => {
                total.add(size);
                items.push(node);
            }
            Some(Open::Map { entries, key, size: total, .. }) => {
                total.add(size);
                match key.take() {
                    None => *key = Some(node),
                    Some(k) => entries.push((k, node)),
                }
            }
        }
    }
}

/// `1234567` as `1,234,567`.
pub(crate) fn thousands(n: impl std::fmt::Display) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A byte count as `16 MiB` when it is a whole number of MiB, else in bytes.
pub(crate) fn byte_size(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{} bytes", thousands(n))
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

    /// Bounds small enough to reach in a few characters.
    const SMALL: Limits = Limits { nesting: 4, nodes: 20, alias_nodes: 8, scalar_bytes: 30, lookahead: 64 };

    #[track_caller]
    fn refused(text: &str, limits: Limits, at: (usize, usize), needle: &str) {
        let e = parse_within(text, limits).expect_err("refused");
        assert_eq!((e.pos.line, e.pos.column), at, "{e:?}");
        assert!(e.message.contains(needle), "{:?} should say {needle:?}", e.message);
    }

    #[test]
    fn nesting_up_to_the_bound() {
        parse_within("[[[[x]]]]", SMALL).unwrap();
        refused("[[[[[x]]]]]", SMALL, (1, 5), "lists and mappings nest more than 4 deep here");
        parse_within("- - - - x", SMALL).unwrap();
        refused("- - - - - x", SMALL, (1, 9), "nest more than 4 deep");
        refused("a: {b: {c: {d: {e: x}}}}", SMALL, (1, 16), "nest more than 4 deep");
    }

    #[test]
    fn nesting_counts_what_an_alias_copies_at_its_place() {
        // b's mapping and list hold a's two lists: 4 deep.
        parse_within("a: &a [[x]]\nb: [*a]\n", SMALL).unwrap();
        refused("a: &a [[x]]\nb: [[*a]]\n", SMALL, (2, 6), "this alias nests lists and mappings more than 4 deep");
    }

    #[test]
    fn nodes_up_to_the_bound() {
        // A list and 19 scalars are 20 nodes.
        parse_within(&format!("[{}]", ["1"; 19].join(",")), SMALL).unwrap();
        refused(&format!("[{}]", ["1"; 20].join(",")), SMALL, (1, 40), "grows past 20 YAML nodes here, the limit");
    }

    #[test]
    fn copies_for_anchors_and_aliases_are_nodes() {
        // 4 nodes written, 3 copied for the anchor, 3 for the alias.
        let text = "[&a [1, 2], *a]";
        parse_within(text, Limits { nodes: 10, ..SMALL }).unwrap();
        refused(text, Limits { nodes: 9, ..SMALL }, (1, 13), "grows past 9 YAML nodes here (copies made");
        refused(text, Limits { nodes: 6, ..SMALL }, (1, 2), "grows past 6 YAML nodes here (copies made");
    }

    #[test]
    fn nodes_copied_by_aliases_up_to_the_bound() {
        // Each alias copies 4 nodes; the third passes 8.
        refused(
            "a: &a [1, 2, 3]\nb: [*a, *a, *a]\n",
            SMALL,
            (2, 13),
            "with this alias, the aliases of this file copy more than 8 YAML nodes, the limit for a rule file",
        );
        parse_within("a: &a [1, 2, 3]\nb: [*a, *a]\n", SMALL).unwrap();
    }

    #[test]
    fn scalar_text_up_to_the_bound_copies_included() {
        parse_within(&format!("[{}]", "x".repeat(30)), SMALL).unwrap();
        refused(&format!("[{}]", "x".repeat(31)), SMALL, (1, 2), "the scalars of this file grow past 30 bytes");
        // 10 bytes written, 10 kept for the anchor, 10 per alias.
        parse_within("[&a xxxxxxxxxx, *a]", SMALL).unwrap();
        refused("[&a xxxxxxxxxx, *a, *a]", SMALL, (1, 21), "grow past 30 bytes of text here (copies made");
    }

    #[test]
    fn the_parser_reads_at_most_the_lookahead_past_the_last_event() {
        // Alone, a flow list could be a mapping key: the parser reads it whole first.
        let limits = Limits { nodes: 100, scalar_bytes: 100, ..SMALL };
        let list = |n: usize| format!("[{}]", ["1"; 100][..n].join(","));
        parse_within(&list(20), limits).unwrap();
        refused(&list(40), limits, (1, 1), "the YAML parser reads more than 64 characters past here");
        // As a value on its key's line it cannot be a key, and is read as it goes.
        parse_within(&format!("a: {}", list(40)), limits).unwrap();
        // As a list item it could be a key again: refused past the dash, the last event.
        refused(&format!("a:\n  - {}", list(40)), limits, (2, 3), "more than 64 characters past here");
    }

    #[test]
    fn brackets_past_the_parsers_own_bound_name_the_nesting_bound() {
        let limits = Limits { lookahead: 1000, ..SMALL };
        refused(&"[".repeat(300), limits, (1, 256), "lists and mappings nest more than 4 deep");
    }

    #[test]
    fn numbers_in_messages() {
        let t = |n: usize| thousands(n);
        assert_eq!([t(0), t(999), t(1000), t(65_536), t(1_000_000)], ["0", "999", "1,000", "65,536", "1,000,000"]);
        assert_eq!(byte_size(64 << 20), "64 MiB");
        assert_eq!(byte_size(1000), "1,000 bytes");
    }

    #[test]
    fn aliases_resolve() {
        let doc = parse("a: &x [1]\nb: *x\n").unwrap().unwrap();
        let Value::Map(entries) = &doc.value else { panic!("not a map") };
        assert!(matches!(&entries[1].1.value, Value::Seq(v) if v.len() == 1));
    }
}

//! Reading rule files: YAML to a validated [`RuleSet`], with every problem of every
//! file reported at its line and column.

use std::{
    collections::HashMap,
    fs,
    io::{self, Read as _},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    RuleError,
    inventory::{
        self, DenyEntry, Endpoint, OnViolation, PatchAge, PatchDate, UnknownMacs, VirtualPatch, ZoneEndpoints,
    },
    ruleset::{Access, AllowEntry, InterfaceGlob, Member, MemberMatch, Mode, Policy, RuleSet, WORLD, Zone},
    types::{Cidr, MacAddr, PortRange, Proto, SourcePos},
    yaml::{self, Node, Pos, Value},
};

/// Most zones a rule set may define besides `world` (zone ids are 16 bits, 0 is `world`).
pub const MAX_ZONES: usize = u16::MAX as usize;

/// Most bytes a rule file may have (16 MiB, three times the 5.2 MB of the benchmarks'
/// generated rule set of 10,000 policies and 100,000 endpoints). [`read_rule_file`] checks
/// it before reading; [`parse_rules`] refuses a longer text without parsing it. What a
/// file may make the parser build (its aliases expanded) has bounds of its own, see
/// `rules/README.md`.
pub const MAX_FILE_BYTES: usize = 16 << 20;

/// Reads one rule file, refusing it without reading it when it is larger than
/// [`MAX_FILE_BYTES`] (and reading no more than that if it grows meanwhile).
pub fn read_rule_file(path: &Path) -> Result<String, RuleError> {
    let cannot = |e: io::Error| RuleError::whole_file(path, format!("cannot read rule file: {e}"));
    let file = fs::File::open(path).map_err(cannot)?;
    let len = file.metadata().map_err(cannot)?.len();
    if len > MAX_FILE_BYTES as u64 {
        return Err(too_big(path, &format!("{} bytes", yaml::thousands(len))));
    }
    let mut text = String::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(MAX_FILE_BYTES as u64 + 1).read_to_string(&mut text).map_err(cannot)?;
    if text.len() > MAX_FILE_BYTES {
        return Err(too_big(path, "more than that"));
    }
    Ok(text)
}

/// The error of a rule file longer than [`MAX_FILE_BYTES`].
fn too_big(path: &Path, len: &str) -> RuleError {
    RuleError::whole_file(
        path,
        format!(
            "a rule file may have at most {} ({} bytes), this one has {len}; split the rule set into files",
            yaml::byte_size(MAX_FILE_BYTES),
            yaml::thousands(MAX_FILE_BYTES)
        ),
    )
}

/// Loads a rule set from a directory (all its `*.yaml` files, in name order) or from
/// one file. On failure, returns every problem found in every file, in file, line and
/// column order.
pub fn load_rules(path: &Path) -> Result<RuleSet, Vec<RuleError>> {
    let files = if path.is_dir() { dir_rule_files(path)? } else { vec![path.to_path_buf()] };
    let mut texts = Vec::with_capacity(files.len());
    let mut errors = Vec::new();
    for file in files {
        match read_rule_file(&file) {
            Ok(text) => texts.push((file, text)),
            Err(e) => errors.push(e),
        }
    }
    let parsed = parse_rules(texts.iter().map(|(p, t)| (p.as_path(), t.as_str())));
    match parsed {
        Ok(rules) if errors.is_empty() => Ok(rules),
        Ok(_) => Err(errors),
        Err(more) => {
            errors.extend(more);
            sort(&mut errors);
            Err(errors)
        }
    }
}

/// The rule files a rules path stands for, in the order [`load_rules`] reads them: every
/// regular `*.yaml` file of a directory in byte order of their names (none is not an
/// error here), or the path itself when it is not a directory. The agent's rule watcher
/// fingerprints the same list, so that it watches exactly what is loaded.
pub fn rule_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    if !fs::metadata(path)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    yaml_files(path)
}

/// The regular `*.yaml` files of a directory, in byte order of their names.
fn yaml_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The rule files of a directory for [`load_rules`]: an unreadable directory, or one
/// without `*.yaml` files, is an error of the rule set.
fn dir_rule_files(dir: &Path) -> Result<Vec<PathBuf>, Vec<RuleError>> {
    let files =
        yaml_files(dir).map_err(|e| vec![RuleError::whole_file(dir, format!("cannot read rule directory: {e}"))])?;
    if files.is_empty() {
        return Err(vec![RuleError::whole_file(dir, "no *.yaml rule files in this directory")]);
    }
    Ok(files)
}

/// Parses and validates rule files given as (path, text), in this order: the path is
/// only used in errors and locations. Together they form one rule set.
pub fn parse_rules<'a>(files: impl IntoIterator<Item = (&'a Path, &'a str)>) -> Result<RuleSet, Vec<RuleError>> {
    let mut loader = Loader::default();
    for (path, text) in files {
        loader.file(path, text);
    }
    loader.finish()
}

fn sort(errors: &mut [RuleError]) {
    errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
}

/// An inventory endpoint whose zone is checked once every file is read.
struct PendingEndpoint {
    endpoint: Endpoint,
    zone_at: Option<SourcePos>,
}

/// A zone's `must_not_share_node_with` entry, checked once every file is read.
struct PendingNeighbour {
    zone: String,
    other: String,
    at: SourcePos,
}

/// A policy whose `from` and `to` are checked once every file is read.
struct PendingPolicy {
    policy: Policy,
    from_at: SourcePos,
    to_at: SourcePos,
}

#[derive(Default)]
struct Loader {
    errors: Vec<RuleError>,
    file: Option<Arc<Path>>,
    zones: Vec<Zone>,
    policies: Vec<PendingPolicy>,
    default_inter_zone: Option<(Access, SourcePos)>,
    unbound_ports: Option<(crate::UnboundPorts, SourcePos)>,
    infrastructure: Vec<crate::Infrastructure>,
    /// Index in `zones` by name.
    zone_index: HashMap<String, usize>,
    /// Index in `policies` by name.
    policy_index: HashMap<String, usize>,
    endpoints: Vec<PendingEndpoint>,
    /// Index in `endpoints` by name, and by MAC.
    endpoint_index: HashMap<String, usize>,
    endpoint_macs: HashMap<MacAddr, usize>,
    /// Index in `endpoints` by IP address.
    endpoint_addrs: HashMap<IpAddr, usize>,
    neighbours: Vec<PendingNeighbour>,
    virtual_patches: Vec<VirtualPatch>,
}

/// The fields of a mapping, checked against the allowed names.
struct Fields<'n> {
    pos: Pos,
    found: Vec<(&'n str, &'n Node, Pos)>,
}

impl<'n> Fields<'n> {
    fn get(&self, name: &str) -> Option<&'n Node> {
        self.found.iter().find(|(k, _, _)| *k == name).map(|(_, v, _)| *v)
    }

    fn key_pos(&self, name: &str) -> Option<Pos> {
        self.found.iter().find(|(k, _, _)| *k == name).map(|(_, _, p)| *p)
    }
}

impl Loader {
    fn loc(&self, pos: Pos) -> SourcePos {
        SourcePos { file: self.file.clone().expect("a file is being read"), line: pos.line, column: pos.column }
    }

    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        let e = self.loc(pos).error(message);
        self.errors.push(e);
    }

    fn file(&mut self, path: &Path, text: &str) {
        self.file = Some(Arc::from(path));
        if text.len() > MAX_FILE_BYTES {
            return self.errors.push(too_big(path, &format!("{} bytes", yaml::thousands(text.len()))));
        }
        let root = match yaml::parse(text) {
            Ok(Some(root)) => root,
            Ok(None) => return,
            Err(e) => return self.error(e.pos, e.message),
        };
        if root.is_null() {
            return;
        }
        let allowed = [
            "zones",
            "policies",
            "default_inter_zone",
            "unbound_ports",
            "infrastructure",
            "endpoints",
            "virtual_patches",
        ];
        let Some(top) = self.fields_with(&root, "a rule file", &allowed, 3) else { return };
        if let Some(zones) = top.get("zones") {
            self.zones(zones);
        }
        if let Some(policies) = top.get("policies") {
            self.policies(policies);
        }
        if let Some(node) = top.get("default_inter_zone") {
            self.default_inter_zone(node);
        }
        if let Some(node) = top.get("unbound_ports") {
            self.unbound_ports(node);
        }
        if let Some(node) = top.get("infrastructure") {
            self.infrastructure(node);
        }
        if let Some(node) = top.get("endpoints") {
            self.endpoints(node);
        }
        if let Some(node) = top.get("virtual_patches") {
            self.virtual_patches(node);
        }
    }

    /// Checks that `node` is a mapping of known, unique scalar keys.
    fn fields<'n>(&mut self, node: &'n Node, what: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        self.fields_with(node, what, allowed, allowed.len())
    }

    /// [`Loader::fields`] whose "expected a mapping" message names only the first
    /// `shown` fields (the ones every such mapping is about).
    fn fields_with<'n>(&mut self, node: &'n Node, what: &str, allowed: &[&str], shown: usize) -> Option<Fields<'n>> {
        let Value::Map(entries) = &node.value else {
            let shown = &allowed[..shown.min(allowed.len())];
            self.error(
                node.pos,
                format!("expected {what} (a mapping with {}), found {}", shown.join(", "), node.kind()),
            );
            return None;
        };
        let mut fields = Fields { pos: node.pos, found: Vec::new() };
        for (key, value) in entries {
            let Some(name) = key.as_str() else {
                self.error(key.pos, format!("expected a field name in {what}, found {}", key.kind()));
                continue;
            };
            if !allowed.contains(&name) {
                self.error(
                    key.pos,
                    format!("unknown field \"{name}\" in {what}; expected one of: {}", allowed.join(", ")),
                );
            } else if let Some(first) = fields.key_pos(name) {
                self.error(key.pos, format!("field \"{name}\" is given twice (first at line {})", first.line));
            } else {
                fields.found.push((name, value, key.pos));
            }
        }
        Some(fields)
    }

    /// Requires a field, reporting its absence at the mapping.
    fn required<'n>(&mut self, fields: &Fields<'n>, name: &str, what: &str, hint: &str) -> Option<&'n Node> {
        let node = fields.get(name);
        if node.is_none() {
            self.error(fields.pos, format!("missing field \"{name}\" in {what}{hint}"));
        }
        node
    }

    /// A non-null scalar.
    fn scalar<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n str> {
        let s = node.as_str();
        if s.is_none() {
            self.error(node.pos, format!("expected {what}, found {}", node.kind()));
        }
        s
    }

    /// A list; null counts as an empty list.
    fn list<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n [Node]> {
        match &node.value {
            Value::Seq(items) => Some(items),
            _ if node.is_null() => Some(&[]),
            _ => {
                self.error(node.pos, format!("expected {what} (a list), found {}", node.kind()));
                None
            }
        }
    }

    fn access(&mut self, node: &Node, what: &str) -> Option<Access> {
        match self.scalar(node, &format!("{what}: allow or deny"))? {
            "allow" => Some(Access::Allow),
            "deny" => Some(Access::Deny),
            other => {
                self.error(node.pos, format!("expected allow or deny for {what}, found \"{other}\""));
                None
            }
        }
    }

    fn zones(&mut self, node: &Node) {
        if node.is_null() {
            return;
        }
        let Value::Map(entries) = &node.value else {
            return self
                .error(node.pos, format!("expected zones (a mapping of zone names to zones), found {}", node.kind()));
        };
        for (key, value) in entries {
            let Some(name) = self.scalar(key, "a zone name") else { continue };
            if let Err(e) = check_zone_name(name) {
                self.error(key.pos, e);
                continue;
            }
            if let Some(&first) = self.zone_index.get(name) {
                let msg = format!("zone \"{name}\" is defined twice (first at {})", self.zones[first].location);
                self.error(key.pos, msg);
                continue;
            }
            let mut zone = Zone {
                name: name.to_owned(),
                members: Vec::new(),
                intra_zone: Access::Allow,
                location: self.loc(key.pos),
                endpoints: ZoneEndpoints::default(),
                on_rules_failure: crate::OnRulesFailure::default(),
                binding: crate::Binding::default(),
            };
            self.zone_body(&mut zone, value);
            self.zone_index.insert(zone.name.clone(), self.zones.len());
            self.zones.push(zone);
        }
    }

    fn zone_body(&mut self, zone: &mut Zone, node: &Node) {
        if node.is_null() {
            return;
        }
        let what = format!("zone \"{}\"", zone.name);
        let allowed = [
            "members",
            "intra_zone",
            "max_patch_age",
            "remediation",
            "placement",
            "on_violation",
            "must_not_share_node_with",
            "unknown_macs",
            "on_rules_failure",
            "binding",
        ];
        let Some(fields) = self.fields_with(node, &what, &allowed, 2) else { return };
        if let Some(v) = fields.get("intra_zone") {
            zone.intra_zone = self.access(v, "intra_zone").unwrap_or_default();
        }
        if let Some(v) = fields.get("on_rules_failure") {
            match self.scalar(v, "on_rules_failure: closed or open") {
                Some("closed") => zone.on_rules_failure = crate::OnRulesFailure::Closed,
                Some("open") => zone.on_rules_failure = crate::OnRulesFailure::Open,
                Some(other) => {
                    let msg = format!("expected closed or open for on_rules_failure, found \"{other}\"");
                    self.error(v.pos, msg);
                }
                None => {}
            }
        }
        if let Some(v) = fields.get("binding") {
            match self.scalar(v, "binding: learn or host") {
                Some("learn") => zone.binding = crate::Binding::Learn,
                Some("host") => zone.binding = crate::Binding::Host,
                Some(other) => self.error(v.pos, format!("expected learn or host for binding, found \"{other}\"")),
                None => {}
            }
        }
        self.zone_endpoint_settings(zone, &fields);
        let Some(members) = fields.get("members") else { return };
        let Some(items) = self.list(members, "members") else { return };
        if zone.name == WORLD && !items.is_empty() {
            let pos = fields.key_pos("members").unwrap_or(members.pos);
            return self
                .error(pos, "the built-in zone world has no members: it holds every address outside the other zones");
        }
        for item in items {
            if let Some(member) = self.member(item) {
                zone.members.push(member);
            }
        }
    }

    fn member(&mut self, node: &Node) -> Option<Member> {
        let fields = self.fields(node, "a zone member", &["mac", "cidr", "interface"])?;
        if fields.found.len() != 1 {
            self.error(node.pos, "a zone member has exactly one of mac, cidr or interface");
            return None;
        }
        let (kind, value, _) = fields.found[0];
        let text = self.scalar(value, &format!("a {kind} string"))?;
        let parsed = match kind {
            "mac" => text.parse::<MacAddr>().map(MemberMatch::Mac),
            "cidr" => text.parse::<Cidr>().map(MemberMatch::Cidr),
            _ if text.is_empty() => Err("an interface glob cannot be empty".to_owned()),
            _ => InterfaceGlob::new(text)
                .map(MemberMatch::Interface)
                .map_err(|e| format!("bad interface glob \"{text}\": {e}")),
        };
        match parsed {
            Ok(matcher) => Some(Member { matcher, location: self.loc(value.pos) }),
            Err(e) => {
                self.error(value.pos, e);
                None
            }
        }
    }

    fn policies(&mut self, node: &Node) {
        let Some(items) = self.list(node, "policies") else { return };
        for item in items {
            if let Some(p) = self.policy(item) {
                self.policy_index.entry(p.policy.name.clone()).or_insert(self.policies.len());
                self.policies.push(p);
            }
        }
    }

    fn policy(&mut self, node: &Node) -> Option<PendingPolicy> {
        let fields = self.fields(node, "a policy", &["name", "from", "to", "allow", "mode"])?;
        let name = self.required(&fields, "name", "a policy", "");
        let from = self.required(&fields, "from", "a policy", "");
        let to = self.required(&fields, "to", "a policy", "");
        let allow = self.required(
            &fields,
            "allow",
            "a policy",
            " (write `allow: []` to cover the zone pair and allow nothing)",
        );
        let mode = match fields.get("mode") {
            None => Mode::Enforce,
            Some(m) => match self.scalar(m, "a mode: enforce or audit") {
                Some("audit") => Mode::Audit,
                Some("enforce") | None => Mode::Enforce,
                Some(other) => {
                    self.error(m.pos, format!("expected enforce or audit for mode, found \"{other}\""));
                    Mode::Enforce
                }
            },
        };
        let name_str = name.and_then(|n| self.scalar(n, "a policy name"));
        if let (Some(n), Some(s)) = (name, name_str) {
            if s.trim().is_empty() || s.chars().any(char::is_control) {
                self.error(n.pos, "a policy name must be non-empty and have no control characters");
            } else if let Some(&first) = self.policy_index.get(s) {
                let msg =
                    format!("policy \"{s}\" is defined twice (first at {})", self.policies[first].policy.location);
                self.error(n.pos, msg);
            }
        }
        let from_str = from.and_then(|n| self.scalar(n, "a zone name"));
        let to_str = to.and_then(|n| self.scalar(n, "a zone name"));
        let entries = allow.and_then(|a| self.allow_list(a));
        Some(PendingPolicy {
            policy: Policy {
                name: name_str?.to_owned(),
                from: from_str?.to_owned(),
                to: to_str?.to_owned(),
                allow: entries.unwrap_or_default(),
                mode,
                location: self.loc(name?.pos),
            },
            from_at: self.loc(from?.pos),
            to_at: self.loc(to?.pos),
        })
    }

    /// The valid entries of an allow list (the others are reported).
    fn allow_list(&mut self, node: &Node) -> Option<Vec<AllowEntry>> {
        let items = self.list(node, "allow")?;
        Some(items.iter().filter_map(|item| self.allow_entry(item)).collect())
    }

    fn allow_entry(&mut self, node: &Node) -> Option<AllowEntry> {
        let (proto, ports) = self.proto_ports(node, "an allow entry", "allows")?;
        Some(AllowEntry { proto, ports, location: self.loc(node.pos) })
    }

    /// An entry of `proto` and optional `ports` (allow lists, virtual patches' deny lists).
    fn proto_ports(&mut self, node: &Node, what: &str, verb: &str) -> Option<(Proto, Vec<PortRange>)> {
        let fields = self.fields(node, what, &["proto", "ports"])?;
        let proto_node = self.required(&fields, "proto", what, "")?;
        let text = self.scalar(proto_node, "a protocol: tcp, udp, icmp, icmpv6, sctp or a number 0-254")?;
        let proto = match text.parse::<Proto>() {
            Ok(p) => p,
            Err(e) => {
                self.error(proto_node.pos, e);
                return None;
            }
        };
        let mut ports = Vec::new();
        if let Some(ports_node) = fields.get("ports") {
            if !proto.has_ports() {
                let pos = fields.key_pos("ports").unwrap_or(ports_node.pos);
                let name = proto.name().map_or_else(|| format!("protocol {}", proto.number()), str::to_owned);
                self.error(
                    pos,
                    format!("{name} has no ports; remove ports (an entry without ports {verb} all {name})"),
                );
                return None;
            }
            let items = self.list(ports_node, "ports")?;
            if items.is_empty() {
                self.error(ports_node.pos, "an empty ports list; leave ports out to allow every port");
                return None;
            }
            let mut ok = true;
            for item in items {
                let Some(text) = self.scalar(item, "a port number or a range \"a-b\"") else {
                    ok = false;
                    continue;
                };
                match text.parse::<PortRange>() {
                    Ok(r) => ports.push(r),
                    Err(e) => {
                        self.error(item.pos, e);
                        ok = false;
                    }
                }
            }
            if !ok {
                return None;
            }
        }
        Some((proto, ports))
    }

    /// A boolean written `true` or `false`.
    fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        match self.scalar(node, &format!("{what}: true or false"))? {
            "true" => Some(true),
            "false" => Some(false),
            other => {
                self.error(node.pos, format!("expected true or false for {what}, found \"{other}\""));
                None
            }
        }
    }

    /// A list of names (tags, labels, zones), each checked.
    fn names(&mut self, node: &Node, what: &str, kind: &str) -> Vec<(String, Pos)> {
        let Some(items) = self.list(node, what) else { return Vec::new() };
        let mut out: Vec<(String, Pos)> = Vec::new();
        for item in items {
            let Some(text) = self.scalar(item, &format!("a {kind}")) else { continue };
            if let Err(e) = inventory::check_name(kind, text) {
                self.error(item.pos, e);
            } else if out.iter().any(|(n, _)| n == text) {
                self.error(item.pos, format!("{kind} \"{text}\" is listed twice in {what}"));
            } else {
                out.push((text.to_owned(), item.pos));
            }
        }
        out
    }

    /// The endpoint settings of a zone: `max_patch_age`, `remediation`, `placement`,
    /// `on_violation`, `must_not_share_node_with`, `unknown_macs`.
    fn zone_endpoint_settings(&mut self, zone: &mut Zone, fields: &Fields<'_>) {
        let settings = &mut zone.endpoints;
        if let Some(v) = fields.get("max_patch_age") {
            if let Some(text) = self.scalar(v, "a duration like 30d") {
                match text.parse::<PatchAge>() {
                    Ok(age) => settings.max_patch_age = Some(age),
                    Err(e) => self.error(v.pos, e),
                }
            }
        }
        if let Some(v) = fields.get("remediation") {
            settings.remediation = self.boolean(v, "remediation").unwrap_or(false);
        }
        if let Some(v) = fields.get("on_violation") {
            settings.on_violation = match self.scalar(v, "on_violation: alert or isolate") {
                Some("alert") | None => OnViolation::Alert,
                Some("isolate") => OnViolation::Isolate,
                Some(other) => {
                    self.error(v.pos, format!("expected alert or isolate for on_violation, found \"{other}\""));
                    OnViolation::Alert
                }
            };
        }
        if let Some(v) = fields.get("unknown_macs") {
            settings.unknown_macs = match self.scalar(v, "unknown_macs: quarantine or allow") {
                Some("quarantine") => Some(UnknownMacs::Quarantine),
                Some("allow") => Some(UnknownMacs::Allow),
                None => None,
                Some(other) => {
                    self.error(v.pos, format!("expected quarantine or allow for unknown_macs, found \"{other}\""));
                    None
                }
            };
        }
        if let Some(v) = fields.get("placement") {
            if let Value::Map(entries) = &v.value {
                for (key, values) in entries {
                    let Some(label) = self.scalar(key, "a node label") else { continue };
                    if let Err(e) = inventory::check_name("node label", label) {
                        self.error(key.pos, e);
                        continue;
                    }
                    if settings.placement.contains_key(label) {
                        self.error(key.pos, format!("placement names label \"{label}\" twice"));
                        continue;
                    }
                    let allowed: Vec<String> =
                        self.names(values, "placement values", "label value").into_iter().map(|(n, _)| n).collect();
                    if allowed.is_empty() && values.is_null() || matches!(&values.value, Value::Seq(s) if s.is_empty())
                    {
                        self.error(
                            values.pos,
                            format!("placement of label \"{label}\" allows no value; list the values nodes may have"),
                        );
                        continue;
                    }
                    settings.placement.insert(label.to_owned(), allowed);
                }
            } else if !v.is_null() {
                self.error(
                    v.pos,
                    format!("expected placement (a mapping of node labels to lists of values), found {}", v.kind()),
                );
            }
        }
        if let Some(v) = fields.get("must_not_share_node_with") {
            for (other, pos) in self.names(v, "must_not_share_node_with", "zone name") {
                if other == zone.name {
                    self.error(pos, format!("zone \"{other}\" cannot keep away from itself"));
                    continue;
                }
                let at = self.loc(pos);
                zone.endpoints.must_not_share_node_with.push(other.clone());
                self.neighbours.push(PendingNeighbour { zone: zone.name.clone(), other, at });
            }
        }
    }

    fn endpoints(&mut self, node: &Node) {
        if node.is_null() {
            return;
        }
        let Value::Map(entries) = &node.value else {
            return self.error(
                node.pos,
                format!("expected endpoints (a mapping of endpoint names to endpoints), found {}", node.kind()),
            );
        };
        for (key, value) in entries {
            let Some(name) = self.scalar(key, "an endpoint name") else { continue };
            if let Err(e) = inventory::check_name("endpoint name", name) {
                self.error(key.pos, e);
                continue;
            }
            if let Some(&first) = self.endpoint_index.get(name) {
                let msg = format!(
                    "endpoint \"{name}\" is defined twice (first at {})",
                    self.endpoints[first].endpoint.location
                );
                self.error(key.pos, msg);
                continue;
            }
            let Some(pending) = self.endpoint(name, key.pos, value) else { continue };
            let mac = pending.endpoint.mac;
            if let Some(&first) = self.endpoint_macs.get(&mac) {
                let other = &self.endpoints[first].endpoint;
                let msg = format!(
                    "MAC {mac} of endpoint \"{name}\" is already endpoint \"{}\"'s ({}); a MAC is one endpoint's identity",
                    other.name, other.location
                );
                self.error(key.pos, msg);
                continue;
            }
            self.endpoint_index.insert(name.to_owned(), self.endpoints.len());
            self.endpoint_macs.insert(mac, self.endpoints.len());
            for ip in &pending.endpoint.ips {
                self.endpoint_addrs.insert(*ip, self.endpoints.len());
            }
            self.endpoints.push(pending);
        }
    }

    fn endpoint(&mut self, name: &str, at: Pos, node: &Node) -> Option<PendingEndpoint> {
        let what = format!("endpoint \"{name}\"");
        let fields = self.fields(
            node,
            &what,
            &["mac", "ips", "zone", "tags", "patched_at", "allowed_macs", "allowed_addresses"],
        )?;
        let mac_node = self.required(&fields, "mac", &what, " (the MAC is the endpoint's identity)");
        let mac = mac_node.and_then(|n| {
            let text = self.scalar(n, "a MAC address")?;
            text.parse::<MacAddr>().map_err(|e| self.error(n.pos, e)).ok()
        });
        let mut ips = Vec::new();
        if let Some(list) = fields.get("ips") {
            for item in self.list(list, "ips").unwrap_or(&[]) {
                let Some(text) = self.scalar(item, "an IP address") else { continue };
                match text.parse::<IpAddr>() {
                    Ok(ip) if ips.contains(&ip) => self.error(item.pos, format!("address {ip} is listed twice")),
                    Ok(ip) if self.endpoint_addrs.contains_key(&ip) => {
                        let other = &self.endpoints[self.endpoint_addrs[&ip]].endpoint;
                        let msg = format!(
                            "address {ip} of endpoint \"{name}\" is already endpoint \"{}\"'s ({}); an address belongs to one endpoint, whose port alone may send from it",
                            other.name, other.location
                        );
                        self.error(item.pos, msg);
                    }
                    Ok(ip) => ips.push(ip),
                    Err(_) => self.error(
                        item.pos,
                        format!("\"{text}\" is not an IP address; expected an IPv4 or IPv6 address like 10.30.0.5"),
                    ),
                }
            }
        }
        let zone = fields.get("zone").and_then(|n| Some((self.scalar(n, "a zone name")?.to_owned(), n.pos)));
        let tags = fields.get("tags").map(|n| self.names(n, "tags", "tag")).unwrap_or_default();
        let patched_at = fields.get("patched_at").and_then(|n| {
            let text = self.scalar(n, "a date YYYY-MM-DD")?;
            text.parse::<PatchDate>().map_err(|e| self.error(n.pos, e)).ok()
        });
        let mut allowed_macs = Vec::new();
        for item in fields.get("allowed_macs").map_or(&[][..], |l| self.list(l, "allowed_macs").unwrap_or(&[])) {
            let Some(text) = self.scalar(item, "a MAC address") else { continue };
            match text.parse::<MacAddr>() {
                Err(e) => self.error(item.pos, e),
                Ok(m) if m.0[0] & 1 != 0 || m.0 == [0; 6] => {
                    self.error(item.pos, format!("{m} is not a unicast MAC: no frame is sent from it"));
                }
                Ok(m) if allowed_macs.contains(&m) || mac.is_some_and(|own| own == m) => {
                    self.error(item.pos, format!("MAC {m} is listed twice for {what}"));
                }
                Ok(m) => allowed_macs.push(m),
            }
        }
        let mut allowed_addresses = Vec::new();
        for item in
            fields.get("allowed_addresses").map_or(&[][..], |l| self.list(l, "allowed_addresses").unwrap_or(&[]))
        {
            let Some(text) = self.scalar(item, "an IP address") else { continue };
            match text.parse::<IpAddr>() {
                Err(_) => self.error(
                    item.pos,
                    format!("\"{text}\" is not an IP address; expected an IPv4 or IPv6 address like 10.30.0.100"),
                ),
                Ok(ip) if allowed_addresses.contains(&ip) || ips.contains(&ip) => {
                    self.error(item.pos, format!("address {ip} is listed twice for {what}"));
                }
                Ok(ip) => allowed_addresses.push(ip),
            }
        }
        Some(PendingEndpoint {
            zone_at: zone.as_ref().map(|(_, pos)| self.loc(*pos)),
            endpoint: Endpoint {
                name: name.to_owned(),
                mac: mac?,
                ips,
                zone: zone.map(|(z, _)| z),
                tags: tags.into_iter().map(|(t, _)| t).collect(),
                patched_at,
                allowed_macs,
                allowed_addresses,
                location: self.loc(at),
            },
        })
    }

    fn virtual_patches(&mut self, node: &Node) {
        let Some(items) = self.list(node, "virtual_patches") else { return };
        for item in items {
            let Some(fields) = self.fields(item, "a virtual patch", &["name", "tag", "deny"]) else { continue };
            let name = self.required(&fields, "name", "a virtual patch", "");
            let tag =
                self.required(&fields, "tag", "a virtual patch", " (the patch applies to endpoints with this tag)");
            let deny = self.required(&fields, "deny", "a virtual patch", "");
            let name = name.and_then(|n| Some((self.scalar(n, "a patch name")?, n.pos)));
            if let Some((text, pos)) = name {
                if text.trim().is_empty() || text.chars().any(char::is_control) {
                    self.error(pos, "a patch name must be non-empty and have no control characters");
                } else if let Some(first) = self.virtual_patches.iter().find(|p| p.name == text) {
                    let msg = format!("virtual patch \"{text}\" is defined twice (first at {})", first.location);
                    self.error(pos, msg);
                }
            }
            let tag = tag.and_then(|n| {
                let text = self.scalar(n, "a tag")?;
                inventory::check_name("tag", text).map_err(|e| self.error(n.pos, e)).ok()?;
                Some(text.to_owned())
            });
            let entries: Option<Vec<DenyEntry>> = deny.and_then(|d| self.list(d, "deny")).map(|items| {
                items
                    .iter()
                    .filter_map(|e| {
                        let (proto, ports) = self.proto_ports(e, "a deny entry", "denies")?;
                        Some(DenyEntry { proto, ports, location: self.loc(e.pos) })
                    })
                    .collect()
            });
            if let Some(d) = deny {
                if matches!(&d.value, Value::Seq(s) if s.is_empty()) || d.is_null() {
                    self.error(d.pos, "a virtual patch denies something: list at least one deny entry");
                    continue;
                }
            }
            let (Some((name, pos)), Some(tag), Some(deny)) = (name, tag, entries) else { continue };
            self.virtual_patches.push(VirtualPatch { name: name.to_owned(), tag, deny, location: self.loc(pos) });
        }
    }

    /// The inventory checks that need every file: endpoint zones, MACs that members put
    /// in another zone, and the zones of `must_not_share_node_with`.
    fn finish_inventory(&mut self) -> Vec<Endpoint> {
        let names = || -> String {
            std::iter::once(WORLD)
                .chain(self.zones.iter().map(|z| z.name.as_str()).filter(|n| *n != WORLD))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut errors = Vec::new();
        for n in &self.neighbours {
            if n.other != WORLD && !self.zone_index.contains_key(&n.other) {
                errors.push(n.at.error(format!(
                    "unknown zone \"{}\" in must_not_share_node_with of zone \"{}\"; known zones: {}",
                    n.other,
                    n.zone,
                    names()
                )));
            }
        }
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        for p in std::mem::take(&mut self.endpoints) {
            let e = &p.endpoint;
            if let (Some(zone), Some(at)) = (&e.zone, &p.zone_at) {
                if zone != WORLD && !self.zone_index.contains_key(zone) {
                    errors.push(at.error(format!(
                        "unknown zone \"{zone}\" for endpoint \"{}\"; known zones: {}",
                        e.name,
                        names()
                    )));
                    endpoints.push(p.endpoint);
                    continue;
                }
                let member = self
                    .zones
                    .iter()
                    .find(|z| z.members.iter().any(|m| matches!(&m.matcher, MemberMatch::Mac(x) if *x == e.mac)));
                if let Some(other) = member.filter(|z| z.name != *zone) {
                    errors.push(at.error(format!(
                        "endpoint \"{}\" is put in zone \"{zone}\" but its MAC {} is a member of zone \"{}\"; an address can be in one zone only",
                        e.name, e.mac, other.name
                    )));
                }
            }
            endpoints.push(p.endpoint);
        }
        self.errors.extend(errors);
        endpoints
    }

    /// `infrastructure: { NAME: { mac: MAC, ips: [ADDR, ...] } }`.
    fn infrastructure(&mut self, node: &Node) {
        if node.is_null() {
            return;
        }
        let Value::Map(entries) = &node.value else {
            return self.error(
                node.pos,
                format!("expected infrastructure (a mapping of names to {{ mac, ips }}), found {}", node.kind()),
            );
        };
        for (key, value) in entries {
            let Some(name) = self.scalar(key, "an infrastructure name") else { continue };
            let name = name.to_owned();
            if let Some(first) = self.infrastructure.iter().find(|i| i.name == name) {
                let msg = format!("infrastructure \"{name}\" is defined twice (first at {})", first.location);
                self.error(key.pos, msg);
                continue;
            }
            let what = format!("infrastructure \"{name}\"");
            let Some(fields) = self.fields(value, &what, &["mac", "ips"]) else { continue };
            let mac = fields.get("mac").and_then(|n| {
                let text = self.scalar(n, "a MAC address")?;
                text.parse::<MacAddr>().map_err(|e| self.error(n.pos, e)).ok()
            });
            let mut ips = Vec::new();
            for item in fields.get("ips").map_or(&[][..], |l| self.list(l, "ips").unwrap_or(&[])) {
                let Some(text) = self.scalar(item, "an IP address") else { continue };
                match text.parse::<IpAddr>() {
                    Ok(ip) => ips.push(ip),
                    Err(_) => self.error(
                        item.pos,
                        format!("\"{text}\" is not an IP address; expected an IPv4 or IPv6 address like 10.30.0.254"),
                    ),
                }
            }
            if mac.is_none() && ips.is_empty() {
                self.error(key.pos, format!("{what} names neither a mac nor ips: nothing to protect"));
                continue;
            }
            let location = self.loc(key.pos);
            self.infrastructure.push(crate::Infrastructure { name, mac, ips, location });
        }
    }

    fn unbound_ports(&mut self, node: &Node) {
        let value = match self.scalar(node, "unbound_ports: quarantine, deny or observe") {
            Some("quarantine") => crate::UnboundPorts::Quarantine,
            Some("deny") => crate::UnboundPorts::Deny,
            Some("observe") => crate::UnboundPorts::Observe,
            Some(other) => {
                let msg = format!("expected quarantine, deny or observe for unbound_ports, found \"{other}\"");
                return self.error(node.pos, msg);
            }
            None => return,
        };
        if let Some((_, first)) = &self.unbound_ports {
            let msg = format!("unbound_ports is set twice (first at {first})");
            return self.error(node.pos, msg);
        }
        self.unbound_ports = Some((value, self.loc(node.pos)));
    }

    fn default_inter_zone(&mut self, node: &Node) {
        let Some(access) = self.access(node, "default_inter_zone") else { return };
        if let Some((_, first)) = &self.default_inter_zone {
            let msg = format!("default_inter_zone is set twice (first at {first})");
            return self.error(node.pos, msg);
        }
        self.default_inter_zone = Some((access, self.loc(node.pos)));
    }

    /// What an endpoint is allowed to send from besides its own is nobody else's: not
    /// another endpoint's MAC or address, not infrastructure's.
    fn check_allowed(&mut self, endpoints: &[Endpoint]) {
        for e in endpoints {
            for m in &e.allowed_macs {
                let other = endpoints.iter().find(|o| o.mac == *m).map(|o| format!("endpoint \"{}\"'s", o.name));
                let infra = self.infrastructure.iter().find(|i| i.mac == Some(*m));
                if let Some(whose) = other.or_else(|| infra.map(|i| format!("infrastructure \"{}\"'s", i.name))) {
                    self.errors.push(e.location.error(format!(
                        "allowed_macs of endpoint \"{}\": {m} is {whose}; a port may send only what is nobody else's",
                        e.name
                    )));
                }
            }
            for ip in &e.allowed_addresses {
                let other = endpoints.iter().find(|o| o.ips.contains(ip)).map(|o| format!("endpoint \"{}\"'s", o.name));
                let infra = self.infrastructure.iter().find(|i| i.ips.contains(ip));
                if let Some(whose) = other.or_else(|| infra.map(|i| format!("infrastructure \"{}\"'s", i.name))) {
                    self.errors.push(e.location.error(format!(
                        "allowed_addresses of endpoint \"{}\": {ip} is {whose}; a port may send only what is nobody else's",
                        e.name
                    )));
                }
            }
        }
    }

    /// The checks that need every file: zone references and overlapping members.
    fn finish(mut self) -> Result<RuleSet, Vec<RuleError>> {
        let user_zones = self.zones.iter().filter(|z| z.name != WORLD).count();
        if user_zones > MAX_ZONES {
            let at = self.zones[MAX_ZONES].location.clone();
            self.errors.push(at.error(format!("too many zones ({user_zones}); a rule set has at most {MAX_ZONES}")));
        }
        let endpoints = self.finish_inventory();
        self.check_allowed(&endpoints);
        for infra in &self.infrastructure {
            for e in &endpoints {
                if infra.mac == Some(e.mac) {
                    self.errors.push(infra.location.error(format!(
                        "MAC {} of infrastructure \"{}\" is endpoint \"{}\"'s ({}): infrastructure is never a VM's",
                        e.mac, infra.name, e.name, e.location
                    )));
                }
                if let Some(ip) = infra.ips.iter().find(|ip| e.ips.contains(ip)) {
                    self.errors.push(infra.location.error(format!(
                        "address {ip} of infrastructure \"{}\" is endpoint \"{}\"'s ({}): infrastructure is never a VM's",
                        infra.name, e.name, e.location
                    )));
                }
            }
        }
        let mut policies = Vec::with_capacity(self.policies.len());
        for p in self.policies {
            for (name, at, field) in [(&p.policy.from, &p.from_at, "from"), (&p.policy.to, &p.to_at, "to")] {
                if name != WORLD && !self.zone_index.contains_key(name.as_str()) {
                    let names: Vec<&str> = std::iter::once(WORLD)
                        .chain(self.zones.iter().map(|z| z.name.as_str()).filter(|n| *n != WORLD))
                        .collect();
                    self.errors.push(
                        at.error(format!("unknown zone \"{name}\" in {field}; known zones: {}", names.join(", "))),
                    );
                }
            }
            if p.policy.from == p.policy.to {
                self.errors.push(p.to_at.error(format!(
                    "policy from zone \"{0}\" to itself is never consulted: traffic within a zone is decided by its intra_zone setting",
                    p.policy.from
                )));
            }
            policies.push(p.policy);
        }
        check_overlaps(&self.zones, &mut self.errors);
        if !self.errors.is_empty() {
            sort(&mut self.errors);
            return Err(self.errors);
        }
        let (default_inter_zone, default_inter_zone_at) = match self.default_inter_zone {
            Some((a, at)) => (a, Some(at)),
            None => (Access::Deny, None),
        };
        Ok(RuleSet {
            zones: self.zones,
            policies,
            default_inter_zone,
            default_inter_zone_at,
            endpoints,
            virtual_patches: self.virtual_patches,
            unbound_ports: self.unbound_ports.map(|(u, _)| u).unwrap_or_default(),
            infrastructure: self.infrastructure,
        })
    }
}

/// Zone names appear in metric labels, flow records and command lines.
fn check_zone_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "\"{name}\" is not a valid zone name: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ))
    }
}

/// One address in two zones is an error: the same MAC, the same interface glob, or
/// two CIDRs of which one holds the other. Reported at the member read last.
fn check_overlaps(zones: &[Zone], errors: &mut Vec<RuleError>) {
    // (reading order, zone, member)
    let members: Vec<(usize, &Zone, &Member)> = zones
        .iter()
        .flat_map(|z| z.members.iter().map(move |m| (z, m)))
        .enumerate()
        .map(|(i, (z, m))| (i, z, m))
        .collect();
    let conflict =
        |errors: &mut Vec<RuleError>, a: &(usize, &Zone, &Member), b: &(usize, &Zone, &Member), what: &str| {
            let (first, later) = if a.0 < b.0 { (a, b) } else { (b, a) };
            errors.push(later.2.location.error(format!(
                "{} in zone \"{}\" {what} {} of zone \"{}\" ({}); an address can be in one zone only",
                later.2.matcher, later.1.name, first.2.matcher, first.1.name, first.2.location
            )));
        };

    let mut macs: HashMap<MacAddr, &(usize, &Zone, &Member)> = HashMap::new();
    let mut globs: HashMap<&str, &(usize, &Zone, &Member)> = HashMap::new();
    let mut cidrs = Vec::new();
    for m in &members {
        match &m.2.matcher {
            MemberMatch::Mac(mac) => match macs.get(mac) {
                Some(first) if first.1.name != m.1.name => conflict(errors, first, m, "is already"),
                Some(_) => {}
                None => {
                    macs.insert(*mac, m);
                }
            },
            MemberMatch::Interface(g) => match globs.get(g.pattern()) {
                Some(first) if first.1.name != m.1.name => conflict(errors, first, m, "is already"),
                Some(_) => {}
                None => {
                    globs.insert(g.pattern(), m);
                }
            },
            MemberMatch::Cidr(c) => cidrs.push((*c, m)),
        }
    }

    // Two networks overlap only when one holds the other. Sorted by family, start
    // address, then shorter prefix first, every network comes after those holding
    // it; a stack keeps the chain of networks holding the current one.
    //
    // Each network is reported once, with the outermost network of another zone that
    // holds it (or is it): one network in n zones would otherwise make n^2/2 errors (2,000
    // zones of one 10.0.0.0/8, 80 kB of YAML, made 2 million, 535 MB). And the stack keeps
    // members of two zones at most per network, all that tells whether a later one is in
    // another zone, so that it stays as short as the chain of prefixes (129 at most).
    cidrs.sort_by_key(|(c, m)| (c.addr().is_ipv6(), addr_bits(c.addr()), c.prefix_len(), m.0));
    let mut stack: Vec<(Cidr, &(usize, &Zone, &Member))> = Vec::new();
    for (c, m) in cidrs {
        while stack.last().is_some_and(|(outer, _)| !outer.overlaps(c)) {
            stack.pop();
        }
        if let Some((outer, om)) = stack.iter().find(|(_, om)| om.1.name != m.1.name) {
            let verb = if *outer == c { "is already" } else { "overlaps" };
            conflict(errors, om, m, verb);
        }
        let same: Vec<&str> =
            stack.iter().rev().take_while(|(outer, _)| *outer == c).map(|(_, om)| om.1.name.as_str()).collect();
        if same.len() < 2 && !same.contains(&m.1.name.as_str()) {
            stack.push((c, m));
        }
    }
}

fn addr_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

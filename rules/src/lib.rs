//! Zone rule sets for backplane: the YAML schema, validation that reports every
//! problem at its file, line and column, a compiler to the kernel's rule-table
//! entries, and a reference evaluator that decides flows the way the data path does.
//!
//! ```text
//! *.yaml --load_rules--> RuleSet --compile--> CompiledRules (table entries, no slot)
//!                           \------evaluate--> Decision (verdict, reason, policy, zones)
//! ```
//!
//! See `rules/README.md` for the schema and its semantics.

mod compile;
mod error;
mod evaluate;
mod failure;
mod inventory;
mod load;
mod ruleset;
mod types;
mod yaml;

pub use compile::{
    CidrEntry, CompiledPatch, CompiledRules, EndpointEntry, InterfaceEntry, PAIR_MARKER_PROTO, PolicyEntry,
    VpatchEntry, ZoneEntry, ZoneIds, compile, port_prefixes,
};
pub use error::RuleError;
pub use evaluate::{
    DecidedBy, Decision, EndMatch, Explanation, OtherBinding, PacketView, PortBinding, PortIdentity, PortZone,
    ZoneMatch, evaluate, explain, zone_of,
};
pub use failure::{FAILURE_POLICY_PREFIX, OnRulesFailure};
pub use inventory::{
    DenyEntry, Endpoint, OnViolation, PatchAge, PatchDate, UnknownMacs, VirtualPatch, ZoneEndpoints,
    check_endpoint_name,
};
pub use load::{MAX_FILE_BYTES, MAX_ZONES, load_rules, parse_rules, read_rule_file, rule_files};
pub use ruleset::{
    Access, AllowEntry, Binding, Infrastructure, InterfaceGlob, Member, MemberMatch, Mode, Policy, RuleSet,
    UnboundPorts, WORLD, Zone,
};
pub use types::{Cidr, MacAddr, PortRange, Proto, SourcePos};
pub use yaml::{MAX_ALIAS_NODES, MAX_LOOKAHEAD, MAX_NESTING, MAX_NODES, MAX_SCALAR_BYTES};

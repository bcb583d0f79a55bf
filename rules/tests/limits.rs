//! What a rule file may cost is bounded: alias bombs, deep nesting and oversized files
//! are refused with an error at their file, line and column that names the limit,
//! quickly and without large allocations; the examples and the benchmarks' biggest
//! generated rule set still load.
//!
//! The bombs are parsed in a child process (this test binary run again, see [`child`])
//! whose address space is limited to 1 GiB: an unbounded parser aborts there ("memory
//! allocation of N bytes failed") instead of taking the machine's memory, and the child
//! reports how much the parse allocated at its peak (a counting global allocator).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use backplane_rules::{
    MAX_ALIAS_NODES, MAX_FILE_BYTES, MAX_LOOKAHEAD, MAX_NESTING, MAX_NODES, MAX_SCALAR_BYTES, load_rules, parse_rules,
};

#[allow(dead_code, reason = "the benchmarks' generator: only its rule sets are used here")]
#[path = "../../benches/src/rulegen.rs"]
mod rulegen;

/// Counts the bytes allocated now and at the peak.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

impl Counting {
    fn grew(by: usize) {
        let now = ALLOCATED.fetch_add(by, Ordering::Relaxed) + by;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

// SAFETY: every call goes to `System` with the caller's arguments; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `System`.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `System`.
        unsafe { System.dealloc(ptr, layout) };
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `System`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
            Self::grew(new_size);
        }
        p
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// The classic "billion laughs": 9 anchors of 9 aliases each, 9^9 scalars in 414 bytes.
fn alias_bomb() -> String {
    let mut text =
        String::from("a: &a [\"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\"]\n");
    for (prev, name) in
        ["a", "b", "c", "d", "e", "f", "g", "h"].into_iter().zip(["b", "c", "d", "e", "f", "g", "h", "i"])
    {
        let items = vec![format!("*{prev}"); 9].join(", ");
        writeln!(text, "{name}: &{name} [{items}]").unwrap();
    }
    text
}

/// Few nodes but long scalars: one scalar of 100,000 bytes, and anchors of 9 aliases
/// copying it 9, 81, 729... times. Bounding nodes alone would let this one through.
fn text_bomb() -> String {
    let mut text = format!("a: &a \"{}\"\n", "x".repeat(100_000));
    for (prev, name) in ["a", "b", "c", "d"].into_iter().zip(["b", "c", "d", "e"]) {
        let items = vec![format!("*{prev}"); 9].join(", ");
        writeln!(text, "{name}: &{name} [{items}]").unwrap();
    }
    text
}

/// 10,000 flow lists, one in the other.
fn deep_flow() -> String {
    format!("{}{}\n", "[".repeat(10_000), "]".repeat(10_000))
}

/// 10,000 block lists, one in the other, on one line (`- - - ... x`): `saphyr-parser`
/// bounds flow nesting itself, not this.
fn deep_block() -> String {
    format!("{}x\n", "- ".repeat(10_000))
}

/// Anchors that each nest the previous one 10 lists deeper: 7 x 10 levels, though no
/// line of the file nests more than 10.
fn deep_aliases() -> String {
    let mut text = format!("a0: &a0 {}x{}\n", "[".repeat(10), "]".repeat(10));
    for i in 1..7 {
        writeln!(text, "a{i}: &a{i} {}*a{}{}", "[".repeat(10), i - 1, "]".repeat(10)).unwrap();
    }
    text
}

/// A list of as many scalars as a file may have nodes, in a mapping: two nodes too many,
/// no alias.
fn many_nodes() -> String {
    format!("a: [{}]\n", "1,".repeat(MAX_NODES))
}

/// A list of 8 million scalars, alone: the YAML parser reads it whole before it yields
/// anything (it could be a mapping key), keeping every token.
fn flow_bomb() -> String {
    format!("[{}]\n", "1,".repeat((MAX_FILE_BYTES - 3) / 2))
}

const CHILD: &str = "BACKPLANE_RULES_LIMITS_CHILD";
const ADDRESS_SPACE: u64 = 1 << 30;

/// Not a test on its own: run by [`in_child`] with `CHILD` naming an input, it limits its
/// address space to 1 GiB, parses the input and prints its errors, the peak of what the
/// parse allocated and how long it took.
#[test]
fn child() {
    let Ok(input) = std::env::var(CHILD) else { return };
    let limit = libc::rlimit { rlim_cur: ADDRESS_SPACE, rlim_max: ADDRESS_SPACE };
    // SAFETY: a plain system call on a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &raw const limit) }, 0, "setrlimit");
    let text = match input.as_str() {
        "alias-bomb" => alias_bomb(),
        "text-bomb" => text_bomb(),
        "many-nodes" => many_nodes(),
        "flow-bomb" => flow_bomb(),
        other => panic!("no input {other}"),
    };
    let before = ALLOCATED.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let start = Instant::now();
    let result = parse_rules([(Path::new("r.yaml"), text.as_str())]);
    let took = start.elapsed();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    // On a line of its own, after the harness's "test child ... ".
    println!();
    match result {
        Ok(_) => println!("LOADED"),
        Err(errors) => errors.iter().for_each(|e| println!("ERROR {e}")),
    }
    println!("PEAK {peak}");
    println!("MICROS {}", took.as_micros());
}

/// What a child parsing `input` under the address-space limit printed: its errors, the
/// parse's peak allocation in bytes, and the parse's time.
fn in_child(input: &str) -> (Vec<String>, usize, Duration) {
    let exe = std::env::current_exe().expect("the test binary");
    let out = Command::new(exe)
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(CHILD, input)
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "parsing {input} under a {} MiB address-space limit: {} (SIGABRT/134: an allocation failed)\n{stdout}\n{}",
        ADDRESS_SPACE >> 20,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |key: &str| -> u64 {
        let line = stdout.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key}: {stdout}"));
        line.trim().parse().unwrap()
    };
    let errors = stdout.lines().filter_map(|l| l.strip_prefix("ERROR ")).map(str::to_owned).collect();
    (errors, usize::try_from(value("PEAK ")).unwrap(), Duration::from_micros(value("MICROS ")))
}

fn one_error(text: &str) -> String {
    match parse_rules([(Path::new("r.yaml"), text)]) {
        Ok(_) => panic!("rule set unexpectedly valid"),
        Err(errors) => {
            assert_eq!(errors.len(), 1, "{errors:#?}");
            errors[0].to_string()
        }
    }
}

/// Asserts the error starts with `r.yaml:line:column:` and contains `needle`.
#[track_caller]
fn assert_error(error: &str, at: &str, needle: &str) {
    assert!(error.starts_with(&format!("r.yaml:{at}: ")), "wrong place: {error} (want {at})");
    assert!(error.contains(needle), "{error} should say {needle:?}");
}

#[test]
fn the_billion_laughs_is_refused_at_the_alias_that_passes_the_limit() {
    let text = alias_bomb();
    assert!(text.len() < 450, "{} bytes", text.len());
    let (errors, peak, took) = in_child("alias-bomb");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    // Line g: its first alias copies f (597,871 nodes), past 1,000,000 with the 672,588
    // that the aliases of b to f copied.
    assert_error(&errors[0], "7:8", "the aliases of this file copy more than 1,000,000 YAML nodes");
    assert!(errors[0].contains("the limit for a rule file"), "{}", errors[0]);
    assert_eq!(MAX_ALIAS_NODES, 1_000_000);
    assert!(peak < 256 << 20, "the parse allocated {} MiB at its peak", peak >> 20);
    assert!(took < Duration::from_secs(2), "the parse took {took:?}");
    eprintln!("alias bomb: refused in {took:?}, peak allocation {} MiB", peak >> 20);
}

#[test]
fn long_scalars_copied_by_aliases_are_refused() {
    let (errors, peak, took) = in_child("text-bomb");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    // Before d, 18.2 MB were built (each level written or copied, and kept for its anchor);
    // each alias of d copies c's 8.1 MB, and the seventh passes 64 MiB (67.1 MB).
    assert_error(&errors[0], "4:32", "the scalars of this file grow past 64 MiB of text here");
    assert_eq!(MAX_SCALAR_BYTES, 64 << 20);
    assert!(peak < 256 << 20, "the parse allocated {} MiB at its peak", peak >> 20);
    assert!(took < Duration::from_secs(2), "the parse took {took:?}");
    eprintln!("text bomb: refused in {took:?}, peak allocation {} MiB", peak >> 20);
}

#[test]
fn a_flow_collection_read_whole_is_refused_past_the_lookahead() {
    let (errors, peak, took) = in_child("flow-bomb");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_error(&errors[0], "1:1", "the YAML parser reads more than 262,144 characters past here");
    assert_eq!(MAX_LOOKAHEAD, 256 << 10);
    assert!(peak < 128 << 20, "the parse allocated {} MiB at its peak", peak >> 20);
    eprintln!("flow bomb: refused in {took:?}, peak allocation {} MiB", peak >> 20);
}

#[test]
fn deep_flow_nesting_is_refused() {
    assert_eq!(MAX_NESTING, 64);
    let e = one_error(&deep_flow());
    // The YAML parser scans ahead of its events, and stops at 256 brackets itself.
    assert_error(&e, "1:256", "lists and mappings nest more than 64 deep, the limit for a rule file");
}

#[test]
fn deep_block_nesting_is_refused_without_a_stack_overflow() {
    let e = one_error(&deep_block());
    assert_error(&e, "1:129", "lists and mappings nest more than 64 deep here");
}

#[test]
fn nesting_counts_what_aliases_copy() {
    let e = one_error(&deep_aliases());
    // a6 puts a5 (60 deep) 10 lists down.
    assert_error(&e, "7:19", "this alias nests lists and mappings more than 64 deep");
}

#[test]
fn nesting_up_to_the_limit_is_only_a_schema_error() {
    let text = format!("{}x{}\n", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING));
    let e = one_error(&text);
    assert_error(&e, "1:1", "expected a rule file (a mapping with zones, policies, default_inter_zone), found a list");
}

#[test]
fn nodes_past_the_limit_are_refused() {
    assert!(many_nodes().len() < MAX_FILE_BYTES);
    let (errors, peak, took) = in_child("many-nodes");
    assert_eq!(errors.len(), 1, "{errors:#?}");
    // The mapping, its key and the list are 3 nodes; this scalar is one too many.
    let column = 5 + 2 * (MAX_NODES - 3);
    assert_error(
        &errors[0],
        &format!("1:{column}"),
        "this file grows past 2,000,000 YAML nodes here, the limit for a rule file",
    );
    assert!(peak < 256 << 20, "the parse allocated {} MiB at its peak", peak >> 20);
    eprintln!("{} nodes: refused in {took:?}, peak allocation {} MiB", MAX_NODES + 1, peak >> 20);
}

/// A file of `bytes` bytes that is mostly a hole: nothing of it is on disk, and reading
/// it whole would take as long as writing that many zeros.
fn sparse_file(name: &str, bytes: u64) -> PathBuf {
    let path = std::env::temp_dir().join(format!("backplane-rules-limits-{}-{name}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(bytes).unwrap();
    path
}

#[test]
fn a_file_over_the_size_limit_is_refused_before_it_is_read() {
    // 64 GiB: a loader that read it first would run out of memory, or take minutes.
    let path = sparse_file("huge.yaml", 64 << 30);
    let start = Instant::now();
    let errors = load_rules(&path).unwrap_err();
    let took = start.elapsed();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!((errors[0].line, errors[0].column), (0, 0));
    assert_eq!(
        errors[0].to_string(),
        format!(
            "{}: a rule file may have at most 16 MiB (16,777,216 bytes), this one has 68,719,476,736 bytes; \
             split the rule set into files",
            path.display()
        )
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[test]
fn a_file_at_the_size_limit_is_read_and_one_byte_more_is_not() {
    let at = sparse_file("at.yaml", MAX_FILE_BYTES as u64);
    let over = sparse_file("over.yaml", MAX_FILE_BYTES as u64 + 1);
    // Zero bytes are no YAML: the file at the limit is read and refused by the parser.
    let at_errors = load_rules(&at).unwrap_err();
    let over_errors = load_rules(&over).unwrap_err();
    std::fs::remove_file(&at).unwrap();
    std::fs::remove_file(&over).unwrap();
    assert!(!at_errors[0].message.contains("at most 16 MiB"), "{at_errors:#?}");
    assert!(over_errors[0].message.contains("this one has 16,777,217 bytes"), "{over_errors:#?}");
}

#[test]
fn a_text_over_the_size_limit_is_refused_without_parsing() {
    let text = format!("zones: {{}}\n{}", "#".repeat(MAX_FILE_BYTES));
    let e = one_error(&text);
    assert!(e.starts_with("r.yaml: a rule file may have at most 16 MiB"), "{e}");
}

#[test]
fn the_examples_load() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut loaded = 0;
    for dir in std::fs::read_dir(&examples).unwrap() {
        let dir = dir.unwrap().path();
        load_rules(&dir).unwrap_or_else(|e| panic!("{}: {e:#?}", dir.display()));
        loaded += 1;
    }
    assert!(loaded >= 3, "{loaded} examples");
}

/// The benchmarks' biggest rule set: 10,000 policies and 100,000 endpoints in one file
/// of 5.2 MB and 570,712 YAML nodes, written to a file and loaded through `load_rules`.
#[test]
fn the_benchmarks_biggest_generated_rule_set_loads() {
    let set = rulegen::ZoneRuleSet::generate(10_000, 100_000, &rulegen::BenchTraffic::default());
    let yaml = set.to_yaml();
    assert!(yaml.len() * 3 < MAX_FILE_BYTES, "{} bytes", yaml.len());
    let path = std::env::temp_dir().join(format!("backplane-rules-limits-{}-generated.yaml", std::process::id()));
    std::fs::write(&path, &yaml).unwrap();
    let loaded = load_rules(&path);
    std::fs::remove_file(&path).unwrap();
    let rules = loaded.unwrap_or_else(|e| panic!("{:#?}", &e[..e.len().min(5)]));
    assert_eq!(rules.policies.len(), 10_000);
    assert_eq!(rules.zones.iter().map(|z| z.members.len()).sum::<usize>(), 100_000 + rules.zones.len());
}

#[test]
fn aliases_used_as_intended_still_load() {
    let text = "\
zones:
  web: { members: [ { cidr: 10.30.0.0/24 } ] }
  db: { members: [ { cidr: 10.40.0.0/24 } ] }
  mgmt: { members: [ { cidr: 10.50.0.0/24 } ] }
policies:
  - { name: web-to-db, from: web, to: db, allow: &common [ { proto: tcp, ports: [22, 5432] }, { proto: icmp } ] }
  - { name: mgmt-to-db, from: mgmt, to: db, allow: *common }
  - { name: mgmt-to-web, from: mgmt, to: web, allow: *common }
";
    let rules = parse_rules([(Path::new("r.yaml"), text)]).unwrap_or_else(|e| panic!("{e:#?}"));
    assert_eq!(rules.policies.len(), 3);
    assert!(rules.policies.iter().all(|p| p.allow.len() == 2));
}

/// The inputs kept for the rules parser's fuzz target (`agent/fuzz/regressions/rules_parser`)
/// that stand for these bounds are refused with their errors; the agent's replay of them
/// (`agent/tests/fuzz_regressions.rs`) checks that nothing panics.
#[test]
fn the_fuzz_regressions_of_the_bounds_are_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/fuzz/regressions/rules_parser");
    for (name, generated, needle) in [
        ("alias-bomb.yaml", alias_bomb(), "the aliases of this file copy more than 1,000,000 YAML nodes"),
        ("deep-flow-nesting.yaml", deep_flow(), "nest more than 64 deep"),
        ("deep-block-nesting.yaml", deep_block(), "nest more than 64 deep"),
        ("deep-alias-nesting.yaml", deep_aliases(), "this alias nests lists and mappings more than 64 deep"),
    ] {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(bytes, generated.as_bytes(), "{name} is what this test generates");
        let e = one_error(&generated);
        assert!(e.contains(needle), "{name}: {e}");
    }
}

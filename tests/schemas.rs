//! The JSON Schemas in `schemas/` held against `src/event.rs`.
//!
//! Producers in other languages validate with the schemas; the ledger decodes
//! with `DealEvent::decode`. These tests check that the two agree: on the
//! example scenario, on the catalogue of invalid events, on events the Rust
//! producer emits, and on generated mutations (every field dropped in turn,
//! unknown fields added, boundary values of every scalar rule).
//!
//! The schemas are loaded from disk into a `jsonschema` registry under their
//! `$id`s, so `$ref`s resolve offline; format assertion is on (`date-time`
//! and `date` are part of the contract).
//!
//! Where the two differ, the difference is listed in a `*_DIVERGENCES`
//! constant and asserted to still be there, so that a fix on either side
//! shows up here. In every listed difference the schema is the more lenient
//! side: JSON Schema cannot see how a number is written, how large an event
//! is or which of two equal keys wins, and the shared schema still admits
//! a leap second at 23:59:60 UTC and instants whose UTC year leaves 0000-9999.
//! Corners where event.rs used to be the lenient one (null for an optional
//! field, a leap second in any minute, years that could not be written back)
//! are now asserted to be rejected by both.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dealledger::event::{DealEvent, DecodeError, EventType, SCHEMA_BASE_URI, limits};
use jsonschema::{Draft, Registry, Validator};
use serde_json::{Value, json};

const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

// ---------------------------------------------------------------------------
// Loading.
// ---------------------------------------------------------------------------

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

fn envelope_id() -> String {
    format!("{SCHEMA_BASE_URI}deal-event.schema.json")
}

/// Every `*.schema.json` under `schemas/` (examples excluded): path relative
/// to `schemas/` with `/` separators, and the parsed document.
fn schema_documents() -> &'static [(String, Value)] {
    static DOCS: OnceLock<Vec<(String, Value)>> = OnceLock::new();
    DOCS.get_or_init(|| {
        fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, Value)>) {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
                .map(|e| e.expect("directory entry").path())
                .collect();
            entries.sort();
            for path in entries {
                let name = path.file_name().unwrap().to_str().unwrap().to_string();
                let rel_name = if rel.is_empty() {
                    name.clone()
                } else {
                    format!("{rel}/{name}")
                };
                if path.is_dir() {
                    if name != "examples" {
                        walk(&path, &rel_name, out);
                    }
                } else if name.ends_with(".schema.json") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    let value: Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("{rel_name} is not JSON: {e}"));
                    out.push((rel_name, value));
                }
            }
        }
        let mut out = Vec::new();
        walk(&schemas_dir(), "", &mut out);
        out
    })
}

/// The schema document whose `$id` is `id`.
fn document(id: &str) -> &'static Value {
    schema_documents()
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["$id"] == id)
        .unwrap_or_else(|| panic!("no schema document has $id {id}"))
}

/// All schema documents registered under their `$id`s; nothing is fetched.
fn registry() -> &'static Registry<'static> {
    static REGISTRY: OnceLock<Registry<'static>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let resources = schema_documents().iter().map(|(rel, v)| {
            let id = v["$id"]
                .as_str()
                .unwrap_or_else(|| panic!("{rel} has no $id"));
            (id.to_string(), v.clone())
        });
        Registry::new()
            .extend(resources)
            .expect("schema $ids are URIs")
            .prepare()
            .expect("registry of schemas/ builds")
    })
}

/// A draft 2020-12 validator for `schema`, format assertion on, offline.
fn build(schema: &Value) -> Validator {
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(true)
        .offline()
        .with_registry(registry())
        .build(schema)
        .unwrap_or_else(|e| panic!("schema does not compile: {e}\n{schema:#}"))
}

/// The validator for whole deal events (`deal-event.schema.json`).
fn event_validator() -> &'static Validator {
    static V: OnceLock<Validator> = OnceLock::new();
    V.get_or_init(|| build(document(&envelope_id())))
}

fn schema_accepts(event: &Value) -> bool {
    event_validator().is_valid(event)
}

/// The schema's errors for `event`, as (dotted path, message).
fn schema_errors(event: &Value) -> Vec<(String, String)> {
    event_validator()
        .iter_errors(event)
        .map(|e| {
            (
                pointer_to_dotted(&e.instance_path().to_string()),
                e.to_string(),
            )
        })
        .collect()
}

fn rust_decode(event: &Value) -> Result<DealEvent, DecodeError> {
    DealEvent::decode(&serde_json::to_vec(event).unwrap())
}

/// `/data/signatories/0/name` → `data.signatories[0].name` (event.rs's path style).
fn pointer_to_dotted(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

fn read_jsonl(name: &str) -> Vec<(usize, String, Value)> {
    let path = schemas_dir().join("examples").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{name}:{}: not JSON: {e}", i + 1));
            (i + 1, l.to_string(), v)
        })
        .collect()
}

fn scenario() -> Vec<(usize, String, Value)> {
    read_jsonl("scenario.jsonl")
}

/// Asserts that the schema and event.rs give the same verdict on `event`;
/// returns that verdict.
#[track_caller]
fn assert_agree(what: &str, event: &Value) -> bool {
    let schema = schema_accepts(event);
    let rust = rust_decode(event);
    assert_eq!(
        schema,
        rust.is_ok(),
        "{what}: schema says {}, event.rs says {:?}\nschema errors: {:#?}\nevent: {event}",
        if schema { "valid" } else { "invalid" },
        rust.as_ref().map(|_| "valid").map_err(|e| e.to_string()),
        schema_errors(event),
    );
    schema
}

// ---------------------------------------------------------------------------
// The schema files themselves.
// ---------------------------------------------------------------------------

#[test]
fn schema_files_are_valid_draft_2020_12_and_named_by_their_id() {
    let docs = schema_documents();
    let names: BTreeSet<&str> = docs.iter().map(|(rel, _)| rel.as_str()).collect();
    let mut expected: BTreeSet<String> = ["deal-event.schema.json", "defs.schema.json"]
        .map(String::from)
        .into();
    for t in EventType::ALL {
        expected.insert(format!("data/{t}.schema.json"));
    }
    assert_eq!(
        names,
        expected.iter().map(String::as_str).collect(),
        "schemas/ holds exactly the envelope, the shared defs and one data schema per type"
    );
    for (rel, doc) in docs {
        assert_eq!(doc["$schema"], DRAFT_2020_12, "{rel}: $schema");
        assert_eq!(
            doc["$id"],
            format!("{SCHEMA_BASE_URI}{rel}"),
            "{rel}: $id is the base URI plus the file's path"
        );
        if let Err(e) = jsonschema::meta::validate(doc) {
            panic!("{rel} is not a valid draft 2020-12 schema: {e}");
        }
        // Every document compiles on its own with all its $refs resolved offline.
        build(doc);
    }
    for t in EventType::ALL {
        let uri = t.schema_uri();
        let doc = document(&uri);
        assert_eq!(doc["title"], format!("{t} data"));
        assert_eq!(doc["additionalProperties"], false, "{uri}");
    }
    // The envelope dispatches every type, and only those, to its data schema.
    let env = document(&envelope_id());
    let types: Vec<&str> = env["properties"]["type"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(types, EventType::ALL.map(EventType::as_str));
    for (i, t) in EventType::ALL.into_iter().enumerate() {
        let rule = &env["allOf"][i];
        assert_eq!(rule["if"]["properties"]["type"]["const"], t.as_str());
        let target = rule["then"]["properties"]["data"]["$ref"].as_str().unwrap();
        assert_eq!(format!("{SCHEMA_BASE_URI}{target}"), t.schema_uri());
    }
}

// ---------------------------------------------------------------------------
// The example scenario.
// ---------------------------------------------------------------------------

#[test]
fn scenario_events_are_valid_by_schema_and_decode_in_rust() {
    let events = scenario();
    assert!(events.len() >= 40, "scenario has {} events", events.len());
    let mut ids = BTreeSet::new();
    let mut per_type: BTreeMap<&str, usize> = BTreeMap::new();
    let mut per_deal: BTreeMap<String, usize> = BTreeMap::new();
    let mut last_time = None;
    for (line, text, value) in &events {
        let errors = schema_errors(value);
        assert!(
            errors.is_empty(),
            "scenario.jsonl:{line}: schema errors {errors:#?}"
        );
        let ev = DealEvent::decode(text.as_bytes())
            .unwrap_or_else(|e| panic!("scenario.jsonl:{line}: event.rs rejects it: {e}"));
        assert_eq!(
            ev.dataschema.as_deref(),
            Some(ev.event_type().schema_uri().as_str()),
            "scenario.jsonl:{line}: dataschema"
        );
        assert!(
            ids.insert(ev.id.clone()),
            "scenario.jsonl:{line}: id {} reused",
            ev.id
        );
        assert!(
            ev.id.starts_with("evt-"),
            "scenario.jsonl:{line}: id {}",
            ev.id
        );
        assert!(
            ev.source.starts_with("urn:dealledger:example:"),
            "scenario.jsonl:{line}"
        );
        let time = value["time"].as_str().unwrap();
        assert!(
            time.ends_with('Z'),
            "scenario.jsonl:{line}: time in UTC with Z"
        );
        assert!(
            last_time <= Some(ev.time),
            "scenario.jsonl:{line}: events are in business-time order"
        );
        last_time = Some(ev.time);
        assert_eq!(value["datacontenttype"], "application/json");
        *per_type.entry(ev.event_type().as_str()).or_default() += 1;
        *per_deal.entry(ev.deal_id.to_string()).or_default() += 1;
    }
    for t in EventType::ALL {
        assert!(
            per_type.contains_key(t.as_str()),
            "the scenario has no {t} event"
        );
    }
    for deal in [
        "msft-openai-2019",
        "google-openai-2025",
        "stargate-2025",
        "coreweave-openai-2025",
    ] {
        assert!(
            per_deal.contains_key(deal),
            "the scenario has no events of {deal}"
        );
    }
    println!("events per deal: {per_deal:?}\nevents per type: {per_type:?}");
}

#[test]
fn rust_encoding_of_scenario_events_is_schema_valid() {
    for (line, text, _) in scenario() {
        let ev = DealEvent::decode(text.as_bytes()).unwrap();
        let bytes = ev.to_json();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        let errors = schema_errors(&value);
        assert!(
            errors.is_empty(),
            "scenario.jsonl:{line}: DealEvent::to_json is not schema-valid: {errors:#?}\n{value}"
        );
        let again = DealEvent::decode(&bytes).expect("re-decodes");
        assert_eq!(again, ev, "scenario.jsonl:{line}: round trip");
    }
}

// ---------------------------------------------------------------------------
// The catalogue of invalid events.
// ---------------------------------------------------------------------------

#[test]
fn invalid_cases_are_rejected_by_schema_and_by_rust_with_kind_and_path() {
    let cases = read_jsonl("invalid.jsonl");
    assert!(cases.len() >= 15, "invalid.jsonl has {} cases", cases.len());
    let mut kinds = BTreeSet::new();
    for (line, _, case) in &cases {
        let why = case["why"].as_str().expect("why");
        let kind = case["expect_kind"].as_str().expect("expect_kind");
        let path = case["expect_path"].as_str().expect("expect_path");
        assert!(
            ["schema", "not_cloudevent", "unknown_type", "invalid"].contains(&kind),
            "invalid.jsonl:{line}: expect_kind {kind}"
        );
        kinds.insert(kind);
        let event = &case["event"];

        let errors = schema_errors(event);
        assert!(
            !errors.is_empty(),
            "invalid.jsonl:{line} ({why}): the schema accepts it"
        );
        // The schema complains somewhere on the branch of the expected field
        // (at it, or at an ancestor such as the object missing it).
        let expected = if path == "(event)" { "" } else { path };
        let on_branch = |p: &str| {
            let within = |outer: &str, inner: &str| {
                outer.is_empty()
                    || inner == outer
                    || inner.starts_with(&format!("{outer}."))
                    || inner.starts_with(&format!("{outer}["))
            };
            within(p, expected) || within(expected, p)
        };
        assert!(
            errors.iter().any(|(p, _)| on_branch(p)),
            "invalid.jsonl:{line} ({why}): no schema error near {path}: {errors:#?}"
        );

        let err = match rust_decode(event) {
            Ok(_) => panic!("invalid.jsonl:{line} ({why}): event.rs accepts it"),
            Err(e) => e,
        };
        assert_eq!(err.kind(), kind, "invalid.jsonl:{line} ({why}): {err}");
        assert_eq!(
            err.path(),
            Some(path),
            "invalid.jsonl:{line} ({why}): {err}"
        );
    }
    assert_eq!(kinds.len(), 4, "the catalogue covers every kind: {kinds:?}");
}

// ---------------------------------------------------------------------------
// Generated sweep: every field dropped in turn, unknown fields added.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

fn dotted(loc: &[Seg]) -> String {
    let mut out = String::new();
    for seg in loc {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn at_mut<'a>(mut v: &'a mut Value, loc: &[Seg]) -> &'a mut Value {
    for seg in loc {
        v = match seg {
            Seg::Key(k) => &mut v[k.as_str()],
            Seg::Index(i) => &mut v[*i],
        };
    }
    v
}

/// Resolves `reference` against the document `base` (both URIs of schemas/).
fn resolve_ref(base: &str, reference: &str) -> (String, String) {
    let (path, fragment) = reference.split_once('#').unwrap_or((reference, ""));
    let doc = if path.is_empty() {
        base.to_string()
    } else {
        let mut dir: Vec<&str> = base.rsplit_once('/').unwrap().0.split('/').collect();
        let mut rest = path;
        while let Some(r) = rest.strip_prefix("../") {
            dir.pop();
            rest = r;
        }
        format!("{}/{rest}", dir.join("/"))
    };
    (doc, fragment.to_string())
}

/// A schema node located as (document $id, JSON pointer), following `$ref`s
/// until a node that describes an object or array.
fn follow(doc: &str, pointer: &str) -> (String, String, &'static Value) {
    let (mut doc, mut pointer) = (doc.to_string(), pointer.to_string());
    loop {
        let node = document(&doc)
            .pointer(&pointer)
            .unwrap_or_else(|| panic!("{doc}#{pointer} does not exist"));
        match node.get("$ref").and_then(Value::as_str) {
            Some(r) if node.get("properties").is_none() && node.get("items").is_none() => {
                (doc, pointer) = resolve_ref(&doc, r);
            }
            _ => return (doc, pointer, node),
        }
    }
}

#[derive(Debug)]
enum Mutation {
    /// Remove the field at `loc`; `required` says whether both must reject.
    Drop { loc: Vec<Seg>, required: bool },
    /// Add an unknown field to the object at `loc`; both must reject.
    AddUnknown { loc: Vec<Seg> },
}

/// Collects the mutations of `instance` (at `loc`) described by the schema
/// node at `doc#pointer`, and records which declared properties were seen.
fn mutations(
    instance: &Value,
    doc: &str,
    pointer: &str,
    loc: &mut Vec<Seg>,
    out: &mut Vec<Mutation>,
    seen: &mut BTreeSet<(String, String, String)>,
) {
    let (doc, pointer, node) = follow(doc, pointer);
    match instance {
        Value::Object(map) if node.get("properties").is_some() => {
            let required: BTreeSet<&str> = node["required"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_str().unwrap()).collect())
                .unwrap_or_default();
            for key in map.keys() {
                let declared = node["properties"].get(key).is_some();
                assert!(
                    declared,
                    "{}.{key} is not declared at {doc}#{pointer}",
                    dotted(loc)
                );
                seen.insert((doc.clone(), pointer.clone(), key.clone()));
                loc.push(Seg::Key(key.clone()));
                out.push(Mutation::Drop {
                    loc: loc.clone(),
                    required: required.contains(key.as_str()),
                });
                mutations(
                    &map[key],
                    &doc,
                    &format!("{pointer}/properties/{key}"),
                    loc,
                    out,
                    seen,
                );
                loc.pop();
            }
            for key in &required {
                assert!(
                    map.contains_key(*key),
                    "{} lacks required {key}",
                    dotted(loc)
                );
            }
            if node["additionalProperties"] == false {
                out.push(Mutation::AddUnknown { loc: loc.clone() });
            }
        }
        Value::Array(items) if node.get("items").is_some() => {
            for (i, item) in items.iter().enumerate() {
                loc.push(Seg::Index(i));
                mutations(item, &doc, &format!("{pointer}/items"), loc, out, seen);
                loc.pop();
            }
        }
        _ => {}
    }
}

/// Scenario events plus the optional fields the scenario never uses, so
/// every declared field is exercised.
fn sweep_events() -> Vec<Value> {
    let mut events: Vec<Value> = scenario().into_iter().map(|(_, _, v)| v).collect();
    let grant = events
        .iter()
        .find(|e| e["type"] == "deal.exclusivity.granted")
        .expect("a grant")
        .clone();
    let mut bounded = grant;
    bounded["data"]["valid_until"] = json!("2030-01-01T00:00:00Z");
    events.push(bounded);
    events
}

#[test]
fn dropping_fields_and_adding_unknown_fields_agree() {
    let mut seen = BTreeSet::new();
    let mut checked = 0;
    for event in sweep_events() {
        let ty = EventType::parse(event["type"].as_str().unwrap()).unwrap();
        assert!(assert_agree("original", &event));
        // Envelope attributes (unknown ones there are extension attributes,
        // covered by their own tests).
        let env = envelope_id();
        let env_doc = document(&env);
        for key in event.as_object().unwrap().keys() {
            let required = env_doc["required"]
                .as_array()
                .unwrap()
                .contains(&json!(key));
            let mut m = event.clone();
            m.as_object_mut().unwrap().remove(key);
            let accepted = assert_agree(&format!("{ty}: without attribute {key}"), &m);
            assert_eq!(accepted, !required, "{ty}: without attribute {key}");
            if required {
                let err = rust_decode(&m).unwrap_err();
                assert_eq!(
                    (err.kind(), err.path()),
                    ("not_cloudevent", Some(key.as_str()))
                );
            }
            checked += 1;
        }
        // Data, against the type's data schema.
        let mut list = Vec::new();
        mutations(
            &event["data"],
            &ty.schema_uri(),
            "",
            &mut vec![Seg::Key("data".into())],
            &mut list,
            &mut seen,
        );
        for mutation in list {
            let mut m = event.clone();
            match &mutation {
                Mutation::Drop { loc, required } => {
                    let (last, parent) = loc.split_last().unwrap();
                    let Seg::Key(key) = last else { unreachable!() };
                    at_mut(&mut m, parent).as_object_mut().unwrap().remove(key);
                    let what = format!("{ty}: without {}", dotted(loc));
                    let accepted = assert_agree(&what, &m);
                    assert_eq!(accepted, !required, "{what}");
                    if *required {
                        let err = rust_decode(&m).unwrap_err();
                        assert_eq!(err.kind(), "schema", "{what}: {err}");
                        assert_eq!(err.path(), Some(dotted(loc).as_str()), "{what}: {err}");
                    }
                }
                Mutation::AddUnknown { loc } => {
                    at_mut(&mut m, loc)
                        .as_object_mut()
                        .unwrap()
                        .insert("unexpected".into(), json!(1));
                    let what = format!("{ty}: unknown field in {}", dotted(loc));
                    assert!(!assert_agree(&what, &m), "{what}");
                    let err = rust_decode(&m).unwrap_err();
                    assert_eq!(err.kind(), "schema", "{what}: {err}");
                    assert_eq!(
                        err.path(),
                        Some(format!("{}.unexpected", dotted(loc)).as_str()),
                        "{what}: {err}"
                    );
                }
            }
            checked += 1;
        }
    }
    // Every property declared by a data schema or a shared object definition
    // was present in some event, so its required/optional status was checked.
    let mut declared = BTreeSet::new();
    fn collect(
        doc: &str,
        pointer: &str,
        node: &Value,
        out: &mut BTreeSet<(String, String, String)>,
    ) {
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (key, sub) in props {
                out.insert((doc.to_string(), pointer.to_string(), key.clone()));
                collect(doc, &format!("{pointer}/properties/{key}"), sub, out);
            }
        }
        if let Some(items) = node.get("items") {
            collect(doc, &format!("{pointer}/items"), items, out);
        }
        if let Some(defs) = node.get("$defs").and_then(Value::as_object) {
            for (key, sub) in defs {
                collect(doc, &format!("{pointer}/$defs/{key}"), sub, out);
            }
        }
    }
    for (_, doc) in schema_documents() {
        let id = doc["$id"].as_str().unwrap();
        if id != envelope_id() {
            collect(id, "", doc, &mut declared);
        }
    }
    let missed: Vec<_> = declared.difference(&seen).collect();
    assert!(
        missed.is_empty(),
        "declared but never exercised: {missed:#?}"
    );
    assert!(checked > 500, "only {checked} mutations");
}

// ---------------------------------------------------------------------------
// Boundary values of each scalar rule.
// ---------------------------------------------------------------------------

/// Known differences between the schema and event.rs. Each is asserted to
/// still hold, so that a fix on either side shows up here (and the entry can
/// go). (input, why)
///
/// Inherent to JSON Schema, which sees numbers, not how they are written:
const AMOUNT_DIVERGENCES: &[(&str, &str)] = &[
    (
        "2.0",
        "JSON Schema's integer admits 2.0; event.rs rejects any number written with a fraction",
    ),
    (
        "1e3",
        "JSON Schema's integer admits 1e3; event.rs rejects any number written with an exponent",
    ),
];

/// Timestamps the schema accepts and event.rs rejects. (input, why)
///
/// Leap seconds: event.rs refuses second 60 everywhere ("use :59"); the
/// schema's `format: date-time` keeps RFC 3339's rule that :60 may end a UTC
/// day. A seconds pattern of `[0-5][0-9]` in `defs.schema.json` would close it.
///
/// UTC year: event.rs keeps instants in UTC and refuses those whose UTC year
/// leaves 0000-9999, because it could not write them back as RFC 3339; the
/// schema sees only the written form, whose year is in range.
const TIMESTAMP_DIVERGENCES: &[(&str, &str)] = &[
    (
        "9999-12-31T23:59:59-01:00",
        "is year 10000 in UTC; event.rs refuses it",
    ),
    (
        "0000-01-01T00:00:00+01:00",
        "is year -1 in UTC; event.rs refuses it",
    ),
];

/// Timestamps that used to split the two (event.rs accepted them, the schema
/// did not) and are now rejected by both: a leap second outside 23:59 UTC.
/// (input, what event.rs's reason says)
const LEAP_SECONDS_BOTH_REJECT: &[(&str, &str)] = &[
    (
        "2025-01-15T10:00:60Z",
        "leap seconds are not accepted; use :59",
    ),
    (
        "2016-12-31T23:59:60-01:00",
        "leap seconds are not accepted; use :59",
    ),
    (
        "2016-12-31T23:59:60Z",
        "leap seconds are not accepted; use :59",
    ),
    (
        "2016-12-31T23:59:60.5Z",
        "leap seconds are not accepted; use :59",
    ),
    (
        "2017-01-01T00:59:60+01:00",
        "leap seconds are not accepted; use :59",
    ),
    (
        "2025-06-30T23:59:60Z",
        "leap seconds are not accepted; use :59",
    ),
];

/// Instants whose UTC year leaves 0000-9999. event.rs used to accept them and
/// then write them back (in UTC) as `+10000-01-01T00:59:59Z` or a negative
/// year, which neither side accepts; now it refuses them when decoding, so
/// nothing it accepts re-encodes out of contract. (input, what event.rs's
/// reason says)
const OUT_OF_RANGE_UTC_YEARS: &[(&str, &str)] = &[
    (
        "9999-12-31T23:59:59-01:00",
        "year 10000 in UTC, outside 0000-9999",
    ),
    (
        "0000-01-01T00:00:00+01:00",
        "year -1 in UTC, outside 0000-9999",
    ),
];

/// Optional fields (Rust `Option`, or a list with a default) given as JSON
/// null: "optional" means "may be left out", so both the schema and event.rs
/// reject null. (event type, field path inside data)
const NULL_OPTIONAL_FIELDS: &[(&str, &str)] = &[
    ("deal.negotiation.opened", "description"),
    ("deal.negotiation.opened", "partners"),
    ("deal.terms.rejected", "reason"),
    ("deal.exclusivity.granted", "valid_until"),
    ("deal.finalized", "terms"),
    ("deal.finalized", "signatories/0/title"),
    ("deal.amended", "reason"),
];

/// The accepted event used as a template by the boundary tests.
fn template() -> Value {
    let line = scenario()
        .into_iter()
        .find(|(_, _, v)| v["type"] == "deal.terms.proposed")
        .unwrap();
    line.2
}

fn with_amount(raw: &str) -> Value {
    let text = serde_json::to_string(&template()).unwrap();
    let amount = template()["data"]["terms"]["price"]["amount_minor"].to_string();
    let needle = format!("\"amount_minor\":{amount}");
    assert!(text.contains(&needle));
    serde_json::from_str(&text.replace(&needle, &format!("\"amount_minor\":{raw}"))).unwrap()
}

#[test]
fn amount_bounds_agree() {
    let max = limits::MAX_SAFE_INTEGER;
    for (raw, valid) in [
        ("0".to_string(), true),
        ("1".to_string(), true),
        (max.to_string(), true),
        ((max + 1).to_string(), false),
        (u64::MAX.to_string(), false),
        ("18446744073709551616".to_string(), false),
        ("-1".to_string(), false),
        ("2.5".to_string(), false),
        ("\"5\"".to_string(), false),
        ("null".to_string(), false),
    ] {
        let event = with_amount(&raw);
        assert_eq!(
            assert_agree(&format!("amount {raw}"), &event),
            valid,
            "amount {raw}"
        );
    }
    for (raw, why) in AMOUNT_DIVERGENCES {
        let event = with_amount(raw);
        assert!(
            schema_accepts(&event),
            "{why}: the schema now rejects {raw}"
        );
        assert!(
            rust_decode(&event).is_err(),
            "{why}: event.rs now accepts {raw}"
        );
    }
    // Capacity quantity: an amount that is at least 1.
    for (q, valid) in [(0, false), (1, true)] {
        let mut event = template();
        event["data"]["terms"]["capacity"]["quantity"] = json!(q);
        assert_eq!(assert_agree(&format!("quantity {q}"), &event), valid);
    }
}

#[test]
fn timestamp_rule_agrees() {
    let cases = [
        "2025-01-15T10:00:00Z",
        "2025-01-15T10:00:00.1Z",
        "2025-01-15T10:00:00.123456789+02:00",
        "2025-01-15T10:00:00-05:30",
        "2025-01-15T10:00:00+23:59",
        "2025-01-15T10:00:00-00:00",
        "2024-02-29T00:00:00Z",
        "2000-02-29T00:00:00Z",
        "0001-01-01T00:00:00Z",
        "2016-12-31T23:59:60Z",
        "2016-12-31T23:59:60.5Z",
        "2016-12-31T23:59:60-01:00",
        "2017-01-01T00:59:60+01:00",
        "2025-01-15T10:00:60Z",
        "2025-06-30T23:59:60Z",
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59-01:00",
        "0000-01-01T00:00:00+01:00",
        "2025-01-15",
        "2025-01-15T10:00Z",
        "2025-01-15t10:00:00z",
        "2025-01-15T10:00:00z",
        "2025-01-15t10:00:00Z",
        "2025-01-15T10:00:00",
        "2025-01-15 10:00:00Z",
        "2025-13-15T10:00:00Z",
        "2025-00-15T10:00:00Z",
        "2025-01-00T10:00:00Z",
        "2025-01-32T10:00:00Z",
        "2025-02-29T00:00:00Z",
        "1900-02-29T00:00:00Z",
        "2025-04-31T00:00:00Z",
        "2025-01-15T24:00:00Z",
        "2025-01-15T10:60:00Z",
        "2025-01-15T10:00:61Z",
        "2025-01-15T10:00:00+24:00",
        "2025-01-15T10:00:00+02:60",
        "2025-01-15T10:00:00.Z",
        "2025-01-15T10:00:00.1234567890Z",
        "2025-01-15T10:00:00+0200",
        "2025-01-15T10:00:00+02",
        "+2025-01-15T10:00:00Z",
        "20250-01-15T10:00:00Z",
        "2025-1-15T10:00:00Z",
        "2025-01-15T10:00:00Z ",
        " 2025-01-15T10:00:00Z",
        "2025-01-15T10:00:00Z\n",
        "2025-01-15T10:00:00\u{ff10}Z",
        "２０２５-01-15T10:00:00Z",
        "",
    ];
    let grant = grant_event();
    let known: BTreeSet<&str> = TIMESTAMP_DIVERGENCES.iter().map(|(t, _)| *t).collect();
    let mut disagreements = BTreeSet::new();
    let inputs = cases
        .into_iter()
        .chain(known.iter().copied())
        .chain(LEAP_SECONDS_BOTH_REJECT.iter().map(|(t, _)| *t))
        .chain(OUT_OF_RANGE_UTC_YEARS.iter().map(|(t, _)| *t));
    for t in inputs {
        // In the envelope (kind not_cloudevent) and in data (kind schema).
        for place in ["time", "data.valid_from"] {
            let event = with_timestamp(&grant, place, t);
            let schema = schema_accepts(&event);
            let rust = rust_decode(&event);
            if schema != rust.is_ok() {
                // The schema is the lenient side of every known difference.
                assert!(
                    known.contains(t) && schema,
                    "{t:?} at {place}: schema {}, event.rs {:?}",
                    if schema { "accepts" } else { "rejects" },
                    rust.map(|_| "accepts").map_err(|e| e.to_string())
                );
                disagreements.insert(t);
            }
        }
    }
    assert_eq!(disagreements, known, "TIMESTAMP_DIVERGENCES is up to date");
}

/// The scenario's first exclusivity grant: it carries a timestamp in data.
fn grant_event() -> Value {
    scenario()
        .into_iter()
        .find(|(_, _, v)| v["type"] == "deal.exclusivity.granted")
        .unwrap()
        .2
}

/// `event` with the timestamp at `place` (`time` or `data.valid_from`) set to `t`.
fn with_timestamp(event: &Value, place: &str, t: &str) -> Value {
    let mut event = event.clone();
    match place {
        "time" => event["time"] = json!(t),
        "data.valid_from" => event["data"]["valid_from"] = json!(t),
        other => panic!("no timestamp at {other}"),
    }
    event
}

/// The (kind, path) event.rs reports for a bad timestamp at `place`.
fn timestamp_error_at(place: &str) -> (&'static str, Option<&str>) {
    match place {
        "time" => ("not_cloudevent", Some("time")),
        _ => ("schema", Some("data.valid_from")),
    }
}

#[test]
fn leap_seconds_outside_23_59_utc_are_rejected_by_both() {
    let grant = grant_event();
    for (t, reason) in LEAP_SECONDS_BOTH_REJECT {
        for place in ["time", "data.valid_from"] {
            let event = with_timestamp(&grant, place, t);
            assert!(!assert_agree(&format!("{t} at {place}"), &event));
            let err = rust_decode(&event).unwrap_err();
            assert_eq!(
                (err.kind(), err.path()),
                timestamp_error_at(place),
                "{t}: {err}"
            );
            assert!(err.to_string().contains(reason), "{t} at {place}: {err}");
        }
    }
}

#[test]
fn out_of_range_utc_years_are_rejected_by_event_rs() {
    // event.rs refuses them, with its reason; the schema, which cannot see the
    // UTC year, still accepts them (listed in TIMESTAMP_DIVERGENCES).
    let grant = grant_event();
    for (t, reason) in OUT_OF_RANGE_UTC_YEARS {
        assert!(
            TIMESTAMP_DIVERGENCES.iter().any(|(d, _)| d == t),
            "{t}: not in TIMESTAMP_DIVERGENCES"
        );
        for place in ["time", "data.valid_from"] {
            let event = with_timestamp(&grant, place, t);
            assert!(
                schema_accepts(&event),
                "{t} at {place}: the schema now rejects it"
            );
            let err = rust_decode(&event).unwrap_err();
            assert_eq!(
                (err.kind(), err.path()),
                timestamp_error_at(place),
                "{t}: {err}"
            );
            assert!(err.to_string().contains(reason), "{t} at {place}: {err}");
        }
    }
}

#[test]
fn timestamps_event_rs_accepts_are_re_encoded_schema_valid() {
    // event.rs keeps instants in UTC and re-encodes them with Z; the result
    // must still be a valid event, which decodes back to the same event.
    let check = |t: &str, event: &Value| {
        let ev = rust_decode(event).unwrap_or_else(|e| panic!("{t}: {e}"));
        let bytes = ev.to_json();
        let out: Value = serde_json::from_slice(&bytes).unwrap();
        let errors = schema_errors(&out);
        assert!(
            errors.is_empty(),
            "{t} re-encoded as {}: {errors:#?}",
            out["time"]
        );
        assert_eq!(DealEvent::decode(&bytes).unwrap(), ev, "{t}: round trip");
    };
    for t in [
        "2025-01-15T10:00:00+02:00",
        "2025-01-15T10:00:00.5-05:30",
        "2025-01-15T10:00:00.123456789Z",
        "2016-12-31T23:59:59.999999999Z",
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59.999999999Z",
        "9999-12-31T23:59:59+01:00",
        "0000-01-01T00:00:00-01:00",
    ] {
        let mut event = template();
        event["time"] = json!(t);
        assert!(assert_agree(t, &event));
        check(t, &event);
    }
    // Both edges of the year range, at every offset from -23:59 to +23:59 in
    // steps: event.rs accepts exactly the instants whose UTC year stays in
    // range, and every one it accepts re-encodes inside the contract.
    let offsets: [i32; 13] = [
        -1439, -1380, -61, -60, -59, -1, 0, 1, 59, 60, 61, 1380, 1439,
    ];
    for (date, local_secs) in [
        ("9999-12-31", [0, 3_599, 82_800, 86_399]),
        ("0000-01-01", [0, 59, 3_600, 86_399]),
    ] {
        for secs in local_secs {
            for offset in offsets {
                let sign = if offset < 0 { '-' } else { '+' };
                let t = format!(
                    "{date}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
                    secs / 3600,
                    secs / 60 % 60,
                    secs % 60,
                    offset.abs() / 60,
                    offset.abs() % 60
                );
                let utc_secs = secs - offset * 60;
                let in_range = if date.starts_with("9999") {
                    utc_secs < 86_400
                } else {
                    utc_secs >= 0
                };
                let mut event = template();
                event["time"] = json!(t);
                assert!(schema_accepts(&event), "{t}");
                match rust_decode(&event) {
                    Ok(_) => {
                        assert!(in_range, "{t}: event.rs accepts an out-of-range UTC year");
                        check(&t, &event);
                    }
                    Err(e) => {
                        assert!(!in_range, "{t}: {e}");
                        assert!(e.to_string().contains("outside 0000-9999"), "{t}: {e}");
                    }
                }
            }
        }
    }
}

#[test]
fn date_rule_agrees() {
    let finalized = scenario()
        .into_iter()
        .find(|(_, _, v)| v["type"] == "deal.finalized")
        .unwrap()
        .2;
    for d in [
        "2025-06-01",
        "2024-02-29",
        "0001-01-01",
        "2025-02-29",
        "2025-13-01",
        "2025-06-00",
        "2025-6-1",
        "2025-06-01T00:00:00Z",
        "20250601",
        "2025/06/01",
        "2025-06-01 ",
        "",
    ] {
        let mut event = finalized.clone();
        event["data"]["effective_date"] = json!(d);
        assert_agree(&format!("effective_date {d:?}"), &event);
    }
}

#[test]
fn identifier_rule_agrees() {
    let long = "a".repeat(limits::MAX_ID_CHARS);
    let too_long = "a".repeat(limits::MAX_ID_CHARS + 1);
    for (id, valid) in [
        ("a", true),
        ("Z", true),
        ("7", true),
        ("a.b_c:d-e", true),
        ("0-x", true),
        (long.as_str(), true),
        (too_long.as_str(), false),
        ("", false),
        ("-a", false),
        (".a", false),
        ("_a", false),
        (":a", false),
        ("a b", false),
        ("a/b", false),
        ("a+b", false),
        ("é", false),
        ("aé", false),
        ("a\n", false),
        ("\u{ff41}", false),
        ("a\u{0661}", false),
    ] {
        for place in ["subject", "data.accepted_by"] {
            let mut event = template();
            event["type"] = json!("deal.terms.accepted");
            event["dataschema"] = json!(EventType::TermsAccepted.schema_uri());
            event["data"] = json!({"proposal_id": "p1", "accepted_by": "openai"});
            match place {
                "subject" => event["subject"] = json!(id),
                _ => event["data"]["accepted_by"] = json!(id),
            }
            let verdict = assert_agree(&format!("id {id:?} at {place}"), &event);
            assert_eq!(verdict, valid, "id {id:?} at {place}");
        }
    }
}

#[test]
fn text_rule_agrees() {
    let max = limits::MAX_TEXT_CHARS;
    for (text, valid) in [
        (String::new(), false),
        ("x".to_string(), true),
        ("x".repeat(max), true),
        ("x".repeat(max + 1), false),
        // Lengths count characters (code points), not bytes or UTF-16 units.
        ("é".repeat(max), true),
        ("😀".repeat(max), true),
        ("😀".repeat(max + 1), false),
        (" leading and trailing spaces ".to_string(), true),
    ] {
        let mut event = template();
        event["type"] = json!("deal.terminated");
        event["dataschema"] = json!(EventType::Terminated.schema_uri());
        event["data"] = json!({"terminated_by": "openai", "reason": text});
        let verdict = assert_agree(&format!("text of {} chars", text.chars().count()), &event);
        assert_eq!(verdict, valid);
    }
}

#[test]
fn attribute_whitespace_rule_matches_char_is_whitespace() {
    // The schema spells out Unicode White_Space as a character class; check it
    // for every character against what event.rs uses (char::is_whitespace)...
    let source = build(&json!({
        "$schema": DRAFT_2020_12,
        "$ref": format!("{}#/properties/source", envelope_id()),
    }));
    let mut mismatches = Vec::new();
    for c in (0..=0x10FFFFu32).filter_map(char::from_u32) {
        let s = format!("a{c}b");
        if source.is_valid(&json!(s)) == c.is_whitespace() {
            mismatches.push(format!("U+{:04X}", c as u32));
        }
    }
    assert!(mismatches.is_empty(), "{mismatches:?}");
    // ...and through both full decoders for the whitespace characters and a
    // few look-alikes that are not whitespace.
    let candidates = (0..=0x10FFFFu32)
        .filter_map(char::from_u32)
        .filter(|c| c.is_whitespace())
        .chain([
            '\u{180E}', '\u{200B}', '\u{FEFF}', '\u{1C}', '\u{1F}', '\u{0}',
        ]);
    for c in candidates {
        for attr in ["id", "source", "dataschema"] {
            let mut event = template();
            event[attr] = json!(format!("urn:x{c}y"));
            assert_eq!(
                assert_agree(&format!("U+{:04X} in {attr}", c as u32), &event),
                !c.is_whitespace()
            );
        }
    }
    // Length: 1 to 256 characters.
    for (n, valid) in [(1, true), (256, true), (257, false)] {
        let mut event = template();
        event["id"] = json!("é".repeat(n));
        assert_eq!(assert_agree(&format!("id of {n} chars"), &event), valid);
    }
}

#[test]
fn extension_attributes_agree() {
    let base = template();
    // Names.
    for (name, valid) in [
        ("traceparent", true),
        ("a", true),
        ("x9", true),
        ("abcdefghijklmnopqrst", true),
        ("abcdefghijklmnopqrstu", false),
        ("Trace", false),
        ("trace_id", false),
        ("trace-id", false),
        ("", false),
        ("é", false),
    ] {
        let mut event = base.clone();
        event[name] = json!("v");
        assert_eq!(
            assert_agree(&format!("extension {name:?}"), &event),
            valid,
            "{name:?}"
        );
    }
    // Values.
    for (raw, valid) in [
        ("\"text\"", true),
        ("\"\"", true),
        ("true", true),
        ("false", true),
        ("0", true),
        ("-42", true),
        ("9223372036854775807", true),
        ("-9223372036854775808", true),
        ("9223372036854775808", false),
        ("1.5", false),
        ("null", false),
        ("{}", false),
        ("[]", false),
        ("[1]", false),
    ] {
        let text = serde_json::to_string(&base).unwrap();
        let text = format!("{},\"ext\":{raw}}}", &text[..text.len() - 1]);
        let event: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            assert_agree(&format!("extension value {raw}"), &event),
            valid,
            "{raw}"
        );
    }
    for (n, valid) in [(256, true), (257, false)] {
        let mut event = base.clone();
        event["ext"] = json!("😀".repeat(n));
        assert_eq!(
            assert_agree(&format!("extension of {n} chars"), &event),
            valid
        );
    }
    // Count: at most 16, whichever optional attributes are present.
    for optional in [
        &[][..],
        &["datacontenttype"][..],
        &["dataschema"][..],
        &["datacontenttype", "dataschema"][..],
    ] {
        for n in 0..=limits::MAX_EXTENSIONS + 3 {
            let mut event = base.clone();
            let obj = event.as_object_mut().unwrap();
            for attr in ["datacontenttype", "dataschema"] {
                if !optional.contains(&attr) {
                    obj.remove(attr);
                }
            }
            for i in 0..n {
                obj.insert(format!("ext{i}"), json!(i));
            }
            let verdict = assert_agree(&format!("{n} extensions with {optional:?}"), &event);
            assert_eq!(
                verdict,
                n <= limits::MAX_EXTENSIONS,
                "{n} extensions with {optional:?}"
            );
        }
    }
}

#[test]
fn envelope_attribute_values_agree() {
    let base = template();
    for (attr, value, valid) in [
        ("specversion", json!("1.0"), true),
        ("specversion", json!("0.3"), false),
        ("specversion", json!("1"), false),
        ("specversion", json!(1.0), false),
        ("datacontenttype", json!("application/json"), true),
        (
            "datacontenttype",
            json!("application/json; charset=utf-8"),
            false,
        ),
        ("datacontenttype", json!("text/plain"), false),
        ("datacontenttype", json!(null), false),
        ("dataschema", json!("urn:any-non-blank-string"), true),
        ("dataschema", json!(""), false),
        ("dataschema", json!(null), false),
        ("type", json!("deal.terms.withdrawn"), false),
        ("type", json!("Deal.Terms.Proposed"), false),
        ("type", json!(7), false),
        ("subject", json!(null), false),
        ("time", json!(1736935200), false),
        ("data", json!(null), false),
        ("data", json!("{}"), false),
        ("data", json!([]), false),
    ] {
        let mut event = base.clone();
        event[attr] = value.clone();
        assert_eq!(assert_agree(&format!("{attr} = {value}"), &event), valid);
    }
    // Data of another type than the event's type.
    let mut event = base.clone();
    event["type"] = json!("deal.terms.accepted");
    assert!(!assert_agree(
        "proposal data under an accepted type",
        &event
    ));
    // Not an object at all.
    for v in [json!([]), json!("event"), json!(42), json!(null)] {
        assert!(!assert_agree(&format!("event {v}"), &v));
    }
}

#[test]
fn list_bounds_agree() {
    let base = template();
    let opened =
        json!({"customer": "openai", "provider": "oracle", "scope": "datacenter-capacity"});
    for n in [0usize, 1, 16, 17] {
        let mut event = base.clone();
        event["type"] = json!("deal.negotiation.opened");
        event["dataschema"] = json!(EventType::NegotiationOpened.schema_uri());
        event["data"] = opened.clone();
        event["data"]["partners"] = json!((0..n).map(|i| format!("p{i}")).collect::<Vec<_>>());
        assert_eq!(assert_agree(&format!("{n} partners"), &event), n <= 16);

        let mut event = base.clone();
        event["type"] = json!("deal.amended");
        event["dataschema"] = json!(EventType::Amended.schema_uri());
        event["data"] = json!({
            "amendment_id": "a1",
            "terms": base["data"]["terms"].clone(),
            "agreed_by": (0..n).map(|i| format!("p{i}")).collect::<Vec<_>>(),
        });
        assert_eq!(
            assert_agree(&format!("{n} agreeing"), &event),
            (1..=16).contains(&n)
        );

        let mut event = base.clone();
        event["type"] = json!("deal.finalized");
        event["dataschema"] = json!(EventType::Finalized.schema_uri());
        event["data"] = json!({
            "proposal_id": "p1",
            "effective_date": "2025-06-01",
            "signatories": (0..n).map(|i| json!({"party": format!("p{i}"), "name": "N"})).collect::<Vec<_>>(),
        });
        assert_eq!(
            assert_agree(&format!("{n} signatories"), &event),
            (1..=16).contains(&n)
        );
    }
    // Units and lock kinds: exactly event.rs's enums.
    for unit in [
        "gpu-hours",
        "gpus",
        "tpu-chips",
        "tpu-hours",
        "vcpu-hours",
        "MW",
        "GW",
    ] {
        let mut event = base.clone();
        event["data"]["terms"]["capacity"]["unit"] = json!(unit);
        assert!(assert_agree(unit, &event));
    }
    for unit in ["kW", "mw", "GPU-hours", "gpu_hours", ""] {
        let mut event = base.clone();
        event["data"]["terms"]["capacity"]["unit"] = json!(unit);
        assert!(!assert_agree(unit, &event));
    }
    let grant = scenario()
        .into_iter()
        .find(|(_, _, v)| v["type"] == "deal.exclusivity.granted")
        .unwrap()
        .2;
    for (kind, valid) in [
        ("exclusive", true),
        ("right-of-first-refusal", true),
        ("Exclusive", false),
        ("rofr", false),
    ] {
        let mut event = grant.clone();
        event["data"]["kind"] = json!(kind);
        assert_eq!(assert_agree(kind, &event), valid);
    }
    for (currency, valid) in [
        ("USD", true),
        ("EUR", true),
        ("usd", false),
        ("US", false),
        ("USDT", false),
        ("ÉUR", false),
    ] {
        let mut event = base.clone();
        event["data"]["terms"]["price"]["currency"] = json!(currency);
        assert_eq!(assert_agree(currency, &event), valid);
    }
}

#[test]
fn readme_example_event_is_valid() {
    let readme = std::fs::read_to_string(schemas_dir().join("README.md")).unwrap();
    let marker = "<!-- example-event -->";
    let start = readme.find(marker).expect("README marks its example event") + marker.len();
    let rest = &readme[start..];
    let body = rest
        .split_once("```json\n")
        .and_then(|(_, r)| r.split_once("```"))
        .expect("a ```json block after the marker")
        .0;
    let event: Value = serde_json::from_str(body).expect("README example is JSON");
    assert!(assert_agree("README example", &event));
    assert!(
        body.len() <= limits::MAX_EVENT_BYTES,
        "the example is within the size limit"
    );
    // The envelope schema's own example, too.
    for example in document(&envelope_id())["examples"].as_array().unwrap() {
        assert!(assert_agree("envelope schema example", example));
    }
}

#[test]
fn null_for_an_optional_field_is_rejected_by_both() {
    let events = scenario();
    for (ty, field) in NULL_OPTIONAL_FIELDS {
        let mut event = events
            .iter()
            .find(|(_, _, v)| v["type"] == *ty)
            .unwrap()
            .2
            .clone();
        let (parent, key) = field.rsplit_once('/').unwrap_or(("", field));
        let parent = if parent.is_empty() {
            "/data".to_string()
        } else {
            format!("/data/{parent}")
        };
        event
            .pointer_mut(&parent)
            .and_then(Value::as_object_mut)
            .expect("the scenario event has the parent object")
            .insert(key.to_string(), Value::Null);
        assert!(!assert_agree(&format!("{ty} {field} = null"), &event));
        let path = pointer_to_dotted(&format!("/data/{field}"));
        let errors = schema_errors(&event);
        assert!(
            errors.iter().any(|(p, _)| *p == path),
            "{ty} {field}: no schema error at {path}: {errors:#?}"
        );
        let err = rust_decode(&event).unwrap_err();
        assert_eq!(
            (err.kind(), err.path()),
            ("schema", Some(path.as_str())),
            "{ty} {field}: {err}"
        );
        assert!(
            err.to_string().contains("never null"),
            "{ty} {field}: {err}"
        );
    }
}

#[test]
fn null_for_any_field_agrees_and_the_optional_list_is_complete() {
    // Every field of every sweep event set to null in turn: both reject, and
    // event.rs names the field. The optional ones found this way are exactly
    // NULL_OPTIONAL_FIELDS (indices normalised to 0).
    let mut optional = BTreeSet::new();
    let mut checked = 0;
    for event in sweep_events() {
        let ty = EventType::parse(event["type"].as_str().unwrap()).unwrap();
        let mut list = Vec::new();
        mutations(
            &event["data"],
            &ty.schema_uri(),
            "",
            &mut vec![Seg::Key("data".into())],
            &mut list,
            &mut BTreeSet::new(),
        );
        for mutation in list {
            let Mutation::Drop { loc, required } = mutation else {
                continue;
            };
            let mut m = event.clone();
            *at_mut(&mut m, &loc) = Value::Null;
            let what = format!("{ty}: {} = null", dotted(&loc));
            assert!(!assert_agree(&what, &m), "{what}");
            let err = rust_decode(&m).unwrap_err();
            assert_eq!(err.kind(), "schema", "{what}: {err}");
            assert_eq!(err.path(), Some(dotted(&loc).as_str()), "{what}: {err}");
            if !required {
                let field: Vec<String> = loc[1..]
                    .iter()
                    .map(|seg| match seg {
                        Seg::Key(k) => k.clone(),
                        Seg::Index(_) => "0".into(),
                    })
                    .collect();
                optional.insert((ty.as_str().to_string(), field.join("/")));
            }
            checked += 1;
        }
    }
    let listed: BTreeSet<(String, String)> = NULL_OPTIONAL_FIELDS
        .iter()
        .map(|(t, f)| (t.to_string(), f.to_string()))
        .collect();
    assert_eq!(optional, listed, "NULL_OPTIONAL_FIELDS is complete");
    assert!(checked > 200, "only {checked} fields");
}

#[test]
fn size_limit_is_beyond_the_schema() {
    // JSON Schema cannot count bytes: a schema-valid event can exceed the
    // 64 KiB limit (16 signatories with 1024-character names and titles).
    let mut event = scenario()
        .into_iter()
        .find(|(_, _, v)| v["type"] == "deal.finalized")
        .unwrap()
        .2;
    event["data"]["signatories"] = json!(
        (0..limits::MAX_LIST_LEN)
            .map(|i| json!({"party": format!("p{i}"), "name": "😀".repeat(1024), "title": "😀".repeat(1024)}))
            .collect::<Vec<_>>()
    );
    let bytes = serde_json::to_vec(&event).unwrap();
    assert!(bytes.len() > limits::MAX_EVENT_BYTES);
    assert!(schema_accepts(&event));
    assert_eq!(DealEvent::decode(&bytes).unwrap_err().kind(), "too_large");
    // Every scenario event is far below it.
    for (line, text, _) in scenario() {
        assert!(
            text.len() < limits::MAX_EVENT_BYTES / 8,
            "scenario.jsonl:{line}"
        );
    }
}

#[test]
fn duplicate_keys_are_beyond_the_schema() {
    // A JSON parser keeps one of two equal keys, so the schema sees a valid
    // event; event.rs refuses the ambiguity.
    let text = serde_json::to_string(&template()).unwrap();
    for (needle, doubled) in [
        ("\"id\":", "\"id\":\"evt-x\",\"id\":"),
        ("\"proposer\":", "\"proposer\":\"openai\",\"proposer\":"),
        ("\"currency\":", "\"currency\":\"EUR\",\"currency\":"),
    ] {
        let dup = text.replacen(needle, doubled, 1);
        let parsed: Value = serde_json::from_str(&dup).unwrap();
        assert!(schema_accepts(&parsed), "{doubled}");
        assert!(DealEvent::decode(dup.as_bytes()).is_err(), "{doubled}");
    }
}

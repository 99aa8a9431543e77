//! `dealledger produce` against the real broker: what goes in comes out,
//! keyed by deal, in order per deal; invalid input sends nothing.

use std::collections::{BTreeMap, BTreeSet};

use dealledger::event::DealEvent;

use crate::common::{create_topic, dealledger, describe, read_all, repo_file, unique_topic};

fn scenario() -> (Vec<u8>, Vec<DealEvent>) {
    let bytes = std::fs::read(repo_file("schemas/examples/scenario.jsonl")).unwrap();
    let events = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| DealEvent::decode(l).expect("scenario lines are valid"))
        .collect();
    (bytes, events)
}

#[test]
fn scenario_arrives_complete_keyed_and_in_order_per_deal() {
    let topic = unique_topic("produce-scenario");
    create_topic(&topic, 6);
    let (_, events) = scenario();
    let file = repo_file("schemas/examples/scenario.jsonl");
    let out = dealledger(
        &[
            "produce",
            "--topic",
            &topic,
            "--json",
            file.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", describe(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json summary");
    assert_eq!(summary["sent"], events.len() as u64, "{summary}");

    let records = read_all(&topic);
    assert_eq!(records.len(), events.len());

    // Every event arrives exactly once, byte for byte as a line of the file.
    let sent_ids: BTreeSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let mut got_ids = BTreeSet::new();
    let mut per_deal_partition: BTreeMap<String, i32> = BTreeMap::new();
    let mut per_deal_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &records {
        let ev = DealEvent::decode(r.value.as_deref().unwrap()).expect("valid on the topic");
        assert!(
            got_ids.insert(ev.id.clone()),
            "event {} arrived twice",
            ev.id
        );
        // The key is the deal id, and one deal lives on one partition.
        assert_eq!(r.key_str(), Some(ev.deal_id.as_str()));
        let p = *per_deal_partition
            .entry(ev.deal_id.to_string())
            .or_insert(r.partition);
        assert_eq!(p, r.partition, "deal {} spread over partitions", ev.deal_id);
        per_deal_order
            .entry(ev.deal_id.to_string())
            .or_default()
            .push(ev.id.clone());
        assert!(
            r.headers.iter().any(|(k, v)| k == "content-type"
                && v.as_deref() == Some(b"application/cloudevents+json".as_slice())),
            "structured-mode content-type header missing"
        );
    }
    assert_eq!(
        got_ids.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        sent_ids
    );

    // Per deal, the order on the partition is the order of the file.
    for (deal, got) in &per_deal_order {
        let want: Vec<String> = events
            .iter()
            .filter(|e| e.deal_id.as_str() == deal)
            .map(|e| e.id.clone())
            .collect();
        assert_eq!(got, &want, "order of deal {deal}");
    }
    assert!(
        per_deal_order.len() >= 4,
        "the scenario has at least four deals"
    );
}

#[test]
fn invalid_lines_are_reported_and_nothing_is_sent() {
    let topic = unique_topic("produce-invalid");
    create_topic(&topic, 3);
    let (bytes, _) = scenario();
    let mut lines: Vec<&[u8]> = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .take(5)
        .collect();
    let not_json: &[u8] = b"{this is not json";
    let not_utf8: &[u8] = b"\xff\xfe\xfd";
    lines.insert(2, not_json);
    lines.insert(3, not_utf8);
    let mut input = lines.join(&b'\n');
    input.push(b'\n');
    input.extend_from_slice(b"{\"specversion\":\"1.0\",\"id\":\"x\",\"source\":\"s\",\"type\":\"deal.unknown\",\"subject\":\"d\",\"time\":\"2025-01-01T00:00:00Z\",\"data\":{}}\n");

    let out = dealledger(&["produce", "--topic", &topic, "-"], Some(&input));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3: event is not JSON"), "{stderr}");
    assert!(stderr.contains("line 4: event is not UTF-8"), "{stderr}");
    assert!(
        stderr.contains("line 8: field type: unknown event type \"deal.unknown\""),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    assert!(
        crate::common::high_watermarks(&topic)
            .iter()
            .all(|(_, h)| *h == 0),
        "something was sent"
    );

    // --skip-invalid sends the five valid lines and still names the bad ones.
    let out = dealledger(
        &[
            "produce",
            "--topic",
            &topic,
            "--skip-invalid",
            "--json",
            "-",
        ],
        Some(&input),
    );
    assert!(out.status.success(), "{}", describe(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["sent"], 5, "{summary}");
    assert_eq!(summary["invalid"], 3, "{summary}");
    assert_eq!(read_all(&topic).len(), 5);
}

#[test]
fn field_errors_name_line_and_path() {
    let (bytes, _) = scenario();
    let first_proposal = bytes
        .split(|b| *b == b'\n')
        .map(|l| String::from_utf8(l.to_vec()).unwrap())
        .find(|l| l.contains("\"deal.terms.proposed\""))
        .expect("a proposal in the scenario");
    let v: serde_json::Value = serde_json::from_str(&first_proposal).unwrap();
    let mut bad = v.clone();
    bad["data"]["terms"]["price"]["amount_minor"] = serde_json::json!(-5);
    let input = format!("{first_proposal}\n{bad}\n");
    let out = dealledger(&["validate", "-"], Some(input.as_bytes()));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 2: field data.terms.price.amount_minor: -5 is negative"),
        "{stderr}"
    );
}

#[test]
fn rust_producer_api_reports_where_each_event_went() {
    use dealledger::kafka::KafkaSettings;
    use dealledger::producer::DealProducer;

    let topic = unique_topic("produce-api");
    create_topic(&topic, 3);
    let (_, events) = scenario();
    let producer =
        DealProducer::new(&KafkaSettings::new(crate::common::bootstrap()), &topic).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deliveries: Vec<_> = rt.block_on(async {
        let mut out = Vec::new();
        for event in events.iter().take(10) {
            out.push(producer.send(event).await.expect("delivered"));
        }
        out
    });
    let records = read_all(&topic);
    assert_eq!(records.len(), 10);
    for (event, delivery) in events.iter().zip(&deliveries) {
        let record = records
            .iter()
            .find(|r| r.partition == delivery.partition && r.offset == delivery.offset)
            .expect("a record where the delivery said");
        assert_eq!(record.key_str(), Some(event.deal_id.as_str()));
        let back = DealEvent::decode(record.value.as_deref().unwrap()).unwrap();
        assert_eq!(back.id, event.id);
        assert_eq!(back.payload, event.payload);
    }
}

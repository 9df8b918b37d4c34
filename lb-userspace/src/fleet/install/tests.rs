use super::*;

fn v(text: String) -> Versioned {
    Versioned { text, revision: 1 }
}

fn service(name: &str, instances: &[(&str, u32, &str)], vips: &[&str]) -> (String, Versioned) {
    let instances: Vec<serde_json::Value> = instances
        .iter()
        .map(|(a, w, n)| serde_json::json!({"address": a, "weight": w, "node": n}))
        .collect();
    let vips: Vec<serde_json::Value> = vips
        .iter()
        .map(|a| serde_json::json!({"address": a, "port": 80, "protocol": "tcp"}))
        .collect();
    let record = serde_json::json!({"name": name, "instances": instances, "vips": vips});
    (name.to_string(), v(record.to_string()))
}

fn install(from: &str, to: &str) -> (String, Versioned) {
    let record = serde_json::json!({"from": from, "to": to, "created_ms": 1});
    (format!("{from}/{to}"), v(record.to_string()))
}

fn health(node: &str, checked: &[&str], down: &[&str]) -> (String, Versioned) {
    let record =
        serde_json::json!({"node": node, "checked": checked, "down": down, "updated_ms": 1});
    (node.to_string(), v(record.to_string()))
}

fn registry() -> Vec<(String, Versioned)> {
    vec![
        service(
            "a",
            &[("198.18.20.2:1", 1, "h0"), ("198.18.22.2:1", 1, "h1")],
            &[],
        ),
        service(
            "b",
            &[("198.18.0.11:80", 100, "b0"), ("198.18.0.12:80", 50, "b1")],
            &["198.18.10.1"],
        ),
    ]
}

#[test]
fn a_host_runs_the_targets_vips_for_its_own_callers() {
    let p = plan("h0", &[install("a", "b")], &registry(), &[])
        .unwrap()
        .unwrap();
    assert_eq!(p.installs, ["a/b"]);
    assert_eq!(p.sources, ["198.18.20.2".parse::<IpAddr>().unwrap()]);
    assert_eq!(p.vips.len(), 1);
    assert_eq!(p.vips[0].name, "b");
    assert_eq!(p.vips[0].backends.len(), 2);
    // A node that runs none of a's instances has nothing to do.
    assert_eq!(
        plan("b0", &[install("a", "b")], &registry(), &[]).unwrap(),
        None
    );
}

#[test]
fn health_majority_takes_instances_out_and_fails_open() {
    let one = [health(
        "lb0",
        &["198.18.0.11", "198.18.0.12"],
        &["198.18.0.12"],
    )];
    let p = plan("h0", &[install("a", "b")], &registry(), &one)
        .unwrap()
        .unwrap();
    assert_eq!(p.vips[0].backends, [("198.18.0.11".parse().unwrap(), 100)]);
    // One of two checkers is no majority.
    let split = [one[0].clone(), health("lb1", &["198.18.0.12"], &[])];
    let p = plan("h0", &[install("a", "b")], &registry(), &split)
        .unwrap()
        .unwrap();
    assert_eq!(p.vips[0].backends.len(), 2);
    // Every instance down: all of them stay.
    let all = [health(
        "lb0",
        &["198.18.0.11", "198.18.0.12"],
        &["198.18.0.11", "198.18.0.12"],
    )];
    let p = plan("h0", &[install("a", "b")], &registry(), &all)
        .unwrap()
        .unwrap();
    assert_eq!(p.vips[0].backends.len(), 2);
    // A record that does not parse is no opinion.
    let bad = [(String::from("x"), v("{".into()))];
    assert!(plan("h0", &[install("a", "b")], &registry(), &bad).is_ok());
}

#[test]
fn invalid_records_an_install_depends_on_are_errors() {
    let mut reg = registry();
    reg[1].1.text = "{\"name\": \"b\"}".into();
    let e = plan("h0", &[install("a", "b")], &reg, &[]).unwrap_err();
    assert!(e.field.starts_with("services/b"), "{e}");
    // A target without a VIP.
    let reg = vec![
        registry().remove(0),
        service("b", &[("198.18.0.11:80", 1, "b0")], &[]),
    ];
    let e = plan("h0", &[install("a", "b")], &reg, &[]).unwrap_err();
    assert!(e.field.ends_with("to"), "{e}");
    // A record whose key and content disagree.
    let mut i = install("a", "b");
    i.0 = "a/c".into();
    assert!(plan("h0", &[i], &registry(), &[]).is_err());
}

#[test]
fn check_refuses_what_lbctl_must_not_write() {
    let services: BTreeMap<String, Service> = registry()
        .iter()
        .map(|(k, v)| (k.clone(), Service::from_json(k, &v.text).unwrap()))
        .collect();
    let i = |from: &str, to: &str| Install {
        from: from.into(),
        to: to.into(),
        created_ms: 0,
    };
    i("a", "b").check(&services).unwrap();
    assert_eq!(i("a", "a").check(&services).unwrap_err().field, "to");
    assert_eq!(i("x", "b").check(&services).unwrap_err().field, "from");
    assert_eq!(i("a", "x").check(&services).unwrap_err().field, "to");
    assert_eq!(i("b", "a").check(&services).unwrap_err().field, "to");
    assert_eq!(i("a", "b").hosts(&services), ["h0", "h1"]);
}

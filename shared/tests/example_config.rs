//! deploy/warden.example.toml must stay a valid config that documents every
//! key of the built-in defaults.

use warden_shared::config::DEFAULTS_TOML;
use warden_shared::Config;

fn example() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/warden.example.toml"
    ))
    .expect("read deploy/warden.example.toml")
}

#[test]
fn example_config_is_valid() {
    let text = example();
    Config::from_parts(Some(&text), Vec::new())
        .expect("deploy/warden.example.toml must be a valid config");
}

/// The optional keys are commented out (`# key = value`); with every such
/// line uncommented the file must still be valid, and they must take.
#[test]
fn example_config_with_optional_keys_uncommented_is_valid() {
    let text: String = example()
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                format!("{rest}\n")
            }
            // Commented-out array-of-tables headers come back with them.
            Some(rest) if rest.starts_with("[[") => format!("{rest}\n"),
            _ => format!("{line}\n"),
        })
        .collect();
    let c = Config::from_parts(Some(&text), Vec::new())
        .expect("example with optional keys uncommented must be a valid config");
    assert!(c.nats.user.is_some(), "a nats login documented");
    assert!(c.http.token.is_some(), "http.token documented");
    assert_eq!(c.worker.resources.len(), 1, "worker.resources documented");
    assert_eq!(c.health.checks["host"].len(), 2, "a dns check documented");
    let rule = &c.trigger.rules[0];
    assert!(
        rule.priority.is_some() && rule.pool.is_some(),
        "rule priority/pool"
    );
}

#[test]
fn example_config_documents_every_default_key() {
    let text = example();
    let defaults: toml::Table = DEFAULTS_TOML.parse().expect("defaults parse");
    let mut missing = Vec::new();
    for (section, value) in &defaults {
        if section == "tasks" {
            continue;
        }
        let toml::Value::Table(keys) = value else {
            continue;
        };
        for key in keys.keys() {
            if (section == "trigger" && key == "rules")
                || (section == "classifier" && (key == "rules" || key == "details"))
                || (section == "health" && key == "checks")
            {
                continue;
            }
            // A sub-table ([amqp.ci_messages]): its own keys, which no
            // environment variable reaches.
            if let Some(toml::Value::Table(sub)) = keys.get(key) {
                if !text.contains(&format!("[{section}.{key}]")) {
                    missing.push(format!("[{section}.{key}]"));
                }
                for subkey in sub.keys() {
                    if !text.contains(&format!("\n{subkey} = "))
                        && !text.contains(&format!("[{section}.{key}.{subkey}]"))
                    {
                        missing.push(format!("{section}.{key}.{subkey}"));
                    }
                }
                continue;
            }
            if !text.contains(&format!("\n{key} = ")) {
                missing.push(format!("{section}.{key}"));
            }
            let var = format!("WARDEN_{}_{}", section.to_uppercase(), key.to_uppercase());
            if !text.contains(&var) {
                missing.push(var);
            }
        }
    }
    for needle in [
        "#   credentials = ",
        "WARDEN_NATS_CREDENTIALS",
        "#   nkey_file = ",
        "WARDEN_NATS_NKEY_FILE",
        "# user = ",
        "# token = ",
        "WARDEN_HTTP_TOKEN",
        "[[trigger.rules]]",
        "\nwhen = ",
        "\nargs = ",
        "priority = ",
        "pool = ",
        "\ncommand = ",
        "\nverdicts = ",
        "\ntimeout = ",
        "\nenv = ",
        "\nowners = ",
        "\nretry = {",
        "[[classifier.rules]]",
        "[classifier.details.",
        "[[health.checks.host]]",
        "[[health.checks.workcopy]]",
        "# [[worker.resources]]",
    ] {
        if !text.contains(needle) {
            missing.push(needle.trim().to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "deploy/warden.example.toml does not document: {missing:?}"
    );
}

//! docs/crash-details.md is generated from the built-in config; it must
//! match. `WARDEN_BLESS=1` rewrites it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use warden_shared::Config;

#[test]
fn crash_details_doc_matches_the_catalogue() {
    let want = warden_classifier::catalogue_markdown(&Config::defaults());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/crash-details.md");
    if std::env::var_os("WARDEN_BLESS").is_some() {
        std::fs::write(&path, &want).expect("write doc");
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/crash-details.md is out of date: run WARDEN_BLESS=1 cargo test -p warden-classifier --test catalogue"
    );
    // Every code a shipped rule gives is in it.
    let rules: toml::Table = toml::from_str(warden_classifier::DEFAULT_RULES_TOML).unwrap();
    for r in rules["rules"].as_array().unwrap() {
        let detail = r["detail"].as_str().unwrap();
        assert!(
            have.contains(&format!("| `{detail}` |")),
            "{detail} missing"
        );
    }
}

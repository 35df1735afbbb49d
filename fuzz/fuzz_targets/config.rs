//! Configuration: TOML text and `WARDEN_*` environment overrides, loaded
//! and validated as every service does at start; a valid config is then
//! used as the services use it.
//!
//! Input: the TOML text, then (after a NUL byte) environment lines
//! `NAME=VALUE`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_shared::Config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (file, env) = match text.split_once('\0') {
        Some((f, e)) => (f, e),
        None => (&*text, ""),
    };
    let vars: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let config = match Config::from_parts(Some(file), vars.clone()) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(config.problems().is_empty());
    assert_eq!(
        Config::from_parts(Some(file), vars).ok().as_ref(),
        Some(&config),
        "loading is deterministic"
    );
    let _ = config.topology();
    let _ = config.http_listen();
    let _ = config.metrics_listen();
    for name in config.tasks.keys() {
        let _ = config.retry_policy(name);
    }
    let _ = warden_classifier::Classifier::from_config(&config);
    let _ = warden_trigger::rules::Rules::new(std::sync::Arc::new(config));
});

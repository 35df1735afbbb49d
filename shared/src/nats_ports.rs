//! The ports a nats-server bound, read back from the file it writes with
//! `--ports_file_dir DIR` (`DIR/<exe>_<pid>.ports`, JSON:
//! `{"nats": ["nats://h:p"], "cluster": ["nats://h:p"], ...}`). A server
//! started on port `-1` picks a free port itself, so nothing has to choose
//! one for it in advance (choosing one by binding and releasing it races
//! every other process on the machine). `warden up`, the test servers and
//! the chaos cluster all read their ports this way.

use std::path::Path;

/// What a ports file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub client: u16,
    pub cluster: Option<u16>,
}

fn first_port(v: &serde_json::Value, key: &str) -> Option<u16> {
    v.get(key)?
        .as_array()?
        .first()?
        .as_str()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}

/// A ports file's text; `None` until it names a client port (a file
/// still being written, or not a ports file).
pub fn parse(text: &str) -> Option<Ports> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    Some(Ports {
        client: first_port(&v, "nats")?,
        cluster: first_port(&v, "cluster"),
    })
}

/// The ports of the server with `pid`, from its ports file in `dir`;
/// `None` until it is written.
pub fn read(dir: &Path, pid: u32) -> Option<Ports> {
    let suffix = format!("_{pid}.ports");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        if !e.file_name().to_string_lossy().ends_with(&suffix) {
            return None;
        }
        parse(&std::fs::read_to_string(e.path()).ok()?)
    })
}

/// The ports of whichever server wrote a ports file into `dir` (for a
/// directory only one server writes to, when the pid that was started is
/// not the server's own, e.g. under a guard).
pub fn read_any(dir: &Path) -> Option<Ports> {
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        if !e.file_name().to_string_lossy().ends_with(".ports") {
            return None;
        }
        parse(&std::fs::read_to_string(e.path()).ok()?)
    })
}

/// The pid of whichever server wrote a ports file into `dir`, from the
/// file's name (`<exe>_<pid>.ports`): the server's own pid, also under a
/// guard (what `warden bench` reads its CPU time from).
pub fn server_pid(dir: &Path) -> Option<u32> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find_map(|e| pid_of_file_name(&e.file_name().to_string_lossy()))
}

fn pid_of_file_name(name: &str) -> Option<u32> {
    name.strip_suffix(".ports")?
        .rsplit('_')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_is_read_off_the_file_name() {
        assert_eq!(pid_of_file_name("nats-server_4242.ports"), Some(4242));
        assert_eq!(pid_of_file_name("nats_server_bin_7.ports"), Some(7));
        assert_eq!(pid_of_file_name("nats-server_4242.pid"), None);
        assert_eq!(pid_of_file_name("nats-server.ports"), None);
    }

    #[test]
    fn client_and_cluster_ports_are_read() {
        assert_eq!(
            parse(r#"{"nats":["nats://127.0.0.1:34297"],"cluster":["nats://127.0.0.1:6222"]}"#),
            Some(Ports {
                client: 34297,
                cluster: Some(6222)
            })
        );
        assert_eq!(
            parse(r#"{"nats":["nats://127.0.0.1:4000"]}"#),
            Some(Ports {
                client: 4000,
                cluster: None
            })
        );
        assert_eq!(parse(""), None, "a file still being written");
        assert_eq!(parse("{"), None, "a file still being written");
        assert_eq!(parse(r#"{"cluster":["nats://127.0.0.1:1"]}"#), None);
    }

    #[test]
    fn the_file_of_the_pid_asked_for_is_read() {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::write(
            dir.path().join("nats-server_11.ports"),
            r#"{"nats":["nats://127.0.0.1:1111"]}"#,
        )
        .expect("write");
        std::fs::write(
            dir.path().join("nats-server_22.ports"),
            r#"{"nats":["nats://127.0.0.1:2222"]}"#,
        )
        .expect("write");
        assert_eq!(read(dir.path(), 22).map(|p| p.client), Some(2222));
        assert_eq!(read(dir.path(), 33), None);
        assert!(read_any(dir.path()).is_some());
    }
}

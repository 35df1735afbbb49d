//! Trigger rules: topic patterns, body conditions, argument templates.
//! Every matching rule contributes jobs, in order (as Taskotron's trigger
//! did); one task named by two rules is still one job (same derived id).

use std::collections::BTreeMap;

use serde_json::Value;
use uuid::Uuid;
use warden_shared::config::Rule;
use warden_shared::job::{derived_job_id, Source};
use warden_shared::template::{lookup, Template};
use warden_shared::Config;

use crate::decode::Event;

pub use warden_shared::subjects::subject_matches;

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// A condition holds when the field equals the value, or is one of the list.
pub fn condition_holds(body: &Value, field: &str, expected: &Value) -> bool {
    let Some(actual) = lookup(body, field) else {
        return false;
    };
    match expected {
        Value::Array(options) => options.iter().any(|o| json_eq(actual, o)),
        single => json_eq(actual, single),
    }
}

struct Compiled {
    rule: Rule,
    args: Vec<(String, Template)>,
}

/// Rules compiled once at start.
pub struct Rules {
    rules: Vec<Compiled>,
    config: std::sync::Arc<Config>,
}

/// A job the event asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub id: Uuid,
    pub task: String,
    pub args: BTreeMap<String, String>,
    pub pool: String,
    pub priority: i32,
    pub source: Source,
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub jobs: Vec<Planned>,
    /// Rules that matched but could not fill an argument: (rule, field).
    pub incomplete: Vec<(String, String)>,
}

impl Rules {
    /// Config validation has checked every template already.
    pub fn new(config: std::sync::Arc<Config>) -> Rules {
        let rules = config
            .trigger
            .rules
            .iter()
            .map(|r| Compiled {
                rule: r.clone(),
                args: r
                    .args
                    .iter()
                    .filter_map(|(k, t)| Template::parse(t).ok().map(|t| (k.clone(), t)))
                    .collect(),
            })
            .collect();
        Rules { rules, config }
    }

    pub fn plan(&self, event: &Event) -> Plan {
        let mut plan = Plan::default();
        for c in &self.rules {
            let r = &c.rule;
            if !subject_matches(&r.topic, &event.topic) {
                continue;
            }
            if !r
                .when
                .iter()
                .all(|(field, expected)| condition_holds(&event.body, field, expected))
            {
                continue;
            }
            let mut args = BTreeMap::new();
            let mut missing = None;
            for (name, tmpl) in &c.args {
                match tmpl.render(&event.body) {
                    Ok(v) => {
                        args.insert(name.clone(), v);
                    }
                    Err(e) => {
                        missing = Some(e.0);
                        break;
                    }
                }
            }
            if let Some(field) = missing {
                plan.incomplete.push((r.name.clone(), field));
                continue;
            }
            for task in &r.tasks {
                let Some(tc) = self.config.tasks.get(task) else {
                    continue;
                };
                let id = derived_job_id(&event.message_id, task);
                if plan.jobs.iter().any(|j| j.id == id) {
                    continue;
                }
                plan.jobs.push(Planned {
                    id,
                    task: task.clone(),
                    args: args.clone(),
                    pool: r.pool.clone().unwrap_or_else(|| tc.pool.clone()),
                    priority: r.priority.unwrap_or(tc.priority),
                    source: Source {
                        message_id: event.message_id.clone(),
                        subject: event.topic.clone(),
                        rule: Some(r.name.clone()),
                    },
                });
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    #[test]
    fn wildcards() {
        assert!(subject_matches(
            "org.fedoraproject.*.buildsys.build.state.change",
            "org.fedoraproject.prod.buildsys.build.state.change"
        ));
        assert!(!subject_matches(
            "org.fedoraproject.*.buildsys.build.state.change",
            "org.fedoraproject.prod.buildsys.tag"
        ));
        assert!(subject_matches(
            "org.fedoraproject.>",
            "org.fedoraproject.prod.buildsys.tag"
        ));
        assert!(!subject_matches("org.fedoraproject.>", "org.fedoraproject"));
        assert!(!subject_matches("a.b", "a.b.c"));
        assert!(!subject_matches("a.b.c", "a.b"));
    }

    #[test]
    fn conditions() {
        let body = json!({"new": 1, "instance": "primary", "info": {"arch": "noarch"}, "f": 1.0});
        assert!(condition_holds(&body, "new", &json!(1)));
        assert!(
            !condition_holds(&body, "new", &json!("1")),
            "no string/number coercion"
        );
        assert!(condition_holds(&body, "new", &json!([1, 3, 4])));
        assert!(!condition_holds(&body, "new", &json!([0, 2])));
        assert!(condition_holds(&body, "info.arch", &json!("noarch")));
        assert!(condition_holds(&body, "f", &json!(1)), "1.0 equals 1");
        assert!(!condition_holds(&body, "missing", &json!(null)));
    }

    fn rules(extra: &str) -> Rules {
        let cfg = Config::from_parts(
            Some(&format!(
                r#"
[tasks.rpmlint]
command = ["true"]
priority = 3
[tasks.abicheck]
command = ["true"]
pool = "x86_64"
{extra}"#
            )),
            Vec::new(),
        )
        .expect("config");
        Rules::new(Arc::new(cfg))
    }

    fn event(body: serde_json::Value) -> Event {
        Event {
            message_id: "m1".into(),
            topic: "org.fedoraproject.prod.buildsys.build.state.change".into(),
            body,
        }
    }

    #[test]
    fn matching_rules_make_jobs_with_rendered_args() {
        let r = rules(
            r#"
[[trigger.rules]]
name = "a"
topic = "org.fedoraproject.*.buildsys.build.state.change"
when = { new = 1 }
tasks = ["rpmlint", "abicheck"]
args = { nvr = "{name}-{version}-{release}" }
[[trigger.rules]]
name = "b"
topic = "org.fedoraproject.>"
tasks = ["rpmlint"]
priority = 9
"#,
        );
        let plan = r.plan(&event(
            json!({"new": 1, "name": "ansible", "version": "1.8.3", "release": "1.el7"}),
        ));
        assert_eq!(plan.jobs.len(), 2, "{plan:?}");
        assert_eq!(plan.jobs[0].args["nvr"], "ansible-1.8.3-1.el7");
        assert_eq!(
            (plan.jobs[0].pool.as_str(), plan.jobs[0].priority),
            ("default", 3)
        );
        assert_eq!(plan.jobs[1].pool, "x86_64");
        assert_eq!(plan.jobs[0].id, derived_job_id("m1", "rpmlint"));
        assert_eq!(plan.jobs[0].source.rule.as_deref(), Some("a"));
        // Not complete: rule a does not match; rule b does.
        let plan = r.plan(&event(json!({"new": 0})));
        assert_eq!(plan.jobs.len(), 1);
        assert_eq!(plan.jobs[0].priority, 9);
    }

    #[test]
    fn missing_template_field_is_incomplete_not_a_job() {
        let r = rules(
            r#"
[[trigger.rules]]
name = "needs-owner"
topic = ">"
tasks = ["rpmlint"]
args = { owner = "{owner}" }
"#,
        );
        let plan = r.plan(&event(json!({"name": "x"})));
        assert!(plan.jobs.is_empty());
        assert_eq!(
            plan.incomplete,
            vec![("needs-owner".to_string(), "owner".to_string())]
        );
    }
}

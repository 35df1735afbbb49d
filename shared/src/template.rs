//! Argument templates of trigger rules: literal text with `{dotted.path}`
//! placeholders filled from a message body. `{{` and `}}` are literal braces.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Field(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TemplateError {
    #[error("unclosed '{{' at byte {0}")]
    Unclosed(usize),
    #[error("unmatched '}}' at byte {0}")]
    Unmatched(usize),
    #[error("empty placeholder at byte {0}")]
    Empty(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("message has no usable field {0:?}")]
pub struct MissingField(pub String);

impl Template {
    pub fn parse(s: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = s.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|(_, c)| *c) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|(_, c)| *c) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut field = String::new();
                    let mut closed = false;
                    for (_, c) in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        field.push(c);
                    }
                    if !closed {
                        return Err(TemplateError::Unclosed(i));
                    }
                    let field = field.trim().to_string();
                    if field.is_empty() {
                        return Err(TemplateError::Empty(i));
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Field(field));
                }
                '}' => return Err(TemplateError::Unmatched(i)),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template { parts })
    }

    /// Fills placeholders from `body`. Strings are used as they are,
    /// numbers and booleans in their JSON spelling; null, missing fields,
    /// arrays and objects are errors (an argument is one plain value).
    pub fn render(&self, body: &serde_json::Value) -> Result<String, MissingField> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Field(path) => match lookup(body, path) {
                    Some(serde_json::Value::String(s)) => out.push_str(s),
                    Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                        out.push_str(&v.to_string())
                    }
                    _ => return Err(MissingField(path.clone())),
                },
            }
        }
        Ok(out)
    }
}

/// `a.b.0.c` into objects and arrays.
pub fn lookup<'a>(value: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    let mut cur = value;
    for seg in path.split('.') {
        cur = match cur {
            serde_json::Value::Object(m) => m.get(seg)?,
            serde_json::Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_fields_and_literals() {
        let t = Template::parse("{name}-{version}-{release}").expect("parse");
        let body =
            json!({"name": "ansible", "version": "1.8.3", "release": "1.el7", "build_id": 612324});
        assert_eq!(t.render(&body).expect("render"), "ansible-1.8.3-1.el7");
        let t = Template::parse("id={build_id} {{x}}").expect("parse");
        assert_eq!(t.render(&body).expect("render"), "id=612324 {x}");
    }

    #[test]
    fn nested_paths_and_missing_fields() {
        let body = json!({"update": {"builds": [{"nvr": "a-1-1"}]}, "owner": null});
        assert_eq!(
            Template::parse("{update.builds.0.nvr}")
                .expect("p")
                .render(&body)
                .expect("r"),
            "a-1-1"
        );
        assert_eq!(
            Template::parse("{owner}").expect("p").render(&body),
            Err(MissingField("owner".into()))
        );
        assert_eq!(
            Template::parse("{update}").expect("p").render(&body),
            Err(MissingField("update".into()))
        );
    }

    #[test]
    fn malformed_templates() {
        assert_eq!(Template::parse("{name"), Err(TemplateError::Unclosed(0)));
        assert_eq!(Template::parse("a}"), Err(TemplateError::Unmatched(1)));
        assert_eq!(Template::parse("{ }"), Err(TemplateError::Empty(0)));
    }
}

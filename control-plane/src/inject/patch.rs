//! The JSON Patch (RFC 6902) that turns one JSON document into another, for the admission
//! webhook's response: the pod as it came in and the pod injected go in, the operations leave.
//!
//! Objects are compared field by field (`add`, `remove`, `replace` per changed field, recursing into
//! objects present in both); arrays and scalars that differ are replaced whole, which keeps the
//! patch exact without guessing at moved list items.

use serde_json::{Value, json};

/// The operations that turn `from` into `to`.
pub fn diff(from: &Value, to: &Value) -> Vec<Value> {
    let mut operations = Vec::new();
    walk(from, to, &mut String::new(), &mut operations);
    operations
}

fn walk(from: &Value, to: &Value, path: &mut String, operations: &mut Vec<Value>) {
    match (from, to) {
        (Value::Object(a), Value::Object(b)) => {
            let length = path.len();
            for (key, old) in a {
                push_segment(path, key);
                match b.get(key) {
                    Some(new) => walk(old, new, path, operations),
                    None => operations.push(json!({"op": "remove", "path": path})),
                }
                path.truncate(length);
            }
            for (key, new) in b.iter().filter(|(key, _)| !a.contains_key(*key)) {
                push_segment(path, key);
                operations.push(json!({"op": "add", "path": path, "value": new}));
                path.truncate(length);
            }
        }
        _ if from == to => {}
        _ => operations.push(json!({"op": "replace", "path": path, "value": to})),
    }
}

/// Appends `/key` to a JSON Pointer, escaped (`~` as `~0`, `/` as `~1`).
fn push_segment(path: &mut String, key: &str) {
    path.push('/');
    for c in key.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Applies `operations` (the subset `diff` writes) to `document`.
    fn apply(document: &mut Value, operations: &[Value]) {
        for op in operations {
            let path = op["path"].as_str().unwrap_or_default();
            let (parent, key) = path.rsplit_once('/').unwrap_or(("", path));
            let key = key.replace("~1", "/").replace("~0", "~");
            let target = if parent.is_empty() { Some(&mut *document) } else { document.pointer_mut(parent) };
            let Some(Value::Object(target)) = target else {
                if path.is_empty() {
                    *document = op["value"].clone();
                }
                continue;
            };
            match op["op"].as_str() {
                Some("remove") => {
                    target.shift_remove(&key);
                }
                _ => {
                    target.insert(key, op["value"].clone());
                }
            }
        }
    }

    #[test]
    fn the_patch_turns_one_document_into_the_other() {
        let from = json!({"metadata": {"name": "p", "labels": {"a": "1", "gone": "x"}},
                          "spec": {"containers": [{"name": "app"}]}});
        let to = json!({"metadata": {"name": "p", "labels": {"a": "2"}, "annotations": {"remora.dev/x": "y"}},
                        "spec": {"containers": [{"name": "app"}], "initContainers": [{"name": "remora-init"}]}});
        let operations = diff(&from, &to);
        assert_eq!(
            operations,
            vec![
                json!({"op": "replace", "path": "/metadata/labels/a", "value": "2"}),
                json!({"op": "remove", "path": "/metadata/labels/gone"}),
                json!({"op": "add", "path": "/metadata/annotations", "value": {"remora.dev/x": "y"}}),
                json!({"op": "add", "path": "/spec/initContainers", "value": [{"name": "remora-init"}]}),
            ]
        );
        let mut patched = from.clone();
        apply(&mut patched, &operations);
        assert_eq!(patched, to);
        assert!(diff(&to, &to).is_empty());
    }

    #[test]
    fn keys_are_escaped() {
        let operations = diff(&json!({}), &json!({"a/b~c": 1}));
        assert_eq!(operations[0]["path"], "/a~1b~0c");
    }
}

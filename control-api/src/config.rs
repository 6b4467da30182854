//! YAML config documents to typed resources.
//!
//! One format serves the proxy's `--config` file and the control plane's GitOps directory. A file holds
//! one or more YAML documents (separated by `---`); each document is either
//!
//! - a single resource, a mapping with `kind:` (`Listener`, `RouteTable`, `Cluster`, `Endpoints`) and
//!   that kind's fields, or
//! - a config document, a mapping with `bootstrap:` (the proxy's start-up settings) and/or
//!   `resources:` (a list of single resources).
//!
//! Fields follow the proto3 JSON mapping of `proto/remora/v1`: snake_case (or lowerCamelCase) names,
//! enums by value name (`protocol: http1`), durations as seconds with an `s` suffix (`1.5s`).
//! Unknown fields and values of the wrong type are errors that name the resource and the field path.
//! Text enters through [`parse`]; a [`ConfigFile`] leaves, each resource checked on its own but not yet
//! against the others (that is [`crate::validate::validate`]).

use std::fmt;
use std::io::Read;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};

use crate::limits::MAX_CONFIG_FILE;
use crate::resource::{Kind, Resource, describe};
use crate::{v1, yaml};

/// What one config file (or a directory's files, concatenated) holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigFile {
    /// The `bootstrap:` section, if the file has one.
    pub bootstrap: Option<v1::Bootstrap>,
    /// Every resource, in file order.
    pub resources: Vec<Resource>,
}

/// A problem with one field of one resource (or of the bootstrap, or of a whole document).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// What the field belongs to: `listener "outbound"`, `bootstrap`, `document 2`.
    pub subject: String,
    /// The field's path inside the subject (`routes[0].match.path.regex`); empty for the whole subject.
    pub field: String,
    /// What is wrong, in lowercase.
    pub message: String,
}

impl FieldError {
    /// A problem with `field` of `subject` (a resource, `bootstrap`, ...).
    pub fn new(subject: impl Into<String>, field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { subject: subject.into(), field: field.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.subject, self.message)
        } else {
            write!(f, "{}: {}: {}", self.subject, self.field, self.message)
        }
    }
}

impl std::error::Error for FieldError {}

/// A problem with one field, found by a step that knows the field but not the resource it belongs
/// to (a retry policy's compile step, say). The step's caller names the resource
/// ([`Invalid::of`]), or places the field inside its own (`Invalid::within`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field's path inside whatever the step compiled (`backoff_base`, `headers[2].name`).
    pub field: String,
    /// What is wrong, in lowercase.
    pub message: String,
}

impl Invalid {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid { field: field.into(), message: message.into() }
    }

    /// The same problem seen from the message that holds this one at `prefix`
    /// (`retry` + `backoff_base` → `retry.backoff_base`).
    pub fn within(self, prefix: &str) -> Invalid {
        let field = if self.field.is_empty() { prefix.to_owned() } else { format!("{prefix}.{}", self.field) };
        Invalid { field, ..self }
    }

    /// The problem as one of resource `kind` `name`.
    pub fn of(self, kind: Kind, name: &str) -> FieldError {
        FieldError { subject: describe(kind, name), field: self.field, message: self.message }
    }
}

/// Why a config file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not YAML.
    #[error("{origin}: {error}")]
    Syntax {
        /// Where the text came from (a path).
        origin: String,
        /// The YAML parser's error, with line and column.
        error: serde_yaml_ng::Error,
    },
    /// The YAML does not fit the schema.
    #[error("{origin}: {error}")]
    Field {
        /// Where the text came from (a path).
        origin: String,
        /// The resource and field at fault.
        error: FieldError,
    },
}

/// Parses the YAML `text` of one file. `origin` (usually the path) prefixes every error message.
///
/// Fails on the first problem; the error names the resource (or document) and the field. A text
/// whose aliases would expand past its budget is refused before it is built ([`crate::yaml`]).
pub fn parse(text: &str, origin: &str) -> Result<ConfigFile, ConfigError> {
    parse_documents(text, origin, None)
}

/// Reads the text of config file `path`, refusing one larger than [`MAX_CONFIG_FILE`] (after reading
/// that much, so a file that never ends, a pipe or `/dev/zero`, is refused too).
pub fn read_text(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_CONFIG_FILE as u64 + 1).read_to_string(&mut text)?;
    if text.len() > MAX_CONFIG_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("is larger than the {} MiB a config file may hold", MAX_CONFIG_FILE >> 20),
        ));
    }
    Ok(text)
}

/// What a file of the control plane's directory holds: Remora's documents, and the Kubernetes
/// objects beside them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MixedFile {
    /// Remora's documents.
    pub config: ConfigFile,
    /// Every document that carries an `apiVersion` (a Kubernetes object; a `List`'s items one by
    /// one), as JSON, untouched: what the control plane makes of them is its business.
    pub kubernetes: Vec<serde_json::Value>,
}

/// Parses a file that may hold Kubernetes manifests beside Remora's documents: a document with an
/// `apiVersion` is a Kubernetes object, any other is read as [`parse`] reads it.
pub fn parse_mixed(text: &str, origin: &str) -> Result<MixedFile, ConfigError> {
    let mut kubernetes = Vec::new();
    let config = parse_documents(text, origin, Some(&mut kubernetes))?;
    Ok(MixedFile { config, kubernetes })
}

fn parse_documents(
    text: &str,
    origin: &str,
    mut kubernetes: Option<&mut Vec<serde_json::Value>>,
) -> Result<ConfigFile, ConfigError> {
    let field_error = |error: FieldError| ConfigError::Field { origin: origin.to_owned(), error };
    let mut file = ConfigFile::default();
    let documents = yaml::documents(text).map_err(|error| ConfigError::Syntax { origin: origin.to_owned(), error })?;
    for (index, value) in documents.into_iter().enumerate() {
        let document_name = format!("document {}", index + 1);
        let mapping = match value {
            Value::Null => continue,
            Value::Mapping(mapping) => mapping,
            other => {
                return Err(field_error(FieldError::new(
                    document_name,
                    "",
                    format!("must be a mapping, found {}", type_name(&other)),
                )));
            }
        };
        if let Some(objects) = kubernetes.as_deref_mut()
            && mapping.contains_key("apiVersion")
        {
            objects.extend(kubernetes_objects(mapping).map_err(field_error)?);
            continue;
        }
        if mapping.contains_key("kind") {
            let position = file.resources.len() + 1;
            file.resources.push(parse_resource(mapping, position).map_err(field_error)?);
            continue;
        }
        for (key, value) in mapping {
            match key.as_str() {
                Some("bootstrap") => {
                    if file.bootstrap.is_some() {
                        return Err(field_error(FieldError::new(
                            document_name,
                            "bootstrap",
                            "appears more than once in this file",
                        )));
                    }
                    let bootstrap = match value {
                        Value::Null => v1::Bootstrap::default(),
                        value => deserialize(value, "bootstrap").map_err(field_error)?,
                    };
                    file.bootstrap = Some(bootstrap);
                }
                Some("resources") => {
                    let items = match value {
                        Value::Null => Vec::new(),
                        Value::Sequence(items) => items,
                        other => {
                            return Err(field_error(FieldError::new(
                                document_name,
                                "resources",
                                format!("must be a list, found {}", type_name(&other)),
                            )));
                        }
                    };
                    for item in items {
                        let position = file.resources.len() + 1;
                        let Value::Mapping(mapping) = item else {
                            return Err(field_error(FieldError::new(
                                format!("resource #{position}"),
                                "",
                                format!("must be a mapping with `kind:`, found {}", type_name(&item)),
                            )));
                        };
                        file.resources.push(parse_resource(mapping, position).map_err(field_error)?);
                    }
                }
                _ => {
                    return Err(field_error(FieldError::new(
                        document_name,
                        describe_key(&key),
                        "unknown top-level field (expected `bootstrap`, `resources`, or `kind` for a single resource)",
                    )));
                }
            }
        }
    }
    Ok(file)
}

/// A Kubernetes document as JSON objects: itself, or a `List`'s items.
fn kubernetes_objects(mapping: Mapping) -> Result<Vec<serde_json::Value>, FieldError> {
    let object = serde_json::to_value(Value::Mapping(mapping))
        .map_err(|e| FieldError::new("kubernetes object", "", format!("is not representable as JSON: {e}")))?;
    if object["kind"] == "List" {
        return Ok(object["items"].as_array().cloned().unwrap_or_default());
    }
    Ok(vec![object])
}

/// Turns one `kind:`-tagged mapping into a resource. `position` counts resources in the file from 1
/// and names a resource that has no name yet.
fn parse_resource(mut mapping: Mapping, position: usize) -> Result<Resource, FieldError> {
    let unnamed = format!("resource #{position}");
    let kind = match mapping.remove("kind") {
        Some(Value::String(kind)) => {
            kind.parse::<Kind>().map_err(|e| FieldError::new(&unnamed, "kind", e.to_string()))?
        }
        Some(other) => {
            return Err(FieldError::new(unnamed, "kind", format!("must be a string, found {}", type_name(&other))));
        }
        None => return Err(FieldError::new(unnamed, "kind", "is required")),
    };
    let name_field = if kind == Kind::Endpoints { "cluster" } else { "name" };
    let subject = match mapping.get(name_field) {
        Some(Value::String(name)) => describe(kind, name),
        _ => format!("{} #{position}", kind.noun()),
    };
    let value = Value::Mapping(mapping);
    let resource = match kind {
        Kind::Listener => Resource::Listener(deserialize(value, &subject)?),
        Kind::RouteTable => Resource::RouteTable(deserialize(value, &subject)?),
        Kind::AuthorizationPolicy => Resource::AuthorizationPolicy(deserialize(value, &subject)?),
        Kind::Cluster => Resource::Cluster(deserialize(value, &subject)?),
        Kind::Endpoints => Resource::Endpoints(deserialize(value, &subject)?),
    };
    Ok(resource)
}

/// Deserializes a message from YAML, naming the field path on failure.
fn deserialize<T: DeserializeOwned>(value: Value, subject: &str) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." { String::new() } else { path };
        let message = explain(&field, error.into_inner().to_string());
        FieldError::new(subject, field, message)
    })
}

/// pbjson's messages for numbers and durations describe its parser, not the field; say what the
/// field expects instead.
fn explain(field: &str, message: String) -> String {
    let last = field.rsplit('.').next().unwrap_or(field);
    if last.ends_with("timeout") || last.ends_with("_time") {
        format!("{message} (a duration is seconds with an `s` suffix, e.g. `30s` or `0.25s`)")
    } else if message.contains("untagged enum") {
        "must be a whole number in the field's range".to_owned()
    } else {
        message
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

fn describe_key(key: &Value) -> String {
    match key {
        Value::String(key) => key.clone(),
        other => format!("<{}>", type_name(other)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn error_text(yaml: &str) -> String {
        parse(yaml, "test.yaml").expect_err("config should be rejected").to_string()
    }

    #[test]
    fn a_file_larger_than_the_limit_is_refused_after_reading_the_limit() {
        let error = read_text(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("larger than the 64 MiB"), "{error}");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "kind: Cluster\nname: a\n").unwrap();
        assert_eq!(read_text(file.path()).unwrap(), "kind: Cluster\nname: a\n");
    }

    #[test]
    fn an_alias_bomb_is_a_syntax_error_of_the_file() {
        let text = format!("kind: Cluster\nname: a\n---\n{}", crate::testing::alias_bomb(10_000));
        let error = parse(&text, "bomb.yaml").unwrap_err();
        assert!(matches!(error, ConfigError::Syntax { .. }));
        assert!(
            error.to_string().starts_with("bomb.yaml: b[")
                && error.to_string().contains("the text expands past its limit"),
            "{error}"
        );
    }

    #[test]
    fn reads_bootstrap_and_resources_in_both_document_shapes() {
        let file = parse(
            r#"
bootstrap:
  admin_address: 127.0.0.1:9901
  workers: 2
  drain_time: 2.5s
resources:
  - kind: Listener
    name: web
    address: 127.0.0.1:8080
    protocol: http1
    route_tables: [shop]
---
kind: Endpoints
cluster: shop
endpoints:
  - address: 127.0.0.1:9000
    weight: 3
"#,
            "test.yaml",
        )
        .unwrap();
        let bootstrap = file.bootstrap.unwrap();
        assert_eq!(bootstrap.admin_address, "127.0.0.1:9901");
        assert_eq!(bootstrap.workers, 2);
        assert_eq!(bootstrap.drain_time.unwrap().nanos, 500_000_000);
        assert_eq!(file.resources.len(), 2);
        let Resource::Listener(listener) = &file.resources[0] else { panic!("not a listener") };
        assert_eq!(listener.protocol(), v1::listener::Protocol::Http1);
        let Resource::Endpoints(endpoints) = &file.resources[1] else { panic!("not endpoints") };
        assert_eq!(endpoints.endpoints[0].weight, Some(3));
    }

    #[test]
    fn unknown_field_names_resource_and_field() {
        let text = error_text("kind: Listener\nname: web\naddress: 127.0.0.1:1\nprotocl: http1\n");
        assert!(text.starts_with("test.yaml: listener \"web\":"), "{text}");
        assert!(text.contains("unknown field `protocl`"), "{text}");
    }

    #[test]
    fn bad_enum_value_names_the_field_path() {
        let text = error_text("kind: Listener\nname: web\naddress: 127.0.0.1:1\nprotocol: htp1\n");
        assert!(text.contains("listener \"web\": protocol:"), "{text}");
        assert!(text.contains("htp1"), "{text}");
    }

    #[test]
    fn nested_errors_carry_the_whole_path() {
        let text = error_text(
            "kind: RouteTable\nname: shop\nroutes:\n  - match:\n      path:\n        prefx: /a\n    backends: [{cluster: c}]\n",
        );
        assert!(text.contains("route table \"shop\": routes[0].match.path"), "{text}");
        assert!(text.contains("prefx"), "{text}");
    }

    #[test]
    fn bad_duration_is_rejected() {
        let text = error_text("bootstrap:\n  drain_time: 5 minutes\n");
        assert!(text.contains("bootstrap: drain_time:"), "{text}");
        assert!(text.contains("e.g. `30s`"), "{text}");
    }

    #[test]
    fn bad_number_says_what_the_field_takes() {
        let text = error_text("kind: Endpoints\ncluster: c\nendpoints: [{address: 1.2.3.4:5, weight: -1}]\n");
        assert_eq!(
            text,
            "test.yaml: endpoints \"c\": endpoints[0].weight: must be a whole number in the field's range"
        );
    }

    #[test]
    fn unknown_kind_and_top_level_keys_are_rejected() {
        assert!(error_text("kind: Gateway\nname: x\n").contains("unknown kind \"Gateway\""));
        assert!(error_text("listeners: []\n").contains("unknown top-level field"));
        assert!(error_text("- a\n- b\n").contains("must be a mapping"));
        assert!(error_text("bootstrap: {}\n---\nbootstrap: {}\n").contains("more than once"));
    }

    /// A mixed file gives Kubernetes documents back as JSON (a `List` item by item) and reads the
    /// rest as Remora's; a proxy's own file has no place for them.
    #[test]
    fn kubernetes_documents_are_set_aside_in_mixed_files_only() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n---\nkind: Cluster\nname: web\n---\napiVersion: v1\nkind: List\nitems: [{apiVersion: v1, kind: Pod, metadata: {name: a}}, {apiVersion: v1, kind: Pod, metadata: {name: b}}]\n";
        let mixed = parse_mixed(text, "t").unwrap();
        assert_eq!(mixed.config.resources.len(), 1);
        let names: Vec<&str> = mixed.kubernetes.iter().filter_map(|o| o["metadata"]["name"].as_str()).collect();
        assert_eq!(names, ["web", "a", "b"]);
        assert_eq!(mixed.kubernetes[0]["spec"]["ports"][0]["port"], 80);
        assert!(parse(text, "t").is_err(), "a proxy's file holds Remora's documents only");
    }

    #[test]
    fn syntax_errors_keep_the_position() {
        let text = error_text("kind: Listener\n  name: [unclosed\n");
        assert!(text.contains("line"), "{text}");
    }

    #[test]
    fn empty_documents_are_fine() {
        assert_eq!(parse("", "x").unwrap(), ConfigFile::default());
        assert_eq!(parse("---\n---\n", "x").unwrap(), ConfigFile::default());
    }
}

//! The resource kinds as one tagged union.
//!
//! A [`Resource`] is what a config file, a GitOps directory or the control-plane stream hands a
//! proxy: one listener, route table, cluster, endpoint set or authorization policy. Its [`Kind`] names it in YAML (`kind:`),
//! in error messages, and on the wire (`type.googleapis.com/remora.v1.<Kind>`).
//! An [`Encoded`] is a resource held at rest: its protobuf bytes, decoded when it is compiled or
//! shown.

use std::fmt;
use std::str::FromStr;

use prost::Message;

use crate::v1;

/// Why an `Any` did not hold a resource.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The type URL names no kind.
    #[error("type {0:?} is not a Remora resource type")]
    Type(String),
    /// The bytes are not a valid message of the kind.
    #[error("not a valid {0} message: {1}")]
    Protobuf(Kind, prost::DecodeError),
    /// A field holds a value this version does not know (an enum's number past its variants, from a
    /// newer control plane): refused, as a value prost would otherwise read as the default.
    #[error("{subject}: {within}holds a value this version does not know ({message})")]
    Unknown {
        /// The resource (`route table "web"`).
        subject: String,
        /// The path of the message that holds the field, with a colon (`routes[0].retry: `); empty
        /// for a field of the resource itself.
        within: String,
        /// What the serializer said of it (`Invalid variant 40`).
        message: String,
    },
}

/// The kinds of resource, in the order the control plane pushes them (a cluster before the endpoints
/// that fill it, both before the listeners and routes that use them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// [`v1::Cluster`]
    Cluster,
    /// [`v1::Endpoints`]
    Endpoints,
    /// [`v1::AuthorizationPolicy`]: pushed before the listeners it guards, so a new listener never
    /// serves a moment without its policy.
    AuthorizationPolicy,
    /// [`v1::Listener`]
    Listener,
    /// [`v1::RouteTable`]
    RouteTable,
}

impl Kind {
    /// How many kinds there are.
    pub const COUNT: usize = Kind::ALL.len();

    /// Every kind, in push order.
    pub const ALL: [Kind; 5] =
        [Kind::Cluster, Kind::Endpoints, Kind::AuthorizationPolicy, Kind::Listener, Kind::RouteTable];

    /// The name used in YAML's `kind:` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Cluster => "Cluster",
            Kind::Endpoints => "Endpoints",
            Kind::Listener => "Listener",
            Kind::RouteTable => "RouteTable",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// The protobuf `Any` type URL of the kind.
    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Cluster => "type.googleapis.com/remora.v1.Cluster",
            Kind::Endpoints => "type.googleapis.com/remora.v1.Endpoints",
            Kind::Listener => "type.googleapis.com/remora.v1.Listener",
            Kind::RouteTable => "type.googleapis.com/remora.v1.RouteTable",
            Kind::AuthorizationPolicy => "type.googleapis.com/remora.v1.AuthorizationPolicy",
        }
    }

    /// The kind a protobuf `Any` type URL names, if any.
    pub fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.type_url() == url)
    }

    /// The position of the kind in push order (0 for clusters).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The lowercase word used in error messages (`route table "shop"`).
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Cluster => "cluster",
            Kind::Endpoints => "endpoints",
            Kind::Listener => "listener",
            Kind::RouteTable => "route table",
            Kind::AuthorizationPolicy => "authorization policy",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `kind:` value that names no kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind {0:?} (expected Listener, RouteTable, Cluster, Endpoints or AuthorizationPolicy)")]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL.into_iter().find(|kind| kind.as_str() == s).ok_or_else(|| UnknownKind(s.to_owned()))
    }
}

/// One resource of any kind.
// A Cluster with all its policy messages inline is a few hundred bytes; resources are config, held
// by the hundred or thousand, never per request, so boxing it would buy nothing but a deref at
// every match.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    /// A socket to accept on.
    Listener(v1::Listener),
    /// HTTP routes for a set of destinations.
    RouteTable(v1::RouteTable),
    /// A group of interchangeable endpoints.
    Cluster(v1::Cluster),
    /// The addresses behind one cluster.
    Endpoints(v1::Endpoints),
    /// Who may call an inbound listener.
    AuthorizationPolicy(v1::AuthorizationPolicy),
}

/// So that a set of resources may be given as values or as shared references (`Arc<Resource>`).
impl AsRef<Resource> for Resource {
    fn as_ref(&self) -> &Resource {
        self
    }
}

impl Resource {
    /// The resource's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Listener(_) => Kind::Listener,
            Resource::RouteTable(_) => Kind::RouteTable,
            Resource::Cluster(_) => Kind::Cluster,
            Resource::Endpoints(_) => Kind::Endpoints,
            Resource::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    /// The resource's name, unique within its kind. An endpoint set is named by its cluster.
    pub fn name(&self) -> &str {
        match self {
            Resource::Listener(listener) => &listener.name,
            Resource::RouteTable(table) => &table.name,
            Resource::Cluster(cluster) => &cluster.name,
            Resource::Endpoints(endpoints) => &endpoints.cluster,
            Resource::AuthorizationPolicy(policy) => &policy.name,
        }
    }

    /// A message of `kind` from its protobuf bytes.
    fn decode(kind: Kind, bytes: &[u8]) -> Result<Resource, DecodeError> {
        let decoded = match kind {
            Kind::Listener => v1::Listener::decode(bytes).map(Resource::Listener),
            Kind::RouteTable => v1::RouteTable::decode(bytes).map(Resource::RouteTable),
            Kind::Cluster => v1::Cluster::decode(bytes).map(Resource::Cluster),
            Kind::Endpoints => v1::Endpoints::decode(bytes).map(Resource::Endpoints),
            Kind::AuthorizationPolicy => v1::AuthorizationPolicy::decode(bytes).map(Resource::AuthorizationPolicy),
        };
        decoded.map_err(|e| DecodeError::Protobuf(kind, e))
    }

    /// The message's size encoded.
    fn encoded_len(&self) -> usize {
        match self {
            Resource::Listener(r) => r.encoded_len(),
            Resource::RouteTable(r) => r.encoded_len(),
            Resource::Cluster(r) => r.encoded_len(),
            Resource::Endpoints(r) => r.encoded_len(),
            Resource::AuthorizationPolicy(r) => r.encoded_len(),
        }
    }

    /// Appends the message's protobuf bytes to `buffer` (which has room: `encoded_len`).
    fn encode_into(&self, buffer: &mut bytes::BytesMut) {
        // Encoding fails only for want of room, and `BytesMut` grows.
        let _ = match self {
            Resource::Listener(r) => r.encode(buffer),
            Resource::RouteTable(r) => r.encode(buffer),
            Resource::Cluster(r) => r.encode(buffer),
            Resource::Endpoints(r) => r.encode(buffer),
            Resource::AuthorizationPolicy(r) => r.encode(buffer),
        };
    }

    /// The resource in protobuf form, wrapped in an `Any` with the kind's type URL.
    pub fn to_any(&self) -> pbjson_types::Any {
        let mut value = bytes::BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut value);
        pbjson_types::Any { type_url: self.kind().type_url().to_owned(), value: value.freeze() }
    }

    /// Decodes a resource from an `Any`, whose type URL must name one of the kinds.
    pub fn from_any(any: &pbjson_types::Any) -> Result<Resource, DecodeError> {
        let kind = Kind::from_type_url(&any.type_url).ok_or_else(|| DecodeError::Type(any.type_url.clone()))?;
        let resource = Resource::decode(kind, &any.value)?;
        resource.known_values()?;
        Ok(resource)
    }

    /// Checks that every field holds a value this version knows, by writing the resource's JSON form
    /// to nowhere: pbjson refuses an enum number past the enum's variants, naming it.
    fn known_values(&self) -> Result<(), DecodeError> {
        let mut sink = serde_json::Serializer::new(std::io::sink());
        let written = match self {
            Resource::Listener(r) => serde_path_to_error::serialize(r, &mut sink),
            Resource::RouteTable(r) => serde_path_to_error::serialize(r, &mut sink),
            Resource::Cluster(r) => serde_path_to_error::serialize(r, &mut sink),
            Resource::Endpoints(r) => serde_path_to_error::serialize(r, &mut sink),
            Resource::AuthorizationPolicy(r) => serde_path_to_error::serialize(r, &mut sink),
        };
        written.map_err(|error| {
            let within = match error.path().to_string() {
                path if path == "." => String::new(),
                path => format!("{path}: "),
            };
            DecodeError::Unknown {
                subject: describe(self.kind(), self.name()),
                within,
                message: error.inner().to_string(),
            }
        })
    }

    /// The resource in its YAML/JSON form: the message's fields with `kind` first.
    pub fn to_json(&self) -> serde_json::Value {
        let fields = match self {
            Resource::Listener(r) => serde_json::to_value(r),
            Resource::RouteTable(r) => serde_json::to_value(r),
            Resource::Cluster(r) => serde_json::to_value(r),
            Resource::Endpoints(r) => serde_json::to_value(r),
            Resource::AuthorizationPolicy(r) => serde_json::to_value(r),
        };
        let mut object = serde_json::Map::new();
        object.insert("kind".into(), self.kind().as_str().into());
        // pbjson's serializers fail only on an enum number past its variants, which decoding
        // refuses (`from_any`) and YAML cannot write; an empty object is still a truthful dump of
        // such a resource's kind.
        if let Ok(serde_json::Value::Object(fields)) = fields {
            object.extend(fields);
        }
        serde_json::Value::Object(object)
    }
}

/// A resource kept at rest in its protobuf form, with its kind and name at hand.
///
/// A decoded message carries room for every optional part it leaves out, and every string and list
/// in it is an allocation of its own: a cluster with five endpoints and a route took about 1.7 kB
/// decoded, and about 150 bytes encoded. A proxy keeps what serves (for `/config_dump`, and to
/// compose the control plane's resources with its file's) encoded, and decodes it only to compile
/// it or to show it. [`Encoded::all`] encodes a set into one buffer that its resources share,
/// each resource's name right before its protobuf bytes, so a config held at rest is a single
/// allocation beside the list of its resources.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    kind: Kind,
    /// How many of `bytes`' first bytes are the name; the protobuf bytes follow.
    name_len: u32,
    bytes: bytes::Bytes,
}

impl Encoded {
    /// Encodes `resources` into one buffer, in order.
    pub fn all<'a>(resources: impl IntoIterator<Item = &'a Resource>) -> Vec<Encoded> {
        let resources: Vec<&Resource> = resources.into_iter().collect();
        let total: usize = resources.iter().map(|r| r.name().len() + r.encoded_len()).sum();
        let mut buffer = bytes::BytesMut::with_capacity(total);
        let mut ends = Vec::with_capacity(resources.len());
        for resource in &resources {
            buffer.extend_from_slice(resource.name().as_bytes());
            resource.encode_into(&mut buffer);
            ends.push(buffer.len());
        }
        let buffer = buffer.freeze();
        let mut start = 0;
        resources
            .iter()
            .zip(ends)
            .map(|(resource, end)| {
                let bytes = buffer.slice(start..end);
                start = end;
                // Names are validated to be short (a DNS-like name, a path): far below 4 GiB.
                let name_len = u32::try_from(resource.name().len()).unwrap_or(u32::MAX);
                Encoded { kind: resource.kind(), name_len, bytes }
            })
            .collect()
    }

    /// The resource's kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The resource's name, unique within its kind.
    pub fn name(&self) -> &str {
        // Written from a `&str` by `all`: always UTF-8, always in range.
        self.bytes.get(..self.name_len as usize).and_then(|name| std::str::from_utf8(name).ok()).unwrap_or_default()
    }

    /// Its protobuf bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(self.name_len as usize..).unwrap_or_default()
    }

    /// Its size encoded, in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether it encodes to nothing (a resource with every field at its default).
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }

    /// The resource, decoded.
    pub fn decode(&self) -> Result<Resource, DecodeError> {
        Resource::decode(self.kind, self.as_bytes())
    }

    /// The resource in its YAML/JSON form (see [`Resource::to_json`]). Bytes this proxy encoded
    /// itself always decode; were they not to, the dump says so in place of the fields.
    pub fn to_json(&self) -> serde_json::Value {
        match self.decode() {
            Ok(resource) => resource.to_json(),
            Err(error) => serde_json::json!({
                "kind": self.kind.as_str(),
                "name": self.name(),
                "error": error.to_string(),
            }),
        }
    }
}

/// `listener "outbound"`: how a resource is named in messages.
pub fn describe(kind: Kind, name: &str) -> String {
    format!("{} {name:?}", kind.noun())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in Kind::ALL {
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
            assert!(kind.type_url().ends_with(kind.as_str()));
            assert_eq!(Kind::from_type_url(kind.type_url()), Some(kind));
            assert_eq!(Kind::ALL[kind.index()], kind);
        }
        assert!("listener".parse::<Kind>().is_err());
    }

    /// A set held encoded shares one buffer, keeps each resource's kind and name, decodes to what
    /// was given, and dumps the same JSON as the decoded resource.
    #[test]
    fn resources_held_encoded_share_one_buffer_and_decode_as_given() {
        let given = vec![
            Resource::Cluster(v1::Cluster { name: "web".into(), ..Default::default() }),
            Resource::Endpoints(v1::Endpoints {
                cluster: "web".into(),
                endpoints: vec![v1::Endpoint { address: "10.0.0.1:80".into(), ..Default::default() }],
            }),
            Resource::RouteTable(v1::RouteTable { name: "empty".into(), ..Default::default() }),
        ];
        let held = Encoded::all(&given);
        assert_eq!(held.len(), 3);
        for (encoded, resource) in held.iter().zip(&given) {
            assert_eq!((encoded.kind(), encoded.name()), (resource.kind(), resource.name()));
            assert_eq!(&encoded.decode().unwrap(), resource);
            assert_eq!(encoded.to_json(), resource.to_json());
            assert_eq!(encoded.as_bytes(), &resource.to_any().value[..]);
        }
        // Names and bytes, one resource after another, in one buffer.
        let start = held[0].name().as_ptr() as usize;
        let total: usize = held.iter().map(|e| e.name().len() + e.len()).sum();
        for encoded in &held {
            for (what, at, len) in [
                ("name", encoded.name().as_ptr() as usize, encoded.name().len()),
                ("bytes", encoded.as_bytes().as_ptr() as usize, encoded.len()),
            ] {
                assert!(
                    at >= start && at - start + len <= total,
                    "{}'s {what} is not in the shared buffer",
                    encoded.name()
                );
            }
        }
        // Held by the thousand: a kind, the name's length and a view of the buffer.
        assert!(std::mem::size_of::<Encoded>() <= 40, "{}", std::mem::size_of::<Encoded>());
    }

    /// An enum number past the enum's variants (a newer control plane's) is refused, naming the
    /// field, instead of being read as the default.
    #[test]
    fn unknown_enum_values_are_refused_naming_the_field() {
        let table = v1::RouteTable { name: "web".into(), direction: 40, ..Default::default() };
        let error = Resource::from_any(&Resource::RouteTable(table).to_any()).unwrap_err();
        assert_eq!(
            error.to_string(),
            r#"route table "web": holds a value this version does not know (Invalid variant 40)"#
        );
        let endpoint = v1::Endpoint { address: "10.0.0.1:80".into(), health: 99, ..Default::default() };
        let nested = v1::Endpoints { cluster: "web".into(), endpoints: vec![endpoint] };
        let error = Resource::from_any(&Resource::Endpoints(nested).to_any()).unwrap_err().to_string();
        assert!(error.starts_with(r#"endpoints "web": endpoints[0]: holds a value"#), "{error}");
        let fine = Resource::RouteTable(v1::RouteTable { name: "web".into(), ..Default::default() });
        assert_eq!(Resource::from_any(&fine.to_any()).unwrap(), fine);
    }
}

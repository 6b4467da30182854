//! YAML text to values, with a bound on what the text may expand to.
//!
//! A YAML alias repeats the node its anchor names, so a short text can describe a huge value: 140 kB
//! holding one anchored 10,000-item list referenced 10,000 times is 10^8 nodes once built. The YAML
//! parser's own repetition limit counts alias jumps, not the nodes each jump repeats, so it stops
//! the classic "billion laughs" but not this, and building the value exhausts memory: a sidecar
//! given such a file as a reload would die, and die again at every restart while the file stays.
//!
//! Every YAML document Remora reads (the proxy's config file, `remora validate`, the control plane's
//! directory, `remora inject`'s manifests) is built here instead, by [`documents`] or [`value`]. Each
//! node built spends from a budget set by the text's length ([`budget_for`]): [`NODE_COST`] per node
//! plus the bytes of its string. A text without aliases costs far less than its budget; a text whose
//! aliases would expand past it is refused with an error saying so, before the value is built, and
//! the memory spent on the way is bounded by the budget. Nesting deeper than the parser's 128 levels
//! is refused by the parser itself.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use serde_yaml_ng::value::{Tag, TaggedValue};
use serde_yaml_ng::{Mapping, Value};

/// What a text may expand to whatever its length: 16 MiB of built values.
pub const EXPANSION_FLOOR: usize = 16 * 1024 * 1024;

/// What each byte of text adds to the budget. A node takes a few bytes of text and
/// [`NODE_COST`] bytes once built, so a text without aliases stays well inside.
pub const EXPANSION_PER_BYTE: usize = 64;

/// What one node costs from the budget (besides its string's bytes): the size of a built value.
pub const NODE_COST: usize = size_of::<Value>();

/// The budget of a text `length` bytes long, in bytes of built values.
pub fn budget_for(length: usize) -> usize {
    EXPANSION_FLOOR.saturating_add(length.saturating_mul(EXPANSION_PER_BYTE))
}

/// Every document of `text`, in order, built within the text's budget (shared by all its documents).
/// An empty document is `Value::Null`.
pub fn documents(text: &str) -> Result<Vec<Value>, serde_yaml_ng::Error> {
    let budget = Cell::new(budget_for(text.len()));
    let mut values = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        values.push(Bounded { budget: &budget }.deserialize(document)?);
    }
    Ok(values)
}

/// The one document of `text`, built within its budget.
pub fn value(text: &str) -> Result<Value, serde_yaml_ng::Error> {
    let budget = Cell::new(budget_for(text.len()));
    Bounded { budget: &budget }.deserialize(serde_yaml_ng::Deserializer::from_str(text))
}

/// Builds one value, spending from `budget` for every node.
#[derive(Clone, Copy)]
struct Bounded<'b> {
    budget: &'b Cell<usize>,
}

impl Bounded<'_> {
    fn spend<E: de::Error>(self, string: usize) -> Result<(), E> {
        let cost = NODE_COST.saturating_add(string);
        match self.budget.get().checked_sub(cost) {
            Some(left) => {
                self.budget.set(left);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "the text expands past its limit once its aliases are repeated (a YAML text may build {} MiB \
                 of values plus {EXPANSION_PER_BYTE} bytes per byte of text)",
                EXPANSION_FLOOR >> 20,
            ))),
        }
    }

    fn scalar<E: de::Error>(self, value: Value) -> Result<Value, E> {
        self.spend(0)?;
        Ok(value)
    }
}

impl<'de> DeserializeSeed<'de> for Bounded<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded<'_> {
    type Value = Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.scalar(Value::Bool(b))
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Value, E> {
        self.scalar(Value::Number(i.into()))
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Value, E> {
        self.scalar(Value::Number(u.into()))
    }

    fn visit_f64<E: de::Error>(self, f: f64) -> Result<Value, E> {
        self.scalar(Value::Number(f.into()))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.spend(s.len())?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.spend(s.len())?;
        Ok(Value::String(s))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.scalar(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.scalar(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Value, A::Error> {
        self.spend(0)?;
        let mut sequence = Vec::new();
        while let Some(item) = items.next_element_seed(self)? {
            sequence.push(item);
        }
        Ok(Value::Sequence(sequence))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Value, A::Error> {
        self.spend(0)?;
        let mut mapping = Mapping::new();
        while let Some(key) = entries.next_key_seed(self)? {
            if mapping.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate entry {}", describe_key(&key))));
            }
            let value = entries.next_value_seed(self)?;
            mapping.insert(key, value);
        }
        Ok(Value::Mapping(mapping))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, tagged: A) -> Result<Value, A::Error> {
        self.spend(0)?;
        let (tag, contents) = tagged.variant::<String>()?;
        if tag.is_empty() {
            return Err(de::Error::custom("empty YAML tag is not allowed"));
        }
        let value = contents.newtype_variant_seed(self)?;
        Ok(Value::Tagged(Box::new(TaggedValue { tag: Tag::new(tag), value })))
    }
}

/// A mapping key as the duplicate-key error names it.
fn describe_key(key: &Value) -> String {
    match key {
        Value::Null => "with null key".into(),
        Value::Bool(b) => format!("with key `{b}`"),
        Value::Number(n) => format!("with key {n}"),
        Value::String(s) => format!("with key {s:?}"),
        Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_) => "in YAML map".into(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::testing::alias_bomb;

    #[test]
    fn plain_documents_build_as_the_parser_builds_them() {
        let text = "kind: Cluster\nname: web\nports: [1, 2.5, true, null, ~]\nnested: {a: {b: [x, !tagged y]}}\n---\n---\nb: 2\n";
        let ours = documents(text).unwrap();
        let theirs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(text)
            .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
            .collect();
        assert_eq!(ours, theirs);
        assert_eq!(value("x: 1").unwrap(), serde_yaml_ng::from_str::<Value>("x: 1").unwrap());
    }

    #[test]
    fn aliases_within_the_budget_are_repeated() {
        let built = value(&alias_bomb(100)).unwrap();
        assert_eq!(built["b"].as_sequence().unwrap().len(), 100);
        assert_eq!(built["b"][99].as_sequence().unwrap().len(), 100);
    }

    #[test]
    fn an_alias_bomb_is_refused_before_it_is_built() {
        // 10^8 nodes (several GiB once built) from 140 kB.
        let text = alias_bomb(10_000);
        assert!(text.len() < 150_000);
        let error = value(&text).unwrap_err().to_string();
        assert!(error.contains("expands past its limit"), "{error}");
        let error = documents(&text).unwrap_err().to_string();
        assert!(error.contains("aliases"), "{error}");
    }

    #[test]
    fn a_long_string_repeated_by_aliases_counts_its_bytes() {
        let long = "x".repeat(1 << 20);
        let mut text = format!("a: &a {long}\nb: [");
        text.push_str(&vec!["*a"; 200].join(","));
        text.push(']');
        assert!(value(&text).unwrap_err().to_string().contains("expands"));
    }

    #[test]
    fn the_budget_is_shared_by_the_documents_of_one_text() {
        let small = alias_bomb(300); // 90,000 nodes: more than a third of the floor once built
        assert!(value(&small).is_ok());
        let three = [small.as_str(); 3].join("---\n");
        assert!(documents(&three).unwrap_err().to_string().contains("expands"));
    }

    #[test]
    fn duplicate_keys_and_deep_nesting_are_refused() {
        let error = value("a: 1\na: 2\n").unwrap_err().to_string();
        assert!(error.contains(r#"duplicate entry with key "a""#), "{error}");
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(value(&deep).unwrap_err().to_string().contains("recursion limit"));
    }
}

//! A user update as a patch, and folding patches (SPEC §6 step 4).
//!
//! An update's `dataFields` either replace top-level keys (shallow, the default) or merge into
//! nested objects (`mergeNestedObjects: true`). A sequence of mixed shallow and deep updates
//! cannot in general be folded into one update with one flag: after a shallow update replaced
//! `a`, a deep update must merge into the *new* `a` but into the *stored* value of other keys.
//! So updates fold into a `Patch`: a tree where each key is either `Set` (replace the value) or
//! `Merge` (apply a nested patch to the object there). Applying the fold of a sequence equals
//! applying the sequence one update at a time, for any stored document, and applying a patch
//! twice equals applying it once (both property-tested): a replay after a crash is harmless.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// What to do with one key of a document.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Replace the value (or add the key).
    Set(Value),
    /// Apply a nested patch to the object at this key (an absent or non-object value counts
    /// as an empty object, as in a deep merge).
    Merge(Patch),
}

/// A folded set of changes to a user's `dataFields`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Patch(pub BTreeMap<String, Op>);

impl Patch {
    /// The patch of one update. `fields` is the update's `dataFields` object.
    pub fn from_update(fields: &Map<String, Value>, merge_nested_objects: bool) -> Patch {
        Patch(
            fields
                .iter()
                .map(|(key, value)| {
                    let op = match value {
                        Value::Object(nested) if merge_nested_objects => {
                            Op::Merge(Patch::from_update(nested, true))
                        }
                        other => Op::Set(other.clone()),
                    };
                    (key.clone(), op)
                })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `self` followed by `next`, as one patch.
    pub fn then(mut self, next: &Patch) -> Patch {
        for (key, op) in &next.0 {
            let combined = match (self.0.remove(key), op) {
                (_, Op::Set(value)) => Op::Set(value.clone()),
                (Some(Op::Set(mut value)), Op::Merge(nested)) => {
                    nested.apply_to_value(&mut value);
                    Op::Set(value)
                }
                (Some(Op::Merge(earlier)), Op::Merge(nested)) => Op::Merge(earlier.then(nested)),
                (None, Op::Merge(nested)) => Op::Merge(nested.clone()),
            };
            self.0.insert(key.clone(), combined);
        }
        self
    }

    /// Applies the patch to a document's `dataFields`.
    pub fn apply(&self, doc: &mut Map<String, Value>) {
        for (key, op) in &self.0 {
            match op {
                Op::Set(value) => {
                    doc.insert(key.clone(), value.clone());
                }
                Op::Merge(nested) => {
                    let slot = doc.entry(key.clone()).or_insert(Value::Null);
                    nested.apply_to_value(slot);
                }
            }
        }
    }

    /// Applies the patch to a value: merges into it if it is an object, else replaces it with
    /// the patch applied to an empty object.
    fn apply_to_value(&self, value: &mut Value) {
        if !value.is_object() {
            *value = Value::Object(Map::new());
        }
        if let Value::Object(map) = value {
            self.apply(map);
        }
    }
}

/// Test support shared with the crates that fold patches: proptest strategies for documents,
/// and shorthands to write documents and updates as `json!` literals.
#[cfg(any(test, feature = "proptest"))]
pub mod testing {
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::Patch;

    /// The object of a `json!` literal (an empty object for anything else).
    pub fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// The patch of an update whose `dataFields` is the `json!` literal `v`.
    pub fn update(v: Value, deep: bool) -> Patch {
        Patch::from_update(&obj(v), deep)
    }

    /// Small JSON values: scalars, and objects over a few keys, a few levels deep (few keys, so
    /// updates often touch the same ones).
    pub fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (0i64..5).prop_map(|n| json!(n)),
            "[a-c]".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 3, |inner| {
            proptest::collection::btree_map("[a-d]", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        })
    }

    /// A `dataFields` object (or a stored profile's).
    pub fn json_object() -> impl Strategy<Value = Map<String, Value>> {
        proptest::collection::btree_map("[a-d]", json_value(), 0..4)
            .prop_map(|m| m.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn shallow_replaces_top_level_keys_and_deep_merges_nested_objects() {
        let stored = json!({"plan": "free", "address": {"city": "Paris", "zip": "75001"}, "n": 1});
        let mut shallow = obj(stored.clone());
        update(json!({"address": {"city": "Lyon"}}), false).apply(&mut shallow);
        assert_eq!(
            Value::Object(shallow),
            json!({"plan": "free", "address": {"city": "Lyon"}, "n": 1})
        );

        let mut deep = obj(stored);
        update(json!({"address": {"city": "Lyon"}, "n": 2}), true).apply(&mut deep);
        assert_eq!(
            Value::Object(deep),
            json!({"plan": "free", "address": {"city": "Lyon", "zip": "75001"}, "n": 2})
        );
    }

    #[test]
    fn shallow_then_deep_cannot_be_one_flag_but_folds_correctly() {
        let stored = json!({"a": {"x": 1, "y": 1}, "b": {"x": 1, "y": 1}});
        let u1 = update(json!({"a": {"x": 2}}), false); // replaces a entirely
        let u2 = update(json!({"a": {"y": 3}, "b": {"y": 3}}), true); // merges into both
        let mut one_by_one = obj(stored.clone());
        u1.apply(&mut one_by_one);
        u2.apply(&mut one_by_one);
        let mut folded = obj(stored);
        u1.clone().then(&u2).apply(&mut folded);
        assert_eq!(folded, one_by_one);
        assert_eq!(
            Value::Object(folded),
            json!({"a": {"x": 2, "y": 3}, "b": {"x": 1, "y": 3}})
        );
    }

    use super::testing::{json_object, obj, update};

    proptest! {
        /// Folding any sequence of shallow/deep updates, then applying once, equals applying
        /// them one by one, for any stored document.
        #[test]
        fn folding_equals_applying_one_by_one(
            stored in json_object(),
            updates in proptest::collection::vec((json_object(), any::<bool>()), 0..6),
        ) {
            let patches: Vec<Patch> = updates.iter().map(|(f, deep)| Patch::from_update(f, *deep)).collect();
            let mut one_by_one = stored.clone();
            for p in &patches {
                p.apply(&mut one_by_one);
            }
            let folded = patches.iter().fold(Patch::default(), |acc, p| acc.then(p));
            let mut at_once = stored;
            folded.apply(&mut at_once);
            prop_assert_eq!(at_once, one_by_one);
        }

        /// A replay applies a patch a second time: that must change nothing.
        #[test]
        fn applying_twice_equals_applying_once(
            stored in json_object(),
            update in json_object(),
            deep in any::<bool>(),
        ) {
            let patch = Patch::from_update(&update, deep);
            let mut once = stored.clone();
            patch.apply(&mut once);
            let mut twice = once.clone();
            patch.apply(&mut twice);
            prop_assert_eq!(twice, once);
        }
    }
}

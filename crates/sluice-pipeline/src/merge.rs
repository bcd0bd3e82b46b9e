//! The merge stage: folding a batch's user updates (SPEC §6 step 4).
//!
//! An update's `dataFields` either replace top-level keys (shallow, the default) or merge into
//! nested objects (`mergeNestedObjects: true`). A sequence of mixed shallow and deep updates
//! cannot in general be folded into one update with one flag: after a shallow update replaced
//! `a`, a deep update must merge into the *new* `a` but into the *stored* value of other keys.
//! So updates fold into a `Patch`: a tree where each key is either `Set` (replace the value) or
//! `Merge` (apply a nested patch to the object there). Applying the fold of a sequence equals
//! applying the sequence one update at a time, for any stored document (property-tested).

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

/// One message of a batch, as the merge stage sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Update { user: String, patch: Patch },
    Event { user: String },
}

/// The merge stage's output for a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Merged {
    /// One folded patch per user that had updates, in order of each user's first update.
    pub updates: Vec<(String, Patch)>,
    /// For each event (by its position in the input), the fold of that user's updates that
    /// come before it in the batch: the profile at the event is the stored profile with this
    /// patch applied.
    pub event_snapshots: Vec<(usize, Patch)>,
}

/// Folds a batch in log order.
pub fn merge(items: &[Item]) -> Merged {
    let mut order: Vec<String> = Vec::new();
    let mut folded: std::collections::HashMap<&str, Patch> = std::collections::HashMap::new();
    let mut event_snapshots = Vec::new();
    for (position, item) in items.iter().enumerate() {
        match item {
            Item::Update { user, patch } => match folded.get_mut(user.as_str()) {
                Some(existing) => *existing = std::mem::take(existing).then(patch),
                None => {
                    order.push(user.clone());
                    folded.insert(user, patch.clone());
                }
            },
            Item::Event { user } => {
                let snapshot = folded.get(user.as_str()).cloned().unwrap_or_default();
                event_snapshots.push((position, snapshot));
            }
        }
    }
    let updates = order
        .into_iter()
        .map(|user| {
            let patch = folded.remove(user.as_str()).unwrap_or_default();
            (user, patch)
        })
        .collect();
    Merged {
        updates,
        event_snapshots,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn update(v: Value, deep: bool) -> Patch {
        Patch::from_update(&obj(v), deep)
    }

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

    #[test]
    fn events_see_the_profile_as_of_their_position() {
        let items = vec![
            Item::Update {
                user: "u".into(),
                patch: update(json!({"seq": 1}), false),
            },
            Item::Event { user: "u".into() },
            Item::Update {
                user: "v".into(),
                patch: update(json!({"seq": 10}), false),
            },
            Item::Update {
                user: "u".into(),
                patch: update(json!({"seq": 2}), false),
            },
            Item::Event { user: "u".into() },
            Item::Event { user: "w".into() },
        ];
        let merged = merge(&items);
        let users: Vec<&str> = merged.updates.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(users, ["u", "v"]);
        assert_eq!(merged.updates[0].1, update(json!({"seq": 2}), false));
        let snapshot = |i: usize| {
            merged
                .event_snapshots
                .iter()
                .find(|(p, _)| *p == i)
                .map(|(_, s)| s.clone())
        };
        assert_eq!(snapshot(1), Some(update(json!({"seq": 1}), false)));
        assert_eq!(snapshot(4), Some(update(json!({"seq": 2}), false)));
        assert_eq!(
            snapshot(5),
            Some(Patch::default()),
            "no update before: the stored profile"
        );
    }

    /// Small JSON values: scalars, and objects over a few keys, a few levels deep.
    fn json_value() -> impl Strategy<Value = Value> {
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

    fn json_object() -> impl Strategy<Value = Map<String, Value>> {
        proptest::collection::btree_map("[a-d]", json_value(), 0..4)
            .prop_map(|m| m.into_iter().collect())
    }

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

        /// Each event's snapshot, applied to the stored profile, is the profile after exactly
        /// the updates of that user that precede the event.
        #[test]
        fn event_snapshots_are_prefix_folds(
            stored in json_object(),
            steps in proptest::collection::vec((0u8..3, proptest::option::of((json_object(), any::<bool>()))), 0..12),
        ) {
            let items: Vec<Item> = steps.iter().map(|(u, update)| match update {
                Some((f, deep)) => Item::Update { user: u.to_string(), patch: Patch::from_update(f, *deep) },
                None => Item::Event { user: u.to_string() },
            }).collect();
            let merged = merge(&items);
            for (position, snapshot) in &merged.event_snapshots {
                let Item::Event { user } = &items[*position] else { panic!("snapshot of a non-event") };
                let mut expected = stored.clone();
                for item in &items[..*position] {
                    if let Item::Update { user: u, patch } = item
                        && u == user { patch.apply(&mut expected); }
                }
                let mut got = stored.clone();
                snapshot.apply(&mut got);
                prop_assert_eq!(got, expected);
            }
            // And the final fold per user is the profile after all that user's updates.
            for (user, patch) in &merged.updates {
                let mut expected = stored.clone();
                for item in &items {
                    if let Item::Update { user: u, patch } = item
                        && u == user { patch.apply(&mut expected); }
                }
                let mut got = stored.clone();
                patch.apply(&mut got);
                prop_assert_eq!(got, expected);
            }
        }
    }
}

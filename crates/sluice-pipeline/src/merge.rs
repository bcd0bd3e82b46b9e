//! The merge stage: folding a batch's user updates (SPEC §6 step 4).
//!
//! Consecutive updates of one user fold into one `Patch` (see `sluice_model::patch` for why a
//! patch and not a merged update). Events in between are not folded away: each gets the fold of
//! its user's updates before it, so the profile "as it stood at that event" can be rebuilt.

pub use sluice_model::patch::{Op, Patch};

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

    use sluice_model::patch::testing::{json_object, update};

    proptest! {
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

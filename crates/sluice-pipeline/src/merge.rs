//! The merge stage: folding a batch's user updates (SPEC §6 step 4).
//!
//! Consecutive updates of one user fold into one `Patch` (see `sluice_model::patch` for why a
//! patch and not a merged update) and one [`Identity`]. Events in between are not folded away:
//! an event that asks for it (one a trigger rule matches) gets the fold of its user's updates
//! before it, so the profile "as it stood at that event" can be rebuilt. This is the only place
//! that folds; the index write and the trigger stage read its output.

use std::collections::HashMap;
use std::hash::Hash;

pub use sluice_model::patch::{Op, Patch};

/// Who a user's updates say the user is, folded in log order: the latest id and email they
/// carried, the latest time one was received, the log position after the last.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Identity<'a> {
    pub user_id: Option<&'a str>,
    pub email: Option<&'a str>,
    pub updated_at: i64,
    /// The log position after the user's last update (`UserUpsert::version`).
    pub version: u64,
}

impl<'a> Identity<'a> {
    /// This identity followed by a later update's.
    fn then(self, later: Identity<'a>) -> Identity<'a> {
        Identity {
            user_id: later.user_id.or(self.user_id),
            email: later.email.or(self.email),
            updated_at: self.updated_at.max(later.updated_at),
            version: self.version.max(later.version),
        }
    }
}

/// One user's updates folded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fold<'a> {
    pub patch: Patch,
    pub identity: Identity<'a>,
}

/// One message of a batch, as the merge stage sees it; `U` names the user.
#[derive(Debug, Clone, PartialEq)]
pub enum Item<'a, U> {
    Update {
        user: U,
        patch: Patch,
        identity: Identity<'a>,
    },
    /// `snapshot`: whether to give this event the fold of its user's updates before it.
    Event { user: U, snapshot: bool },
    /// The user is forgotten: what came before folds into nothing; after it the user starts
    /// anew from no profile.
    Forget { user: U },
}

/// The merge stage's output for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged<'a, U> {
    /// One fold per user that had updates, in order of each user's first update.
    pub updates: Vec<(U, Fold<'a>)>,
    /// For each event that asked for a snapshot (by its position in the input), the fold of
    /// that user's updates before it in the batch (`None`: there were none): the profile at
    /// the event is the stored profile with this fold applied.
    pub event_snapshots: Vec<(usize, Option<Fold<'a>>)>,
}

/// Folds a batch in log order.
pub fn merge<'a, U: Copy + Eq + Hash>(items: &[Item<'a, U>]) -> Merged<'a, U> {
    let mut order: Vec<U> = Vec::new();
    let mut folded: HashMap<U, Fold<'a>> = HashMap::new();
    let mut event_snapshots = Vec::new();
    for (position, item) in items.iter().enumerate() {
        match item {
            Item::Update {
                user,
                patch,
                identity,
            } => match folded.get_mut(user) {
                Some(existing) => {
                    existing.patch = std::mem::take(&mut existing.patch).then(patch);
                    existing.identity = existing.identity.then(*identity);
                }
                None => {
                    order.push(*user);
                    folded.insert(
                        *user,
                        Fold {
                            patch: patch.clone(),
                            identity: *identity,
                        },
                    );
                }
            },
            Item::Event { user, snapshot } => {
                if *snapshot {
                    event_snapshots.push((position, folded.get(user).cloned()));
                }
            }
            Item::Forget { user } => {
                if folded.remove(user).is_some() {
                    order.retain(|u| u != user);
                }
            }
        }
    }
    let updates = order
        .into_iter()
        .map(|user| {
            let fold = folded.remove(&user).unwrap_or_default();
            (user, fold)
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
        let who = |user_id, email, at| Identity {
            user_id,
            email,
            updated_at: at,
            version: at as u64,
        };
        let items = vec![
            Item::Update {
                user: "u",
                patch: update(json!({"seq": 1}), false),
                identity: who(Some("u1"), Some("a@x"), 1),
            },
            Item::Event {
                user: "u",
                snapshot: true,
            },
            Item::Update {
                user: "v",
                patch: update(json!({"seq": 10}), false),
                identity: who(None, None, 3),
            },
            Item::Update {
                user: "u",
                patch: update(json!({"seq": 2}), false),
                identity: who(None, Some("b@x"), 4),
            },
            Item::Event {
                user: "u",
                snapshot: true,
            },
            Item::Event {
                user: "w",
                snapshot: true,
            },
            Item::Event {
                user: "u",
                snapshot: false,
            },
        ];
        let merged = merge(&items);
        let users: Vec<&str> = merged.updates.iter().map(|(u, _)| *u).collect();
        assert_eq!(users, ["u", "v"]);
        assert_eq!(merged.updates[0].1.patch, update(json!({"seq": 2}), false));
        assert_eq!(
            merged.updates[0].1.identity,
            who(Some("u1"), Some("b@x"), 4),
            "the latest id and email each update carried"
        );
        let snapshot = |i: usize| {
            merged
                .event_snapshots
                .iter()
                .find(|(p, _)| *p == i)
                .map(|(_, s)| s.clone())
        };
        let at_1 = snapshot(1).flatten().expect("a fold before the event");
        assert_eq!(at_1.patch, update(json!({"seq": 1}), false));
        assert_eq!(at_1.identity, who(Some("u1"), Some("a@x"), 1));
        let at_4 = snapshot(4).flatten().expect("a fold before the event");
        assert_eq!(at_4.patch, update(json!({"seq": 2}), false));
        assert_eq!(
            snapshot(5),
            Some(None),
            "no update before: the stored profile"
        );
        assert_eq!(snapshot(6), None, "an event that asked for none gets none");
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
            let items: Vec<Item<'_, u8>> = steps.iter().map(|(u, update)| match update {
                Some((f, deep)) => Item::Update { user: *u, patch: Patch::from_update(f, *deep), identity: Identity::default() },
                None => Item::Event { user: *u, snapshot: true },
            }).collect();
            let merged = merge(&items);
            let events = items.iter().filter(|i| matches!(i, Item::Event { .. })).count();
            prop_assert_eq!(merged.event_snapshots.len(), events);
            for (position, snapshot) in &merged.event_snapshots {
                let Item::Event { user, .. } = &items[*position] else { panic!("snapshot of a non-event") };
                let mut expected = stored.clone();
                for item in &items[..*position] {
                    if let Item::Update { user: u, patch, .. } = item
                        && u == user { patch.apply(&mut expected); }
                }
                let mut got = stored.clone();
                if let Some(fold) = snapshot {
                    fold.patch.apply(&mut got);
                }
                prop_assert_eq!(got, expected);
            }
            // And the final fold per user is the profile after all that user's updates.
            for (user, fold) in &merged.updates {
                let mut expected = stored.clone();
                for item in &items {
                    if let Item::Update { user: u, patch, .. } = item
                        && u == user { patch.apply(&mut expected); }
                }
                let mut got = stored.clone();
                fold.patch.apply(&mut got);
                prop_assert_eq!(got, expected);
            }
        }
    }
}

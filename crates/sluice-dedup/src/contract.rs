//! The stash's contract, run by every backend's tests in two phases, so a backend that keeps
//! stashes on disk can be reopened between them (`then` must see what `first` stashed).

use crate::{Dedup, MessageKey, Stash};

const ORG: &str = "acme/welcome";

fn key(id: &str) -> MessageKey<'_> {
    MessageKey {
        org: ORG,
        message_id: id,
    }
}

/// Kept payloads are stashed once (a key repeated in one call finds the first), a look-up
/// stashes nothing, a stash is not a mark.
pub async fn stash_first(store: &dyn Dedup) {
    let found = store
        .stash(&[
            Stash::kept(key("m1"), b"first"),
            Stash::kept(key("m2"), b"other"),
            Stash::kept(key("m1"), b"again"),
            Stash::looked_up(key("m3"), b"only looked up"),
        ])
        .await
        .expect("stash");
    assert_eq!(
        found,
        [None, None, Some(b"first".to_vec()), None],
        "a key repeated in one call finds the payload stashed by the first"
    );
    assert_eq!(
        store.check(&[key("m1")]).await.expect("check"),
        [false],
        "a stash is not a mark"
    );
}

/// After [`stash_first`] on the same store: what was stashed is kept, what was looked up is
/// free, and an unstashed key is free again.
pub async fn stash_then(store: &dyn Dedup) {
    let found = store
        .stash(&[
            Stash::looked_up(key("m1"), b"later"),
            Stash::kept(key("m3"), b"kept now"),
        ])
        .await
        .expect("stash");
    assert_eq!(
        found,
        [Some(b"first".to_vec()), None],
        "a stashed payload is kept; a look-up stashes nothing"
    );
    let found = store
        .stash(&[Stash::looked_up(key("m3"), b"")])
        .await
        .expect("stash");
    assert_eq!(found, [Some(b"kept now".to_vec())]);
    store.unstash(&[key("m1")]).await.expect("unstash");
    let found = store
        .stash(&[Stash::kept(key("m1"), b"new")])
        .await
        .expect("stash");
    assert_eq!(found, [None], "after unstash the key is free");
}

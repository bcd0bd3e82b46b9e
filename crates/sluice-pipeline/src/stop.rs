//! A stop request: one [`Stopper`] asks, any number of [`Stop`]s (clones) see it. A task
//! checks [`Stop::is_requested`] between steps and awaits [`Stop::requested`] beside whatever
//! it waits for, so a stop ends a wait at once. A stopper dropped without asking counts as a
//! stop: nothing is left to ask later.

use tokio::sync::watch;

/// Asks every [`Stop`] made from it to stop.
#[derive(Debug)]
pub struct Stopper(watch::Sender<bool>);

/// Sees the stop request of its [`Stopper`].
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<bool>);

/// A stopper and the first stop it drives.
pub fn channel() -> (Stopper, Stop) {
    let (tx, rx) = watch::channel(false);
    (Stopper(tx), Stop(rx))
}

impl Stopper {
    /// Requests the stop; it stays requested.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }

    /// Another stop driven by this stopper.
    pub fn subscribe(&self) -> Stop {
        Stop(self.0.subscribe())
    }
}

impl Stop {
    /// Whether the stop was requested (or its stopper dropped).
    pub fn is_requested(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Returns once the stop is requested (or its stopper dropped).
    pub async fn requested(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_is_seen_by_every_clone_and_stays_requested() {
        let (stopper, stop) = channel();
        let mut other = stop.clone();
        let mut third = stopper.subscribe();
        assert!(!stop.is_requested());
        let waiting = tokio::spawn(async move { other.requested().await });
        stopper.stop();
        waiting.await.expect("the wait ends");
        third.requested().await;
        assert!(stop.is_requested() && third.is_requested());
    }

    #[tokio::test]
    async fn a_dropped_stopper_is_a_stop() {
        let (stopper, mut stop) = channel();
        drop(stopper);
        assert!(stop.is_requested());
        stop.requested().await;
    }
}

//! forkd's life as the standard gRPC services tell it, and draining.
//!
//! - `grpc.health.v1.Health` reports the overall server (`""`) and
//!   `forkd.v1.Forkd`: NOT_SERVING until the sockets are bound, SERVING
//!   while forkd takes work, NOT_SERVING again from SIGTERM (or SIGINT) on.
//! - Server reflection (`grpc.reflection.v1` and `v1alpha`) lists
//!   `forkd.v1.Forkd` and the health service, from the descriptor set the
//!   build writes.
//! - Draining: on SIGTERM forkd stops taking new work (`Spawn` and
//!   `CreateSeed` answer UNAVAILABLE), lets spawn streams under way finish
//!   for up to the grace period (`--drain-s`), then ends every stream still
//!   open and stops. A second signal stops at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio_stream::Stream;
use tonic::Status;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{info, warn};

/// The service name health reports under, besides the server's `""`.
pub const SERVICE: &str = "forkd.v1.Forkd";

/// Serving, draining, stopped; and the work under way.
pub struct Lifecycle {
    reporter: HealthReporter,
    draining: AtomicBool,
    /// Spawn streams and seed captures under way.
    active: AtomicUsize,
    idle: Notify,
    stopped: watch::Sender<bool>,
    grace: Duration,
}

/// A piece of work forkd waits for when it drains; done when dropped.
pub struct Work(Arc<Lifecycle>);

impl Drop for Work {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Lifecycle {
    /// A lifecycle with `grace` to drain in, and the health service that
    /// reports it (NOT_SERVING until [`Lifecycle::serving`]).
    pub async fn new(
        grace: Duration,
    ) -> (
        Arc<Lifecycle>,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, server) = tonic_health::server::health_reporter();
        for name in ["", SERVICE] {
            reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        let life = Arc::new(Lifecycle {
            reporter,
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            stopped: watch::channel(false).0,
            grace,
        });
        (life, server)
    }

    /// Report SERVING: the sockets are bound and forkd takes work.
    pub async fn serving(&self) {
        for name in ["", SERVICE] {
            self.reporter
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
    }

    /// Begin `what` (a spawn, a capture), unless forkd is draining.
    pub fn admit(self: &Arc<Self>, what: &str) -> Result<Work, Status> {
        // Counted first, then checked: a drain that starts in between
        // sees this work and waits for it.
        self.active.fetch_add(1, Ordering::SeqCst);
        let work = Work(self.clone());
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable(format!(
                "forkd is shutting down and takes no new {what}; try another node"
            )));
        }
        Ok(work)
    }

    /// Whether forkd is draining (no new work).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Work under way.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Wait for SIGTERM or SIGINT, drain, and stop: the servers' shutdown
    /// futures ([`Lifecycle::stopped`]) resolve then.
    pub async fn run(self: Arc<Self>) {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        signal(&mut term).await;
        tokio::select! {
            _ = self.drain() => {}
            _ = signal(&mut term) => warn!("second signal: stopping without waiting for spawns"),
        }
        self.stop().await;
    }

    /// NOT_SERVING, no new work, and wait (up to the grace period) for
    /// the work under way.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        for name in ["", SERVICE] {
            self.reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        info!(
            active = self.active(),
            grace_s = self.grace.as_secs_f64(),
            "draining: no new spawns; waiting for those under way"
        );
        let idle = async {
            loop {
                let notified = self.idle.notified();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(self.grace, idle).await.is_err() {
            warn!(
                active = self.active(),
                "drain grace period over; ending the spawn streams still open"
            );
        }
    }

    /// End every stream and stop the servers.
    async fn stop(&self) {
        self.draining.store(true, Ordering::SeqCst);
        // Health watchers' streams end when their status goes away.
        let mut reporter = self.reporter.clone();
        for name in ["", SERVICE] {
            reporter.clear_service_status(name).await;
        }
        self.stopped.send_replace(true);
    }

    /// Resolves once forkd has stopped (the servers' shutdown signal).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stopped.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// `stream`, ended when forkd stops (a drain's grace period is over).
    pub fn until_stopped<S: Stream + Send + 'static>(&self, stream: S) -> UntilStopped<S> {
        UntilStopped {
            inner: stream,
            stop: Box::pin(self.stopped()),
        }
    }
}

/// SIGINT, or SIGTERM when its handler could be installed.
async fn signal(term: &mut Option<tokio::signal::unix::Signal>) {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        } => {}
    }
}

/// A stream that ends when forkd stops: see [`Lifecycle::until_stopped`].
pub struct UntilStopped<S> {
    inner: S,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl<S: Stream + Unpin> Stream for UntilStopped<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        // What is already there (the last events of a spawn that just
        // ended) still goes out; then the stop ends the stream.
        if let Poll::Ready(item) = Pin::new(&mut self.inner).poll_next(cx) {
            return Poll::Ready(item);
        }
        match self.stop.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Server reflection, v1 and v1alpha (grpcurl, Postman, grpcui and
/// Python's `grpc_reflection` ask one or the other), for `forkd.v1` and
/// `grpc.health.v1`.
pub fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn draining_refuses_new_work_waits_for_old_then_ends_streams() {
        let (life, _health) = Lifecycle::new(Duration::from_secs(30)).await;
        life.serving().await;
        let w = life.admit("spawns").unwrap();
        assert_eq!(life.active(), 1);
        let (tx, rx) = tokio::sync::mpsc::channel::<u32>(4);
        let mut s = life.until_stopped(tokio_stream::wrappers::ReceiverStream::new(rx));
        let l2 = life.clone();
        let drain = tokio::spawn(async move { l2.drain().await });
        // Give the drain time to start, then new work is refused.
        while life.admit("spawns").is_ok() {
            tokio::task::yield_now().await;
        }
        let e = life.admit("spawns").err().unwrap();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(!drain.is_finished());
        tx.send(1).await.unwrap();
        assert_eq!(s.next().await, Some(1));
        drop(w);
        drain.await.unwrap();
        assert_eq!(life.active(), 0);
        tx.send(2).await.unwrap();
        life.stop().await;
        assert_eq!(
            s.next().await,
            Some(2),
            "what was sent before the stop goes out"
        );
        assert_eq!(s.next().await, None, "then open streams end");
        life.stopped().await;
    }

    #[tokio::test]
    async fn the_grace_period_bounds_the_drain() {
        let (life, _health) = Lifecycle::new(Duration::from_millis(50)).await;
        let _w = life.admit("spawns").unwrap();
        tokio::time::timeout(Duration::from_secs(60), life.drain())
            .await
            .unwrap();
        assert_eq!(life.active(), 1);
    }

    #[test]
    fn reflection_knows_both_services() {
        reflection().unwrap();
    }
}

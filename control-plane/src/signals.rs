//! The signals that end a long-running command (`remora control`, `remora register`) gracefully.

/// A future that completes at the first SIGTERM or SIGINT. Fails if the handlers cannot be
/// installed.
pub fn stop() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

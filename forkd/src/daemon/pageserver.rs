//! The page server: other nodes read this node's seeds' page stores over
//! TCP (`remotefork::pager::wire`, `docs/PAGE_PROTOCOL.md`).
//!
//! A connection names one seed and proves its key in the handshake; then
//! it carries pipelined requests of many ranges each. Every request is
//! bounds-checked, and checked against the registry: nothing is served from
//! a dropped seed. A half frame followed by silence times out; a bad frame
//! closes the connection; neither disturbs other connections.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use remotefork::pager::wire::{self, hello_status, read_status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::registry::Registry;

/// Time a client has to finish a frame it started.
const FRAME_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may sit idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Serve page requests on `listener` until the process ends.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "page server accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(reason) = connection(sock, &registry).await {
                info!(%peer, reason, "page channel closed");
            }
        });
    }
}

async fn read_frame(s: &mut TcpStream, buf: &mut [u8], timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, s.read_exact(buf)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("reading: {e}")),
        Err(_) => Err(format!("no complete frame within {timeout:?}")),
    }
}

async fn connection(mut s: TcpStream, registry: &Registry) -> Result<(), String> {
    let _ = s.set_nodelay(true);
    let mut hello = [0u8; wire::HELLO_LEN];
    read_frame(&mut s, &mut hello, FRAME_TIMEOUT).await?;
    let (id, key) = match wire::parse_hello(&hello) {
        Ok(x) => x,
        Err(why) => {
            let _ = s
                .write_all(&wire::hello_answer(hello_status::BAD_HELLO, 0, why))
                .await;
            return Err(why.to_string());
        }
    };
    let Some(seed) = registry.get(&id) else {
        let _ = s
            .write_all(&wire::hello_answer(
                hello_status::UNKNOWN_SEED,
                0,
                &format!("no seed {id} on this node"),
            ))
            .await;
        return Err(format!("unknown seed {id}"));
    };
    let want = wire::key_bytes(&seed.meta.key).unwrap_or([0; 16]);
    // Compare every byte, whatever the first difference.
    if want
        .iter()
        .zip(key.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        != 0
    {
        let _ = s
            .write_all(&wire::hello_answer(
                hello_status::WRONG_KEY,
                0,
                &format!("wrong key for seed {id}"),
            ))
            .await;
        return Err(format!("wrong key for seed {id}"));
    }
    let file = std::sync::Arc::new(
        std::fs::File::open(seed.dir.join(remotefork::image::PAGES_FILE))
            .map_err(|e| format!("opening seed {id}: {e}"))?,
    );
    let size = seed.image_bytes;
    drop(seed);
    s.write_all(&wire::hello_answer(hello_status::OK, size, ""))
        .await
        .map_err(|e| e.to_string())?;
    debug!(seed = %id, "page channel open");

    let mut head = [0u8; 8];
    loop {
        match tokio::time::timeout(IDLE_TIMEOUT, s.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(format!("reading: {e}")),
            Err(_) => return Err("idle".into()),
        }
        let req_id = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let n = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if n == 0 || n > wire::MAX_RANGES {
            let msg = format!(
                "{n} ranges in one request (1 to {} allowed)",
                wire::MAX_RANGES
            );
            reply_error(&mut s, req_id, read_status::TOO_LARGE, &msg).await;
            return Err(msg);
        }
        let mut body = vec![0u8; n as usize * 12];
        read_frame(&mut s, &mut body, FRAME_TIMEOUT).await?;
        let ranges: Vec<(u64, u32)> = body
            .chunks_exact(12)
            .map(|c| {
                (
                    u64::from_le_bytes(c[..8].try_into().unwrap_or([0; 8])),
                    u32::from_le_bytes(c[8..].try_into().unwrap_or([0; 4])),
                )
            })
            .collect();
        if registry.get(&id).is_none() {
            reply_error(
                &mut s,
                req_id,
                read_status::SEED_GONE,
                &format!("seed {id} was dropped"),
            )
            .await;
            return Err(format!("seed {id} dropped"));
        }
        let st = wire::check_ranges(&ranges, size);
        if st != read_status::OK {
            let msg =
                format!("request {req_id}: ranges outside the {size}-byte page store or too large");
            reply_error(&mut s, req_id, st, &msg).await;
            // The request was well formed: the channel stays usable.
            continue;
        }
        let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        // File reads may wait for the disk: not on a runtime worker.
        let f = file.clone();
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut data = vec![0u8; total as usize];
            let mut at = 0usize;
            for (o, l) in &ranges {
                f.read_exact_at(&mut data[at..at + *l as usize], *o)?;
                at += *l as usize;
            }
            Ok(data)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(format!("reader task: {e}"))));
        let data = match read {
            Ok(d) => d,
            Err(e) => {
                reply_error(
                    &mut s,
                    req_id,
                    read_status::READ_ERROR,
                    &format!("reading seed {id}: {e}"),
                )
                .await;
                continue;
            }
        };
        s.write_all(&wire::response_header(
            req_id,
            read_status::OK,
            total as u32,
        ))
        .await
        .map_err(|e| e.to_string())?;
        s.write_all(&data).await.map_err(|e| e.to_string())?;
    }
}

async fn reply_error(s: &mut TcpStream, req_id: u32, status: u8, msg: &str) {
    let _ = s
        .write_all(&wire::response_header(req_id, status, msg.len() as u32))
        .await;
    let _ = s.write_all(msg.as_bytes()).await;
}

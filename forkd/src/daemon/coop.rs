//! The cooperative socket (`--coop-socket`): JSON lines with which a
//! process asks for itself to be captured as a seed (`remotefork::coop`):
//! a forked copy of its calling thread (`pid` is the copy), or, with
//! `"all_threads":true`, the caller itself with all its threads while one
//! of them waits on this connection (`reply_fd`, its number for it).

use tokio::io::AsyncBufReadExt;

use super::{auth, Service};

/// The cooperative socket: one JSON request per line, one answer per line
/// (see `remotefork::coop`).
pub(super) async fn serve_coop(listener: tokio::net::UnixListener, svc: Service) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        // Who is asking: a process may have itself (or what it could
        // ptrace) captured, nothing else.
        let Ok(cred) = stream.peer_cred() else {
            continue;
        };
        let svc = svc.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let answer = match serde_json::from_str::<serde_json::Value>(&line) {
                    Ok(v) if v["op"] == "create_seed" => match v["pid"].as_u64() {
                        Some(pid) => match async {
                            auth::may_ptrace(cred.uid(), cred.gid(), pid as u32)?;
                            let owner = match cred.uid() {
                                0 => String::new(),
                                uid => svc
                                    .state
                                    .auth
                                    .tenant_of_uid(uid)
                                    .map(|t| t.name.clone())
                                    .unwrap_or_default(),
                            };
                            // All threads: the caller itself is captured while
                            // one of its threads waits on `reply_fd` (this
                            // connection) for this answer.
                            let reply_fd = match (v["all_threads"] == true, v["reply_fd"].as_i64()) {
                                (false, _) => None,
                                (true, Some(fd)) if (0..=i32::MAX as i64).contains(&fd) => Some(fd as i32),
                                (true, _) => {
                                    return Err(tonic::Status::invalid_argument(
                                        "an all_threads checkpoint needs reply_fd, the descriptor it waits on",
                                    ))
                                }
                            };
                            svc.create_from_pid(
                                pid as u32,
                                v["name"].as_str().unwrap_or("").to_string(),
                                true,
                                owner,
                                reply_fd,
                                v["drop_fds"] == true,
                            )
                            .await
                        }
                        .await
                        {
                            Ok(s) => serde_json::json!({ "ok": true, "id": s.id, "key": s.key }),
                            Err(e) => serde_json::json!({ "ok": false, "error": e.message() }),
                        },
                        None => {
                            serde_json::json!({ "ok": false, "error": "create_seed needs a pid" })
                        }
                    },
                    Ok(v) => {
                        serde_json::json!({ "ok": false, "error": format!("unknown op {}", v["op"]) })
                    }
                    Err(e) => serde_json::json!({ "ok": false, "error": format!("not JSON: {e}") }),
                };
                let mut out = answer.to_string().into_bytes();
                out.push(b'\n');
                if tokio::io::AsyncWriteExt::write_all(&mut w, &out)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

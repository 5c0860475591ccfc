//! The cooperative socket (`--coop-socket`): JSON lines with which a
//! process asks for itself to be captured as a seed (`remotefork::coop`).

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
                            svc.create_from_pid(
                                pid as u32,
                                v["name"].as_str().unwrap_or("").to_string(),
                                true,
                                owner,
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

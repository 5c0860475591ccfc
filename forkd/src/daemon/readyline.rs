//! Waiting for a command's ready line (`CreateSeed` from a command), and
//! saying why it never came: the command's exit status and the end of its
//! stderr, a hint when the line went to stderr instead of stdout, or one
//! about output buffered in a pipe.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tonic::Status;

/// Lines of the command's stderr kept for the message.
const TAIL_LINES: usize = 20;
/// Bytes of the command's stderr kept for the message, at most.
const TAIL_BYTES: usize = 2048;

/// What the command wrote on stderr: its last lines, and whether one of
/// them was the ready line.
#[derive(Default, Debug)]
pub struct StderrTail {
    lines: VecDeque<String>,
    bytes: usize,
    /// The ready line appeared on stderr.
    pub ready_on_stderr: bool,
}

impl StderrTail {
    fn push(&mut self, line: String, ready: &str) {
        if line.trim() == ready.trim() {
            self.ready_on_stderr = true;
        }
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > TAIL_LINES || (self.bytes > TAIL_BYTES && self.lines.len() > 1) {
            if let Some(l) = self.lines.pop_front() {
                self.bytes -= l.len();
            }
        }
    }

    /// `; its stderr ends: ...` or nothing.
    fn describe(&self) -> String {
        if self.lines.is_empty() {
            return String::new();
        }
        let mut tail: String = self.lines.iter().map(|l| format!("\n  {l}")).collect();
        if tail.len() > TAIL_BYTES {
            let cut = tail.len() - TAIL_BYTES;
            let cut = (cut..tail.len())
                .find(|&i| tail.is_char_boundary(i))
                .unwrap_or(tail.len());
            tail = format!("\n  ...{}", &tail[cut..]);
        }
        format!("; its stderr ends:{tail}")
    }
}

/// Read `r` to its end, keeping the tail.
async fn follow_stderr(
    r: impl AsyncRead + Unpin,
    ready: String,
    tail: std::sync::Arc<std::sync::Mutex<StderrTail>>,
) {
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        tail.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(l, &ready);
    }
}

/// Wait until `child` prints `ready` as a line of its stdout, for up to
/// `timeout`. Its stdout and stderr must be piped; stderr is drained from
/// here on (until the command ends) so the command never blocks on it.
pub async fn wait(
    child: &mut Child,
    argv: &[String],
    ready: &str,
    timeout: Duration,
) -> Result<(), Status> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Status::internal("the command's stdout is not piped"))?;
    let tail = std::sync::Arc::new(std::sync::Mutex::new(StderrTail::default()));
    let stderr_done = child
        .stderr
        .take()
        .map(|e| tokio::spawn(follow_stderr(e, ready.to_string(), tail.clone())));
    let mut lines = BufReader::new(stdout).lines();
    let seen = tokio::time::timeout(timeout, async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.trim() == ready.trim() {
                return true;
            }
        }
        false
    })
    .await;
    match seen {
        Ok(true) => Ok(()),
        Ok(false) => {
            // Its stdout closed: it exited, or is about to. Let it, and let
            // its last stderr lines arrive (bounded: a process it left
            // behind may hold stderr open).
            let status = tokio::time::timeout(Duration::from_secs(2), child.wait())
                .await
                .ok()
                .and_then(Result::ok);
            if let Some(h) = stderr_done {
                let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
            }
            let how = match status {
                Some(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                    (Some(c), _) => format!("exited with status {c}"),
                    (None, Some(sig)) => format!("was killed by signal {sig}"),
                    _ => "ended".to_string(),
                },
                None => "closed its stdout".to_string(),
            };
            let t = tail.lock().unwrap_or_else(|e| e.into_inner());
            Err(Status::failed_precondition(format!(
                "{argv:?} {how} before printing {ready:?} on stdout{}{}",
                stderr_hint(&t, ready),
                t.describe()
            )))
        }
        Err(_) => {
            let t = tail.lock().unwrap_or_else(|e| e.into_inner());
            let hint = if t.ready_on_stderr {
                stderr_hint(&t, ready)
            } else {
                " (if it prints the line, it may sit in a pipe buffer: flush stdout \
                 after it, e.g. print(..., flush=True) or python3 -u)"
                    .to_string()
            };
            Err(Status::deadline_exceeded(format!(
                "{argv:?} did not print {ready:?} on stdout within {timeout:?}{hint}{}",
                t.describe()
            )))
        }
    }
}

fn stderr_hint(t: &StderrTail, ready: &str) -> String {
    if t.ready_on_stderr {
        format!("; it printed {ready:?} on stderr, but forkd reads the ready line from stdout")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Stdio;

    fn sh(script: &str) -> Child {
        tokio::process::Command::new("sh")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    fn argv(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn the_ready_line_on_stdout_is_found() {
        let s = "echo warming; echo ready; sleep 5";
        wait(&mut sh(s), &argv(s), "ready", Duration::from_secs(60))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_early_exit_says_how_and_shows_the_end_of_stderr() {
        let s = "i=0; while [ $i -lt 50 ]; do echo line $i >&2; i=$((i+1)); done; echo Trace: boom >&2; exit 3";
        let e = wait(&mut sh(s), &argv(s), "ready", Duration::from_secs(60))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        let m = e.message();
        assert!(
            m.contains("exited with status 3 before printing \"ready\""),
            "{m}"
        );
        assert!(
            m.ends_with("\n  Trace: boom") && m.contains("line 49"),
            "{m}"
        );
        assert!(!m.contains("line 29\n"), "only the tail: {m}");
    }

    #[tokio::test]
    async fn a_ready_line_on_stderr_is_pointed_out() {
        let s = "echo ready >&2; exit 0";
        let e = wait(&mut sh(s), &argv(s), "ready", Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(
            e.message().contains("printed \"ready\" on stderr"),
            "{}",
            e.message()
        );
        let s = "echo ready >&2; sleep 30";
        let e = wait(&mut sh(s), &argv(s), "ready", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
        assert!(
            e.message().contains("on stderr, but forkd reads"),
            "{}",
            e.message()
        );
        let s = "sleep 30";
        let e = wait(&mut sh(s), &argv(s), "ready", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(e.message().contains("flush stdout"), "{}", e.message());
    }
}

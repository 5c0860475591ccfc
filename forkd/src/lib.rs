//! forkd: the per-node daemon (`forkd serve`), its gRPC API and the client
//! that `forkctl` is built on.

pub mod cli;
pub mod client;
pub mod daemon;
pub mod gateway;
pub mod keeper;

/// The generated gRPC types and service (`proto/forkd.proto`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("forkd.v1");

    /// The encoded `FileDescriptorSet` of `proto/forkd.proto` (for reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/forkd_descriptor.bin"));
}

/// Random hex of `bytes` bytes from the kernel's generator.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Mark every descriptor this process inherited (above stdio) close-on-exec:
/// the commands forkd starts to make seeds must not get them, or their
/// seeds would hold descriptors shared with whatever started forkd (a pipe
/// of the shell, which capture refuses).
pub fn cloexec_inherited_fds() {
    let Ok(rd) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: fcntl on a number; a closed one only fails with EBADF.
        unsafe {
            let f = libc::fcntl(fd, libc::F_GETFD);
            if f >= 0 {
                libc::fcntl(fd, libc::F_SETFD, f | libc::FD_CLOEXEC);
            }
        }
    }
}

//! Socket options the standard library does not expose.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

/// Binds a UDP socket and asks for `size`-byte send and receive buffers: with CAP_NET_ADMIN
/// past the system limit (`SO_*BUFFORCE`), else up to it.
pub fn udp_socket_with_buffers(
    addr: SocketAddr,
    size: usize,
) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    set_buffers(&socket, size);
    Ok(socket)
}

/// Asks for `size`-byte send and receive buffers on a socket: past the system limit with
/// CAP_NET_ADMIN, else up to it.
pub fn set_buffers(socket: &impl AsRawFd, size: usize) {
    let fd = socket.as_raw_fd();
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: setsockopt on a descriptor we own, with a pointer to a live c_int and its size.
        let set = |opt| unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set(force) != 0 {
            set(plain);
        }
    }
}

//! Passing listening sockets from a ztunnel that hands its pods over to the one taking them
//! (`SCM_RIGHTS` over the agent socket), and checking what arrives.
//!
//! Both processes then hold the same listening socket: either accepts from its one queue, and when
//! the old one closes its descriptor the socket stays open, so no connection waiting in it is lost
//! and no third party can join (as it could a `SO_REUSEPORT` group of the same user).

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// The kernel's limit of descriptors in one message (`SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) as usize }
}

/// Sends `bytes` on the Unix stream socket `sock` with `fds` attached (at most
/// [`MAX_FDS_PER_MESSAGE`]). Returns how many bytes went out; the descriptors go with the first.
pub fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    assert!(fds.len() <= MAX_FDS_PER_MESSAGE && !bytes.is_empty());
    // u64 elements keep the buffer aligned for cmsghdr.
    let mut control = vec![0u64; cmsg_space(fds.len()).div_ceil(8)];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut _, iov_len: bytes.len() };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(fds.len()) as _;
        // SAFETY: the control buffer has room for one header and `fds.len()` descriptors.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<RawFd>()) as u32) as _;
            let data = libc::CMSG_DATA(c).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: a valid socket and a fully initialised msghdr.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Receives into `buf` from the Unix stream socket `sock`, appending any descriptors that came
/// with the bytes to `fds` (close-on-exec). A message whose descriptors did not fit is an error.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut control = vec![0u64; cmsg_space(MAX_FDS_PER_MESSAGE).div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: as in `send`.
    let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(MAX_FDS_PER_MESSAGE) as _;
    // SAFETY: a valid socket and buffers that outlive the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walking the control messages the kernel wrote, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("more descriptors arrived than one message may carry"));
    }
    Ok(n as usize)
}

/// Checks that `fd` is a listening TCP socket on `port` inside the network namespace at `netns`,
/// so that a socket handed over can only ever serve the pod it was made for.
pub fn check_listener(fd: BorrowedFd<'_>, netns: &Path, port: u16) -> io::Result<std::net::SocketAddr> {
    let raw = fd.as_raw_fd();
    let int_opt = |level, name| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int into `v`.
        if unsafe { libc::getsockopt(raw, level, name, (&mut v as *mut libc::c_int).cast(), &mut len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(v)
    };
    if int_opt(libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_STREAM
        || int_opt(libc::SOL_SOCKET, libc::SO_PROTOCOL)? != libc::IPPROTO_TCP
        || int_opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 1
    {
        return Err(io::Error::other("not a listening TCP socket"));
    }
    let local = socket2::SockRef::from(&fd).local_addr()?.as_socket();
    let Some(local) = local.filter(|a| a.port() == port) else {
        return Err(io::Error::other(format!("bound to {local:?}, not port {port}")));
    };
    // SIOCGSKNS (linux/sockios.h): a descriptor for the socket's network namespace.
    const SIOCGSKNS: libc::c_ulong = 0x894c;
    // SAFETY: the ioctl takes no argument and returns a new descriptor, which we own.
    let ns = unsafe { libc::ioctl(raw, SIOCGSKNS) };
    if ns < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ns` was just returned to us.
    let ns = unsafe { OwnedFd::from_raw_fd(ns) };
    use std::os::unix::fs::MetadataExt;
    let theirs = std::fs::File::from(ns).metadata()?;
    let ours = std::fs::metadata(netns)?;
    if (theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino()) {
        return Err(io::Error::other(format!("not in the network namespace {}", netns.display())));
    }
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn listeners_cross_a_unix_socket_and_are_checked() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let not_listening = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let sent = send(a.as_fd(), b"three\n", &[l1.as_fd(), l2.as_fd(), not_listening.as_fd()]).unwrap();
        assert_eq!(sent, 6);
        let (mut buf, mut fds) = ([0u8; 64], Vec::new());
        assert_eq!(recv(b.as_fd(), &mut buf, &mut fds).unwrap(), 6);
        assert_eq!(&buf[..6], b"three\n");
        assert_eq!(fds.len(), 3);

        let here = Path::new("/proc/self/ns/net");
        let port = |l: &std::net::TcpListener| l.local_addr().unwrap().port();
        assert_eq!(check_listener(fds[0].as_fd(), here, port(&l1)).unwrap(), l1.local_addr().unwrap());
        // The received descriptor is the same socket: a connection to it is accepted through it.
        let received = std::net::TcpListener::from(fds.remove(1));
        let _c = std::net::TcpStream::connect(l2.local_addr().unwrap()).unwrap();
        assert!(received.accept().is_ok());
        let wrong_port = check_listener(fds[0].as_fd(), here, port(&l1) + 1).unwrap_err();
        assert!(wrong_port.to_string().contains("not"), "{wrong_port}");
        let udp = check_listener(fds[1].as_fd(), here, 0).unwrap_err();
        assert!(udp.to_string().contains("not a listening TCP socket"), "{udp}");
        let elsewhere = check_listener(fds[0].as_fd(), Path::new("/proc/self/ns/uts"), port(&l1)).unwrap_err();
        assert!(elsewhere.to_string().contains("not in the network namespace"), "{elsewhere}");
    }
}

//! systemd's service notification protocol (sd_notify(3)), written out: one datagram
//! per notice to the Unix socket named by `$NOTIFY_SOCKET`, a file-system path or,
//! starting with `@`, an abstract socket name. Without `$NOTIFY_SOCKET` (not started
//! by systemd, or a unit that is not `Type=notify`) every notice is a no-op.
//!
//! Both daemons use it the same way: `READY=1` once they really serve (the server has
//! bound its listener, the agent has loaded its configuration and state), `WATCHDOG=1`
//! at half of `$WATCHDOG_USEC` from a task of their async runtime (so the pings stop
//! when the runtime stops scheduling, and systemd restarts the service), and
//! `STOPPING=1` when a shutdown begins. No libsystemd: the protocol is one `sendto`.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// What a service tells the service manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// Start-up is finished: the service does what it is for.
    Ready,
    /// Still alive (the unit's `WatchdogSec=` counts from here).
    Watchdog,
    /// Shutdown has begun.
    Stopping,
}

impl Notice {
    /// The datagram's text.
    pub fn message(self) -> &'static str {
        match self {
            Notice::Ready => "READY=1",
            Notice::Watchdog => "WATCHDOG=1",
            Notice::Stopping => "STOPPING=1",
        }
    }
}

/// What went wrong talking to the service manager.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an abstract socket name starting with '@'")]
    Address(String),
    #[error("WATCHDOG_USEC {0:?} is not a positive number of microseconds")]
    WatchdogUsec(String),
    #[error("cannot send {notice} to the service manager's socket {socket:?}: {source}")]
    Send { notice: &'static str, socket: String, source: std::io::Error },
}

/// Where notices go (nowhere without `$NOTIFY_SOCKET`) and how often the watchdog
/// wants to hear from this process.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(SocketAddr, String)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd gives a service: `NOTIFY_SOCKET`, `WATCHDOG_USEC`
    /// and `WATCHDOG_PID` (the watchdog applies only to the process it names).
    pub fn from_env() -> Result<Self, NotifyError> {
        let var = |name| std::env::var_os(name);
        Notifier::from_values(var("NOTIFY_SOCKET").as_deref(), var("WATCHDOG_USEC").as_deref(), var("WATCHDOG_PID").as_deref(), std::process::id())
    }

    /// From those variables' values, for process `own_pid`.
    pub fn from_values(socket: Option<&OsStr>, watchdog_usec: Option<&OsStr>, watchdog_pid: Option<&OsStr>, own_pid: u32) -> Result<Self, NotifyError> {
        let target = socket.filter(|s| !s.is_empty()).map(|s| socket_address(s).map(|a| (a, s.to_string_lossy().into_owned()))).transpose()?;
        let for_us = watchdog_pid.is_none_or(|p| p.to_str().and_then(|p| p.parse::<u32>().ok()) == Some(own_pid));
        let watchdog = match watchdog_usec {
            Some(usec) if for_us && target.is_some() => {
                let text = usec.to_string_lossy();
                match text.parse::<u64>() {
                    Ok(n) if n > 0 => Some(Duration::from_micros(n) / 2),
                    _ => return Err(NotifyError::WatchdogUsec(text.into_owned())),
                }
            }
            _ => None,
        };
        Ok(Notifier { target, watchdog })
    }

    /// [`Self::from_env`], or, when the environment is unusable, a notifier that
    /// sends nothing after `report` was told why (a daemon logs it and carries on:
    /// systemd's start timeout then says the rest).
    pub fn from_env_or_report(report: impl FnOnce(NotifyError)) -> Self {
        Notifier::from_env().unwrap_or_else(|e| {
            report(e);
            Notifier { target: None, watchdog: None }
        })
    }

    /// Whether notices go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send [`Notice::Watchdog`]: half of `WATCHDOG_USEC`, or `None`
    /// when the unit has no watchdog for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `notice` (a no-op without `$NOTIFY_SOCKET`).
    pub fn notify(&self, notice: Notice) -> Result<(), NotifyError> {
        let Some((addr, name)) = &self.target else { return Ok(()) };
        let send_err = |source| NotifyError::Send { notice: notice.message(), socket: name.clone(), source };
        let socket = UnixDatagram::unbound().map_err(send_err)?;
        socket.send_to_addr(notice.message().as_bytes(), addr).map_err(send_err)?;
        Ok(())
    }

    /// Sends `notice`; a failure is handed to `report` (a daemon logs it and carries
    /// on serving).
    pub fn notify_or_report(&self, notice: Notice, report: impl FnOnce(NotifyError)) {
        if let Err(e) = self.notify(notice) {
            report(e);
        }
    }

    /// Sends [`Notice::Watchdog`] every [`Self::watchdog_interval`] from a task of the
    /// current tokio runtime, for as long as the runtime runs it (and the returned
    /// guard lives); `None` (no task) without a watchdog.
    pub fn spawn_watchdog(self: &std::sync::Arc<Self>) -> Option<WatchdogTask> {
        let every = self.watchdog?;
        let me = self.clone();
        Some(WatchdogTask(tokio::spawn(async move {
            // The first ping one interval from now, not at once: the service has just
            // said READY=1 and a ping in the same instant tells systemd nothing.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // A failed ping is not retried here: systemd, which stops hearing from
                // this process, is the one to act on it.
                let _ = me.notify(Notice::Watchdog);
            }
        })))
    }
}

/// The watchdog's ping task; dropping this ends it.
#[derive(Debug)]
pub struct WatchdogTask(tokio::task::JoinHandle<()>);

impl Drop for WatchdogTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `/run/systemd/notify` or `@name` (abstract namespace, Linux).
fn socket_address(value: &OsStr) -> Result<SocketAddr, NotifyError> {
    let bytes = value.as_bytes();
    let bad = || NotifyError::Address(value.to_string_lossy().into_owned());
    match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..]).map_err(|_| bad()),
        Some(b'/') => SocketAddr::from_pathname(value).map_err(|_| bad()),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    /// A manager's socket in the abstract namespace, non-blocking, and its
    /// `$NOTIFY_SOCKET` value.
    fn manager(tag: &str) -> (UnixDatagram, String) {
        let name = format!("outpost-sdnotify-{tag}-{}", std::process::id());
        let sock = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        sock.set_nonblocking(true).unwrap();
        (sock, format!("@{name}"))
    }

    fn receive(sock: &UnixDatagram) -> String {
        sock.set_nonblocking(false).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notice arrives");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn notices_reach_a_socket_named_by_path() {
        let dir = std::env::temp_dir().join(format!("outpost-sdnotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_values(Some(path.as_os_str()), None, None, 1).unwrap();
        assert!(n.is_enabled());
        for notice in [Notice::Ready, Notice::Watchdog, Notice::Stopping] {
            n.notify(notice).unwrap();
        }
        assert_eq!([receive(&sock), receive(&sock), receive(&sock)], ["READY=1", "WATCHDOG=1", "STOPPING=1"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notices_reach_an_abstract_socket() {
        let (sock, address) = manager("test");
        let n = Notifier::from_values(os(&address), None, None, 1).unwrap();
        n.notify(Notice::Ready).unwrap();
        assert_eq!(receive(&sock), "READY=1");
    }

    #[test]
    fn without_notify_socket_nothing_is_sent_and_nothing_fails() {
        let n = Notifier::from_values(None, os("1000000"), None, 1).unwrap();
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_interval(), None, "no socket, no watchdog");
        n.notify(Notice::Ready).unwrap();
        assert!(!Notifier::from_values(os(""), None, None, 1).unwrap().is_enabled());
    }

    #[test]
    fn a_socket_nobody_listens_on_is_an_error_naming_it() {
        let path = std::env::temp_dir().join(format!("outpost-sdnotify-none-{}", std::process::id()));
        let n = Notifier::from_values(Some(path.as_os_str()), None, None, 1).unwrap();
        let e = n.notify(Notice::Ready).unwrap_err().to_string();
        assert!(e.contains("READY=1") && e.contains(&*path.to_string_lossy()), "{e}");
    }

    #[test]
    fn relative_and_unknown_addresses_are_refused() {
        for bad in ["notify", "vsock:2:1234"] {
            let e = Notifier::from_values(os(bad), None, None, 1).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn the_watchdog_pings_at_half_its_timeout_and_only_for_its_process() {
        let n = Notifier::from_values(os("@x"), os("30000000"), None, 7).unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        let n = Notifier::from_values(os("@x"), os("30000000"), os("7"), 7).unwrap();
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(15)));
        let n = Notifier::from_values(os("@x"), os("30000000"), os("8"), 7).unwrap();
        assert_eq!(n.watchdog_interval(), None, "WATCHDOG_PID names another process");
        for bad in ["0", "soon", "-5"] {
            let e = Notifier::from_values(os("@x"), os(bad), None, 7).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    // The race CI met: on a multi-threaded runtime the task ran on another worker before
    // the caller's READY=1, and the manager heard WATCHDOG=1 first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_ping_waits_one_interval() {
        let (sock, address) = manager("first");
        // A ping every second (WATCHDOG_USEC of 2 s).
        let n = std::sync::Arc::new(Notifier::from_values(os(&address), os("2000000"), None, 1).unwrap());
        let task = n.spawn_watchdog().expect("a watchdog is configured");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut buf = [0u8; 64];
        assert!(sock.recv(&mut buf).is_err(), "a ping came before one interval had passed");
        drop(task);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_watchdog_task_keeps_pinging() {
        let (sock, address) = manager("watchdog");
        let n = std::sync::Arc::new(Notifier::from_values(os(&address), os("40000"), None, 1).unwrap());
        let task = n.spawn_watchdog().expect("a watchdog is configured");

        let mut pings = Vec::new();
        let mut buf = [0u8; 64];
        let collect = async {
            while pings.len() < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                while let Ok(len) = sock.recv(&mut buf) {
                    pings.push(String::from_utf8_lossy(&buf[..len]).into_owned());
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), collect).await.expect("three pings (every 20 ms) within 10 s");
        assert!(pings.iter().all(|p| p == "WATCHDOG=1"), "{pings:?}");
        drop(task);
        // Dropping the guard ends the pings.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while sock.recv(&mut buf).is_ok() {}
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(sock.recv(&mut buf).is_err(), "no ping after the guard is dropped");
        let none = Notifier::from_values(os(&address), None, None, 1).unwrap();
        assert!(std::sync::Arc::new(none).spawn_watchdog().is_none(), "no WATCHDOG_USEC, no task");
    }
}
